"""What every engine shares: the objective it is handed, the engine it is, the summary it returns.

An engine (``optuna_engine.OptunaEngine``, ``kerastuner_engine.KerasTunerEngine``) implements
:class:`Engine`: ``run(objective, n_trials, study_name=None, timeout=None) -> Summary``. It
samples ``search.space.suggest(objective.phase, source, **objective.space_options)``, calls
``objective.build`` and ``objective.fit``, records the trial's ``objective.last_score``
(``search.selection.Score``) and points ``results/searches/`` at its study.
Nothing here imports an engine's library.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from search.errors import UserError
from search.io import write_json

ENGINES = ("optuna", "kerastuner")
METRIC = "validation accuracy"


class Objective(Protocol):
    """A phase objective (``search.engines.objective``): what an engine trains through."""

    phase: str
    cache_id: str
    max_epochs: int

    @property
    def budget(self) -> dict[str, Any]: ...
    @property
    def space_options(self) -> dict[str, Any]: ...
    def build(self, params: dict[str, Any], seed: int = 0) -> Any: ...
    def fit(self, model: Any, epochs: int, callbacks: list | None = None, initial_epoch: int = 0) -> float: ...


class Engine(Protocol):
    """A search engine over one phase objective."""

    def run(self, objective: Objective, n_trials: int | None, study_name: str | None = None,
            timeout: float | None = None) -> dict[str, Any]: ...


STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running"}


def summary(study_name: str, trials: list[tuple[str, float | None, dict, int]],
            fail_reason: str | None = None) -> dict[str, Any]:
    """The one run summary both engines return: trial counts by state (keys :data:`STATES`),
    the best complete trial (``best_value``, ``best_params``, ``best_number``) and the first
    failure's reason. ``trials``: ``(state, value, params, number)`` of each trial."""
    states = [t[0] for t in trials]
    out: dict[str, Any] = {"study_name": study_name, "trials": len(trials),
                           **{key: states.count(state) for state, key in STATES.items()}}
    if fail_reason:
        out["fail_reason"] = fail_reason
    done = [t for t in trials if t[0] == "COMPLETE" and t[1] is not None]
    if done:
        best = max(done, key=lambda t: t[1])
        out.update(best_value=best[1], best_params=best[2], best_number=best[3])
    return out


class AllTrialsFailed(UserError):
    """Every trial of a search failed: nothing to recommend."""


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


