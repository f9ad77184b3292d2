"""What the runners train on: stratified subsets of rows, pooled features resident in memory
(:class:`PooledData`, phase 1), and batches of cached cut maps with reproducible augmentation
(:class:`CachedMaps`, phase 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from search.cache import Cache
from search.data import Splits, one_hot
from search.errors import UserError

VAL_BATCH = 256


HEAD_VAL_BATCH = 4096  # rows per validation batch of a head on pooled features (a few MB)


def stratified_folds(rows: np.ndarray, labels: np.ndarray, k: int, seed: int = 0
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` stratified folds of ``rows`` (``labels`` their classes): (rows to fit, held-out rows)
    each, every row held out once. The same ``seed`` gives the same folds, so the trials of a
    study are scored on the same images."""
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(k, shuffle=True, random_state=seed)
    return [(rows[fit], rows[held]) for fit, held in splitter.split(np.zeros(len(rows)), labels)]


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
        n_orig = len(self.x_train) // self.views
        labels = self.y_train[:n_orig].argmax(1)
        out = []
        for fit_rows, held in stratified_folds(np.arange(n_orig), labels, k, seed):
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


def offsets(shift: int) -> tuple[tuple[int, int], ...]:
    """Every offset ``(dy, dx)`` that :func:`shift_maps` draws with ``shift``: ``(2 shift + 1)^2``
    of them, ``(0, 0)`` first."""
    rest = [(dy, dx) for dy in range(-shift, shift + 1) for dx in range(-shift, shift + 1) if (dy, dx) != (0, 0)]
    return ((0, 0), *rest)


def shift_by(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``(b, h, w, c)`` maps moved by one fixed offset, ``out[:, i, j] = x[:, i + dy, j + dx]``, zero
    fill: one of the views :func:`shift_maps` draws at random, in NumPy (test-time averaging moves
    maps with ``backbones.shift_cells``, in the graph, ``final.offset_probs``)."""
    if dy == dx == 0:
        return x
    s = max(abs(dy), abs(dx))
    h, w = x.shape[1:3]
    return np.pad(x, ((0, 0), (s, s), (s, s), (0, 0)))[:, s + dy:s + dy + h, s + dx:s + dx + w]


def shift_maps(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    """Shift each ``(h, w, c)`` map of ``x`` by ``-s..s`` cells in each direction, zero fill (vectorized)."""
    b, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (s, s), (s, s), (0, 0)))
    dy, dx = rng.integers(0, 2 * s + 1, size=(2, b))
    ys = dy[:, None] + np.arange(h)[None, :]
    xs = dx[:, None] + np.arange(w)[None, :]
    return padded[np.arange(b)[:, None, None], ys[:, :, None], xs[:, None, :]]

