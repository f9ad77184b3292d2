"""KerasTuner engine: the same space and objective through ``HyperModel.build`` / ``HyperModel.fit``.

``build(hp)`` samples ``search.space.suggest(phase, hp)`` (conditional parameters under
``conditional_scope``) and returns ``objective.build(params)``; ``fit(hp, model, ...)`` returns
``objective.fit(model, epochs, callbacks)``, the best validation accuracy, which KerasTuner
records as the trial's score. Projects live in ``results/kerastuner/<phase>-<cache id>/``;
KerasTuner continues a project that exists (``overwrite=False``). :func:`best_params` reads the
trials' ``trial.json`` files (:func:`read_trials`), without rebuilding a tuner.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from search import space
from search.engines import AllTrialsFailed, check_outcome, check_same_budget, default_study_name, write_pointer
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
            return objective.build(space.suggest(objective.phase, hp), seed=seed + self.trials)

        def fit(self, hp: Any, model: Any, *args: Any, epochs: int | None = None, callbacks: list | None = None,
                initial_epoch: int = 0, **kwargs: Any) -> float:
            if args or set(kwargs) - {"validation_data", "verbose", "x", "y"}:
                raise UserError(f"the {objective.phase} objective takes no fit arguments {sorted(kwargs)}")
            return objective.fit(model, epochs or objective.max_epochs, callbacks, initial_epoch=initial_epoch)

    return PhaseHyperModel()


class KerasTunerEngine:
    """KerasTuner over a phase objective: Bayesian optimization or Hyperband."""

    def __init__(self, oracle: str | None = None, seed: int = 0, progress: bool = True,
                 results: str | Path = "results") -> None:
        self.oracle = oracle or "bayesian"
        if self.oracle not in ORACLES:
            raise UserError(f"unknown KerasTuner oracle {self.oracle!r}; choose one of {list(ORACLES)}")
        self.seed, self.progress, self.results = seed, progress, results
        self.directory = Path(results) / "kerastuner"

    def make_tuner(self, objective: Any, n_trials: int | None, project_name: str):
        import keras_tuner as kt

        common = dict(objective=kt.Objective("val_accuracy", "max"), directory=str(self.directory),
                      project_name=project_name, seed=self.seed, overwrite=False)
        hypermodel = _hypermodel(objective, self.seed)
        if self.oracle == "bayesian":
            return kt.BayesianOptimization(hypermodel, max_trials=n_trials or 20, **common)
        if n_trials is not None:
            raise UserError("KerasTuner's Hyperband sets its own number of trials from --max-epochs; "
                            "drop --trials (or use --oracle bayesian)")
        return kt.Hyperband(hypermodel, max_epochs=objective.max_epochs, factor=3, hyperband_iterations=1,
                            **common)

    def run(self, objective: Any, n_trials: int | None, study_name: str | None = None) -> dict:
        project_name = study_name or default_study_name(objective.phase, objective.cache_id)
        write_pointer(self.results, objective.phase, objective.cache_id,
                      {"engine": "kerastuner", "directory": str(self.directory), "project_name": project_name,
                       "oracle": self.oracle})
        budget_file = self.directory / project_name / "search_budget.json"
        check_same_budget(project_name, read_json(budget_file) if budget_file.exists() else None, objective.budget)
        write_json(budget_file, objective.budget)
        try:
            tuner = self.make_tuner(objective, n_trials, project_name)
            tuner.search(epochs=objective.max_epochs, verbose=1 if self.progress else 0)
        except (UserError, KeyboardInterrupt):
            raise
        except Exception as exc:  # KerasTuner re-raises a failing build, or after too many failed trials
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ''}"
            raise AllTrialsFailed(f"KerasTuner search {project_name} stopped: {reason}") from None
        trials = read_trials(self.directory, project_name)
        out = {"study_name": project_name, "trials": len(trials),
               "complete": sum(t["state"] == "COMPLETE" for t in trials),
               "pruned": 0, "failed": sum(t["state"] == "FAIL" for t in trials)}
        done = [t for t in trials if t["state"] == "COMPLETE"]
        if done:
            best = max(done, key=lambda t: t["value"])
            out.update(best_value=best["value"], best_params=best["params"], best_number=best["number"])
        return check_outcome(out)


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
                    "space": {h["config"]["name"]: h for h in t["hyperparameters"]["space"]}})
    return out


def best_params(directory: str, project_name: str) -> tuple[dict, dict]:
    done = [t for t in read_trials(directory, project_name) if t["state"] == "COMPLETE"]
    if not done:
        raise UserError(f"KerasTuner project {project_name!r} in {directory} has no completed trial")
    best = max(done, key=lambda t: t["value"])
    return best["params"], {"engine": "kerastuner", "directory": str(directory), "study": project_name,
                            "trial": best["trial_id"], "value": best["value"]}
