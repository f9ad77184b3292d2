"""What both engines optimize: the head trained on cached pooled features, val accuracy.

The arrays are read from the cache's memory maps once per process (:class:`PooledData`);
trials share them, nothing is copied per trial.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from search import heads, space
from search.cache import Cache
from search.data import Splits, one_hot


@dataclass
class PooledData:
    """Train/val arrays of pooled features (float32) and one-hot labels (float32).

    ``x_train`` is ``(n_train * views, features)``: mirrored images are extra rows.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray

    @classmethod
    def from_cache(cls, cache: Cache, splits: Splits, use_flips: bool = True) -> PooledData:
        views = cache.views if use_flips else ("orig",)
        x = np.concatenate([np.asarray(cache.array("train", "pool", v)[splits.train_idx]) for v in views])
        y = one_hot(np.concatenate([splits.y_train[splits.train_idx]] * len(views)))
        x_val = np.asarray(cache.array("train", "pool", "orig")[splits.val_idx])
        return cls(x, y, x_val, one_hot(splits.y_train[splits.val_idx]))


def build_model(params: dict[str, Any], n_features: int) -> keras.Model:
    """The compiled head for ``params`` (the one builder in ``search.heads``)."""
    return heads.compile_for(heads.build_head(params, (n_features,)), params, steps_per_execution=64)


def fit_and_score(params: dict[str, Any], data: PooledData, callbacks: list | None = None,
                  max_epochs: int = space.MAX_EPOCHS, seed: int = 0) -> dict[str, Any]:
    """Train one head with early stopping on val accuracy; return ``val_accuracy``, ``epochs``."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    model = build_model(params, data.x_train.shape[1])
    stop = keras.callbacks.EarlyStopping("val_accuracy", patience=space.EARLY_STOPPING_PATIENCE,
                                         mode="max", restore_best_weights=True)
    history = model.fit(data.x_train, data.y_train, batch_size=int(params["batch_size"]),
                        epochs=max_epochs, validation_data=(data.x_val, data.y_val),
                        callbacks=[stop, *(callbacks or [])], verbose=0)
    accs = history.history["val_accuracy"]
    return {"val_accuracy": float(max(accs)), "epochs": len(accs)}
