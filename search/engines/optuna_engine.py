"""Optuna engine: TPE with a seed, a per-epoch pruner, any SQLAlchemy storage, resumable.

The study opens unchanged in the ``optuna`` CLI and in optuna-dashboard: parameters are the
plain names of ``search.space.suggest``; user attrs hold ``val_accuracy``, ``epochs``,
``seconds`` and the cache key.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import optuna

from search import space
from search.engines import LATEST
from search.engines.objective import PooledData, fit_and_score
from search.errors import UserError
from search.io import write_json

log = logging.getLogger(__name__)
PRUNERS = ("hyperband", "median", "none")


def default_storage(results: str | Path = "results") -> str:
    return f"sqlite:///{Path(results) / 'study.db'}"


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=space.MAX_EPOCHS)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise UserError(f"unknown pruner {name!r}; choose one of {list(PRUNERS)}")


def open_study(storage: str, study_name: str, seed: int = 0, pruner: str = "hyperband",
               create: bool = True, heartbeat: int | None = None) -> optuna.Study:
    """Create or load (``load_if_exists``) the study; one clear error for a bad storage URL.

    With ``heartbeat`` (seconds), running trials beat; a trial whose process died (SIGKILL)
    is marked FAIL when a worker next starts a trial, instead of staying RUNNING forever.
    """
    import sqlalchemy

    try:
        url = sqlalchemy.engine.make_url(storage)
    except Exception:
        raise UserError(f"malformed storage URL {storage!r} (e.g. sqlite:///results/study.db or "
                        "postgresql://user@host:port/db)") from None
    if url.drivername.startswith("sqlite") and url.database:
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    sampler = optuna.samplers.TPESampler(seed=seed)
    try:
        if heartbeat:
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(storage, heartbeat_interval=heartbeat,
                                                 grace_period=2 * heartbeat)
        if create:
            return optuna.create_study(storage=storage, study_name=study_name, direction="maximize",
                                       sampler=sampler, pruner=make_pruner(pruner), load_if_exists=True)
        return optuna.load_study(storage=storage, study_name=study_name, sampler=sampler,
                                 pruner=make_pruner(pruner))
    except UserError:
        raise
    except KeyError:
        raise UserError(f"no study {study_name!r} in {storage}") from None
    except Exception as exc:
        raise UserError(f"cannot open storage {url.render_as_string()}: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0]}") from None


def make_objective(data: PooledData, cache_id: str, max_epochs: int, seed: int):
    from optuna_integration import KerasPruningCallback

    def objective(trial: optuna.Trial) -> float:
        params = space.suggest(trial)
        start = time.perf_counter()
        try:
            result = fit_and_score(params, data, [KerasPruningCallback(trial, "val_accuracy")],
                                   max_epochs=max_epochs, seed=seed + trial.number)
        finally:
            trial.set_user_attr("seconds", time.perf_counter() - start)
            trial.set_user_attr("cache", cache_id)
        trial.set_user_attr("val_accuracy", result["val_accuracy"])
        trial.set_user_attr("epochs", result["epochs"])
        return result["val_accuracy"]

    return objective


def run(data: PooledData, cache_id: str, n_trials: int, storage: str | None = None,
        study_name: str | None = None, pruner: str = "hyperband", seed: int = 0,
        results: str | Path = "results", progress: bool = True, timeout: float | None = None,
        max_epochs: int = space.MAX_EPOCHS, heartbeat: int = 30, worker_index: int = 0, **_: Any) -> dict:
    """Run ``n_trials`` more trials in this process; record the study in ``latest_search.json``."""
    storage = storage or default_storage(results)
    study_name = study_name or f"heads-{cache_id}"
    study = open_study(storage, study_name, seed, pruner, heartbeat=heartbeat)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Resumed runs and parallel workers sample differently even with one --seed.
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials) + 1000 * worker_index)
    write_json(Path(results) / LATEST, {"engine": "optuna", "storage": storage, "study_name": study_name})
    study.optimize(make_objective(data, cache_id, max_epochs, seed), n_trials=n_trials,
                   timeout=timeout, catch=(Exception,), show_progress_bar=progress, gc_after_trial=True)
    return summarize(study)


def summarize(study: optuna.Study) -> dict:
    states = [t.state.name for t in study.trials]
    out = {"study_name": study.study_name, "trials": len(states),
           "complete": states.count("COMPLETE"), "pruned": states.count("PRUNED"),
           "failed": states.count("FAIL")}
    try:
        best = study.best_trial
        out.update(best_value=best.value, best_params=best.params, best_number=best.number)
    except ValueError:
        out.update(best_value=None, best_params=None)
    return out


def best_params(storage: str, study_name: str) -> tuple[dict, str]:
    study = open_study(storage, study_name, create=False)
    try:
        best = study.best_trial
    except ValueError:
        raise UserError(f"study {study_name!r} has no completed trial yet") from None
    return dict(best.params), f"optuna:{study_name}#{best.number} (val {best.value:.4f})"
