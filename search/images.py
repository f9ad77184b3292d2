"""Bring your own images: a folder of class folders decoded once into uint8 arrays.

Entry point: :func:`read_folder`. Layouts, as ``keras.utils.image_dataset_from_directory``
reads them (class names are the folder names, numbered in alphabetical order):

- ``DIR/<class>/*.jpg|png|...`` : a test split is carved from it, stratified, with its own fixed
  seed (``TEST_SEED``, not the run's ``--seed``, so every run and seed share one test set and
  one feature cache), ``test_fraction`` of each class; recorded as ``carved_test``;
- ``DIR/train/<class>/...`` and ``DIR/test/<class>/...``: the user's own test split.

Every image, whatever its size and mode (grayscale, RGBA, palette, CMYK, 16-bit), is converted
to RGB (Pillow's ``convert("RGB")``, as ``keras.utils.load_img`` does: alpha is dropped) and
resized to one square ``image_size`` (bilinear, aspect ratio not kept, as Keras's default).
Default size: the images' own side when they all share one square size (CIFAR-10's 32), else
:data:`DEFAULT_SIZE`. Decoding happens once: the arrays are kept in
``<cache_root>/data/<folder>-<digest>.npz`` keyed by every file's path, size and modification
time and by the options, written atomically, and reused by every later run. Each split is
shuffled with ``TEST_SEED`` (folders are read class by class), so any prefix mixes the classes.

Bad input: a missing folder, no class folders, a single class, an empty class folder, or no
image at all is refused with one line naming the folder. A file with an image extension that
Pillow cannot decode (not an image, truncated) is **skipped**: the count and the first names are
logged and recorded (``skipped``); a class left with no decodable image is refused. Files
without an image extension are ignored, as Keras does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from search.errors import UserError
from search.split import stratified_split

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_SIZE = 128
MIN_SIZE, MAX_SIZE = 8, 1024
TEST_SEED = 0
FORMAT_VERSION = 2  # 2: images shuffled with TEST_SEED after decoding


@dataclass
class FolderData:
    """A decoded folder: ``x_*`` ``(n, s, s, 3)`` uint8, ``y_*`` ``(n,)`` int64 class ids."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    source: str
    carved_test: bool
    skipped: list[str] = field(default_factory=list)
    reused: bool = False


def _class_folders(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def scan(root: str | os.PathLike) -> tuple[tuple[str, ...], dict[str, list[tuple[Path, int]]]]:
    """Class names and, per split (``"train"``, and ``"test"`` when the folder has one), the
    ``(file, class id)`` pairs; refuses a layout it cannot use, naming the folder."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data folder not found: {root}")
    top = {p.name: p for p in _class_folders(root)}
    split_dirs = {"train": top.get("train"), "test": top.get("test")}
    if split_dirs["train"] is not None and split_dirs["test"] is not None and set(top) == {"train", "test"}:
        layout = split_dirs
    else:
        layout = {"train": root}
    names: tuple[str, ...] | None = None
    files: dict[str, list[tuple[Path, int]]] = {}
    for split, folder in layout.items():
        classes = _class_folders(folder)
        if not classes:
            raise UserError(f"no class folders in {folder}: expected {folder}/<class name>/<images>")
        found = tuple(c.name for c in classes)
        if names is None:
            names = found
        elif found != names:
            raise UserError(f"{folder} has classes {list(found)} but {layout['train']} has {list(names)}")
        if len(names) < 2:
            raise UserError(f"{folder} has one class folder ({names[0]}): a classifier needs at least two")
        files[split] = []
        for label, c in enumerate(classes):
            members = _image_files(c)
            if not members:
                raise UserError(f"class folder {c} has no image files ({', '.join(IMAGE_EXTENSIONS)})")
            files[split] += [(f, label) for f in members]
    return names, files


def _digest(root: Path, files: dict[str, list[tuple[Path, int]]], options: dict) -> str:
    h = hashlib.sha1(json.dumps({**options, "format": FORMAT_VERSION}, sort_keys=True).encode())
    for split in sorted(files):
        for f, label in files[split]:
            st = f.stat()
            h.update(f"{split}/{f.relative_to(root)}:{label}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


def _open(path: Path):
    from PIL import Image

    img = Image.open(path)
    img.load()  # decodes now: a truncated or non-image file fails here
    return img


def _decode(items: list[tuple[Path, int]], size: int, progress: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from PIL import Image
    from tqdm.auto import tqdm

    x = np.empty((len(items), size, size, 3), np.uint8)
    y = np.empty(len(items), np.int64)
    kept, skipped = 0, []
    for path, label in tqdm(items, unit="img", desc="decode", disable=not progress):
        try:
            img = _open(path).convert("RGB")
        except (OSError, ValueError, SyntaxError) as exc:  # Pillow's errors for bad or truncated files
            skipped.append(f"{path} ({type(exc).__name__})")
            continue
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        x[kept], y[kept] = np.asarray(img, np.uint8), label
        kept += 1
    return x[:kept], y[:kept], skipped


def _common_side(items: list[tuple[Path, int]]) -> int | None:
    """The side all images share when they are one square size, else None (headers only)."""
    from PIL import Image

    sizes = set()
    for path, _ in items:
        try:
            with Image.open(path) as img:
                sizes.add(img.size)
        except (OSError, ValueError, SyntaxError):
            continue
        if len(sizes) > 1:
            return None
    (w, h), = sizes if len(sizes) == 1 else ((0, 1),)
    return w if w == h else None


def read_folder(root: str | os.PathLike, image_size: int | None = None, cache_root: str | os.PathLike = "cache",
                test_fraction: float = 0.2, progress: bool = True) -> FolderData:
    """Decode ``root`` (see the module docstring) once; later calls reuse the stored arrays.

    Args:
        root: the folder of class folders (or of ``train/`` and ``test/`` class folders).
        image_size: stored side in pixels, 8..1024; default: the images' own common square side,
            else :data:`DEFAULT_SIZE`.
        cache_root: where the decoded arrays are kept (``<cache_root>/data/``).
        test_fraction: share of each class carved as the test split when there is no ``test/``.
    """
    from search.io import atomic_path

    root = Path(root)
    if image_size is not None and not MIN_SIZE <= image_size <= MAX_SIZE:
        raise UserError(f"image size must be in {MIN_SIZE}..{MAX_SIZE}, got {image_size}")
    if not 0 < test_fraction < 1:
        raise UserError(f"test fraction must be in (0, 1), got {test_fraction}")
    names, files = scan(root)
    options = {"image_size": image_size, "test_fraction": test_fraction if "test" not in files else None,
               "test_seed": TEST_SEED}
    stored = Path(cache_root) / "data" / f"{root.resolve().name}-{_digest(root, files, options)}.npz"
    if stored.exists():
        with np.load(stored, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            log.info("decoded images reused: %s", stored)
            return FolderData(z["x_train"], z["y_train"], z["x_test"], z["y_test"], tuple(meta["class_names"]),
                              meta["source"], meta["carved_test"], meta["skipped"], reused=True)
    everything = [item for split in files.values() for item in split]
    size = image_size or _common_side(everything) or DEFAULT_SIZE
    if not MIN_SIZE <= size <= MAX_SIZE:
        size = DEFAULT_SIZE
    log.info("decoding %d images of %d classes from %s at %dx%d (once; kept in %s)",
             len(everything), len(names), root, size, size, stored)
    decoded = {split: _decode(items, size, progress) for split, items in files.items()}
    skipped = [s for _, _, sk in decoded.values() for s in sk]
    if skipped:
        log.warning("skipped %d file(s) that are not decodable images, e.g. %s", len(skipped), "; ".join(skipped[:3]))
    for split, (_, y, _) in decoded.items():
        empty = [names[c] for c in range(len(names)) if not np.any(y == c)]
        if empty:
            raise UserError(f"class folder(s) {empty} of {root} ({split}) have no decodable image")
    x, y, _ = decoded["train"]
    carved = "test" not in decoded
    if carved:
        counts = np.bincount(y, minlength=len(names))
        if counts.min() < 2:
            raise UserError(f"class {names[int(counts.argmin())]} of {root} has one image: carving a test "
                            "split needs at least two per class")
        n_test = max(len(names), int(round(test_fraction * len(y))))
        train_idx, test_idx = stratified_split(y, min(n_test, len(y) - len(names)), seed=TEST_SEED)
        x_train, y_train, x_test, y_test = x[train_idx], y[train_idx], x[test_idx], y[test_idx]
    else:
        x_train, y_train = x, y
        x_test, y_test, _ = decoded["test"]
    # folders are read class by class: shuffle (fixed seed) so that any prefix (``--limit``) mixes classes
    rng = np.random.default_rng(TEST_SEED)
    train_order, test_order = rng.permutation(len(y_train)), rng.permutation(len(y_test))
    x_train, y_train = x_train[train_order], y_train[train_order]
    x_test, y_test = x_test[test_order], y_test[test_order]
    source = f"{root.resolve()} ({'test split carved, ' if carved else 'own test split, '}{size}px)"
    meta = {"class_names": list(names), "source": source, "carved_test": carved, "skipped": skipped,
            "image_size": size, "test_seed": TEST_SEED if carved else None}
    try:
        stored.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(stored, suffix=".npz") as tmp:
            np.savez(tmp, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, meta=json.dumps(meta))
    except OSError as exc:
        raise UserError(f"cannot write decoded images to {stored}: {exc.strerror or exc}") from None
    return FolderData(x_train, y_train, x_test, y_test, names, source, carved, skipped)
