"""KerasTuner engine: the same space through ``hp``, Hyperband or Bayesian oracle.

Results live in ``results/kerastuner/<project_name>/``; ``best_params`` reloads the tuner
from there (KerasTuner resumes a project that exists).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras

from search import space
from search.engines import LATEST
from search.engines.objective import PooledData, build_model
from search.errors import UserError
from search.io import write_json

ORACLES = ("hyperband", "bayesian")


def _hypermodel(n_features: int):
    import keras_tuner as kt

    class HeadHyperModel(kt.HyperModel):
        def build(self, hp):
            return build_model(space.suggest(hp), n_features)

        def fit(self, hp, model, *args, **kwargs):
            return model.fit(*args, batch_size=hp.get("batch_size"), **kwargs)

    return HeadHyperModel()


def make_tuner(directory: str | Path, project_name: str, n_features: int, oracle: str = "bayesian",
               n_trials: int = 20, seed: int = 0, max_epochs: int = space.MAX_EPOCHS):
    import keras_tuner as kt

    common = dict(objective="val_accuracy", directory=str(directory), project_name=project_name,
                  seed=seed, overwrite=False)
    if oracle == "bayesian":
        return kt.BayesianOptimization(_hypermodel(n_features), max_trials=n_trials, **common)
    if oracle == "hyperband":
        return kt.Hyperband(_hypermodel(n_features), max_epochs=max_epochs, hyperband_iterations=1, **common)
    raise UserError(f"unknown KerasTuner oracle {oracle!r}; choose one of {list(ORACLES)}")


def run(data: PooledData, cache_id: str, n_trials: int, results: str | Path = "results",
        oracle: str = "bayesian", study_name: str | None = None, seed: int = 0,
        progress: bool = True, max_epochs: int = space.MAX_EPOCHS, **_: Any) -> dict:
    directory = Path(results) / "kerastuner"
    project_name = study_name or f"heads-{cache_id}"
    tuner = make_tuner(directory, project_name, data.x_train.shape[1], oracle, n_trials, seed, max_epochs)
    write_json(Path(results) / LATEST, {"engine": "kerastuner", "directory": str(directory),
                                        "project_name": project_name, "oracle": oracle,
                                        "n_features": data.x_train.shape[1], "max_epochs": max_epochs})
    stop = keras.callbacks.EarlyStopping("val_accuracy", patience=space.EARLY_STOPPING_PATIENCE, mode="max")
    tuner.search(data.x_train, data.y_train, validation_data=(data.x_val, data.y_val),
                 epochs=max_epochs, callbacks=[stop], verbose=1 if progress else 0)
    best = tuner.oracle.get_best_trials(1)
    return {"study_name": project_name, "trials": len(tuner.oracle.trials),
            "best_value": best[0].score if best else None,
            "best_params": best[0].hyperparameters.values if best else None}


def best_params(directory: str, project_name: str) -> tuple[dict, str]:
    import json

    trials = sorted(Path(directory, project_name).glob("trial_*/trial.json"))
    scored = []
    for f in trials:
        t = json.loads(f.read_text())
        if t.get("score") is not None and t.get("status") == "COMPLETED":
            scored.append((t["score"], t["trial_id"], t["hyperparameters"]["values"]))
    if not scored:
        raise UserError(f"KerasTuner project {project_name!r} in {directory} has no completed trial")
    score, trial_id, values = max(scored, key=lambda s: s[0])
    params = {k: v for k, v in values.items() if not k.startswith("tuner/")}
    return params, f"kerastuner:{project_name}#{trial_id} (val {score:.4f})"
