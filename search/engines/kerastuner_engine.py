"""KerasTuner engine: the same space and objective through ``HyperModel.build`` / ``HyperModel.fit``.

``build(hp)`` samples ``search.space.suggest(phase, hp)`` (conditional parameters under
``conditional_scope``) and returns ``objective.build(params)``; ``fit(hp, model, ...)`` returns
``objective.fit(model, epochs, callbacks)``, the best validation accuracy, which KerasTuner
records as the trial's score. Projects live in ``results/kerastuner/<phase>-<cache id>/``;
KerasTuner continues a project that exists (``overwrite=False``). :func:`best_params` reads the
trials' ``trial.json`` files (:func:`read_trials`), without rebuilding a tuner.

KerasTuner's oracles take no enqueued first trial, so a new project's defaults are scored here,
through the same objective at the same budget, before the tuner starts, into ``defaults.json``;
each trial's scores (per fold on small data, :mod:`search.selection`) go to its folder's
``scores.json``. A time budget (``timeout``) stops the search after the trial that crosses it:
the oracle's ``max_trials`` is set to the trials it has.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from search import space
from search.engines.base import (
    AllTrialsFailed,
    check_outcome,
    check_same_budget,
    default_study_name,
    summary,
    write_pointer,
)
from search.errors import UserError
from search.io import read_json, write_json

ORACLES = ("bayesian", "hyperband")


def _hypermodel(objective: Any, seed: int):
    import keras_tuner as kt

    class PhaseHyperModel(kt.HyperModel):
        """One phase objective as a KerasTuner HyperModel."""

        trials = 0

        def build(self, hp: Any) -> Any:
            self.trials += 1
            return objective.build(space.suggest(objective.phase, hp, **objective.space_options),
                                   seed=seed + self.trials)

        def fit(self, hp: Any, model: Any, *args: Any, epochs: int | None = None, callbacks: list | None = None,
                initial_epoch: int = 0, **kwargs: Any) -> float:
            if args or set(kwargs) - {"validation_data", "verbose", "x", "y"}:
                raise UserError(f"the {objective.phase} objective takes no fit arguments {sorted(kwargs)}")
            return objective.fit(model, epochs or objective.max_epochs, callbacks, initial_epoch=initial_epoch)

    return PhaseHyperModel()


class KerasTunerEngine:
    """KerasTuner over a phase objective: Bayesian optimization or Hyperband."""

    def __init__(self, oracle: str | None = None, seed: int = 0, progress: bool = True,
                 results: str | Path = "results", default_trial: bool = True) -> None:
        self.oracle = oracle or "bayesian"
        if self.oracle not in ORACLES:
            raise UserError(f"unknown KerasTuner oracle {self.oracle!r}; choose one of {list(ORACLES)}")
        self.seed, self.progress, self.results = seed, progress, results
        self.default_trial = default_trial
        self.directory = Path(results) / "kerastuner"

    def make_tuner(self, objective: Any, n_trials: int | None, project_name: str, deadline: float | None = None):
        """The tuner: its trials record their scores, and it stops at ``deadline`` (monotonic)."""
        import keras_tuner as kt

        common = dict(objective=kt.Objective("val_accuracy", "max"), directory=str(self.directory),
                      project_name=project_name, seed=self.seed, overwrite=False)
        hypermodel = _hypermodel(objective, self.seed)
        if self.oracle == "hyperband" and n_trials is not None:
            raise UserError("KerasTuner's Hyperband sets its own number of trials from --max-epochs; "
                            "drop --trials (or use --oracle bayesian)")
        base = kt.BayesianOptimization if self.oracle == "bayesian" else kt.Hyperband
        project = self.directory / project_name

        class Tuner(base):
            def run_trial(self, trial: Any, *args: Any, **kwargs: Any) -> Any:
                out = super().run_trial(trial, *args, **kwargs)
                score = getattr(objective, "last_score", None)
                if score is not None:
                    write_json(project / f"trial_{trial.trial_id}" / "scores.json", score.as_dict())
                return out

            def on_trial_end(self, trial: Any) -> None:
                super().on_trial_end(trial)
                if deadline is not None and time.monotonic() > deadline:
                    self.oracle.max_trials = len(self.oracle.trials)  # create_trial answers STOPPED

        if self.oracle == "bayesian":
            return Tuner(hypermodel, max_trials=n_trials or 20, **common)
        return Tuner(hypermodel, max_epochs=objective.max_epochs, factor=3, hyperband_iterations=1, **common)

    def score_defaults(self, objective: Any, project_name: str) -> dict | None:
        """Score the phase's documented defaults once per project, as Optuna's enqueued first trial
        does, into ``defaults.json``; returns that record (None with ``default_trial`` off)."""
        path = self.directory / project_name / "defaults.json"
        if path.exists():
            return read_json(path)
        if not self.default_trial:
            return None
        model = objective.build(space.default_trial(objective.phase, **objective.space_options), seed=self.seed)
        value = objective.fit(model, objective.max_epochs)
        score = getattr(objective, "last_score", None)
        record = score.as_dict() if score is not None else {"value": value, "scores": [value], "n": None}
        write_json(path, {**record, "params": space.default_trial(objective.phase, **objective.space_options)})
        return record

    def run(self, objective: Any, n_trials: int | None, study_name: str | None = None,
            timeout: float | None = None) -> dict:
        """Run the search (at most ``timeout`` seconds: no trial starts after it); then point
        ``results/searches/`` at the project. A refused run (another budget) points nowhere."""
        deadline = None if timeout is None else time.monotonic() + timeout
        project_name = study_name or default_study_name(objective.phase, objective.cache_id)
        budget_file = self.directory / project_name / "search_budget.json"
        check_same_budget(project_name, read_json(budget_file) if budget_file.exists() else None, objective.budget)
        try:
            tuner = self.make_tuner(objective, n_trials, project_name, deadline)
            write_json(budget_file, objective.budget)
            write_pointer(self.results, objective.phase, objective.cache_id,
                          {"engine": "kerastuner", "directory": str(self.directory), "project_name": project_name,
                           "oracle": self.oracle})
            self.score_defaults(objective, project_name)
            tuner.search(epochs=objective.max_epochs, verbose=1 if self.progress else 0)
        except (UserError, KeyboardInterrupt):
            raise
        except Exception as exc:  # KerasTuner re-raises a failing build, or after too many failed trials
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ''}"
            raise AllTrialsFailed(f"KerasTuner search {project_name} stopped: {reason}") from None
        trials = read_trials(self.directory, project_name)
        return check_outcome(summary(project_name, [(t["state"], t["value"], t["params"], t["number"])
                                                    for t in trials]))


def read_trials(directory: str | Path, project_name: str) -> list[dict]:
    """Every trial of a KerasTuner project from its ``trial_*/trial.json``, in trial order.

    Each: ``number`` (int), ``trial_id``, ``state`` (COMPLETE or FAIL), ``value`` (score or
    None), ``params`` (active parameters, no ``tuner/`` bookkeeping), ``space`` (the declared
    hyperparameters' configs by name).
    """
    out = []
    for f in sorted(Path(directory, project_name).glob("trial_*/trial.json")):
        t = json.loads(f.read_text())
        done = t.get("status") == "COMPLETED" and t.get("score") is not None
        out.append({"number": int(t["trial_id"]), "trial_id": t["trial_id"], "state": "COMPLETE" if done else "FAIL",
                    "value": t["score"] if done else None,
                    "params": {k: v for k, v in t["hyperparameters"]["values"].items() if not k.startswith("tuner/")},
                    "space": {h["config"]["name"]: h for h in t["hyperparameters"]["space"]},
                    "scores": read_json(f.parent / "scores.json") if (f.parent / "scores.json").exists() else {}})
    return out


def best_params(directory: str, project_name: str) -> tuple[dict, dict]:
    done = [t for t in read_trials(directory, project_name) if t["state"] == "COMPLETE"]
    if not done:
        raise UserError(f"KerasTuner project {project_name!r} in {directory} has no completed trial")
    from search import selection

    best = max(done, key=lambda t: t["value"])
    defaults = Path(directory, project_name, "defaults.json")
    default_score = None
    if defaults.exists():
        d = read_json(defaults)
        default_score = selection.Score.from_record(d["value"], d).as_dict()
    budget = Path(directory, project_name, "search_budget.json")
    return best["params"], {"engine": "kerastuner", "directory": str(directory), "study": project_name,
                            "trial": best["trial_id"], "value": best["value"],
                            "score": selection.Score.from_record(best["value"], best["scores"]).as_dict(),
                            "default_score": default_score, "best_is_default": False,
                            "budget": read_json(budget) if budget.exists() else None}
