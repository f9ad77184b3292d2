"""Phase 2's runner: the layers after the cut fine-tuned with the head on cached cut activations.

Entry point: :func:`train_tail` (``build_tail_trainer`` + ``fit_tail``; a trial calls the two
halves separately, the final model the whole). Also the tail's compute precision
(:func:`measure_precision` times it here) and its BN statistics (:func:`precise_bn`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from search import space
from search.batches import (
    VAL_BATCH,
    CachedMaps,
)
from search.cache import Cache
from search.config import PRECISIONS
from search.data import Splits, one_hot
from search.errors import UserError
from search.tfgraph import (
    build_training_state,
)


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
        self.ema: EMAWeights | None = None  # set by build_tail_trainer when the weights are averaged

    def prepare_validation(self) -> None:
        """What comes before every validation: within ``fit`` of a trainer with weight averaging,
        the averaged weights swapped in (:class:`EMAWeights`); then ``before_evaluate`` if set (a
        phase-2 trial sets :func:`precise_bn` there)."""
        if self.ema is not None and self.ema.fitting:
            self.ema.swap(averaged=True)
        if self.before_evaluate is not None:
            self.before_evaluate()

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        """Keras's ``evaluate``, after :meth:`prepare_validation` (``fit_tail`` validates with
        :class:`MapsValidation` instead, which does the same first)."""
        self.prepare_validation()
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


class EMAWeights(keras.callbacks.Callback):
    """Validation sees the optimizers' exponential moving averages of the weights (Polyak
    averaging; both optimizers built with ``use_ema``), as Keras's ``SwapEMAWeights`` does for a
    model with one optimizer: the averages are swapped in before each validation
    (:meth:`TwoRateModel.prepare_validation`) and stay in through ``on_epoch_end``, so ``EarlyStopping``
    keeps the averaged weights of the best epoch; this callback swaps them out again at its
    ``on_epoch_end`` (put it after ``EarlyStopping`` and before ``BackupAndRestore``, which then
    saves the weights as trained and their averages in the optimizers). Keras's ``fit`` ends by
    overwriting the weights with the one optimizer's averages (``finalize_variable_values``),
    which the two-optimizer trainer skips: the best epoch's averaged weights are restored instead.

    BatchNormalization layers that train with batch statistics keep moving statistics of the
    weights as trained, not of their averages (which trail them by hundreds of steps): with the
    averages swapped in, those statistics are re-estimated for them (:func:`precise_bn` on
    ``bn_rows()``, augmented training maps that ``fit_tail`` sets) and the trained statistics are
    put back with the trained weights.
    """

    BN_ROWS = 1024  # training maps the averaged weights' BN statistics are re-estimated on

    def __init__(self, trainer: TwoRateModel, tail: keras.Model) -> None:
        super().__init__()
        self.trainer, self.tail = trainer, tail
        self.bn_rows: Callable[[], np.ndarray] | None = None
        self._bn = [v for la in tail.layers if isinstance(la, keras.layers.BatchNormalization) and la.trainable
                    for v in (la.moving_mean, la.moving_variance)]
        self._bn_trained: list[np.ndarray] = []
        self.averaged = False  # whether the model holds the averages now
        self.fitting = False
        trainer.optimizer.finalize_variable_values = lambda var_list: None  # see the class docstring
        trainer.head_optimizer.finalize_variable_values = lambda var_list: None

    def swap(self, averaged: bool) -> None:
        """Put the averages (``averaged``) or the weights as trained into the model."""
        if averaged == self.averaged:
            return
        for opt in (self.trainer.optimizer, self.trainer.head_optimizer):
            # Keras's own SwapEMAWeights walks these two lists of the optimizer the same way
            for var, average in zip(opt._trainable_variables, opt._model_variables_moving_average, strict=True):
                value = np.array(var.numpy())
                var.assign(average)
                average.assign(value)
        if averaged and self._bn and self.bn_rows is not None:
            self._bn_trained = [np.array(v.numpy()) for v in self._bn]
            precise_bn(self.tail, self.bn_rows())
        elif not averaged and self._bn_trained:
            for v, value in zip(self._bn, self._bn_trained, strict=True):
                v.assign(value)
            self._bn_trained = []
        self.averaged = averaged

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.fitting = True

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.swap(averaged=False)

    def on_train_end(self, logs: dict | None = None) -> None:
        self.swap(averaged=False)  # before EarlyStopping's on_train_end restores the best epoch
        self.fitting = False


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


def measure_precision(parts: TailParts, head: keras.Model, maps: np.ndarray, steps: int = 6,
                      params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Choose the tail's precision by timing it here: a trainer of the tail and head for the tail
    parameters ``params`` (None: the defaults; the final model passes its own, so that the step
    timed is the step it trains, with as many blocks unfrozen) on ``maps`` (a batch of cached cut
    maps) in float32 and one in mixed bfloat16, each warmed up by one step that traces, then
    ``steps`` rounds of one step of each, the order alternating from round to round (float32
    first, then bfloat16 first) so that a drift of the machine's speed during the probe falls on
    both alike; the median step of each (recorded with ``unfreeze_blocks`` and the number of tail
    variables the timed step trained). Mixed bfloat16 is chosen when it is at least
    :data:`PRECISION_GAIN` times faster (any CPU or GPU with fast bfloat16, whatever its flags).
    The tail and head are left as they were (weights, float32)."""
    import statistics
    import time

    policies = ("float32", "mixed_bfloat16")
    saved, saved_tail = head.get_weights(), parts.tail.get_weights()
    labels = one_hot(np.arange(len(maps)) % head.output.shape[-1], head.output.shape[-1])
    times: dict[str, list[float]] = {policy: [] for policy in policies}
    try:
        trainers = {}
        for policy in policies:  # each traced in its own precision; the trace keeps it
            trainers[policy] = build_tail_trainer(parts, head, saved, params or {}, steps + 1, 1, policy)
            trainers[policy].train_on_batch(maps, labels)
        tail_variables = len(parts.tail.trainable_weights)  # as the trainers just built set them
        for round_ in range(steps):
            for policy in policies if round_ % 2 == 0 else policies[::-1]:
                start = time.perf_counter()
                trainers[policy].train_on_batch(maps, labels)
                times[policy].append(time.perf_counter() - start)
    finally:
        set_precision(parts.tail, head, "float32")
        parts.tail.set_weights(saved_tail)
        head.set_weights(saved)
    seconds = {policy: statistics.median(t) for policy, t in times.items()}
    speedup = seconds["float32"] / seconds["mixed_bfloat16"]
    return {"chosen": "mixed_bfloat16" if speedup >= PRECISION_GAIN else "float32", "step_seconds": seconds,
            "speedup": speedup, "threshold": PRECISION_GAIN, "batch": len(maps), "steps": steps,
            "order": "alternating", "times": times,
            "unfreeze_blocks": int(space.with_defaults("tail", params or {})["unfreeze_blocks"]),
            "tail_trainable_variables": tail_variables}


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
    ema = float(params["ema_momentum"])
    averaging = {"use_ema": ema > 0, "ema_momentum": ema if ema > 0 else 0.99}
    tail_opt = keras.optimizers.AdamW(_schedule(lr, steps, params["warmup_fraction"]), weight_decay=wd, **averaging)
    head_opt = keras.optimizers.AdamW(_schedule(lr * float(params["head_lr_multiplier"]), steps,
                                                params["warmup_fraction"]), weight_decay=wd, **averaging)
    cut_input = keras.Input(parts.tail.input.shape[1:], name="cached_maps")
    trainer = TwoRateModel(cut_input, head(parts.tail(cut_input)), head=head, head_optimizer=head_opt,
                           name="tail_and_head")
    # each optimizer built on its own variables (also what BackupAndRestore saves and restores)
    head_opt.build([v for v in trainer.trainable_variables if id(v) in trainer._head_ids])
    tail_opt.build([v for v in trainer.trainable_variables if id(v) not in trainer._head_ids])
    trainer.compile(optimizer=tail_opt,
                    loss=keras.losses.CategoricalCrossentropy(label_smoothing=float(params["label_smoothing"])),
                    metrics=["accuracy"])
    if ema > 0:
        trainer.ema = EMAWeights(trainer, parts.tail)
    build_training_state(trainer, np.zeros((1, *trainer.input.shape[1:]), np.float16),
                         np.zeros((1, head.output.shape[-1]), np.float32))
    return trainer


def tail_batches(cache: Cache, splits: Splits, params: dict[str, Any], rows: np.ndarray | None = None,
                 batch_size: int = 128, seed: int = 0, mirror: str = "auto", val_rows: np.ndarray | None = None
                 ) -> tuple[CachedMaps, CachedMaps]:
    """(augmented training batches over ``rows`` (default all training rows), validation batches
    over ``val_rows`` (default the validation split; a cross-validated trial's held-out fold))."""
    params = space.with_defaults("tail", params)
    rows = splits.train_idx if rows is None else rows
    train = CachedMaps(cache, "train", rows, batch_size, augment=True, shift=params["shift"], seed=seed, workers=2,
                       mirror=mirror)
    val = CachedMaps(cache, "train", splits.val_idx if val_rows is None else val_rows, VAL_BATCH)
    return train, val


class MapsValidation(keras.callbacks.Callback):
    """Validates a tail trainer on cached maps at the end of every epoch and writes ``val_loss``
    and ``val_accuracy`` into its logs, as ``fit``'s ``validation_data`` would; it also keeps which
    validation rows each epoch got right (:attr:`hits`, in ``data``'s batch order), so a trial
    reads its best epoch's per-image hits from here instead of predicting the validation rows
    once more after ``fit``. Before each validation the trainer's
    :meth:`TwoRateModel.prepare_validation` runs (weight averages, PreciseBN), as before Keras's.

    The forward pass (and the loss, from the softmax's logits as Keras computes it) is one
    ``tf.function`` per ``fit``, traced at most twice (a smaller last batch relaxes its shape), in
    the precision the trainer computes in: Keras's own validation traces a test function for every
    new model, and the prediction after ``fit`` a predict function, two traces and one more pass
    over the validation rows in every phase-2 trial. Put it first among ``fit``'s callbacks: those
    after it (early stopping, pruning, weight averages) and the history read what it wrote.
    """

    def __init__(self, data: CachedMaps) -> None:
        super().__init__()
        self.data = data
        self.hits: list[np.ndarray] = []
        self._forward: Any = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        import tensorflow as tf

        model = self.model

        def forward(x: Any, y: Any) -> tuple[Any, Any]:
            probs = model(x, training=False)
            return probs, model.loss(y, probs)  # in the graph, as Keras's: from the softmax's logits

        self._forward = tf.function(forward, reduce_retracing=True)
        self.hits = []

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if isinstance(self.model, TwoRateModel):
            self.model.prepare_validation()
        hits, loss, n = [], 0.0, 0
        for i in range(len(self.data)):
            x, y = self.data[i]
            probs, batch_loss = self._forward(x, y)
            hits.append(np.asarray(probs).argmax(1) == y.argmax(1))
            loss, n = loss + float(batch_loss) * len(y), n + len(y)
        self.hits.append(np.concatenate(hits))
        if logs is not None:
            logs["val_loss"] = loss / n
            logs["val_accuracy"] = float(self.hits[-1].mean())

    def best_hits(self, history: dict[str, list[float]]) -> np.ndarray:
        """The hits of the epoch ``EarlyStopping`` restores: the first with the highest
        ``val_accuracy`` of ``history`` (this fit's epochs)."""
        return self.hits[int(np.argmax(history["val_accuracy"]))]


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
             backup_dir: str | None = None, on_resume: Callable[[int, int], None] | None = None,
             validation: MapsValidation | None = None, keras_validation: bool = False) -> dict[str, list[float]]:
    """Fit, validating on ``val`` after every epoch (``validation``, a :class:`MapsValidation` of
    ``val``, made here if not given: pass one to read its hits; ``keras_validation``: Keras's own
    ``validation_data`` instead, the baseline ``make bench-tail`` times); the epoch with the best
    validation accuracy is restored at the end.

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
    ema = [trainer.ema] if isinstance(trainer, TwoRateModel) and trainer.ema is not None else []
    if ema:
        n = min(len(train), -(-EMAWeights.BN_ROWS // train.batch_size))
        ema[0].bn_rows = lambda: np.concatenate([train[i][0] for i in range(n)])
    # shuffle=False: the batches already hold each epoch's own permutation of the rows (seeded by
    # the epoch); Keras's default would also shuffle the batch order with Python's global `random`,
    # whose state a resumed run does not share with an uninterrupted one
    if keras_validation:
        if validation is not None:
            raise ValueError("validation and keras_validation exclude each other")
        first, validation_data = [], val
    else:
        validation = MapsValidation(val) if validation is None else validation
        if validation.data is not val:
            raise ValueError("validation must validate on val")
        first, validation_data = [validation], None
    history = trainer.fit(train, epochs=epochs, initial_epoch=initial_epoch, validation_data=validation_data,
                          shuffle=False, verbose=verbose,
                          callbacks=[*first, _EpochSeed(train), best, *ema, *resume, *(callbacks or [])])
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

