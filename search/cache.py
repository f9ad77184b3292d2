"""The feature cache: the frozen part of a backbone runs over the data exactly once.

Entry point: :func:`ensure_cache`. A cache is a folder ``cache/<key id>/`` holding, for each
split (``train`` = all 50k training images, ``test``) and view (``orig``, and ``flip`` for the
horizontally mirrored images when asked):

- ``{split}_{view}_cut.npy``: activations at the cut layer, ``(n, h, w, c)`` float16;
- ``{split}_{view}_pool.npy``: the backbone's pooled output, ``(n, features)`` float32;
- ``manifest.json``: the key, shapes, dtypes, sizes and row checksums, written last.

What makes a cache stale: any field of :class:`CacheKey` (backbone, weights fingerprint,
resolution, cut layer, data fingerprint, flip). A cache whose manifest, file sizes or sampled
checksums do not match is rebuilt (or refused with ``build=False``), never used. Extraction
writes in chunks into ``*.partial`` memmaps and records finished chunks in ``progress.json``;
a killed extraction resumes from the last finished chunk. One process builds a given cache at
a time (:func:`build_lock`); the others wait for it and then reuse it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import keras
import numpy as np

from search import backbones
from search.config import CHUNK_SIZE
from search.data import CLASS_NAMES, IMAGE_SHAPE, NUM_CLASSES, Splits
from search.errors import UserError
from search.io import read_json, write_json

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
KINDS = ("cut", "pool")
FORMAT_VERSION = 1
DEFAULT_ROOT = Path("cache")


@dataclass(frozen=True)
class CacheKey:
    """Everything the cached numbers depend on; its hash names the cache folder."""

    backbone: str
    weights: str
    weights_fingerprint: str
    resolution: int
    cut_layer: str
    data_fingerprint: str
    flip: bool
    format_version: int = FORMAT_VERSION

    @property
    def id(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        digest = hashlib.sha1(blob).hexdigest()[:12]
        cut = self.cut_layer.replace("before:", "before-")
        return f"{self.backbone}-{self.resolution}-{cut}{'-flip' if self.flip else ''}-{digest}"


@dataclass
class Cache:
    """A complete, verified cache opened read-only as memory maps (once per process)."""

    path: Path
    manifest: dict
    stats: dict = field(default_factory=dict)
    _maps: dict = field(default_factory=dict, repr=False)

    @property
    def key(self) -> dict:
        return self.manifest["key"]

    @property
    def views(self) -> tuple[str, ...]:
        return ("orig", "flip") if self.key["flip"] else ("orig",)

    def array(self, split: str, kind: str, view: str = "orig") -> np.ndarray:
        """Memory-mapped ``(n, ...)`` array of ``split``/``kind``/``view`` (read-only)."""
        name = array_name(split, view, kind)
        if name not in self.manifest["arrays"]:
            raise UserError(f"cache {self.path.name} has no {name} (built with flip={self.key['flip']})")
        if name not in self._maps:
            self._maps[name] = np.load(self.path / f"{name}.npy", mmap_mode="r")
        return self._maps[name]

    @property
    def num_classes(self) -> int:
        return int(self.manifest.get("num_classes", NUM_CLASSES))

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.manifest.get("class_names", CLASS_NAMES))

    @property
    def labels(self) -> dict[str, np.ndarray]:
        return {s: np.asarray(self.manifest["labels"][s], dtype=np.int64) for s in SPLITS}


def array_name(split: str, view: str, kind: str) -> str:
    return f"{split}_{view}_{kind}"


def _row_checksum(arr: np.ndarray) -> str:
    """sha1 of 8 evenly spaced rows: catches edited or foreign data without reading it all."""
    rows = np.unique(np.linspace(0, len(arr) - 1, 8).astype(int))
    return hashlib.sha1(np.ascontiguousarray(arr[rows]).tobytes()).hexdigest()[:16]


def verify(path: Path, key: CacheKey) -> str | None:
    """Why the cache at ``path`` cannot be used for ``key``, or None if it can."""
    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        return "no manifest (extraction unfinished)"
    try:
        manifest = read_json(manifest_path)
    except (OSError, ValueError) as exc:
        return f"unreadable manifest: {exc}"
    if manifest.get("key") != asdict(key):
        return "manifest key differs (another backbone, resolution, cut, weights or data)"
    for name, meta in manifest.get("arrays", {}).items():
        file = path / f"{name}.npy"
        if not file.exists():
            return f"{file.name} is missing"
        if file.stat().st_size != meta["bytes"]:
            return f"{file.name} has {file.stat().st_size} bytes, manifest says {meta['bytes']}"
        try:
            arr = np.load(file, mmap_mode="r")
        except (OSError, ValueError) as exc:
            return f"{file.name} unreadable: {exc}"
        if list(arr.shape) != meta["shape"] or str(arr.dtype) != meta["dtype"]:
            return f"{file.name} is {arr.shape} {arr.dtype}, manifest says {meta['shape']} {meta['dtype']}"
        if _row_checksum(arr) != meta["checksum"]:
            return f"{file.name} content differs from its checksum"
    return None


def build_extractor(model: keras.Model, spec: backbones.BackboneSpec, cut_layer: str,
                    resolution: int, image_shape: tuple[int, ...] = IMAGE_SHAPE, fold: bool = True) -> keras.Model:
    """``(b, *image_shape)`` pixels (CIFAR-10: 32 x 32 x 3) -> [cut activations, pooled
    features]: the frozen pass, float32.

    Starts with the same two Lambda layers as the saved model (``backbones.input_stack``). With
    ``fold`` (default) it runs :func:`backbones.fold_batch_norm`'s copy of ``model`` (the same
    function up to float rounding, faster); ``fold=False`` runs ``model`` as Keras built it.
    """
    if fold:
        model = backbones.fold_batch_norm(model)
    cut = backbones.cut_layer_of(model, cut_layer)
    inner = keras.Model(model.inputs, [cut.output, model.outputs[0]])
    pixels = keras.Input(tuple(image_shape), name="pixels")
    return keras.Model(pixels, inner(backbones.input_stack(pixels, spec, resolution)), name="extractor")


def frozen_pass(extractor: keras.Model, x: np.ndarray, batch_size: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Run ``extractor`` over ``x`` ``(n, h, w, 3)`` pixels in batches: ``(cut activations
    float16, pooled features float32)``, as the cache stores them.

    One compiled function per extractor, called batch by batch, with the float16 rounding done in
    the graph (half the bytes leave it); no float32 copy of a whole chunk is assembled.
    """
    import tensorflow as tf

    step = getattr(extractor, "_frozen_step", None)
    if step is None:
        def run(batch):
            cut, pool = extractor(batch, training=False)
            return tf.cast(cut, tf.float16), pool

        step = extractor._frozen_step = tf.function(run, reduce_retracing=True)
    cuts, pools = [], []
    for start in range(0, len(x), batch_size):
        cut, pool = step(tf.constant(x[start:start + batch_size]))
        cuts.append(cut.numpy())
        pools.append(pool.numpy())
    return np.concatenate(cuts), np.concatenate(pools)


def cache_key(spec: backbones.BackboneSpec, model: keras.Model, weights: str | None, cut_layer: str,
              resolution: int, splits: Splits, flip: bool) -> CacheKey:
    return CacheKey(spec.name, str(weights), backbones.weights_fingerprint(model), resolution,
                    cut_layer, splits.fingerprint, flip)


def ensure_cache(
    spec: backbones.BackboneSpec,
    splits: Splits,
    cut: str | None = None,
    resolution: int | None = None,
    flip: bool = False,
    weights: str | None = "imagenet",
    root: str | os.PathLike = DEFAULT_ROOT,
    build: bool = True,
    chunk_size: int = CHUNK_SIZE,
    batch_size: int = 100,
    progress: bool = True,
    model: keras.Model | None = None,
    on_chunk: Callable[[str, int, int], None] | None = None,
    extractor: keras.Model | None = None,
) -> Cache:
    """Return the verified cache for this configuration, extracting what is missing.

    Args:
        spec: the backbone (``backbones.get_backbone(name)``).
        splits: the data; the cache covers all of ``x_train`` and ``x_test``.
        cut: a cut name of ``spec`` (``"last2"``); default ``spec.default_cut``.
        resolution: input side after upsampling; default ``spec.native_size``.
        flip: also cache the horizontally mirrored images.
        weights: ``"imagenet"`` or None (random; tests only, never called pretrained).
        root: folder holding caches.
        build: when False, a missing or stale cache is an error instead of being built.
        chunk_size: images per resumable chunk.
        model: an already built backbone (else built here from ``spec`` and ``weights``).
        extractor: ``build_extractor(model, ...)`` already built (and traced) by the caller.
        on_chunk: called as ``on_chunk(array_prefix, start, stop)`` after each chunk is saved.

    Returns:
        The :class:`Cache`; ``cache.stats`` says how many chunks were computed in this call.
    """
    cut_layer, resolution = spec.resolve(cut, resolution)
    if model is None:
        model = spec.build(weights=weights, size=resolution)
    key = cache_key(spec, model, weights, cut_layer, resolution, splits, flip)
    path = Path(root) / key.id
    problem = verify(path, key)
    if problem is None:
        return _hit(path)
    if not build:
        raise UserError(f"no usable cache at {path}: {problem} (run without --no-build to build it)")
    with build_lock(path):
        problem = verify(path, key)  # another process may have built it while we waited
        if problem is None:
            return _hit(path)
        if (path / "manifest.json").exists():
            log.warning("rebuilding cache %s: %s", path, problem)
            shutil.rmtree(path)
        if extractor is None:
            extractor = build_extractor(model, spec, cut_layer, resolution, splits.image_shape)
        return _extract(spec, extractor, key, path, splits, chunk_size, batch_size, progress, on_chunk)


def _hit(path: Path) -> Cache:
    log.info("cache hit: %s (the frozen part does not run again)", path)
    return Cache(path, read_json(path / "manifest.json"), {"chunks_computed": 0, "hit": True})


@contextlib.contextmanager
def build_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<path>.lock`` while one process builds the cache at ``path``.

    Other processes wanting the same cache wait (saying so), then find it built. The kernel
    releases the lock when its holder exits, however it dies (SIGKILL included), so a stale
    lock never blocks; a killed build is resumed by the next holder from ``progress.json``.
    """
    import fcntl

    lock_file = path.parent / f"{path.name}.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise UserError(f"cannot create cache lock {lock_file}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another process is building cache %s; waiting for it (lock %s)", path.name, lock_file)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _extract(spec, extractor, key, path, splits, chunk_size, batch_size, progress, on_chunk) -> Cache:
    from tqdm.auto import tqdm

    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create cache folder {path}: {exc.strerror}") from None
    cut_shape = tuple(extractor.outputs[0].shape[1:])
    pool_shape = tuple(extractor.outputs[1].shape[1:])
    views = ("orig", "flip") if key.flip else ("orig",)
    images = {"train": splits.x_train, "test": splits.x_test}
    jobs = [(s, v) for s in SPLITS for v in views]
    need = sum(len(images[s]) * (np.prod(cut_shape) * 2 + np.prod(pool_shape) * 4) for s, _ in jobs)
    free = shutil.disk_usage(path).free
    progress_path = path / "progress.json"
    state = read_json(progress_path) if progress_path.exists() else {}
    if state.get("key") != asdict(key):
        state = {"key": asdict(key), "done": {}}
    remaining = sum(len(images[s]) - state["done"].get(f"{s}_{v}", 0) for s, v in jobs)
    if need * remaining / max(1, sum(len(images[s]) for s, _ in jobs)) > free:
        raise UserError(f"not enough disk for cache {path}: need ~{need / 1e9:.1f} GB, "
                        f"{free / 1e9:.1f} GB free")
    log.info("extracting %s: %d images through %s up to %s", path.name, remaining, spec.name, key.cut_layer)
    computed, started, seconds = 0, time.perf_counter(), 0.0
    bar = tqdm(total=remaining, unit="img", desc=f"extract {spec.name}", disable=not progress)
    for split, view in jobs:
        prefix = f"{split}_{view}"
        n = len(images[split])
        files = {k: path / f"{prefix}_{k}.npy.partial" for k in KINDS}
        shapes = {"cut": (n, *cut_shape), "pool": (n, *pool_shape)}
        dtypes = {"cut": np.float16, "pool": np.float32}
        done = state["done"].get(prefix, 0)
        if done and not all(f.exists() for f in files.values()):
            done = 0
        if done >= n and all((path / f"{prefix}_{k}.npy").exists() for k in KINDS):
            continue
        maps = {
            k: np.lib.format.open_memmap(files[k], mode="r+" if done else "w+",
                                         dtype=dtypes[k], shape=shapes[k])
            for k in KINDS
        }
        for start in range(done, n, chunk_size):
            stop = min(n, start + chunk_size)
            x = images[split][start:stop]
            if view == "flip":
                x = x[:, :, ::-1, :]
            t0 = time.perf_counter()
            cut_out, pool_out = frozen_pass(extractor, x, batch_size)
            seconds += time.perf_counter() - t0
            maps["cut"][start:stop] = cut_out
            maps["pool"][start:stop] = pool_out
            for m in maps.values():
                m.flush()
            state["done"][prefix] = stop
            write_json(progress_path, state)
            computed += 1
            bar.update(stop - start)
            if on_chunk is not None:
                on_chunk(prefix, start, stop)
        del maps
        for k in KINDS:
            os.replace(files[k], path / f"{prefix}_{k}.npy")
    bar.close()
    arrays = {}
    for split, view in jobs:
        for k in KINDS:
            name = array_name(split, view, k)
            arr = np.load(path / f"{name}.npy", mmap_mode="r")
            arrays[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype),
                            "bytes": (path / f"{name}.npy").stat().st_size,
                            "checksum": _row_checksum(arr)}
    elapsed = time.perf_counter() - started
    manifest = {
        "key": asdict(key), "arrays": arrays,
        "labels": {"train": splits.y_train.tolist(), "test": splits.y_test.tolist()},
        "num_classes": splits.num_classes, "class_names": list(splits.class_names),
        "data_source": splits.source,
        "extraction": {"seconds": elapsed, "predict_seconds": seconds,
                       "images": remaining, "chunks": computed,
                       "images_per_second": remaining / elapsed if elapsed else None},
    }
    write_json(path / "manifest.json", manifest)
    progress_path.unlink(missing_ok=True)
    return Cache(path, manifest, {"chunks_computed": computed, "hit": False,
                                  "seconds": elapsed})
