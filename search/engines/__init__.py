"""Search engines over one phase objective: Optuna (default) and KerasTuner.

Entry point: :func:`make_engine` builds an engine from its options, validating every one before
any data is read, and refusing an option the engine cannot honour; ``engine.run(objective,
n_trials, study_name)`` then searches. Both engines sample ``search.space.suggest`` and train
through ``search.engines.objective`` (so through ``search.train``, like the final model).

Each search writes a pointer ``results/searches/<phase>-<cache id>.json`` naming its study;
:func:`best_params` (used by ``make final``) follows the pointer of *its own* cache key and
phase back to the study, so parameters tuned for another backbone, cut or resolution are
never used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from search.errors import UserError
from search.io import read_json, write_json

ENGINES = ("optuna", "kerastuner")
METRIC = "validation accuracy"


class AllTrialsFailed(UserError):
    """Every trial of a search failed: nothing to recommend."""


def make_engine(name: str, *, storage: str | None = None, pruner: str | None = None, oracle: str | None = None,
                heartbeat: int | None = None, seed: int = 0, worker_index: int = 0, progress: bool = True,
                results: str | Path = "results", default_trial: bool | None = None) -> Any:
    """The engine ``name`` with its options checked; an option it cannot honour is an error.

    ``default_trial``: score the phase's documented defaults first in a new study (Optuna
    ``enqueue_trial``; KerasTuner, whose oracles take no first trial, scores them through the
    same objective before the tuner starts); None means yes. The shipping rule
    (:func:`search.selection.decide`) compares the best trial with them."""
    if name == "optuna":
        if oracle is not None:
            raise UserError("--oracle is a KerasTuner option; Optuna takes --pruner (and TPE)")
        from search.engines.optuna_engine import OptunaEngine

        return OptunaEngine(storage=storage, pruner=pruner, heartbeat=heartbeat, seed=seed,
                            worker_index=worker_index, progress=progress, results=results,
                            default_trial=default_trial is not False)
    if name == "kerastuner":
        given = [opt for opt, v in (("--storage", storage), ("--pruner", pruner), ("--heartbeat", heartbeat))
                 if v is not None]
        if given or worker_index:
            raise UserError(f"KerasTuner cannot honour {', '.join(given) or '--worker-index'}: it keeps its "
                            "trials in a folder and stops trials through its oracle (--oracle)")
        from search.engines.kerastuner_engine import KerasTunerEngine

        return KerasTunerEngine(oracle=oracle, seed=seed, progress=progress, results=results,
                                default_trial=default_trial is not False)
    raise UserError(f"unknown engine {name!r}; choose one of {list(ENGINES)}")


def default_study_name(phase: str, cache_id: str) -> str:
    return f"{phase}-{cache_id}"


def pointer_path(results: str | Path, phase: str, cache_id: str) -> Path:
    return Path(results) / "searches" / f"{default_study_name(phase, cache_id)}.json"


def write_pointer(results: str | Path, phase: str, cache_id: str, pointer: dict) -> None:
    write_json(pointer_path(results, phase, cache_id), {"phase": phase, "cache": cache_id, **pointer})


def check_same_budget(study_name: str, recorded: dict | None, budget: dict) -> None:
    """Refuse (:class:`UserError`) to add trials of ``budget`` to a study whose trials ran at
    ``recorded`` (rows, epochs, batch size, ...; None: not recorded, accepted): their values would
    not be comparable, and the best of the mix would ship. The head a phase-2 trial starts from
    is not compared (a later phase-1 search may change it)."""
    import json

    def comparable(b: dict) -> dict:
        return {k: v for k, v in json.loads(json.dumps(b)).items() if k != "head"}

    if recorded is not None and comparable(recorded) != comparable(budget):
        raise UserError(f"study {study_name!r} holds trials of budget {comparable(recorded)}, not this run's "
                        f"{comparable(budget)}: name a new study (--study-name) or run at the study's budget")


def check_outcome(summary: dict) -> dict:
    """Raise :class:`AllTrialsFailed` when a search ran trials and none completed or was pruned."""
    if summary["trials"] and not summary.get("complete") and not summary.get("pruned"):
        reason = summary.get("fail_reason") or "see the log"
        raise AllTrialsFailed(f"all {summary['trials']} trials of {summary['study_name']} failed: {reason}")
    return summary


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
