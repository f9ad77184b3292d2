"""The one search space, written once and served to both engines.

Entry point: :func:`suggest`, which takes an Optuna ``Trial`` or a KerasTuner
``HyperParameters`` and returns a plain parameter dict for ``search.heads``.
``DEFAULT_PARAMS`` is what ``make final`` uses when no study exists.
"""

from __future__ import annotations

from typing import Any, Protocol

UNITS = (128, 256, 512, 1024)
MAX_DENSE_LAYERS = 3
MAX_EPOCHS = 30
EARLY_STOPPING_PATIENCE = 3

DEFAULT_PARAMS: dict[str, Any] = {
    "n_layers": 0,
    "activation": "relu",
    "dropout": 0.2,
    "batch_norm": False,
    "optimizer": "adam",
    "learning_rate": 1e-3,
    "weight_decay": 0.0,
    "batch_size": 256,
    "label_smoothing": 0.1,
}


class Source(Protocol):
    """What :func:`suggest` needs from an engine: four kinds of parameter."""

    def int(self, name: str, low: int, high: int) -> int: ...
    def float(self, name: str, low: float, high: float, log: bool = False) -> float: ...
    def choice(self, name: str, values: tuple) -> Any: ...
    def boolean(self, name: str) -> bool: ...


class OptunaSource:
    """Adapter: Optuna ``Trial.suggest_*``."""

    def __init__(self, trial: Any) -> None:
        self.trial = trial

    def int(self, name, low, high):
        return self.trial.suggest_int(name, low, high)

    def float(self, name, low, high, log=False):
        return self.trial.suggest_float(name, low, high, log=log)

    def choice(self, name, values):
        return self.trial.suggest_categorical(name, list(values))

    def boolean(self, name):
        return self.trial.suggest_categorical(name, [False, True])


class KerasTunerSource:
    """Adapter: KerasTuner ``HyperParameters``."""

    def __init__(self, hp: Any) -> None:
        self.hp = hp

    def int(self, name, low, high):
        return self.hp.Int(name, low, high)

    def float(self, name, low, high, log=False):
        return self.hp.Float(name, low, high, sampling="log" if log else "linear")

    def choice(self, name, values):
        return self.hp.Choice(name, list(values))

    def boolean(self, name):
        return self.hp.Boolean(name)


def _adapt(source: Any) -> Source:
    if hasattr(source, "suggest_float"):
        return OptunaSource(source)
    if hasattr(source, "Float") and hasattr(source, "Choice"):
        return KerasTunerSource(source)
    return source


def suggest(source: Any) -> dict[str, Any]:
    """Sample one configuration: head architecture, optimizer, batch size, label smoothing."""
    s = _adapt(source)
    params: dict[str, Any] = {"n_layers": s.int("n_layers", 0, MAX_DENSE_LAYERS)}
    for i in range(params["n_layers"]):
        params[f"units_{i}"] = s.choice(f"units_{i}", UNITS)
    if params["n_layers"]:
        params["activation"] = s.choice("activation", ("relu", "gelu", "swish"))
        params["batch_norm"] = s.boolean("batch_norm")
    params["dropout"] = s.float("dropout", 0.0, 0.5)
    params["optimizer"] = s.choice("optimizer", ("adam", "adamw", "sgd"))
    params["learning_rate"] = s.float("learning_rate", 1e-4, 3e-2, log=True)
    if params["optimizer"] != "adam":
        params["weight_decay"] = s.float("weight_decay", 1e-6, 1e-2, log=True)
    params["batch_size"] = s.choice("batch_size", (64, 128, 256, 512))
    params["label_smoothing"] = s.float("label_smoothing", 0.0, 0.2)
    return params


def with_defaults(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` completed with ``DEFAULT_PARAMS`` for keys a trial did not sample."""
    return {**DEFAULT_PARAMS, **params}
