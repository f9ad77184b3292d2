"""Training on the cache: one runner per phase, shared by the engines' trials and the final model.

Entry points: :func:`train_head` (phase 1: the head on cached pooled features) and
:func:`train_tail` (phase 2: the layers after the cut, with the head, on cached cut
activations). Each is ``build`` + ``fit``; a trial calls the two halves separately (KerasTuner
needs ``HyperModel.build`` and ``HyperModel.fit``), the final model calls the whole. Only the
budget differs: a trial trains on a stratified subset of rows (:func:`stratified_rows`) for at
most a few epochs, the final model on every training row.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from search import heads, space
from search.cache import Cache
from search.config import PRECISIONS
from search.data import Splits, one_hot
from search.errors import UserError

EARLY_STOPPING_PATIENCE = 3
VAL_BATCH = 256
HEAD_VAL_BATCH = 4096  # rows per validation batch of a head on pooled features (a few MB)


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


def stratified_rows(labels: np.ndarray, rows: np.ndarray, n: int | None, seed: int = 0) -> np.ndarray:
    """``n`` of ``rows`` (indices into ``labels``), the same share per class, sorted; all if None."""
    rows = np.asarray(rows)
    if n is None or n >= len(rows):
        return rows
    rng = np.random.default_rng(seed)
    classes = np.unique(labels[rows])
    picked = []
    for i, c in enumerate(classes):
        members = rows[labels[rows] == c]
        share = n // len(classes) + (1 if i < n % len(classes) else 0)
        picked.append(rng.permutation(members)[:share])
    return np.sort(np.concatenate(picked))


@dataclass
class PooledData:
    """Pooled features held in memory once per process; every trial reads the same arrays.

    ``x_train``: ``(n_train * views, features)`` float32 (mirrored images are extra rows, after
    the originals); ``y_train``: ``(n_train * views, classes)`` float32 one-hot; ``x_val``,
    ``y_val`` likewise for the validation rows (original view only).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    views: int = 1
    _tensors: tuple | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_cache(cls, cache: Cache, splits: Splits, mirrored: bool = True) -> PooledData:
        views = cache.views if mirrored else ("orig",)
        n_classes = cache.num_classes
        x = np.concatenate([np.asarray(cache.array("train", "pool", v)[splits.train_idx]) for v in views])
        y = one_hot(np.concatenate([splits.y_train[splits.train_idx]] * len(views)), n_classes)
        x_val = np.asarray(cache.array("train", "pool", "orig")[splits.val_idx])
        return cls(x, y, x_val, one_hot(splits.y_train[splits.val_idx], n_classes), len(views))

    def subset(self, n: int | None, seed: int = 0, mirrored: bool = True) -> PooledData:
        """``n`` stratified training rows (plus their mirrors when ``mirrored``); same val rows."""
        n_orig = len(self.x_train) // self.views
        labels = self.y_train[:n_orig].argmax(1)
        rows = stratified_rows(labels, np.arange(n_orig), n, seed)
        views = self.views if mirrored else 1
        rows = np.concatenate([rows + v * n_orig for v in range(views)])
        if len(rows) == len(self.x_train):
            return self
        return PooledData(self.x_train[rows], self.y_train[rows], self.x_val, self.y_val, views)

    def folds(self, k: int, seed: int = 0) -> list[PooledData]:
        """``k`` stratified cross-validation splits of the training rows: each a
        :class:`PooledData` that trains on ``k - 1`` folds (with their mirror rows, if any) and
        validates on the original view of the remaining fold. The same ``seed`` gives the same
        folds, so trials scored on them are compared fold by fold."""
        from sklearn.model_selection import StratifiedKFold

        n_orig = len(self.x_train) // self.views
        labels = self.y_train[:n_orig].argmax(1)
        out = []
        for fit_rows, held in StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(n_orig), labels):
            rows = np.concatenate([fit_rows + v * n_orig for v in range(self.views)])
            out.append(PooledData(self.x_train[rows], self.y_train[rows], self.x_train[held], self.y_train[held],
                                  self.views))
        return out

    def tensors(self) -> tuple[Any, Any, Any, Any]:
        """``(x_train, y_train, x_val, y_val)`` as tensors, converted once per instance, not per fit."""
        import tensorflow as tf

        if self._tensors is None:
            self._tensors = tuple(tf.constant(a) for a in (self.x_train, self.y_train, self.x_val, self.y_val))
        return self._tensors

    def dataset(self, batch_size: int, seed: int = 0) -> Any:
        """A ``tf.data`` pipeline of ``batch_size`` training rows over :meth:`tensors`, in a new
        order every epoch, the same orders for the same ``seed``. Handing Keras the numpy arrays
        instead makes every ``fit`` convert and slice them again (``make bench-search`` times both).
        """
        import tensorflow as tf

        x, y, _, _ = self.tensors()
        n = int(x.shape[0])
        return (tf.data.Dataset.range(n).shuffle(n, seed=seed, reshuffle_each_iteration=True).batch(batch_size)
                .map(lambda i: (tf.gather(x, i), tf.gather(y, i))).prefetch(2))

    def validation(self, batch_size: int = HEAD_VAL_BATCH) -> EagerValidation:
        """The callback that validates on this data's validation rows (:class:`EagerValidation`)."""
        _, _, x_val, y_val = self.tensors()
        return EagerValidation(x_val, y_val, batch_size)


class EagerValidation(keras.callbacks.Callback):
    """Writes ``val_loss`` and ``val_accuracy`` into every epoch's logs, from the model called
    eagerly on ``x``, ``y`` (``(n, features)`` and ``(n, classes)`` one-hot float32 tensors) in
    batches of ``batch_size``: loss the compiled loss, accuracy the share of rows whose arg-max
    matches, as Keras's own validation computes them. Put it first among a ``fit``'s callbacks:
    those after it (early stopping, pruning) and the history read what it wrote.

    Keras's own validation (``validation_data``) traces a test function for every new model, a
    fixed cost of every phase-1 trial; a head's forward pass over a few thousand rows costs less
    eagerly than that trace (``make bench-search``'s baseline validates the Keras way).
    """

    def __init__(self, x: Any, y: Any, batch_size: int = HEAD_VAL_BATCH) -> None:
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        import tensorflow as tf

        n = int(self.x.shape[0])
        probs = tf.concat([self.model(self.x[i:i + self.batch_size], training=False)
                           for i in range(0, n, self.batch_size)], 0)
        hits = tf.equal(tf.argmax(probs, 1), tf.argmax(self.y, 1))
        if logs is not None:
            logs["val_loss"] = float(self.model.loss(self.y, probs))
            logs["val_accuracy"] = float(tf.reduce_mean(tf.cast(hits, tf.float32)))


def head_hits(model: keras.Model, data: PooledData, batch_size: int = HEAD_VAL_BATCH) -> np.ndarray:
    """Which of ``data``'s validation rows ``model`` classifies right (booleans, in row order),
    computed eagerly as :class:`EagerValidation` scores them."""
    import tensorflow as tf

    _, _, x, y = data.tensors()
    n = int(x.shape[0])
    probs = tf.concat([model(x[i:i + batch_size], training=False) for i in range(0, n, batch_size)], 0)
    return np.asarray(tf.equal(tf.argmax(probs, 1), tf.argmax(y, 1)))


# ---------------------------------------------------------------- phase 1: the head


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


# ---------------------------------------------------------------- phase 2: the tail


class CachedMaps(keras.utils.PyDataset):
    """Batches of cached cut activations for ``rows`` of a split, with reproducible augmentation.

    Yields ``(x, y)``: ``x`` ``(b, h, w, c)`` float16 activations as cached (the model casts to
    float32 in its graph), ``y`` ``(b, classes)`` float32 one-hot. With ``augment``, the rows are
    reshuffled every epoch, each image is mirrored with probability 1/2 and shifted by up to
    ``shift`` cells (zero fill). ``mirror`` says how (:data:`MIRRORS`): ``"images"`` takes the
    cached activations of the mirrored image (a cache built with ``flip=True``), ``"maps"``
    mirrors the cached activation map itself (no extra extraction), ``"none"`` never mirrors;
    ``"auto"`` is ``"images"`` when the cache has them, else ``"maps"``. ``view="flipped_maps"``
    yields every map mirrored (test-time averaging without cached mirror images). Every random draw
    comes from a generator seeded by ``(seed, epoch, batch index)``, so batches are the same
    whichever worker thread builds them and in whatever order. ``epoch`` is set by the trainer
    (:func:`fit_tail`) at the start of each epoch, also after a resume.
    """

    def __init__(self, cache: Cache, split: str, rows: np.ndarray, batch_size: int, augment: bool = False,
                 shift: int = 0, view: str = "orig", seed: int = 0, workers: int = 1,
                 mirror: str = "auto") -> None:
        super().__init__(workers=workers, use_multiprocessing=False)
        mirror = resolve_mirror(mirror, cache)
        self.flip_all = view == "flipped_maps"
        self.orig = cache.array(split, "cut", "orig" if self.flip_all else view)
        self.mirror = mirror if augment else "none"
        self.flip = cache.array(split, "cut", "flip") if self.mirror == "images" else None
        self.labels = cache.labels[split]
        self.num_classes = cache.num_classes
        self.rows, self.batch_size = np.asarray(rows), int(batch_size)
        self.augment, self.shift, self.seed = augment, int(shift) if augment else 0, seed
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def _order(self) -> np.ndarray:
        if not self.augment:
            return self.rows
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.rows)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        idx = np.sort(self._order()[i * self.batch_size:(i + 1) * self.batch_size])
        x = np.asarray(self.orig[idx])
        if self.flip_all:
            x = np.ascontiguousarray(x[:, :, ::-1])
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            if self.mirror != "none":
                mirrored = rng.random(len(idx)) < 0.5
                if mirrored.any():
                    x[mirrored] = self.flip[idx[mirrored]] if self.flip is not None else x[mirrored, :, ::-1]
            if self.shift:
                x = shift_maps(x, self.shift, rng)
        return x, one_hot(self.labels[idx], self.num_classes)


MIRRORS = ("auto", "images", "maps", "none")


def resolve_mirror(mirror: str, cache: Cache) -> str:
    """``mirror`` (one of :data:`MIRRORS`) made concrete for ``cache``: images, maps or none."""
    if mirror not in MIRRORS:
        raise UserError(f"mirror must be one of {list(MIRRORS)}, got {mirror!r}")
    if mirror == "auto":
        return "images" if cache.key["flip"] else "maps"
    if mirror == "images" and not cache.key["flip"]:
        raise UserError(f"mirror='images' needs a cache of mirrored images; {cache.path.name} has none "
                        "(extract with mirrored images, or mirror the maps)")
    return mirror


def shift_maps(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    """Shift each ``(h, w, c)`` map of ``x`` by ``-s..s`` cells in each direction, zero fill (vectorized)."""
    b, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (s, s), (s, s), (0, 0)))
    dy, dx = rng.integers(0, 2 * s + 1, size=(2, b))
    ys = dy[:, None] + np.arange(h)[None, :]
    xs = dx[:, None] + np.arange(w)[None, :]
    return padded[np.arange(b)[:, None, None], ys[:, :, None], xs[:, None, :]]


class TwoRateModel(keras.Model):
    """A functional model trained with two AdamW optimizers: one for the tail, one for the head.

    ``compile(optimizer=...)`` sets the tail's; ``head_optimizer`` (given at construction) steps
    the variables of ``head``. Otherwise Keras's own ``train_step`` (TensorFlow backend).
    """

    def __init__(self, inputs: Any, outputs: Any, head: keras.Model, head_optimizer: keras.optimizers.Optimizer,
                 **kwargs: Any) -> None:
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self._head_ids = {id(v) for v in head.trainable_variables}
        self.head_optimizer = head_optimizer
        self.before_evaluate: Callable[[], None] | None = None

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        """Keras's ``evaluate`` (``fit`` validates through it), after ``before_evaluate`` if set
        (a phase-2 trial sets :func:`precise_bn` there)."""
        if self.before_evaluate is not None:
            self.before_evaluate()
        return super().evaluate(*args, **kwargs)

    def train_step(self, data: Any) -> dict:
        import tensorflow as tf

        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self._compute_loss(x=x, y=y, y_pred=y_pred, training=True)
        self._loss_tracker.update_state(loss, sample_weight=tf.shape(x)[0])
        variables = self.trainable_variables
        grads = tape.gradient(loss, variables)
        pairs = list(zip(grads, variables, strict=True))
        tail_pairs = [(g, v) for g, v in pairs if id(v) not in self._head_ids]
        if tail_pairs:  # none when every block of the tail stays frozen (unfreeze_blocks 0)
            self.optimizer.apply_gradients(tail_pairs)
        self.head_optimizer.apply_gradients([(g, v) for g, v in pairs if id(v) in self._head_ids])
        return self.compute_metrics(x, y, y_pred)


@dataclass
class TailParts:
    """The trainable part after the cut, with its pretrained weights kept to reset each trial.

    ``tail``: ``(b, h, w, c)`` cut activations -> ``(b, features)`` pooled, sharing its layers
    (and so its weights) with the backbone it was cut from (``backbones.split_at_cut``).
    ``blocks``: the layer names where the tail's blocks end, nearest the cut first
    (``BackboneSpec.tail_blocks``): the tail has ``len(blocks) + 1`` blocks, and unfreezing the
    last ``d`` of them (:meth:`frozen_prefix`) keeps the others frozen in inference mode.
    """

    tail: keras.Model
    initial_weights: list[np.ndarray]
    blocks: tuple[str, ...] = ()

    @classmethod
    def from_backbone(cls, backbone: keras.Model, cut_layer: str, blocks: tuple[str, ...] = ()) -> TailParts:
        from search import backbones

        tail = backbones.split_at_cut(backbone, cut_layer)
        return cls(tail, [np.array(w) for w in tail.get_weights()], tuple(blocks))

    @property
    def n_blocks(self) -> int:
        return len(self.blocks) + 1

    def frozen_prefix(self, unfreeze: int) -> list[keras.layers.Layer]:
        """The tail's layers that stay frozen when only its last ``unfreeze`` blocks train (all of
        them for 0, none for :attr:`n_blocks` or more)."""
        from search import backbones

        layers = [la for la in self.tail.layers if la.weights]
        if unfreeze <= 0:
            return layers
        if unfreeze >= self.n_blocks:
            return []
        frozen = {id(la) for la in backbones.frozen_layers(self.tail, self.blocks[self.n_blocks - 1 - unfreeze])}
        return [la for la in layers if id(la) in frozen]

    def reset(self) -> None:
        self.tail.set_weights(self.initial_weights)




PRECISION_GAIN = 1.10  # mixed bfloat16 is chosen when its tail step is at least 10 % faster, measured


def resolve_precision(precision: str = "auto") -> str:
    """A compute dtype policy the tail can train in (:data:`PRECISIONS`). ``"float32"`` and
    ``"mixed_bfloat16"`` are themselves; ``"auto"`` is chosen by :func:`measure_precision` where
    a run has the tail and cached maps to time, and is float32 where it has not. Variables stay
    float32 either way (Keras mixed precision); the final model is saved and scored in float32."""
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    return "float32" if precision == "auto" else precision


def measure_precision(parts: TailParts, head: keras.Model, maps: np.ndarray, steps: int = 3) -> dict[str, Any]:
    """Choose the tail's precision by timing it here: ``steps`` training steps of the tail and
    head on ``maps`` (a batch of cached cut maps), after one warm-up step that traces, in float32
    and in mixed bfloat16; the median step of each. Mixed bfloat16 is chosen when it is at least
    :data:`PRECISION_GAIN` times faster (any CPU or GPU with fast bfloat16, whatever its flags).
    The tail and head are left as they were (weights, float32)."""
    import statistics
    import time

    saved, saved_tail = head.get_weights(), parts.tail.get_weights()
    labels = one_hot(np.arange(len(maps)) % head.output.shape[-1], head.output.shape[-1])
    seconds = {}
    try:
        for policy in ("float32", "mixed_bfloat16"):
            trainer = build_tail_trainer(parts, head, saved, {}, steps + 1, 1, policy)
            trainer.train_on_batch(maps, labels)
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                trainer.train_on_batch(maps, labels)
                times.append(time.perf_counter() - start)
            seconds[policy] = statistics.median(times)
    finally:
        set_precision(parts.tail, head, "float32")
        parts.tail.set_weights(saved_tail)
        head.set_weights(saved)
    speedup = seconds["float32"] / seconds["mixed_bfloat16"]
    return {"chosen": "mixed_bfloat16" if speedup >= PRECISION_GAIN else "float32", "step_seconds": seconds,
            "speedup": speedup, "threshold": PRECISION_GAIN, "batch": len(maps), "steps": steps}


def set_precision(tail: keras.Model, head: keras.Model, policy: str) -> None:
    """Set the compute dtype policy of the tail's layers and of the head's hidden layers; the
    head's softmax output stays float32 (the loss is computed on it). Takes effect in functions
    traced afterwards (a model built or a ``predict`` first called after this)."""
    for layer in [*tail.layers, *head.layers[:-1]]:
        if not isinstance(layer, keras.layers.InputLayer):
            layer.dtype_policy = policy


def precise_bn(tail: keras.Model, batch: np.ndarray) -> None:
    """Set the moving statistics of the tail's BatchNormalization layers that train with batch
    statistics to the statistics of ``batch`` ``(n, h, w, c)`` cut maps (PreciseBN; Wu & Johnson,
    2021, "Rethinking 'Batch' in BatchNorm").

    A phase-2 trial runs a few dozen steps: moving averages (momentum 0.9-0.99) still hold mostly
    the pretrained statistics when it is validated, and a trial whose weights moved fast scores
    far below what the same rates reach after the final model's thousands of steps. Refreshing
    the statistics before each validation removes that artifact of the short budget. One eager
    forward pass in training mode with momentum 0 (no gradient, no trace); momenta restored after.
    """
    layers = [la for la in tail.layers if isinstance(la, keras.layers.BatchNormalization) and la.trainable]
    saved = [la.momentum for la in layers]
    try:
        for la in layers:
            la.momentum = 0.0
        if layers:
            tail(keras.ops.convert_to_tensor(batch), training=True)
    finally:
        for la, m in zip(layers, saved, strict=True):
            la.momentum = m


def _schedule(peak: float, steps: int, warmup_fraction: float) -> keras.optimizers.schedules.LearningRateSchedule:
    warmup = int(round(warmup_fraction * steps))
    if warmup <= 0:
        return keras.optimizers.schedules.CosineDecay(peak, max(1, steps))
    return keras.optimizers.schedules.CosineDecay(0.0, max(1, steps - warmup), warmup_target=peak,
                                                  warmup_steps=warmup)


def build_tail_trainer(parts: TailParts, head: keras.Model, head_weights: list[np.ndarray],
                       params: dict[str, Any], steps_per_epoch: int, epochs: int,
                       precision: str = "float32") -> TwoRateModel:
    """Reset tail and head to their starting weights and compile cut maps -> head for ``params``,
    computing in ``precision`` (:func:`resolve_precision`; ``set_precision``), with its training
    state built (:func:`build_training_state`: the train function is traced once).

    The learning-rate schedules (linear warm-up, then cosine decay to 0) span ``epochs`` x
    ``steps_per_epoch`` steps: a trial stopped after fewer epochs has run a prefix of them.
    BatchNormalization: ``bn_mode="batch"`` trains with batch statistics and moving averages of
    momentum ``bn_momentum``; ``"frozen"`` keeps the pretrained statistics (inference mode).
    """
    params = space.with_defaults("tail", params)
    parts.reset()
    head.set_weights(head_weights)
    set_precision(parts.tail, head, resolve_precision(precision))
    frozen = {id(la) for la in parts.frozen_prefix(int(params["unfreeze_blocks"]))}
    for layer in parts.tail.layers:
        layer.trainable = id(layer) not in frozen
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = layer.trainable and params["bn_mode"] == "batch"
            layer.momentum = float(params["bn_momentum"])
    steps = steps_per_epoch * epochs
    lr, wd = float(params["tail_learning_rate"]), float(params["weight_decay"])
    tail_opt = keras.optimizers.AdamW(_schedule(lr, steps, params["warmup_fraction"]), weight_decay=wd)
    head_opt = keras.optimizers.AdamW(_schedule(lr * float(params["head_lr_multiplier"]), steps,
                                                params["warmup_fraction"]), weight_decay=wd)
    cut_input = keras.Input(parts.tail.input.shape[1:], name="cached_maps")
    trainer = TwoRateModel(cut_input, head(parts.tail(cut_input)), head=head, head_optimizer=head_opt,
                           name="tail_and_head")
    # each optimizer built on its own variables (also what BackupAndRestore saves and restores)
    head_opt.build([v for v in trainer.trainable_variables if id(v) in trainer._head_ids])
    tail_opt.build([v for v in trainer.trainable_variables if id(v) not in trainer._head_ids])
    trainer.compile(optimizer=tail_opt,
                    loss=keras.losses.CategoricalCrossentropy(label_smoothing=float(params["label_smoothing"])),
                    metrics=["accuracy"])
    build_training_state(trainer, np.zeros((1, *trainer.input.shape[1:]), np.float16),
                         np.zeros((1, head.output.shape[-1]), np.float32))
    return trainer


def tail_batches(cache: Cache, splits: Splits, params: dict[str, Any], rows: np.ndarray | None = None,
                 batch_size: int = 128, seed: int = 0, mirror: str = "auto") -> tuple[CachedMaps, CachedMaps]:
    """(augmented training batches over ``rows`` (default all training rows), validation batches)."""
    params = space.with_defaults("tail", params)
    rows = splits.train_idx if rows is None else rows
    train = CachedMaps(cache, "train", rows, batch_size, augment=True, shift=params["shift"], seed=seed, workers=2,
                       mirror=mirror)
    val = CachedMaps(cache, "train", splits.val_idx, VAL_BATCH)
    return train, val


class _EpochSeed(keras.callbacks.Callback):
    """Sets the batches' epoch number at the start of every epoch, so a resumed run draws the
    same shuffles and augmentation for epoch k as an uninterrupted one."""

    def __init__(self, data: CachedMaps) -> None:
        super().__init__()
        self.data = data

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.data.epoch = epoch

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.data.epoch = epoch + 1  # before the next epoch's batches are prefetched


def fit_tail(trainer: keras.Model, train: CachedMaps, val: CachedMaps, epochs: int,
             callbacks: list | None = None, initial_epoch: int = 0, verbose: int = 0,
             backup_dir: str | None = None, on_resume: Callable[[int, int], None] | None = None
             ) -> dict[str, list[float]]:
    """Fit; the epoch with the best validation accuracy is restored at the end.

    With ``backup_dir``, Keras's ``BackupAndRestore`` saves weights and optimizer state after
    every epoch and a rerun after a kill resumes from the last finished epoch (the backup is
    deleted when training completes). After a resume, "best epoch" is chosen among the epochs
    run since the resume; ``on_resume(k, epochs)`` is called first when resuming from epoch ``k``.
    """
    train.epoch = initial_epoch
    metadata = Path(backup_dir, "training_metadata.json") if backup_dir else None
    if metadata is not None and metadata.exists():
        # resuming: batches prefetched before on_epoch_begin must already be the resumed epoch's
        train.epoch = int(json.loads(metadata.read_text())["epoch"])
        if on_resume is not None:
            on_resume(train.epoch, epochs)
    best = keras.callbacks.EarlyStopping("val_accuracy", patience=epochs + 1, mode="max", restore_best_weights=True)
    resume = [keras.callbacks.BackupAndRestore(backup_dir)] if backup_dir else []
    # shuffle=False: the batches already hold each epoch's own permutation of the rows (seeded by
    # the epoch); Keras's default would also shuffle the batch order with Python's global `random`,
    # whose state a resumed run does not share with an uninterrupted one
    history = trainer.fit(train, epochs=epochs, initial_epoch=initial_epoch, validation_data=val, shuffle=False,
                          callbacks=[*resume, _EpochSeed(train), best, *(callbacks or [])], verbose=verbose)
    return {k: [float(v) for v in vs] for k, vs in history.history.items()}


def train_tail(cache: Cache, splits: Splits, parts: TailParts, head: keras.Model, params: dict[str, Any],
               epochs: int, rows: np.ndarray | None = None, callbacks: list | None = None, seed: int = 0,
               batch_size: int = 128, verbose: int = 0, backup_root: str | None = None,
               mirror: str = "auto", precision: str = "float32",
               on_resume: Callable[[int, int], None] | None = None) -> tuple[keras.Model, dict[str, list[float]]]:
    """Phase 2 in one call: the tail and ``head`` (from its current weights) fine-tuned on cut maps.

    Training (and the validation in it) computes in ``precision``; the layers are set back to
    float32 before the model is returned, so what its ``predict`` returns is what the saved
    float32 model predicts.

    With ``backup_root``, a killed run resumes at epoch granularity on rerun; the backup folder
    is keyed by the cache, parameters, epochs, rows, batch size and seed, so a changed recipe
    starts fresh. Returns the trained ``cut maps -> probabilities`` model (best epoch) and its
    history.
    """
    keras.utils.set_random_seed(seed)
    train, val = tail_batches(cache, splits, params, rows, batch_size, seed, mirror)
    precision = resolve_precision(precision)
    trainer = build_tail_trainer(parts, head, head.get_weights(), params, len(train), epochs, precision)
    backup_dir = None
    if backup_root is not None:
        import hashlib

        recipe = {"cache": cache.path.name, "params": space.with_defaults("tail", params), "epochs": epochs,
                  "rows": hashlib.sha1(np.asarray(train.rows).tobytes()).hexdigest(), "batch": batch_size,
                  "seed": seed, "mirror": train.mirror, "precision": precision}
        digest = hashlib.sha1(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]
        backup_dir = str(Path(backup_root) / f"tail-{digest}")
    history = fit_tail(trainer, train, val, epochs, callbacks, verbose=verbose, backup_dir=backup_dir,
                       on_resume=on_resume)
    set_precision(parts.tail, head, "float32")  # its predict function is traced after this: float32
    return trainer, history
