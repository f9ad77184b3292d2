"""Search engines over one phase objective: Optuna (default) and KerasTuner.

Entry point: :func:`make_engine` builds an engine from its options, validating every one before
any data is read, and refusing an option the engine cannot honour; ``engine.run(objective,
n_trials, study_name, timeout)`` then searches (the protocol: :mod:`search.engines.base`). Both
engines sample ``search.space.suggest`` and train through ``search.engines.objective`` (so
through ``search.train`` and ``search.finetune``, like the final model). What ships from a search is
:mod:`search.engines.choice`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from search.engines.base import (  # noqa: F401  (the package's vocabulary)
    ENGINES,
    METRIC,
    AllTrialsFailed,
    check_outcome,
    check_same_budget,
    default_study_name,
    pointer_path,
    write_pointer,
)
from search.engines.choice import below_final_fidelity, best_params, resolve_params  # noqa: F401
from search.errors import UserError


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


