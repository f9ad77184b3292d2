"""The final model: head (+ tail) trained on cached activations, stitched, compiled, saved.

Entry point: :func:`build_final`. Stages, all on the cache (the frozen part never runs again):

1. the head alone on the cached pooled features (= frozen-feature accuracy);
2. the tail (layers after the cut; BatchNormalization trainable, batch statistics) and the
   head together on the cached cut activations, with random +-1-cell shifts and mirrored
   images from the cache, AdamW with cosine decay and label smoothing;
3. the tail's BatchNormalization statistics re-estimated over the training split;

then one Keras model is stitched: ``Input(32, 32, 3)`` -> Lambda(upsample) ->
Lambda(preprocess) -> the backbone (its tail layers are the ones just trained) -> head, and,
with ``tta``, the same on the mirrored image, averaged. It is compiled and saved atomically.
Every choice is made on the validation split; the test set is scored once, at the end.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from search import backbones, heads, space
from search.cache import Cache, ensure_cache
from search.data import CLASS_NAMES, NUM_CLASSES, Splits, load_cifar10, one_hot
from search.errors import UserError
from search.io import append_row, atomic_path, write_json

log = logging.getLogger(__name__)


@dataclass
class FinalConfig:
    """Everything ``make final`` can change; the defaults are the documented recipe."""

    backbone: str = "MobileNet"
    weights: str | None = "imagenet"
    cut: str | None = None
    resolution: int | None = None
    flip: bool = True
    data: str | None = None
    val_size: int = 5000
    seed: int = 0
    head_params: dict[str, Any] = field(default_factory=lambda: dict(space.DEFAULT_PARAMS))
    params_source: str = "default"
    head_epochs: int = 30
    tail_epochs: int = 6
    tail_learning_rate: float = 5e-4
    tail_weight_decay: float = 0.05
    tail_batch_size: int = 128
    tail_label_smoothing: float = 0.1
    shift: int = 1
    bn_passes: int = 2
    tta: bool = True
    output: str = "cifar10.h5"
    results: str = "results"
    cache_root: str = "cache"
    build_cache: bool = True
    parity_images: int = 500
    progress: bool = True


class CachedMaps(keras.utils.PyDataset):
    """Batches of cached cut activations for ``rows`` of a split, with augmentation.

    Yields ``(x, y)``: ``x`` ``(b, h, w, c)`` float32 activations, ``y`` ``(b, 10)`` one-hot.
    With ``augment``, each image is the cached mirror image with probability 1/2 (when the
    cache has flips) and is shifted by up to ``shift`` cells (zero fill).
    """

    def __init__(self, cache: Cache, split: str, rows: np.ndarray, batch_size: int,
                 augment: bool = False, shift: int = 0, view: str = "orig", seed: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.orig = cache.array(split, "cut", view)
        self.flip = cache.array(split, "cut", "flip") if augment and cache.key["flip"] else None
        self.labels = cache.labels[split]
        self.rows, self.batch_size = np.asarray(rows), batch_size
        self.augment, self.shift = augment, shift if augment else 0
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(self.rows) if augment else self.rows

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def on_epoch_end(self) -> None:
        if self.augment:
            self.order = self.rng.permutation(self.rows)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        idx = np.sort(self.order[i * self.batch_size:(i + 1) * self.batch_size])
        x = np.asarray(self.orig[idx], dtype=np.float32)
        rng = np.random.default_rng((self.rng.integers(1 << 31), i))
        if self.flip is not None:
            mirrored = rng.random(len(idx)) < 0.5
            if mirrored.any():
                x[mirrored] = self.flip[idx[mirrored]]
        if self.shift:
            s = self.shift
            padded = np.pad(x, ((0, 0), (s, s), (s, s), (0, 0)))
            dy, dx = rng.integers(0, 2 * s + 1, size=(2, len(idx)))
            h, w = x.shape[1:3]
            x = np.stack([padded[j, dy[j]:dy[j] + h, dx[j]:dx[j] + w] for j in range(len(idx))])
        return x, one_hot(self.labels[idx])


def _predict(model: keras.Model, x: Any, batch_size: int = 256) -> np.ndarray:
    return model.predict(x, batch_size=batch_size, verbose=0)


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(probs, axis=1) == labels))


def cached_probs(model: keras.Model, cache: Cache, split: str, rows: np.ndarray, tta: bool,
                 kind: str = "cut") -> np.ndarray:
    """Class probabilities of ``model`` on cached ``kind`` arrays; mirrored views averaged."""
    views = cache.views if tta else ("orig",)
    total = 0
    for view in views:
        if kind == "cut":
            data = CachedMaps(cache, split, rows, 256, view=view)
            total = total + _predict(model, data)
        else:
            total = total + _predict(model, np.asarray(cache.array(split, "pool", view)[rows]))
    return total / len(views)


def train_head_on_pooled(cache: Cache, splits: Splits, params: dict[str, Any], epochs: int,
                         seed: int = 0, verbose: int = 0) -> tuple[keras.Model, dict]:
    """Stage 1: the head on cached pooled features (mirrors added as extra rows).

    Returns the model (restored to its best validation epoch) and its history dict.
    """
    keras.utils.set_random_seed(seed)
    views = cache.views
    x = np.concatenate([np.asarray(cache.array("train", "pool", v)[splits.train_idx]) for v in views])
    y = one_hot(np.concatenate([splits.y_train[splits.train_idx]] * len(views)))
    x_val = np.asarray(cache.array("train", "pool", "orig")[splits.val_idx])
    y_val = one_hot(splits.y_train[splits.val_idx])
    head = heads.compile_for(heads.build_head(params, x.shape[1:]), params, steps_per_execution=64)
    stop = keras.callbacks.EarlyStopping("val_accuracy", patience=space.EARLY_STOPPING_PATIENCE,
                                         restore_best_weights=True, mode="max")
    history = head.fit(x, y, batch_size=int(params["batch_size"]), epochs=epochs,
                       validation_data=(x_val, y_val), callbacks=[stop], verbose=verbose)
    return head, history.history


def reestimate_bn(tail: keras.Model, data: keras.utils.PyDataset, passes: int) -> None:
    """Recompute the tail's BatchNormalization moving statistics by forward passes in
    training mode (no gradient step), so inference uses statistics of the final weights."""
    import tensorflow as tf

    step = tf.function(lambda x: tail(x, training=True))
    for _ in range(passes):
        for i in range(len(data)):
            step(data[i][0])


def stitch(spec: backbones.BackboneSpec, backbone: keras.Model, head: keras.Model, cut_layer: str,
           resolution: int, tta: bool) -> keras.Model:
    """``(b, 32, 32, 3)`` 0-255 pixels -> ``(b, 10)`` probabilities, one Keras model.

    The first layer is the Lambda that upsamples to ``resolution``; layers up to ``cut_layer``
    are frozen (``trainable=False``), the tail stays trainable.
    """
    for layer in backbones.frozen_layers(backbone, cut_layer):
        layer.trainable = False
    pixels = keras.Input((32, 32, 3), name="pixels")
    x = keras.layers.Lambda(backbones.upsample, arguments={"size": resolution}, name="upsample")(pixels)
    x = keras.layers.Lambda(backbones.preprocess, arguments={"backbone": spec.name}, name="preprocess")(x)
    probs = head(backbone(x))
    if tta:
        mirrored = keras.layers.Lambda(backbones.flip_left_right, name="mirror")(x)
        probs = keras.layers.Average(name="tta_average")([probs, head(backbone(mirrored))])
    return keras.Model(pixels, probs, name=f"cifar10_{spec.name.lower()}")


def save_model(model: keras.Model, output: str | os.PathLike) -> Path:
    """Save ``model`` as HDF5 at ``output`` atomically (temp file + rename)."""
    output = Path(output)
    with atomic_path(output, suffix=".h5") as tmp:
        try:
            model.save(tmp)
        except OSError as exc:
            raise UserError(f"cannot write {output}: {exc.strerror or exc}") from None
    return output


def build_final(config: FinalConfig, splits: Splits | None = None, model: keras.Model | None = None) -> dict:
    """Run the whole recipe; save ``config.output``; write and return ``results/final.json``.

    ``splits`` and ``model`` (an already built backbone) may be passed in by tests.
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    keras.utils.set_random_seed(config.seed)
    spec = backbones.get_backbone(config.backbone)
    resolution = config.resolution or spec.native_size
    cut_layer = spec.cut_layer(config.cut)
    results = Path(config.results)
    if splits is None:
        splits = load_cifar10(config.data, val_size=config.val_size, seed=config.seed)
    params = space.with_defaults(config.head_params)
    if model is None:
        model = spec.build(weights=config.weights, size=resolution)

    t = time.perf_counter()
    cache = ensure_cache(spec, splits, cut=config.cut,
                         resolution=resolution, flip=config.flip, weights=config.weights,
                         root=config.cache_root, build=config.build_cache,
                         progress=config.progress, model=model)
    timings["cache"] = time.perf_counter() - t
    log.info("cache %s (%s)", cache.path, "reused: the frozen part did not run" if cache.stats["hit"]
             else f"built: {cache.stats['chunks_computed']} chunks")
    base_row = {"backbone": spec.name, "cut": cut_layer, "resolution": resolution,
                "flip": config.flip, "train_images": len(splits.train_idx)}

    t = time.perf_counter()
    head, head_hist = train_head_on_pooled(cache, splits, params, config.head_epochs, config.seed,
                                           verbose=2 if config.progress else 0)
    frozen_val = accuracy(cached_probs(head, cache, "train", splits.val_idx, False, "pool"),
                          splits.y_train[splits.val_idx])
    frozen_val_tta = accuracy(cached_probs(head, cache, "train", splits.val_idx, True, "pool"),
                              splits.y_train[splits.val_idx])
    timings["head"] = time.perf_counter() - t
    rows = [{**base_row, "stage": "frozen features + head", "val_accuracy": frozen_val,
             "val_accuracy_tta": frozen_val_tta, "seconds": timings["head"], "head": params}]
    log.info("frozen features + head: val %.4f (mirror-averaged %.4f)", frozen_val, frozen_val_tta)

    tail = backbones.split_at_cut(model, cut_layer)
    for layer in tail.layers:
        layer.trainable = True
    cut_input = keras.Input(tail.input.shape[1:], name="cached_maps")
    trainable = keras.Model(cut_input, head(tail(cut_input)), name="tail_and_head")
    tail_params = {**params, "optimizer": "adamw", "weight_decay": config.tail_weight_decay,
                   "label_smoothing": config.tail_label_smoothing}
    train_data = CachedMaps(cache, "train", splits.train_idx, config.tail_batch_size, augment=True,
                            shift=config.shift, seed=config.seed, workers=2)
    val_data = CachedMaps(cache, "train", splits.val_idx, 256)
    epoch_rows: list[dict] = []
    if config.tail_epochs > 0:
        steps = config.tail_epochs * len(train_data)
        schedule = keras.optimizers.schedules.CosineDecay(config.tail_learning_rate, steps)
        heads.compile_for(trainable, tail_params, learning_rate=schedule)
        t = time.perf_counter()

        class EpochLog(keras.callbacks.Callback):
            def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
                epoch_rows.append({"epoch": epoch + 1, "seconds": time.perf_counter() - t,
                                   **{k: float(v) for k, v in (logs or {}).items()}})

        trainable.fit(train_data, epochs=config.tail_epochs, validation_data=val_data,
                      callbacks=[EpochLog()], verbose=2 if config.progress else 0)
        timings["tail"] = time.perf_counter() - t
        tail_val = accuracy(cached_probs(trainable, cache, "train", splits.val_idx, False),
                            splits.y_train[splits.val_idx])
        rows.append({**base_row, "stage": "tail fine-tuned", "val_accuracy": tail_val,
                     "seconds": timings["tail"], "epochs": config.tail_epochs,
                     "learning_rate": config.tail_learning_rate})
        if config.bn_passes:
            t = time.perf_counter()
            before = [w.numpy() for w in tail.non_trainable_weights]
            reestimate_bn(tail, CachedMaps(cache, "train", splits.train_idx, config.tail_batch_size),
                          config.bn_passes)
            timings["bn_reestimate"] = time.perf_counter() - t
            bn_val = accuracy(cached_probs(trainable, cache, "train", splits.val_idx, False),
                              splits.y_train[splits.val_idx])
            kept = bn_val >= tail_val
            if not kept:  # chosen on validation: keep the statistics from training
                for w, value in zip(tail.non_trainable_weights, before, strict=True):
                    w.assign(value)
            rows.append({**base_row, "stage": "tail fine-tuned + BN re-estimated",
                         "val_accuracy": bn_val, "seconds": timings["bn_reestimate"], "chosen": kept})
            log.info("BN re-estimation: val %.4f vs %.4f without: %s", bn_val, tail_val,
                     "kept" if kept else "reverted")
    else:
        trainable.compile(loss="categorical_crossentropy", metrics=["accuracy"])

    val_probs_plain = cached_probs(trainable, cache, "train", splits.val_idx, False)
    val_probs_tta = cached_probs(trainable, cache, "train", splits.val_idx, True)
    val_plain = accuracy(val_probs_plain, splits.y_train[splits.val_idx])
    val_tta = accuracy(val_probs_tta, splits.y_train[splits.val_idx])
    tta = config.tta and config.flip and val_tta >= val_plain
    rows.append({**base_row, "stage": "final, mirror-averaged (TTA)", "val_accuracy": val_tta,
                 "seconds": 0.0, "chosen": tta})

    # The test set, scored once, with the configuration chosen above.
    test_rows = np.arange(len(splits.y_test))
    test_probs = cached_probs(trainable, cache, "test", test_rows, tta)
    test_acc = accuracy(test_probs, splits.y_test)
    test_pred = test_probs.argmax(1)
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    np.add.at(confusion, (splits.y_test, test_pred), 1)
    per_class = {name: float(confusion[i, i] / max(1, confusion[i].sum())) for i, name in enumerate(CLASS_NAMES)}

    t = time.perf_counter()
    final = stitch(spec, model, head, cut_layer, resolution, tta)
    heads.compile_for(final, tail_params, learning_rate=config.tail_learning_rate)
    n = min(config.parity_images, len(test_rows))
    stitched_probs = _predict(final, splits.x_test[:n].astype(np.float32), batch_size=64)
    parity = {
        "images": n,
        "cached_accuracy": accuracy(test_probs[:n], splits.y_test[:n]),
        "stitched_accuracy": accuracy(stitched_probs, splits.y_test[:n]),
        "prediction_agreement": float(np.mean(stitched_probs.argmax(1) == test_probs[:n].argmax(1))),
        "max_abs_prob_diff": float(np.abs(stitched_probs - test_probs[:n]).max()),
    }
    saved = save_model(final, config.output)
    timings["stitch_and_save"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start

    for row in rows:
        append_row(results / "ablation.json", {**row, "recorded": time.strftime("%Y-%m-%dT%H:%M:%S")})
    summary = {
        "config": {**asdict(config), "head_params": params, "tail_params": tail_params},
        "cache": {"path": str(cache.path), "key": cache.key, "reused": cache.stats["hit"],
                  "extraction": cache.manifest.get("extraction")},
        "data": {"source": splits.source, "train": len(splits.train_idx), "val": len(splits.val_idx),
                 "test": len(splits.y_test), "fingerprint": splits.fingerprint},
        "frozen_val_accuracy": frozen_val, "frozen_val_accuracy_tta": frozen_val_tta,
        "val_accuracy": val_tta if tta else val_plain, "val_accuracy_plain": val_plain,
        "val_accuracy_tta": val_tta, "tta": tta,
        "test_accuracy": test_acc, "test_confusion_matrix": confusion.tolist(),
        "test_per_class_accuracy": per_class, "class_names": list(CLASS_NAMES), "parity": parity,
        "test_first_predictions": {"true": splits.y_test[:48].tolist(), "predicted": test_pred[:48].tolist(),
                                   "confidence": test_probs[:48].max(1).round(4).tolist()}, "epochs": epoch_rows,
        "head_history": {k: [float(v) for v in vs] for k, vs in head_hist.items()},
        "timings_seconds": timings, "model_path": str(saved.resolve()), "stages": rows,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json(results / "final.json", summary)
    log.info("val %.4f, test %.4f (cached path); stitched %.4f vs cached %.4f on %d test images; "
             "saved %s", summary["val_accuracy"], test_acc, parity["stitched_accuracy"],
             parity["cached_accuracy"], n, saved)
    return summary
