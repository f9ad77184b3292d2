"""The one head builder, and the optimizer/loss that go with a parameter set.

Entry point: :func:`build_head`. The search (both engines) and the final model call it with
the same parameter dict (see ``search.space``); nothing else builds a head.
"""

from __future__ import annotations

from typing import Any

import keras

from search.data import NUM_CLASSES
from search.errors import UserError

OPTIMIZERS = ("adam", "adamw", "sgd")


def build_head(params: dict[str, Any], input_shape: tuple[int, ...], name: str = "head",
               num_classes: int = NUM_CLASSES) -> keras.Model:
    """Classifier head: features -> ``(b, num_classes)`` softmax probabilities (float32).

    Args:
        params: ``n_layers``, ``units_{i}``, ``activation``, ``dropout``, ``batch_norm``
            (``search.space.suggest_head``).
        input_shape: ``(features,)`` for pooled features, or ``(h, w, c)`` for spatial maps,
            which are global-average-pooled first.
    """
    inputs = keras.Input(input_shape, name=f"{name}_input")
    x = inputs
    if len(input_shape) == 3:
        x = keras.layers.GlobalAveragePooling2D(name=f"{name}_pool")(x)
    for i in range(int(params.get("n_layers", 0))):
        x = keras.layers.Dense(int(params[f"units_{i}"]), use_bias=not params.get("batch_norm"),
                               name=f"{name}_dense_{i}")(x)
        if params.get("batch_norm"):
            x = keras.layers.BatchNormalization(name=f"{name}_bn_{i}")(x)
        x = keras.layers.Activation(params.get("activation", "relu"), name=f"{name}_act_{i}")(x)
        if params.get("dropout", 0.0) > 0:
            x = keras.layers.Dropout(float(params["dropout"]), name=f"{name}_dropout_{i}")(x)
    if int(params.get("n_layers", 0)) == 0 and params.get("dropout", 0.0) > 0:
        x = keras.layers.Dropout(float(params["dropout"]), name=f"{name}_dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name=f"{name}_softmax")(x)
    return keras.Model(inputs, outputs, name=name)


def build_optimizer(params: dict[str, Any], learning_rate: Any = None) -> keras.optimizers.Optimizer:
    """Adam, AdamW or SGD with Nesterov momentum from ``params``.

    ``learning_rate`` overrides ``params["learning_rate"]`` (a float or a schedule).
    """
    lr = params["learning_rate"] if learning_rate is None else learning_rate
    name = params.get("optimizer", "adam")
    wd = float(params.get("weight_decay", 0.0))
    if name == "adam":
        return keras.optimizers.Adam(lr)
    if name == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=wd)
    if name == "sgd":
        return keras.optimizers.SGD(lr, momentum=0.9, nesterov=True, weight_decay=wd or None)
    raise UserError(f"unknown optimizer {name!r}; choose one of {list(OPTIMIZERS)}")


def compile_for(model: keras.Model, params: dict[str, Any], learning_rate: Any = None,
                steps_per_execution: int = 1) -> keras.Model:
    """Compile ``model`` (one-hot targets) with the optimizer and label smoothing of ``params``.

    ``steps_per_execution`` > 1 runs that many batches per call into the compiled graph: for
    small heads on cached features the per-step Python overhead otherwise dominates.
    """
    model.compile(
        optimizer=build_optimizer(params, learning_rate),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=float(params.get("label_smoothing", 0.0))),
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
    )
    return model
