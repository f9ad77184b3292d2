"""Data loading (CIFAR-10 or a folder of class folders), input validation, the validation split.

Entry point: :func:`load_data`. The data source is, in order of precedence, the ``path``
argument, the ``CIFAR10_NPZ`` environment variable, then ``keras.datasets.cifar10.load_data()``
(which downloads on a machine with internet). ``path`` is either an ``.npz`` holding
``x_train``, ``y_train``, ``x_test``, ``y_test`` with the shapes and dtypes of
``cifar10.load_data()``, or a folder of class folders (``search.images.read_folder``: any image
size and mode, any number of classes, decoded once).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from search.errors import UserError
from search.selection import default_val_size
from search.split import stratified_split

NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def validate_images(x: np.ndarray, name: str = "X", shape: tuple[int, ...] = IMAGE_SHAPE) -> np.ndarray:
    """Check ``x`` is a non-empty numeric ``(m, *shape)`` array (default ``(m, 32, 32, 3)``).

    Raises:
        UserError (a ValueError): saying what was expected and what was given.
    """
    x = np.asarray(x)
    if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise UserError(f"{name} must be numeric pixels (uint8 0-255), got dtype {x.dtype}")
    expected = "(m, " + ", ".join(map(str, shape)) + ")"
    if x.ndim != 4:
        raise UserError(f"{name} must have rank 4 {expected}, got shape {x.shape}")
    if x.shape[1:] != tuple(shape):
        raise UserError(f"{name} must have shape {expected}, got {x.shape}")
    if x.shape[0] == 0:
        raise UserError(f"{name} is empty: expected at least one image of shape {tuple(shape)}")
    return x


def validate_labels(y: np.ndarray, m: int | None = None, name: str = "Y",
                    num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Return ``y`` as a flat int64 array of class ids in ``0..num_classes - 1`` (default 0..9).

    Accepts shape ``(m,)`` or ``(m, 1)`` (as ``cifar10.load_data`` returns). When ``m`` is
    given, the length must equal it.
    """
    y = np.asarray(y)
    if y.dtype == object or not np.issubdtype(y.dtype, np.number):
        raise UserError(f"{name} must be integer class ids 0-9, got dtype {y.dtype}")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise UserError(f"{name} must have shape (m,) or (m, 1), got {y.shape}")
    if y.shape[0] == 0:
        raise UserError(f"{name} is empty: expected at least one label")
    if m is not None and y.shape[0] != m:
        raise UserError(f"X has {m} images but {name} has {y.shape[0]} labels")
    if np.issubdtype(y.dtype, np.floating) and not np.all(np.mod(y, 1) == 0):
        raise UserError(f"{name} must hold whole numbers 0-9, got non-integer values")
    if y.min() < 0 or y.max() >= num_classes:
        raise UserError(f"{name} labels must be in 0..{num_classes - 1}, got range {y.min()}..{y.max()}")
    return y.astype(np.int64)


def one_hot(y: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """``(m,)`` int labels -> ``(m, num_classes)`` float32 one-hot."""
    return np.eye(num_classes, dtype=np.float32)[np.asarray(y, dtype=np.int64)]


@dataclass(frozen=True)
class Splits:
    """The data in memory, with the validation split as indices into the training set.

    Attributes (CIFAR-10's sizes; a folder of ``k`` classes stored at ``s`` px has its own):
        x_train: ``(50000, 32, 32, 3)`` uint8, all training images (the cache covers them all).
        y_train: ``(50000,)`` int64.
        x_test: ``(10000, 32, 32, 3)`` uint8, touched only for the final reported score.
        y_test: ``(10000,)`` int64.
        train_idx: int64 indices of ``x_train`` used for fitting.
        val_idx: int64 indices of ``x_train`` held out for every model choice.
        fingerprint: sha1 of the four arrays' bytes, and of the class names when they are not
            CIFAR-10's (part of every cache key).
        source: where the data came from (a path or ``keras.datasets``).
        class_names: one name per class id.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray
    fingerprint: str
    source: str
    class_names: tuple[str, ...] = CLASS_NAMES

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(s, s, 3)``: what the saved model's first layer takes."""
        return tuple(self.x_train.shape[1:])

    def subset(self, n_train: int, n_test: int, val_size: int, seed: int = 0) -> Splits:
        """A smaller copy (first ``n_train``/``n_test`` images), for tests and quick runs."""
        return make_splits(
            self.x_train[:n_train], self.y_train[:n_train],
            self.x_test[:n_test], self.y_test[:n_test],
            val_size=val_size, seed=seed, source=f"{self.source}[:{n_train}]", class_names=self.class_names,
        )


def fingerprint_arrays(*arrays: np.ndarray) -> str:
    """sha1 (hex, 16 chars) over the shapes, dtypes and bytes of ``arrays``."""
    h = hashlib.sha1()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()[:16]


def make_splits(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
    val_size: int | None = 5000, seed: int = 0, source: str = "arrays",
    class_names: tuple[str, ...] = CLASS_NAMES,
) -> Splits:
    """Validate raw arrays and build :class:`Splits` (uint8 images, int64 labels).

    Images are ``(m, s, s, 3)`` with one ``s`` for both splits (CIFAR-10: 32); labels in
    ``0..len(class_names) - 1``. ``val_size`` None: ``search.selection.default_val_size``: 10 % of
    the training images (5000 of 50k), at least 50 per class, at most 30 % of them.
    """
    class_names = tuple(class_names)
    shape = np.shape(x_train)[1:]
    if len(shape) != 3 or shape[0] != shape[1] or shape[2] != 3:
        shape = IMAGE_SHAPE  # validate_images names what is wrong
    x_train = validate_images(x_train, "x_train", shape).astype(np.uint8, copy=False)
    x_test = validate_images(x_test, "x_test", shape).astype(np.uint8, copy=False)
    y_train = validate_labels(y_train, len(x_train), "y_train", len(class_names))
    y_test = validate_labels(y_test, len(x_test), "y_test", len(class_names))
    if val_size is None:
        val_size = default_val_size(len(y_train), len(class_names))
    train_idx, val_idx = stratified_split(y_train, val_size, seed)
    fingerprint = fingerprint_arrays(x_train, y_train, x_test, y_test)
    if class_names != CLASS_NAMES:
        fingerprint = hashlib.sha1(f"{fingerprint}{list(class_names)}".encode()).hexdigest()[:16]
    return Splits(x_train, y_train, x_test, y_test, train_idx, val_idx, fingerprint, source, class_names)


def read_npz(path: str | os.PathLike) -> tuple[np.ndarray, ...]:
    """Read ``(x_train, y_train, x_test, y_test)`` from an ``.npz``; clear error otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path} (build it with "
                        "`python ../shared/data/make_cifar10_npz.py cache/cifar10.npz`)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in NPZ_KEYS if k not in npz.files]
            if missing:
                raise UserError(f"data file {path} lacks keys {missing}; expected {list(NPZ_KEYS)}")
            return tuple(npz[k] for k in NPZ_KEYS)
    except UserError:
        raise
    except Exception as exc:  # zipfile/format errors: name the file, not the internals
        raise UserError(f"data file {path} is not a readable .npz: {exc}") from None


def load_data(path: str | os.PathLike | None = None, val_size: int | None = None, seed: int = 0,
              image_size: int | None = None, cache_root: str | os.PathLike = "cache",
              progress: bool = True) -> Splits:
    """Load the data and carve a stratified validation split from the training images.

    Args:
        path: a folder of class folders (``search.images.read_folder``), or an ``.npz`` with the
            arrays of ``cifar10.load_data()``; default ``$CIFAR10_NPZ``, else
            ``keras.datasets.cifar10.load_data()``.
        val_size: validation images taken from the training images (equal per class);
            default 10 % of them (5000 for CIFAR-10), at least 50 per class, at most 30 %.
        seed: seed of the split.
        image_size: a folder's stored image side (see ``read_folder``); refused for an ``.npz``.
        cache_root: where a folder's decoded arrays are kept.
    """
    path = path or os.environ.get("CIFAR10_NPZ") or None
    if path is not None and Path(path).is_dir():
        from search.images import read_folder

        folder = read_folder(path, image_size=image_size, cache_root=cache_root, progress=progress)
        return make_splits(folder.x_train, folder.y_train, folder.x_test, folder.y_test, val_size=val_size,
                           seed=seed, source=folder.source, class_names=folder.class_names)
    if image_size is not None:
        raise UserError("--image-size applies to a folder of images (--data DIR), not to CIFAR-10 arrays")
    if path is not None:
        arrays, source = read_npz(path), str(path)
    else:
        import keras

        try:
            (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
        except Exception as exc:  # offline: get_file's URL/HTTP errors, as one line
            raise UserError(f"cannot download CIFAR-10 ({type(exc).__name__}); offline, set CIFAR10_NPZ or "
                            "pass --data (see README: make offline)") from None
        arrays, source = (x_train, y_train, x_test, y_test), "keras.datasets.cifar10"
    return make_splits(*arrays, val_size=val_size, seed=seed, source=source)


def load_cifar10(path: str | os.PathLike | None = None, val_size: int | None = 5000, seed: int = 0) -> Splits:
    """CIFAR-10 (``path``: an ``.npz``; default ``$CIFAR10_NPZ``, else the Keras download)."""
    return load_data(path, val_size=val_size, seed=seed)
