"""The final model: head and tail trained on cached activations, stitched, compiled, saved.

Entry point: :func:`build_final`. Stages, each its own function, all on the cache (the frozen
part runs over the data once, in :func:`stage_cache`, and never again):

1. :func:`stage_params`: the parameters of both phases, from the best trials of the searches
   run on *this* cache key (``--params auto``/``study``), or the documented defaults;
2. :func:`stage_head`: the head alone on the cached pooled features (``train.train_head``,
   the phase-1 trial runner) = the frozen-feature accuracy;
3. :func:`stage_tail`: the tail (layers after the cut) and the head together on the cached cut
   activations (``finetune.train_tail``, the phase-2 trial runner), best epoch restored; a killed
   run resumes from its last finished epoch on rerun (``cache/checkpoints/``, and the log says
   so); kept only if it beats the frozen-feature head on validation, else the head ships alone
   on the pretrained tail;
4. :func:`stage_bn`: the tail's BatchNormalization statistics re-estimated over the training
   split, *kept only if validation accuracy does not drop* (else the trained ones are restored);
5. :func:`stage_tta`: test-time averaging, chosen on validation: the mirrored image's or the
   mirrored activation map's prediction averaged in (:func:`tta_candidates`), then the better
   mirror also over every shift of the tail's training augmentation (:func:`tta_views`); each
   kept only if it raises validation accuracy;
6. :func:`stage_test`: the test set, scored once, with what was chosen above;
7. :func:`stage_save`: one Keras model stitched: ``Input(s, s, 3)`` (CIFAR-10: 32) -> Lambda(upsample) ->
   Lambda(preprocess) -> the frozen part -> the tail (just trained) -> head (and, with test-time
   averaging, the same on each mirrored or shifted view, averaged); compiled; checked against the
   cached path; saved atomically, with a sidecar ``<output stem>.json`` naming the classes
   (``class_names[i]`` is output ``i``) and the input size.

Every choice is made on the validation split. ``results/final.json`` records each stage, the
parameters of each phase and where they came from (study, trial, value).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from search import backbones, batches, finetune, heads, space, train
from search.cache import Cache, build_extractor, ensure_cache, frozen_pass
from search.config import PARAM_MODES, FinalConfig  # noqa: F401  (FinalConfig: this module's input)
from search.data import IMAGE_SHAPE, Splits, load_data
from search.errors import UserError
from search.io import append_row, atomic_path, code_version, write_json

log = logging.getLogger(__name__)
def _predict(model: keras.Model, x: Any, batch_size: int = 256) -> np.ndarray:
    return model.predict(x, batch_size=batch_size, verbose=0)


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(probs, axis=1) == labels))


SHIFTED = "+shifts"
MIRROR_VIEWS = {"none": ("orig",), "images": ("orig", "flip"), "maps": ("orig", "flipped_maps")}
View = tuple[str, tuple[int, int]]  # (cached view, offset in cells)
ORIGINAL: View = ("orig", (0, 0))


def tta_views(tta: str, shift: int = 0) -> list[View]:
    """The ``(view, offset)`` pairs whose predictions the test-time average ``tta`` averages: the
    views of its mirror (``"none"``: the image; ``"images"``: and the mirrored image; ``"maps"``:
    and the mirrored cut map), each at offset ``(0, 0)``, or for ``"<mirror>+shifts"`` at every
    offset of the tail's training shifts of ``shift`` cells (``batches.offsets``)."""
    mirror = tta.removesuffix(SHIFTED)
    if mirror not in MIRROR_VIEWS:
        raise ValueError(f"unknown test-time average {tta!r}")
    offsets = batches.offsets(shift) if tta.endswith(SHIFTED) else ((0, 0),)
    return [(view, offset) for view in MIRROR_VIEWS[mirror] for offset in offsets]


def average(probs: dict[View, np.ndarray], views: list[View]) -> np.ndarray:
    """The mean of the probabilities of ``views`` (keys of ``probs``)."""
    return sum(probs[v] for v in views) / len(views)


def offset_probs(model: keras.Model, chunks: Any, offsets: tuple[tuple[int, int], ...],
                 batch_size: int = batches.VAL_BATCH) -> dict[tuple[int, int], np.ndarray]:
    """Class probabilities of ``model`` on cut maps moved by each of ``offsets`` (``(dy, dx)``
    cells, ``backbones.shift_cells``), one array per offset: each batch of ``chunks`` (an iterable
    of ``(n, h, w, c)`` arrays, in row order) is read once and every offset is computed from it in
    one compiled call, instead of one pass over the data per offset (``Model.predict``). In
    inference mode each row's prediction does not depend on its batch; the shift is the saved
    model's own Lambda, so the values are the saved model's."""
    import tensorflow as tf

    offsets = tuple(tuple(o) for o in offsets)

    def views(x: Any) -> list:
        return [model(backbones.shift_cells(x, dy, dx) if (dy, dx) != (0, 0) else x, training=False)
                for dy, dx in offsets]

    step = tf.function(views, reduce_retracing=True)  # traced here: the model's current precision
    out: dict[tuple[int, int], list] = {o: [] for o in offsets}
    for chunk in chunks:
        for start in range(0, len(chunk), batch_size):
            for offset, probs in zip(offsets, step(tf.constant(chunk[start:start + batch_size])), strict=True):
                out[offset].append(probs.numpy())
    return {o: np.concatenate(parts) for o, parts in out.items()}


def _offsets_by_view(views: list[View]) -> dict[str, tuple[tuple[int, int], ...]]:
    grouped: dict[str, list] = {}
    for view, offset in dict.fromkeys(views):
        grouped.setdefault(view, []).append(tuple(offset))
    return {view: tuple(offsets) for view, offsets in grouped.items()}


def cached_view_probs(model: keras.Model, cache: Cache, split: str, rows: np.ndarray, views: list[View],
                      kind: str = "cut") -> dict[View, np.ndarray]:
    """Class probabilities of ``model`` on cached ``kind`` arrays, one array per ``(view, offset)``
    (``batches.CachedMaps``: ``"orig"``, ``"flip"`` (cached mirrored images), ``"flipped_maps"``);
    each view's maps are read once for all its offsets (:func:`offset_probs`)."""
    out = {}
    for view, offsets in _offsets_by_view(views).items():
        if kind == "cut":
            data = batches.CachedMaps(cache, split, rows, batches.VAL_BATCH, view=view)
            probs = offset_probs(model, (data[i][0] for i in range(len(data))), offsets)
            out.update({(view, offset): p for offset, p in probs.items()})
        elif view == "flipped_maps" or offsets != ((0, 0),):
            raise ValueError("pooled features have no mirrored or shifted maps")
        else:
            out[view, (0, 0)] = _predict(model, np.asarray(cache.array(split, "pool", view)[rows]))
    return out


def cached_probs(model: keras.Model, cache: Cache, split: str, rows: np.ndarray, tta: str = "none",
                 kind: str = "cut", shift: int = 0) -> np.ndarray:
    """Class probabilities of ``model`` on cached ``kind`` arrays, averaged over the views of the
    test-time average ``tta`` (:func:`tta_views`)."""
    views = tta_views(tta, shift)
    return average(cached_view_probs(model, cache, split, rows, views, kind), views)


def mirrored_image_probs(model: keras.Model, extractor: keras.Model, pixels: np.ndarray, kind: str = "cut",
                         chunk: int = 1000, offsets: tuple[tuple[int, int], ...] = ((0, 0),),
                         ) -> dict[tuple[int, int], np.ndarray]:
    """Probabilities of ``model`` on the mirrored ``pixels`` ``(n, h, w, 3)``, one array per
    offset of the cut maps (:func:`offset_probs`): the frozen pass (``extractor``,
    ``cache.build_extractor``) runs now, once, ``chunk`` images at a time, its cut activations
    rounded to float16 as the cache stores them; nothing is written."""
    offsets = tuple(tuple(o) for o in offsets)
    if kind != "cut" and offsets != ((0, 0),):
        raise ValueError("pooled features have no shifted maps")
    passes = (frozen_pass(extractor, np.ascontiguousarray(pixels[start:start + chunk, :, ::-1]))
              for start in range(0, len(pixels), chunk))
    if kind == "cut":
        return offset_probs(model, (cut for cut, _ in passes), offsets)
    return {(0, 0): np.concatenate([_predict(model, pool) for _, pool in passes])}


def reestimate_bn(tail: keras.Model, data: keras.utils.PyDataset, passes: int) -> None:
    """Recompute the tail's BatchNormalization moving statistics by forward passes in
    training mode (no gradient step), so inference uses statistics of the final weights."""
    import tensorflow as tf

    step = tf.function(lambda x: tail(x, training=True))
    for _ in range(passes):
        for i in range(len(data)):
            step(data[i][0])


def _signed(n: int) -> str:
    return f"m{-n}" if n < 0 else f"p{n}"


def stitch(spec: backbones.BackboneSpec, backbone: keras.Model, head: keras.Model, cut_layer: str,
           resolution: int, tta: str = "none", image_shape: tuple[int, ...] = IMAGE_SHAPE,
           shift: int = 0) -> keras.Model:
    """``(b, *image_shape)`` 0-255 pixels (CIFAR-10: ``(b, 32, 32, 3)``) -> ``(b, classes)``
    probabilities, one Keras model.

    The first layer is the Lambda that upsamples to ``resolution``; then the frozen part (layers
    up to ``cut_layer``, ``trainable=False``), the tail (trainable) and the head. ``tta``
    (:func:`tta_views`): ``"images"`` averages with the prediction on the mirrored image (the
    frozen part runs twice), ``"maps"`` with the prediction on the mirrored cut activations (the
    frozen part runs once); ``"+shifts"`` runs tail and head on each view's cut activations moved
    by every offset of ``shift`` cells (Lambda ``shift_cells``); exactly as :func:`cached_probs`
    scored them on the cache.
    """
    for layer in backbones.frozen_layers(backbone, cut_layer):
        layer.trainable = False
    frozen = keras.Model(backbone.inputs, backbones.cut_layer_of(backbone, cut_layer).output,
                         name=f"{backbone.name}_frozen")
    tail = backbones.split_at_cut(backbone, cut_layer)
    pixels = keras.Input(tuple(image_shape), name="pixels")
    x = backbones.input_stack(pixels, spec, resolution)
    sources = {"orig": frozen(x)}
    outputs = []
    for view, (dy, dx) in tta_views(tta, shift):
        if view == "flip" and view not in sources:
            sources[view] = frozen(keras.layers.Lambda(backbones.flip_left_right, name="mirror")(x))
        elif view == "flipped_maps" and view not in sources:
            sources[view] = keras.layers.Lambda(backbones.flip_left_right, name="mirror_maps")(sources["orig"])
        maps = sources[view]
        if (dy, dx) != (0, 0):
            maps = keras.layers.Lambda(backbones.shift_cells, arguments={"dy": dy, "dx": dx},
                                       name=f"shift_{view}_{_signed(dy)}_{_signed(dx)}")(maps)
        outputs.append(head(tail(maps)))
    probs = outputs[0] if len(outputs) == 1 else keras.layers.Average(name="tta_average")(outputs)
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


@dataclass
class Run:
    """What the stages share: the configuration, the data, the cache and what was trained."""

    config: FinalConfig
    spec: backbones.BackboneSpec
    splits: Splits
    backbone: keras.Model
    cut_layer: str
    resolution: int
    cache: Cache | None = None
    extractor: keras.Model | None = None
    params: dict | None = None
    provenance: dict | None = None
    head: keras.Model | None = None
    head_weights: list | None = None
    parts: finetune.TailParts | None = None
    trainer: keras.Model | None = None
    tta: str = "none"
    precision: str = "float32"

    def __post_init__(self) -> None:
        self.code_version = code_version()  # the code that runs: taken now, not when the run ends
        self.timings: dict[str, float] = {}
        self.rows: list[dict] = []
        self.epochs: list[dict] = []
        self.extra: dict[str, Any] = {}

    @property
    def val_labels(self) -> np.ndarray:
        return self.splits.y_train[self.splits.val_idx]

    @property
    def shift(self) -> int:
        """Cells of the tail's training shifts (``params["tail"]["shift"]``): the offsets of ``"+shifts"``."""
        return int((self.params or {}).get("tail", {}).get("shift", 0))

    def view_probs(self, model: keras.Model, split: str, rows: np.ndarray, views: list[View],
                   kind: str = "cut") -> dict[View, np.ndarray]:
        """:func:`cached_view_probs`; on a cache without mirrored images, the mirrored image's
        views (``"flip"``) are computed here by the frozen part (``extractor``, one pass for all
        their offsets), as the saved model computes them, instead of being read from the cache."""
        views = list(dict.fromkeys(views))
        computed = () if self.cache.key["flip"] else tuple(o for v, o in views if v == "flip")
        out = cached_view_probs(model, self.cache, split, rows,
                                [(v, o) for v, o in views if not (computed and v == "flip")], kind)
        if computed:
            pixels = (self.splits.x_train if split == "train" else self.splits.x_test)[rows]
            out.update({("flip", o): p for o, p in
                        mirrored_image_probs(model, self.extractor, pixels, kind, offsets=computed).items()})
        return out

    def probs(self, model: keras.Model, split: str, rows: np.ndarray, tta: str = "none",
              kind: str = "cut") -> np.ndarray:
        """Probabilities averaged over the views of ``tta`` (:func:`tta_views`, :meth:`view_probs`)."""
        views = tta_views(tta, self.shift)
        return average(self.view_probs(model, split, rows, views, kind), views)

    def val_accuracy(self, model: keras.Model, tta: str = "none", kind: str = "cut") -> float:
        return accuracy(self.probs(model, "train", self.splits.val_idx, tta, kind), self.val_labels)

    def row(self, stage: str, **fields: Any) -> None:
        self.rows.append({"backbone": self.spec.name, "cut": self.cut_layer, "resolution": self.resolution,
                          "mirror": self.config.mirror, "train_images": len(self.splits.train_idx),
                          "seed": self.config.seed, "stage": stage, **fields})


def stage_cache(run: Run) -> None:
    c = run.config
    run.extractor = build_extractor(run.backbone, run.spec, run.cut_layer, run.resolution, run.splits.image_shape)
    run.cache = ensure_cache(run.spec, run.splits, cut=c.cut, resolution=run.resolution, flip=c.mirror == "images",
                             weights=c.weights, root=c.cache_root, build=c.build_cache, progress=c.progress,
                             model=run.backbone, extractor=run.extractor)
    log.info("cache %s (%s)", run.cache.path, "reused: the frozen part did not run" if run.cache.stats["hit"]
             else f"built: {run.cache.stats['chunks_computed']} chunks")


def stage_params(run: Run) -> None:
    from search.engines import resolve_params

    run.params, run.provenance = resolve_params(run.config.params, run.config.results, run.cache.path.name,
                                                train_rows=len(run.splits.train_idx),
                                                tail_epochs=run.config.tail_epochs)
    for phase in space.PHASES:
        p = run.provenance[phase]
        log.info("%s parameters: %s%s: %s", phase, p["source"], f" ({p['why']})" if p.get("why") else
                 f" ({p['decision']['why']})" if p.get("decision") else "", run.params[phase])


def stage_head(run: Run) -> None:
    c = run.config
    data = batches.PooledData.from_cache(run.cache, run.splits, mirrored=c.mirror == "images")
    run.head, history = train.train_head(data, run.params["head"], c.head_epochs, seed=c.seed,
                                         verbose=2 if c.progress else 0)
    run.head_weights = run.head.get_weights()  # the head alone, before the tail's training moves it
    run.extra["head_history"] = history
    run.extra["head_optimizer"] = type(run.head.optimizer).__name__  # FusedAdamW etc. (heads.build_optimizer)
    frozen = run.val_accuracy(run.head, "none", "pool")
    frozen_tta = run.val_accuracy(run.head, "images", "pool") if c.mirror == "images" else None
    run.extra.update(frozen_val_accuracy=frozen, frozen_val_accuracy_tta=frozen_tta)
    run.row("frozen features + head", val_accuracy=frozen, val_accuracy_tta=frozen_tta, head=run.params["head"])
    log.info("frozen features + head: val %.4f", frozen)


def stage_tail(run: Run) -> None:
    c = run.config
    run.parts = finetune.TailParts.from_backbone(run.backbone, run.cut_layer, run.spec.tail_blocks(run.cut_layer))
    if c.tail_epochs == 0:
        # head only: the tail keeps its pretrained weights, BN in inference mode
        run.trainer = finetune.build_tail_trainer(run.parts, run.head, run.head.get_weights(),
                                               {**run.params["tail"], "bn_mode": "frozen", "unfreeze_blocks": 0}, 1, 1)
        return
    if c.tail_precision == "auto":  # timed here, on this machine, on the cached maps
        maps = batches.CachedMaps(run.cache, "train", run.splits.train_idx[:c.tail_batch_size], c.tail_batch_size)[0][0]
        probe = finetune.measure_precision(run.parts, run.head, maps, params=run.params["tail"])
        run.precision = probe["chosen"]
        run.extra["precision_probe"] = probe
        log.info("tail precision: %s (mixed bfloat16 step %.2fx float32's; chosen from %.2fx)", run.precision,
                 probe["speedup"], probe["threshold"])
    run.extra["tail_precision_resolved"] = run.precision
    start = time.perf_counter()

    class EpochLog(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            run.epochs.append({"epoch": epoch + 1, "seconds": time.perf_counter() - start,
                               **{k: float(v) for k, v in (logs or {}).items()}})

    run.trainer, _ = finetune.train_tail(run.cache, run.splits, run.parts, run.head, run.params["tail"],
                                      c.tail_epochs, callbacks=[EpochLog()], seed=c.seed,
                                      batch_size=c.tail_batch_size, verbose=2 if c.progress else 0,
                                      backup_root=str(Path(c.cache_root) / "checkpoints"), mirror=c.mirror,
                                      precision=run.precision, on_resume=lambda k, n: log.info(
                                          "tail: resuming from epoch %d of %d (a backup of a killed run)", k, n))
    best = max(run.epochs, key=lambda e: e["val_accuracy"])
    tuned, frozen = run.val_accuracy(run.trainer), run.extra["frozen_val_accuracy"]
    run.row("tail fine-tuned", val_accuracy=tuned, epochs=c.tail_epochs, best_epoch=best["epoch"],
            tail=run.params["tail"])
    keep = tuned > frozen
    run.extra["tail_decision"] = {
        "tail_val_accuracy": tuned, "head_val_accuracy": frozen, "shipped": "tail" if keep else "head",
        "why": f"fine-tuned tail {tuned:.4f} {'>' if keep else '<='} frozen-feature head {frozen:.4f} on validation"}
    if not keep:  # the pretrained tail in inference mode under the head as stage_head trained it
        log.info("the fine-tuned tail (val %.4f) does not beat the frozen-feature head (val %.4f): the head ships "
                 "alone on the pretrained tail", tuned, frozen)
        run.trainer = finetune.build_tail_trainer(run.parts, run.head, run.head_weights,
                                               {**run.params["tail"], "bn_mode": "frozen", "unfreeze_blocks": 0}, 1, 1)


def stage_bn(run: Run) -> None:
    c = run.config
    if (not c.bn_passes or c.tail_epochs == 0 or run.params["tail"]["bn_mode"] != "batch"
            or run.extra["tail_decision"]["shipped"] == "head"):
        return
    tail = run.parts.tail
    before_val = run.val_accuracy(run.trainer)
    before = [np.array(w) for w in tail.non_trainable_weights]
    reestimate_bn(tail, batches.CachedMaps(run.cache, "train", run.splits.train_idx, c.tail_batch_size), c.bn_passes)
    after_val = run.val_accuracy(run.trainer)
    kept = after_val >= before_val
    if not kept:  # chosen on validation: restore the statistics from training
        for w, value in zip(tail.non_trainable_weights, before, strict=True):
            w.assign(value)
    run.row("tail fine-tuned + BN re-estimated", val_accuracy=after_val, chosen=kept)
    log.info("BN re-estimation: val %.4f vs %.4f without: %s", after_val, before_val, "kept" if kept else "reverted")


def tta_candidates(config: FinalConfig, cache: Cache) -> tuple[str, ...]:
    """The test-time mirror averages tried on validation, cheaper first: the cached mirrored
    images' activations when the cache has them; else the mirrored maps (free) and the mirrored
    images (their frozen pass runs at test time: 15,000 images for CIFAR-10's validation and test
    splits). Each of them is also tried over the training shifts (:func:`stage_tta`)."""
    if not config.tta:
        return ()
    return ("images",) if cache.key["flip"] else ("maps", "images")


def stage_tta(run: Run) -> None:
    """Choose on validation among no averaging, :func:`tta_candidates`, and each of those averaged
    over every offset of the tail's training shifts (``"<mirror>+shifts"``, when the tail trained
    with shifts): the highest score ships, of equal scores the cheaper average (the candidates'
    order, unshifted first), and an average only when it scores strictly higher than none. Each
    mirror is tried with the shifts, not only the better unshifted one: that need not be the
    better shifted one."""
    rows = run.splits.val_idx
    candidates = tta_candidates(run.config, run.cache)
    modes = [*candidates, *([m + SHIFTED for m in candidates] if run.shift else [])]
    # one call: a mirrored image's frozen pass runs once for all its offsets
    probs = run.view_probs(run.trainer, "train", rows,
                           [v for m in ("none", *modes) for v in tta_views(m, run.shift)])

    def score(mode: str) -> float:
        return accuracy(average(probs, tta_views(mode, run.shift)), run.val_labels)

    plain = score("none")
    scores = {mode: score(mode) for mode in modes}
    best = max(scores, key=lambda m: scores[m], default=None)  # the first of equal scores: the cheaper
    run.tta = best if best is not None and scores[best] > plain else "none"
    run.extra.update(val_accuracy_plain=plain, val_accuracy_tta_candidates=scores,
                     val_accuracy_tta=scores[best] if best else None,
                     val_accuracy=scores[run.tta] if run.tta != "none" else plain, tta_mode=best or "none",
                     tta_views=len(tta_views(run.tta, run.shift)))
    for mode, value in scores.items():
        label = f"mirrored {mode.removesuffix(SHIFTED)}" + (
            f", over {len(batches.offsets(run.shift))} shifts" if mode.endswith(SHIFTED) else "")
        run.row(f"final, mirror-averaged (TTA, {label})", val_accuracy=value, chosen=run.tta == mode)
    run.row("final, plain", val_accuracy=plain, chosen=run.tta == "none")


def stage_test(run: Run) -> None:
    """The test set, scored once, with the configuration chosen on validation; the plain
    model's test accuracy (no mirror averaging) is recorded beside it, since the averaging was
    chosen on validation (``test_accuracy_plain``)."""
    y = run.splits.y_test
    rows = np.arange(len(y))
    views = tta_views(run.tta, run.shift)
    by_view = run.view_probs(run.trainer, "test", rows, [ORIGINAL, *views])
    plain, probs = by_view[ORIGINAL], average(by_view, views)
    pred = probs.argmax(1)
    k = run.cache.num_classes
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    names = list(run.splits.class_names)
    sample = np.sort(np.random.default_rng(run.config.seed).choice(len(y), size=min(48, len(y)), replace=False))
    run.extra.update(
        test_probs=probs, test_accuracy=accuracy(probs, y), test_accuracy_plain=accuracy(plain, y),
        test_confusion_matrix=confusion.tolist(),
        test_per_class_accuracy={n: float(confusion[i, i] / max(1, confusion[i].sum())) for i, n in enumerate(names)},
        class_names=names,
        test_sample_predictions={"index": sample.tolist(), "true": y[sample].tolist(),
                                 "predicted": pred[sample].tolist(),
                                 "confidence": probs[sample].max(1).round(4).tolist()})


def stage_save(run: Run) -> Path:
    c = run.config
    final = stitch(run.spec, run.backbone, run.head, run.cut_layer, run.resolution, run.tta,
                   run.splits.image_shape, run.shift)
    frozen = [la for la in backbones.frozen_layers(run.backbone, run.cut_layer) if la.weights]
    tail = [la for la in run.parts.tail.layers if la.weights]
    run.extra["backbone_layers"] = {
        "frozen_with_weights": len(frozen), "tail_with_weights": len(tail), "tail": [la.name for la in tail],
        "frozen_parameters": int(sum(np.prod(w.shape) for la in frozen for w in la.weights)),
        "tail_parameters": int(sum(np.prod(w.shape) for la in tail for w in la.weights)),
        "head_parameters": int(run.head.count_params())}
    heads.compile_for(final, {"optimizer": "adamw", "learning_rate": run.params["tail"]["tail_learning_rate"],
                              "weight_decay": run.params["tail"]["weight_decay"],
                              "label_smoothing": run.params["tail"]["label_smoothing"]})
    n = min(c.parity_images, len(run.splits.y_test))
    stitched = _predict(final, run.splits.x_test[:n].astype(np.float32), batch_size=64)
    cached = run.extra["test_probs"][:n]
    y = run.splits.y_test[:n]
    run.extra["parity"] = {
        "images": n, "cached_accuracy": accuracy(cached, y), "stitched_accuracy": accuracy(stitched, y),
        "prediction_agreement": float(np.mean(stitched.argmax(1) == cached.argmax(1))),
        "max_abs_prob_diff": float(np.abs(stitched - cached).max()),
    }
    saved = save_model(final, c.output)
    write_json(sidecar_path(saved), {
        "model": saved.name, "class_names": list(run.splits.class_names),
        "input_shape": list(run.splits.image_shape), "input": "RGB pixels 0-255, float32",
        "backbone": run.spec.name, "resolution": run.resolution, "data_source": run.splits.source})
    return saved


def sidecar_path(model_path: str | os.PathLike) -> Path:
    """``cifar10.h5`` -> ``cifar10.json``: the class names (output ``i`` is ``class_names[i]``)."""
    return Path(model_path).with_suffix(".json")


def _timed(run: Run, name: str, stage: Any) -> Any:
    start = time.perf_counter()
    out = stage(run)
    run.timings[name] = time.perf_counter() - start
    return out


def build_final(config: FinalConfig, splits: Splits | None = None, model: keras.Model | None = None) -> dict:
    """Run every stage; save ``config.output``; write and return ``results/final.json``.

    ``splits`` and ``model`` (an already built backbone) may be passed in by tests.
    """
    t_start = time.perf_counter()
    keras.utils.set_random_seed(config.seed)
    spec = backbones.get_backbone(config.backbone)
    cut_layer, resolution = spec.resolve(config.cut, config.resolution)
    if splits is None:
        splits = load_data(config.data, val_size=config.val_size, seed=config.seed, image_size=config.image_size,
                           cache_root=config.cache_root, progress=config.progress)
    if model is None:
        model = spec.build(weights=config.weights, size=resolution)
    run = Run(config, spec, splits, model, cut_layer, resolution,
              precision=finetune.resolve_precision(config.tail_precision))  # "auto": measured in stage_tail
    # the machine's speed, at one input side whatever the run's (config.reference_resolution)
    reference_side = spec.native_size if config.reference_resolution is None else spec.resolution(
        config.reference_resolution)
    reference_model = backbones.at_resolution(spec, model, reference_side)
    run.extra["reference_speed"] = backbones.reference_speed(reference_model, cut_layer, reference_side)
    _timed(run, "cache", stage_cache)
    stage_params(run)
    _timed(run, "head", stage_head)
    _timed(run, "tail", stage_tail)
    _timed(run, "bn_reestimate", stage_bn)
    _timed(run, "tta_choice", stage_tta)
    _timed(run, "test", stage_test)
    saved = _timed(run, "stitch_and_save", stage_save)
    run.timings["total"] = time.perf_counter() - t_start  # the end's reference is not part of the run's time
    run.extra["reference_speed_end"] = backbones.reference_speed(reference_model, cut_layer, reference_side)
    return write_summary(run, saved)


CPU_FLAGS_RECORDED = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_description(cpuinfo: str) -> dict:
    """The CPU's model name and which of :data:`CPU_FLAGS_RECORDED` it lists, from the text of
    ``/proc/cpuinfo`` (first processor). Recorded to say which machine a run had; nothing is
    decided by it (the tail precision is chosen by timing)."""
    fields = dict(line.split(":", 1) for line in cpuinfo.split("\n\n")[0].splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {"model": fields.get("model name"), "flags": [f for f in CPU_FLAGS_RECORDED if f in flags]}


def machine(code: str | None) -> dict:
    """What the run ran on: CPU model and a few of its flags (:func:`cpu_description`), CPU
    count, memory, accelerators seen, the library versions, and ``code`` (:func:`code_version`
    when the run started)."""
    import importlib.metadata as md
    import platform

    import tensorflow as tf

    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    versions = {}
    for pkg in ("tensorflow", "keras", "numpy", "optuna", "keras-tuner"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[pkg.replace("-", "_")] = md.version(pkg)
    cpu = None
    with contextlib.suppress(OSError):
        cpu = cpu_description(Path("/proc/cpuinfo").read_text())
    return {"cpu": cpu, "cpus": os.cpu_count(), "memory_bytes": mem,
            "gpus": len(tf.config.list_physical_devices("GPU")),
            "python": platform.python_version(), "versions": versions, "code_version": code,
            "allocator": "BFC" if os.environ.get("TF_CPU_ALLOCATOR_USE_BFC", "").lower() == "true" else "default"}


REFERENCE_IMAGES_PER_SECOND = 60.0


def normalized_time(seconds: float, reference: dict, end: dict | None = None) -> dict:
    """Wall time normalized to a machine whose raw frozen pass runs at 60 images/s:
    ``minutes x measured / 60``, ``measured`` the in-run reference speed
    (``backbones.reference_speed``, at the backbone's native input side for runs of every
    resolution unless ``FinalConfig.reference_resolution`` says otherwise): the median of the
    repeats taken at the run's start and, with ``end``, at its end too (this machine's speed
    drifts within a run); their spread gives the normalized minutes' range."""
    if end is not None:
        speeds = [*reference.get("speeds", [reference["images_per_second"]]),
                  *end.get("speeds", [end["images_per_second"]])]
        reference = {**reference, "images_per_second": float(np.median(speeds)), "min": float(min(speeds)),
                     "max": float(max(speeds)), "start": reference, "end": end}
    speed = float(reference["images_per_second"])
    minutes = seconds / 60
    return {"wall_minutes": minutes, "reference": reference, "measured": "in this run, before its stages",
            "reference_images_per_second": REFERENCE_IMAGES_PER_SECOND,
            "normalized_minutes": minutes * speed / REFERENCE_IMAGES_PER_SECOND,
            "normalized_minutes_range": [minutes * reference["min"] / REFERENCE_IMAGES_PER_SECOND,
                                         minutes * reference["max"] / REFERENCE_IMAGES_PER_SECOND]}


# The training reference, like REFERENCE_IMAGES_PER_SECOND a definition: a round figure near the
# tail step of the AVX-512 machines most runs of this project used (about 0.45 s in float32)
REFERENCE_TAIL_STEP_SECONDS = 0.4
TRAINING_STAGES = ("head", "tail")


def normalized_by_stage(timings: dict[str, float], images_per_second: float, step_seconds: float | None
                        ) -> dict | None:
    """Wall time normalized stage by stage, since machines of one kind differ more in training than
    in inference: the training stages (:data:`TRAINING_STAGES`) scaled by the run's own training
    step (the precision probe's median step, batch 128, in the precision the tail trained in)
    against a reference step of :data:`REFERENCE_TAIL_STEP_SECONDS`, the rest of the run by the
    in-run inference speed against :data:`REFERENCE_IMAGES_PER_SECOND`. None without a step
    (the probe runs only when the precision is ``auto``). The step is timed on the run's own
    maps, so this figure compares runs of one input side only (a smaller side has a faster step
    and so a larger training factor); :func:`normalized_time` compares across sides."""
    if not step_seconds:
        return None
    training = sum(float(timings.get(stage, 0.0)) for stage in TRAINING_STAGES)
    other = float(timings["total"]) - training
    training_factor = REFERENCE_TAIL_STEP_SECONDS / step_seconds
    inference_factor = images_per_second / REFERENCE_IMAGES_PER_SECOND
    return {"normalized_minutes": (training * training_factor + other * inference_factor) / 60,
            "training_seconds": training, "training_factor": training_factor,
            "other_seconds": other, "inference_factor": inference_factor,
            "tail_step_seconds": step_seconds, "reference_tail_step_seconds": REFERENCE_TAIL_STEP_SECONDS}


def write_summary(run: Run, saved: Path) -> dict:
    """``final.json`` (and the stage rows appended to ``ablation.json``) in the results folder, or
    in the run's own folder ``RESULTS/runs/NAME/`` for a named run (``run_dir``)."""
    results = Path(run.config.run_dir or run.config.results)
    # which parameters the run used, per phase ("default" or "search"), so rows of default and
    # searched runs are told apart in the ablation table
    params = space.params_label(run.provenance)
    for row in run.rows:
        append_row(results / "ablation.json",
                   {**row, "params": params, "recorded": time.strftime("%Y-%m-%dT%H:%M:%S")})
    extra = {k: v for k, v in run.extra.items() if k != "test_probs"}
    summary = {
        "config": asdict(run.config), "params": run.params, "params_provenance": run.provenance,
        "cache": {"path": str(run.cache.path), "key": run.cache.key, "reused": run.cache.stats["hit"],
                  "extraction": run.cache.manifest.get("extraction"),
                  "arrays": {k: {"shape": v["shape"], "dtype": v["dtype"], "bytes": v["bytes"]}
                             for k, v in run.cache.manifest["arrays"].items()},
                  "bytes": sum(v["bytes"] for v in run.cache.manifest["arrays"].values())},
        "machine": machine(run.code_version),
        "data": {"source": run.splits.source, "train": len(run.splits.train_idx), "val": len(run.splits.val_idx),
                 "test": len(run.splits.y_test), "fingerprint": run.splits.fingerprint,
                 "classes": len(run.splits.class_names), "image_shape": list(run.splits.image_shape)},
        "sidecar_path": str(sidecar_path(saved).resolve()),
        "tta": run.tta != "none", "tta_chosen": run.tta, **extra, "epochs": run.epochs, "timings_seconds": run.timings,
        "model_path": str(saved.resolve()), "stages": run.rows, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    summary["normalized_time"] = normalized_time(run.timings["total"], run.extra.pop("reference_speed"),
                                                 run.extra.pop("reference_speed_end", None))
    summary.pop("reference_speed", None)
    summary.pop("reference_speed_end", None)
    probe = summary.get("precision_probe")
    summary["normalized_time"]["by_stage"] = normalized_by_stage(
        run.timings, summary["normalized_time"]["reference"]["images_per_second"],
        probe["step_seconds"][run.precision] if probe else None)
    write_json(results / "final.json", summary)
    log.info("val %.4f, test %.4f (cached path); stitched %.4f vs cached %.4f on %d test images; saved %s",
             summary["val_accuracy"], summary["test_accuracy"], summary["parity"]["stitched_accuracy"],
             summary["parity"]["cached_accuracy"], summary["parity"]["images"], saved)
    return summary
