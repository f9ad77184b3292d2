"""TensorFlow and Keras workarounds both runners share: what a search of many models per process
needs that plain Keras does not do (release traced gradients, keep the garbage collector off
long-lived objects, one trace per model, Grappler's rewrites where they pay).

Private TensorFlow APIs are used here (the gradient registry); ``tests/test_train.py`` fails if
they stop working.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Any

import keras


def custom_gradients() -> frozenset[str]:
    """Names of the custom gradients TensorFlow has registered so far in this process.

    Every ``tf.custom_gradient`` traced in a graph (each new Keras model's train function traces
    some) registers a uniquely named gradient in TensorFlow's global registry, which holds the
    traced graph alive forever: a search that builds a model per trial grows by megabytes per
    trial (upstream: keras-team/keras#17458, tensorflow/tensorflow#61791, both open).
    :func:`release_custom_gradients` drops them once their models are done.
    """
    from tensorflow.python.framework import ops

    return frozenset(ops._gradient_registry._registry)


def release_custom_gradients(keep: frozenset[str]) -> int:
    """Unregister every custom gradient not in ``keep`` (see :func:`custom_gradients`); returns
    how many. Only call it when no model traced since ``keep`` was taken will train again."""
    from tensorflow.python.framework import ops

    registry = ops._gradient_registry._registry
    stale = [name for name in registry if name not in keep and name.startswith("CustomGradient-")]
    for name in stale:
        del registry[name]
    return len(stale)


def freeze_long_lived_objects() -> None:
    """Collect garbage, then move every object alive out of the collector's view (``gc.freeze``).

    Every head trial ends in a full collection (``keras.backend.clear_session`` at the next
    ``build``, Optuna's ``gc_after_trial``); with TensorFlow and Keras loaded each such pass walks
    every object of the process, a cost of the order of a small head's whole trial. Frozen objects
    are not scanned again (nor collected, should they later become cyclic garbage), so call this
    once the long-lived state exists (modules, resident data); a trial's collection then walks
    only what trials made since.
    """
    gc.collect()
    gc.freeze()


def build_training_state(model: keras.Model, x: Any, y: Any) -> None:
    """Create the optimizer's slots and the compiled metrics' variables of a compiled ``model``
    now, from one batch ``x``, ``y`` (any rows of the shapes and dtypes training feeds).

    Keras's TensorFlow trainer creates both lazily while tracing the first train function; a
    ``tf.function`` whose first trace created variables is traced a second time, so every new
    model paid for two traces of its train step (about 0.4 s of a small head's phase-1 trial).
    The metrics' state set here is reset by ``fit`` at the start of every epoch; an optimizer
    already built is left as it is.
    """
    if not model.optimizer.built:  # a TwoRateModel's optimizers are built on their own variables
        model.optimizer.build(model.trainable_variables)
    model.compute_metrics(x, y, model(x, training=False))


@contextlib.contextmanager
def graph_rewrites(enabled: bool) -> Iterator[None]:
    """TensorFlow's graph optimizer (Grappler) on or off for the functions first run inside the
    block; the process-wide setting is restored on exit.

    A head's train function is optimized once when ``fit`` first runs it: about 0.1 s of a
    phase-1 trial that trains it for two epochs, for no measurable gain in its steps (a scratch
    probe here: steady epochs alike with and without). The tail's convolutions gain from the
    rewrites (fused kernels); they are left on there.
    """
    import tensorflow as tf

    key = "disable_meta_optimizer"
    saved = bool(tf.config.optimizer.get_experimental_options().get(key, False))
    tf.config.optimizer.set_experimental_options({key: not enabled})
    try:
        yield
    finally:
        tf.config.optimizer.set_experimental_options({key: saved})

