"""Which parameters ship: each phase's best trial on a cache key, weighed against its defaults.

Entry point: :func:`resolve_params` (``make final``, and the phase-2 objective's starting head).
:func:`best_params` follows the pointer ``results/searches/<phase>-<cache id>.json`` of *its own*
cache key and phase back to the study, so parameters tuned for another backbone, cut or
resolution are never used; :func:`search.selection.decide` says whether the best beats the
defaults by more than the noise.

A phase-2 search ships under ``auto`` only if its trials trained as the final's tail does: on
every training image for at least the final's epochs (small data, where a trial is the final's
training, cross-validated). On CIFAR-10 a trial trains on 4,000 of 45,000 images for 2 epochs, a
budget that ranks tail rates unlike the final's training (``results/bench_search.json``,
``phase2_fidelity``, on the default 176-pixel cache: Kendall's tau 0.00 against 20,000 images x
5 epochs). With the rate held at its default, as such a search now holds it
(``TailObjective.space_options``), the same budget ranked the rest with tau 0.69
(``phase2_fidelity_fixed_tail_learning_rate``), but mostly by the BN mode (0.32 within one), and
its winners still did not carry over: when they shipped (``results/search_effect_tail_shipped.json``,
commit 438ba6b), both seeds' searches picked no shift and less smoothing and about a tenth of the head
rate, beat the defaults' trial by 0.9 and 1.8 points at the budget, and their finals scored
0.3 and 0.7 points *lower* on validation (0.8900 and 0.8828) than the same searched heads with
the default tail (0.8930 and 0.8898, ``results/search_effect.json`` at e296c16), and 0.4 and 0.2
points lower on test. Before the rate was held, a winner at a tenth of the default rate cost 1.9
points of test (seed 1, ``results/search_effect.json`` as of commit 4b1dc4e). So such a search's
best trial ships only when asked for (``--params study``).
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
    the tail rate at its default unless told otherwise, ``TailObjective.space_options``; its
    best trial still does not ship under ``auto``: module docstring.)"""
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
    phase 2, its trials trained as the final's tail does (:func:`below_final_fidelity`, with the
    final's ``train_rows`` and ``tail_epochs``, default ``FinalConfig.tail_epochs``); else the
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
                    short = below_final_fidelity(found.get("budget"), train_rows,
                                                 tail_epochs or FinalConfig.tail_epochs) if phase == "tail" else None
                    if decision["ship"] == "search" and short:
                        decision = {**decision, "ship": "default", "why": (
                            f"{decision['why']}; but {short}, a budget whose winners did not carry over to the "
                            "final's training (results/bench_search.json, phase2_fidelity; "
                            "results/search_effect_tail_shipped.json), so the defaults ship "
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
