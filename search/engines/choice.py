"""Which parameters ship: each phase's best trial on a cache key, weighed against its defaults.

Entry point: :func:`resolve_params` (``make final``, and the phase-2 objective's starting head).
:func:`best_params` follows the pointer ``results/searches/<phase>-<cache id>.json`` of *its own*
cache key and phase back to the study, so parameters tuned for another backbone, cut or
resolution are never used; :func:`search.selection.decide` says whether the best beats the
defaults by more than the noise.
"""

from __future__ import annotations

from pathlib import Path

from search.engines.base import pointer_path
from search.errors import UserError
from search.io import read_json


def best_params(results: str | Path, phase: str, cache_id: str) -> tuple[dict, dict]:
    """The best trial of the ``phase`` search on cache ``cache_id``, read from the study itself.

    Returns ``(params, provenance)``, provenance naming engine, study, trial and value.
    Raises UserError when this cache key has no such search.
    """
    path = pointer_path(results, phase, cache_id)
    if not path.exists():
        raise UserError(f"no {phase} search for cache {cache_id} ({path} missing); run `make search` first")
    pointer = read_json(path)
    if pointer["engine"] == "optuna":
        from search.engines import optuna_engine

        return optuna_engine.best_params(pointer["storage"], pointer["study_name"])
    from search.engines import kerastuner_engine

    return kerastuner_engine.best_params(pointer["directory"], pointer["project_name"])


def resolve_params(mode: str | dict, results: str | Path, cache_id: str,
                   phases: tuple[str, ...] | None = None) -> tuple[dict, dict]:
    """``({phase: params}, {phase: provenance})`` for cache ``cache_id``.

    ``mode``: ``"auto"`` (each phase's best trial on this cache key if a search exists and it
    beats the defaults' trial by more than the noise, :func:`search.selection.decide`; else the
    defaults), ``"default"``, ``"study"`` (the best trial whatever its margin; error if a phase
    has no search), or a dict ``{phase: params}``. Missing keys are filled from
    ``search.space.DEFAULTS``. A searched phase's provenance holds the ``decision``.
    """
    from search import selection, space

    params, provenance = {}, {}
    for phase in phases or space.PHASES:
        if isinstance(mode, dict):
            params[phase], provenance[phase] = mode.get(phase, {}), {"source": "given", "values": mode.get(phase, {})}
        elif mode == "default":
            params[phase], provenance[phase] = {}, {"source": "default"}
        else:
            try:
                params[phase], found = best_params(results, phase, cache_id)
                provenance[phase] = {"source": "search", **found}
                if mode == "auto":
                    score, default = found.get("score"), found.get("default_score")
                    decision = selection.decide(
                        selection.Score.from_record(score["value"], score) if score
                        else selection.Score(float(found["value"])),
                        selection.Score.from_record(default["value"], default) if default else None,
                        best_is_default=bool(found.get("best_is_default")))
                    provenance[phase]["decision"] = decision
                    for key in ("score", "default_score"):  # the hits served the decision; not kept
                        if found.get(key):
                            found[key] = {k: v for k, v in found[key].items() if k != "hits"}
                    if decision["ship"] == "default":
                        params[phase] = {}
                        provenance[phase] = {"source": "default", "why": decision["why"], "search": found,
                                             "decision": decision}
            except UserError as exc:
                if mode == "study":
                    raise
                params[phase], provenance[phase] = {}, {"source": "default", "why": str(exc)}
        params[phase] = space.active(phase, space.with_defaults(phase, params[phase]))
    return params, provenance
