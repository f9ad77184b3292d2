"""What both engines optimize: one objective per phase, each a ``build`` and a ``fit``.

An engine knows nothing of caches or layers: it samples ``params`` with
``search.space.suggest(objective.phase, trial_or_hp)``, calls ``model = objective.build(params)``
and ``objective.fit(model, epochs, callbacks, seed)``, and records the returned best validation
accuracy. Optuna calls both from its objective function; KerasTuner from ``HyperModel.build`` and
``HyperModel.fit``. The halves are ``search.train``'s (phase 1) and ``search.finetune``'s
(phase 2), the same the final model runs.

Memory: a trial's ``build`` first releases what TensorFlow kept of the previous trials' traced
train functions (:func:`search.tfgraph.release_custom_gradients`); without it a 200-trial search
grew from 2.0 to 6.5 GB (``results/bench_search.json`` of 2026-11-30 03:21). Making a head
objective freezes the objects alive at that point out of the garbage collector's view
(:func:`search.tfgraph.freeze_long_lived_objects`), so the collection after each trial is cheap.

Budget (multi-fidelity): a trial trains on ``rows`` stratified training rows for at most
``max_epochs`` epochs (a head trial in batches of ``batch_size`` rows); engines' pruners stop it
earlier from its per-epoch validation accuracy. A tail trial on a training set smaller than its
``rows`` trains for the final's tail epochs (:func:`tail_trial_epochs`).

Noise (:mod:`search.selection`): after every ``fit`` the objective's ``last_score`` holds the
trial's estimate with its spread; engines record its ``scores`` and ``n`` with the trial. On
small data a trial is cross-validated (``folds`` > 1): a head trial trains one head per fold on
the cached pooled features, a tail trial one tail per fold on the cached maps (each fold from a
phase-1 head trained without that fold's images: a head that had seen them flatters the
configurations that move it least), the pruner watching the first fold's epochs, and its value
is the mean over the folds. A trial of either phase also records which
training images it got right when held out (every one exactly once), so two trials are
compared image by image over all the training images rather than over the validation split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from search import batches, finetune, selection, space, tfgraph, train
from search.cache import Cache
from search.config import FinalConfig
from search.data import Splits
from search.engines.choice import below_final_fidelity
from search.errors import UserError


@dataclass
class HeadObjective:
    """Phase 1: a head on pooled features. ``data`` is resident in memory once per process
    (:class:`search.batches.PooledData`); a trial with ``rows`` set fits a stratified subset of
    it, gathered once when the objective is made and then shared by every trial."""

    data: batches.PooledData
    cache_id: str
    rows: int | None = None
    max_epochs: int = 10
    mirrored: bool = False
    batch_size: int = space.HEAD_BATCH_SIZE
    release_graphs: bool = True  # False only to measure the leak it prevents (bench-memory)
    plain_keras: bool = False  # only bench-search's baseline: numpy to every fit, no gc freeze, Keras's optimizer
    folds: int = 1
    phase: str = "head"
    last_score: selection.Score | None = None
    _fit_data: batches.PooledData | None = field(default=None, repr=False)
    _fold_data: list = field(default_factory=list, repr=False)
    _params: dict = field(default_factory=dict, repr=False)
    _keep: frozenset = field(default=frozenset(), repr=False)
    _seed: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"the head's batch size must be at least 1 row, got {self.batch_size}")
        self._fit_data = self.data.subset(self.rows, mirrored=self.mirrored)
        if self.folds > 1:
            self._fold_data = self._fit_data.folds(self.folds)
        self._keep = tfgraph.custom_gradients()
        if not self.plain_keras:
            tfgraph.freeze_long_lived_objects()

    @property
    def space_options(self) -> dict[str, Any]:
        """What bounds this phase's search space here (``space.suggest``'s options): nothing."""
        return {}

    @property
    def budget(self) -> dict[str, Any]:
        return {"rows": len(self._fit_data.x_train), "max_epochs": self.max_epochs, "mirrored": self.mirrored,
                "batch_size": self.batch_size, "folds": self.folds}

    def build(self, params: dict[str, Any], seed: int = 0) -> keras.Model:
        if self.release_graphs:
            tfgraph.release_custom_gradients(self._keep)  # the previous trial's model is done
        keras.backend.clear_session()
        keras.utils.set_random_seed(seed)
        self._seed = seed  # the batch order of the fit that follows
        self._params = params
        return train.build_head_model(params, self.data.x_train.shape[1], self.data.y_train.shape[1],
                                      plain_keras=self.plain_keras)

    def fit(self, model: keras.Model, epochs: int, callbacks: list | None = None, initial_epoch: int = 0) -> float:
        """Train ``model`` (and, cross-validated, one head per further fold with the same
        parameters); the best validation accuracy, or its mean over the folds."""
        if self.folds < 2:
            history = train.fit_head(model, self._fit_data, epochs, callbacks, initial_epoch=initial_epoch,
                                     seed=self._seed, resident=not self.plain_keras, batch_size=self.batch_size)
            value = float(max(history["val_accuracy"]))
            hits = train.head_hits(model, self._fit_data)  # the best epoch's weights (restored)
            self.last_score = selection.Score(value, [value], len(hits), selection.pack_hits(hits))
            return value
        scores, hits = [], []
        for k, data in enumerate(self._fold_data):
            if k:  # the engine's callbacks (pruning) watch the first fold only
                model = train.build_head_model(self._params, data.x_train.shape[1], data.y_train.shape[1],
                                               plain_keras=self.plain_keras)
            history = train.fit_head(model, data, epochs, callbacks if k == 0 else None,
                                     initial_epoch=initial_epoch if k == 0 else 0, seed=self._seed + k,
                                     resident=not self.plain_keras, batch_size=self.batch_size)
            scores.append(float(max(history["val_accuracy"])))
            hits.append(train.head_hits(model, data))  # the held-out fold, at the best epoch's weights
        every = np.concatenate(hits)  # the training images in fold order: the same order in every trial
        self.last_score = selection.Score(float(np.mean(scores)), scores, len(every), selection.pack_hits(every))
        return self.last_score.value


@dataclass
class TailObjective:
    """Phase 2: the tail after the cut, with the phase-1 head, on cached cut activations.

    ``head`` starts every trial from ``head_weights`` (trained once on pooled features with the
    phase-1 parameters), or, cross-validated on ``folds``, fold ``k`` from
    ``fold_head_weights[k]`` (trained without fold ``k``'s images: given, or made by
    ``fold_head(rows to fit)`` for each fold); the tail from its pretrained weights
    (``parts.reset``). Before each
    validation, the BN statistics are set from ``precise_bn_rows`` training rows
    (``finetune.precise_bn``; 0 turns it off): the final model's thousands of steps let its moving
    averages converge, a trial's few dozen do not. Validation runs through
    ``finetune.MapsValidation``, which also keeps the best epoch's per-image hits;
    ``keras_validation`` validates the Keras way instead (``validation_data``, then a predict
    over the validation rows for the hits: two more traces and one more pass per trial), the
    baseline ``make bench-tail --time-trials`` times.
    """

    cache: Cache
    splits: Splits
    parts: finetune.TailParts
    head: keras.Model
    head_weights: list[np.ndarray]
    cache_id: str
    rows: int | None = 5000
    max_epochs: int = 3
    batch_size: int = 128
    head_provenance: dict = field(default_factory=dict)
    precision: str = "auto"
    precise_bn_rows: int = 1024
    full_epochs: int = FinalConfig.tail_epochs
    search_depth: bool = False
    search_rate: bool | None = None
    folds: int = 1
    fold_head_weights: list = field(default_factory=list, repr=False)
    fold_head: Callable[[np.ndarray], list] | None = field(default=None, repr=False)
    phase: str = "tail"
    keras_validation: bool = False
    last_score: selection.Score | None = None
    _rows: np.ndarray | None = field(default=None, repr=False)
    _fold_rows: list = field(default_factory=list, repr=False)
    _keep: frozenset = field(default=frozenset(), repr=False)
    _params: dict = field(default_factory=dict, repr=False)
    _seed: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        self._rows = batches.stratified_rows(self.splits.y_train, self.splits.train_idx, self.rows)
        self.max_epochs = tail_trial_epochs(len(self._rows), self.rows, self.max_epochs, self.full_epochs)
        if self.search_rate is None:  # a trial that trains less than the final does not rank rates
            self.search_rate = not holds_rate(len(self.splits.train_idx), self.rows, self.max_epochs, self.full_epochs)
        if self.folds > 1:
            self._fold_rows = batches.stratified_folds(self._rows, self.splits.y_train[self._rows], self.folds)
            if not self.fold_head_weights and self.fold_head is not None:
                self.fold_head_weights = [self.fold_head(fit_rows) for fit_rows, _ in self._fold_rows]
            if len(self.fold_head_weights) != self.folds:
                raise UserError(f"a tail trial cross-validated on {self.folds} folds starts each fold from a head "
                                f"trained without that fold's images: {self.folds} heads needed, "
                                f"{len(self.fold_head_weights)} given")
        self._keep = tfgraph.custom_gradients()
        self.precision = finetune.resolve_precision(self.precision)

    @property
    def space_options(self) -> dict[str, Any]:
        """The tail's blocks bound how many can be unfrozen; the depth is searched only with
        ``search_depth``, else fixed at all of them; the tail rate only with ``search_rate``,
        else held at its default (``space.suggest_tail``).

        ``search_rate`` None (the default) decides by the budget: the rate is searched when a
        trial trains as the final's tail does (on every training image for at least
        ``full_epochs``, :func:`~search.engines.choice.below_final_fidelity`) and held otherwise,
        because such a budget ranks the rates the wrong way round (CIFAR-10, 4,000 of 45,000
        images x 2 epochs: Kendall's tau 0.00 against 20,000 x 5 with the rate searched, 0.69
        with it held; ``results/bench_search.json``, ``phase2_fidelity`` and
        ``phase2_fidelity_fixed_tail_learning_rate``)."""
        return {"max_unfreeze": self.parts.n_blocks, "search_depth": self.search_depth,
                "search_rate": bool(self.search_rate)}

    @property
    def budget(self) -> dict[str, Any]:
        return {"rows": len(self._rows), "max_epochs": self.max_epochs, "batch_size": self.batch_size,
                "precision": self.precision, "precise_bn_rows": self.precise_bn_rows, "folds": self.folds,
                "search_rate": bool(self.search_rate), "head": self.head_provenance}

    def build(self, params: dict[str, Any], seed: int = 0) -> keras.Model:
        tfgraph.release_custom_gradients(self._keep)  # the previous trial's trainer is done
        keras.utils.set_random_seed(seed)
        self._params, self._seed = params, seed
        return self._trainer(0)

    def _trainer(self, fold: int) -> keras.Model:
        """The trainer of this trial's parameters for ``fold`` (its data in ``self._data``): on the
        budget's rows against the validation split, or, cross-validated, on the other folds'
        rows against the held-out fold."""
        fit_rows, held = self._fold_rows[fold] if self.folds > 1 else (self._rows, None)
        self._data = finetune.tail_batches(self.cache, self.splits, self._params, fit_rows, self.batch_size,
                                           self._seed + fold, val_rows=held)
        head_weights = self.fold_head_weights[fold] if self.folds > 1 else self.head_weights
        trainer = finetune.build_tail_trainer(self.parts, self.head, head_weights, self._params,
                                              len(self._data[0]), self.max_epochs, self.precision)
        if self.precise_bn_rows:
            augmented = self._data[0]
            n = min(len(augmented), -(-self.precise_bn_rows // augmented.batch_size))
            # augmented training batches, as the training steps see them
            trainer.before_evaluate = lambda: finetune.precise_bn(
                self.parts.tail, np.concatenate([augmented[i][0] for i in range(n)]))
        return trainer

    def _fit_one(self, model: keras.Model, epochs: int, callbacks: list | None, initial_epoch: int
                 ) -> tuple[float, np.ndarray]:
        """Train ``model`` on ``self._data``: its best validation accuracy, and which of the
        validation rows that best epoch (restored, with its BN statistics) gets right."""
        if self.keras_validation:
            history = finetune.fit_tail(model, *self._data, epochs, callbacks, initial_epoch=initial_epoch,
                                        keras_validation=True)
            val = self._data[1]
            return float(max(history["val_accuracy"])), model.predict(val, verbose=0).argmax(1) == \
                self.splits.y_train[val.rows]
        validation = finetune.MapsValidation(self._data[1])
        history = finetune.fit_tail(model, *self._data, epochs, callbacks, initial_epoch=initial_epoch,
                                    validation=validation)
        return float(max(history["val_accuracy"])), validation.best_hits(history)

    def fit(self, model: keras.Model, epochs: int, callbacks: list | None = None, initial_epoch: int = 0) -> float:
        """Train ``model`` (and, cross-validated, one trainer per further fold with the same
        parameters); the best validation accuracy, or its mean over the folds."""
        if self.folds < 2:
            value, hits = self._fit_one(model, epochs, callbacks, initial_epoch)
            self.last_score = selection.Score(value, [value], len(hits), selection.pack_hits(hits))
            return value
        scores, hits = [], []
        for k in range(self.folds):
            if k:  # the engine's callbacks (pruning) watch the first fold only
                model = self._trainer(k)
            value, fold_hits = self._fit_one(model, epochs, callbacks if k == 0 else None,
                                             initial_epoch if k == 0 else 0)
            scores.append(value)
            hits.append(fold_hits)
        every = np.concatenate(hits)  # the training images in fold order: the same order in every trial
        self.last_score = selection.Score(float(np.mean(scores)), scores, len(every), selection.pack_hits(every))
        return self.last_score.value


Objective = HeadObjective | TailObjective


def make_objective(phase: str, cache: Cache, splits: Splits, rows: int | None, max_epochs: int,
                   backbone: keras.Model | None = None, results: str = "results", seed: int = 0,
                   mirrored: bool = False, batch_size: int | None = None, folds: int | None = None,
                   precision: str = FinalConfig.tail_precision, search_depth: bool = False,
                   search_rate: bool | None = None) -> Objective:
    """The ``phase`` objective on ``cache`` with a budget of ``rows`` x ``max_epochs``; a head
    trial steps in batches of ``batch_size`` rows (None: ``space.BUDGETS["head"]``'s).

    ``folds``: cross-validation folds of a trial (either phase); None chooses (:func:`trial_folds`): 1 from
    :data:`search.selection.SMALL_DATA_ROWS` training images up, else :data:`search.selection.FOLDS`
    or as many as the smallest class allows. A head trial counts the images its ``rows`` leave; a
    tail trial counts all training images, whatever its ``rows`` (CIFAR-10's tail trials train
    on 4,000 of 45,000 images and are scored once, on the validation split). ``precision``: the
    tail trials' compute precision. ``search_depth``: the tail's trials sample how many blocks to
    unfreeze (default: all of them); ``search_rate``: whether they sample the tail rate (None:
    only when a trial trains as the final's tail does, :attr:`TailObjective.space_options`).

    The tail objective starts from the head of the best phase-1 trial on this cache key (or the
    default head when there is none), trained once here on all pooled features; ``backbone`` is
    the model the cache was extracted with (its layers after the cut are the tail).
    """
    from search.engines.choice import resolve_params

    space.check_phase(phase)
    data = batches.PooledData.from_cache(cache, splits, mirrored=mirrored and phase == "head")
    if phase == "head":
        return HeadObjective(data, cache.path.name, rows=rows, max_epochs=max_epochs, mirrored=mirrored,
                             batch_size=space.head_trial_batch_size() if batch_size is None else batch_size,
                             folds=trial_folds(splits, rows) if folds is None else folds)
    params, provenance = resolve_params("auto", results, cache.path.name, phases=("head",))
    head, _ = train.train_head(data, params["head"], epochs=FinalConfig.head_epochs, seed=seed)
    from search.backbones import get_backbone

    cut_layer = cache.key["cut_layer"]
    blocks = get_backbone(cache.key["backbone"]).tail_blocks(cut_layer)
    parts = finetune.TailParts.from_backbone(backbone, cut_layer, blocks)
    if precision == "auto":  # timed on this machine, on the cached maps
        maps = batches.CachedMaps(cache, "train", splits.train_idx[:128], 128)[0][0]
        precision = finetune.measure_precision(parts, head, maps)["chosen"]

    def fold_head(fit_rows: np.ndarray) -> list:  # a head that never saw the fold's held-out images
        keep = np.isin(splits.train_idx, fit_rows)
        fold_data = batches.PooledData(data.x_train[keep], data.y_train[keep], data.x_val, data.y_val)
        return train.train_head(fold_data, params["head"], epochs=FinalConfig.head_epochs, seed=seed)[0].get_weights()

    return TailObjective(cache, splits, parts, head, head.get_weights(), cache.path.name, rows=rows,
                         max_epochs=max_epochs, head_provenance=provenance["head"], precision=precision,
                         search_depth=search_depth, search_rate=search_rate,
                         folds=trial_folds(splits) if folds is None else folds,
                         fold_head=fold_head)


def tail_trial_epochs(available: int, rows: int | None, max_epochs: int, full_epochs: int) -> int:
    """Epochs of a phase-2 trial that trains on ``available`` rows with a budget of ``rows`` x
    ``max_epochs``.

    When the training set is smaller than the budget's ``rows`` (a small folder of images), a
    trial already trains on all of it, and its few epochs would score configurations far from
    the final's training (a tail that fits 1,500 images in 7 epochs is ranked after 2). There the
    trial trains for the final's ``full_epochs`` instead: it *is* the final's tail training, at
    a cost of at most ``rows`` x ``full_epochs`` images, and the pruner gets rungs to judge. With
    ``rows`` None (all rows, a budget the user chose) or data at least that large, ``max_epochs``."""
    if rows is None or available >= rows:
        return max_epochs
    return max(max_epochs, full_epochs)


def holds_rate(train_rows: int, rows: int | None, max_epochs: int, full_epochs: int) -> bool:
    """Whether a phase-2 search with a budget of ``rows`` x ``max_epochs`` on ``train_rows``
    training images holds the tail rate at its default (:attr:`TailObjective.space_options`):
    its trials (:func:`tail_trial_epochs`) train on fewer images or for fewer epochs than the
    final's tail (``full_epochs``)."""
    available = train_rows if rows is None else min(rows, train_rows)
    epochs = tail_trial_epochs(available, rows, max_epochs, full_epochs)
    return below_final_fidelity({"rows": available, "max_epochs": epochs}, train_rows, full_epochs) is not None


def trial_folds(splits: Splits, rows: int | None = None) -> int:
    """Cross-validation folds of a trial of either phase on ``splits`` (1: one validation split).

    Below :data:`search.selection.SMALL_DATA_ROWS` training images (after ``rows``), a trial is
    scored on :data:`search.selection.FOLDS` folds; fewer when a class has too few images for
    them (:func:`search.selection.folds_for`; the log names the fallback)."""
    import logging

    labels = splits.y_train[splits.train_idx]
    n = len(labels) if rows is None else min(rows, len(labels))
    if n >= selection.SMALL_DATA_ROWS:
        return 1
    k = selection.folds_for(labels)
    if k < selection.FOLDS:
        logging.getLogger(__name__).warning(
            "%d training images: trials cross-validated on %d folds, not %d (the smallest class has %d "
            "images; %d per fold needed)%s", n, k, selection.FOLDS, int(np.bincount(labels).min()),
            selection.MIN_FOLD_ROWS_PER_CLASS, "; one validation split instead" if k < 2 else "")
    return k
