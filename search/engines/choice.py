"""Which parameters ship: each phase's best trial on a cache key, weighed against its defaults.

Entry point: :func:`resolve_params` (``make final``, and the phase-2 objective's starting head).
:func:`best_params` follows the pointer ``results/searches/<phase>-<cache id>.json`` of *its own*
cache key and phase back to the study, so parameters tuned for another backbone, cut or
resolution are never used; :func:`search.selection.decide` says whether the best beats the
defaults by more than the noise.

A phase-2 search that sampled the tail rate ships under ``auto`` only if its trials trained as
the final's tail does: on every training image for at least the final's epochs (small data,
where a trial is the final's training, cross-validated). On CIFAR-10 a trial trains on 4,000 of
45,000 images for 2 epochs, a budget whose ranking of configurations with the rate among them was
measured not to carry over to the final's training (``results/bench_search.json``,
``phase2_fidelity``, on the default 176-pixel cache: Kendall's tau 0.00 for that budget against
20,000 images x 5 epochs, and at most 0.29 for 2,000 x 4 and 8,000 x 2). A search on such a
budget therefore holds the rate at its default (``TailObjective.space_options``; its budget
records ``search_rate`` false), and with the rate held the same budget ranked the rest with tau
0.69 (``phase2_fidelity_fixed_tail_learning_rate``): its best trial ships under the noise rule
alone. In the
CIFAR-10 effect run before this rule (seed 1, ``results/search_effect.json`` as of commit
4b1dc4e) a phase-2 winner that beat the defaults' trial by 1.4 points at that budget (a tail
rate of 9.6e-5, a tenth of the default's) shipped with a searched head and scored 86.18 % test
against 88.05 % for the defaults; under this rule the same seed shipped the searched head with
the default tail (the file's current cifar10 row). Such a search's best trial ships only when
asked for (``--params study``).
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


def below_final_fidelity(budget: dict | None, train_rows: int | None, tail_epochs: int) -> str | None:
    """Why a phase-2 trial ``budget`` (its rows and epochs, as recorded) trained less than the
    final's tail does (``train_rows`` images, None if unknown, for ``tail_epochs`` epochs), or
    None when it did not, or when the budget was not recorded. (A search on such a budget holds
    the tail rate at its default unless told otherwise, ``TailObjective.space_options``.)"""
    if not budget:
        return None
    rows, epochs = budget.get("rows"), budget.get("max_epochs")
    if epochs is not None and epochs < tail_epochs:
        return f"its trials trained {epochs} epochs, the final's tail trains {tail_epochs}"
    if rows is not None and train_rows is not None and rows < train_rows:
        # (a cross-validated trial's budget counts all its rows: its folds estimate training on them all)
        return f"its trials trained on {rows} of the {train_rows} training images"
    return None


def resolve_params(mode: str | dict, results: str | Path, cache_id: str,
                   phases: tuple[str, ...] | None = None, train_rows: int | None = None,
                   tail_epochs: int | None = None) -> tuple[dict, dict]:
    """``({phase: params}, {phase: provenance})`` for cache ``cache_id``.

    ``mode``: ``"auto"`` (each phase's best trial on this cache key if a search exists and it
    beats the defaults' trial by more than the noise, :func:`search.selection.decide`, and, for
    phase 2, if it sampled the tail rate, its trials trained as the final's tail does
    (:func:`below_final_fidelity`, with the final's ``train_rows`` and ``tail_epochs``, default
    ``FinalConfig.tail_epochs``; a budget recorded before ``search_rate`` counts as sampling it); else the
    defaults), ``"default"``, ``"study"`` (the best trial whatever its margin or budget; error
    if a phase has no search), or a dict ``{phase: params}``. Missing keys are filled from
    ``search.space.DEFAULTS``. A searched phase's provenance holds the ``decision``.
    """
    from search import selection, space
    from search.config import FinalConfig

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
                    budget = found.get("budget") or {}
                    short = below_final_fidelity(budget, train_rows, tail_epochs or FinalConfig.tail_epochs) \
                        if phase == "tail" and budget.get("search_rate", True) else None
                    if decision["ship"] == "search" and short:
                        decision = {**decision, "ship": "default", "why": (
                            f"{decision['why']}; but {short}, a budget whose ranking does not carry over to the "
                            "final's training (results/bench_search.json, phase2_fidelity), so the defaults ship "
                            "(--params study ships the best trial anyway)")}
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
