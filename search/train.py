"""Phase 1's runner: the classifier head on cached pooled features, shared by the engines' trials
and the final model.

Entry point: :func:`train_head` (``build_head_model`` + ``fit_head``; KerasTuner needs
``HyperModel.build`` and ``HyperModel.fit`` separately, the final model calls the whole). Only the
budget differs: a trial trains on a stratified subset of rows
(:func:`search.batches.stratified_rows`) for a few epochs, the final model on every row. Phase 2's
runner is :mod:`search.finetune`.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from search import heads, space
from search.batches import (
    HEAD_VAL_BATCH,
    PooledData,
)
from search.tfgraph import (
    build_training_state,
    graph_rewrites,
)

EARLY_STOPPING_PATIENCE = 3


def head_hits(model: keras.Model, data: PooledData, batch_size: int = HEAD_VAL_BATCH) -> np.ndarray:
    """Which of ``data``'s validation rows ``model`` classifies right (booleans, in row order),
    computed eagerly as :class:`EagerValidation` scores them."""
    import tensorflow as tf

    _, _, x, y = data.tensors()
    n = int(x.shape[0])
    probs = tf.concat([model(x[i:i + batch_size], training=False) for i in range(0, n, batch_size)], 0)
    return np.asarray(tf.equal(tf.argmax(probs, 1), tf.argmax(y, 1)))


def build_head_model(params: dict[str, Any], n_features: int, n_classes: int, plain_keras: bool = False) -> keras.Model:
    """The compiled head for ``params`` (``search.heads.build_head``), on pooled features, with its
    optimizer's update fused (``heads.build_optimizer``) and its training state built
    (:func:`build_training_state`). ``plain_keras=True``: Keras's own optimizer, state built
    lazily (only ``make bench-search``'s baseline)."""
    params = space.with_defaults("head", params)
    model = heads.build_head(params, (n_features,), num_classes=n_classes)
    heads.compile_for(model, params, steps_per_execution=32, fused=not plain_keras)
    if not plain_keras:
        build_training_state(model, np.zeros((1, n_features), np.float32), np.zeros((1, n_classes), np.float32))
    return model


def fit_head(model: keras.Model, data: PooledData, epochs: int, callbacks: list | None = None,
             initial_epoch: int = 0, verbose: int = 0, seed: int = 0, resident: bool = True,
             batch_size: int = space.HEAD_BATCH_SIZE) -> dict[str, list[float]]:
    """Fit in batches of ``batch_size`` rows with early stopping on validation accuracy, best epoch
    restored; the history dict.

    ``seed`` fixes the order of the batches (:meth:`PooledData.dataset`); validation runs eagerly
    (:class:`EagerValidation`); the train function is not rewritten by Grappler
    (:func:`graph_rewrites`). ``resident=False`` hands Keras the numpy arrays and the validation
    rows instead, as plain Keras code does (every ``fit`` converts them again, and traces a test
    function; Grappler on): only ``make bench-search``'s baseline uses it.
    """
    stop = keras.callbacks.EarlyStopping("val_accuracy", patience=EARLY_STOPPING_PATIENCE, mode="max",
                                         restore_best_weights=True)
    if resident:
        feed = {"x": data.dataset(batch_size, seed), "shuffle": False}
        first = [data.validation()]
    else:
        feed = {"x": data.x_train, "y": data.y_train, "batch_size": batch_size,
                "validation_data": (data.x_val, data.y_val), "validation_batch_size": HEAD_VAL_BATCH}
        first = []
    with graph_rewrites(not resident):
        history = model.fit(**feed, epochs=epochs, initial_epoch=initial_epoch,
                            callbacks=[*first, stop, *(callbacks or [])], verbose=verbose)
    return {k: [float(v) for v in vs] for k, vs in history.history.items()}


def train_head(data: PooledData, params: dict[str, Any], epochs: int, callbacks: list | None = None,
               seed: int = 0, verbose: int = 0) -> tuple[keras.Model, dict[str, list[float]]]:
    """Phase 1 in one call: build and fit a head; returns it (best epoch) and its history."""
    keras.utils.set_random_seed(seed)
    model = build_head_model(params, data.x_train.shape[1], data.y_train.shape[1])
    return model, fit_head(model, data, epochs, callbacks, verbose=verbose, seed=seed)

