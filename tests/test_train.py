"""The trial runners: stratified budgets, reproducible augmented batches, vectorized shifts, the
two learning rates of the tail trainer, and BatchNormalization modes."""

import json

import keras
import numpy as np
import optuna
import pytest

from conftest import TINY_RES
from search import backbones, batches, finetune, heads, space, tfgraph, train
from search.cache import Cache
from search.errors import UserError


@pytest.fixture(scope="module")
def maps_cache(tmp_path_factory, tiny_splits):
    """A cache of random non-zero cut maps (the random-weight tiny backbone's are ~0 in float16)."""
    path = tmp_path_factory.mktemp("maps")
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", len(tiny_splits.y_train)), ("test", len(tiny_splits.y_test))):
        for view in ("orig", "flip"):
            name = f"{split}_{view}_cut"
            np.save(path / f"{name}.npy", rng.uniform(0, 6, (n, 2, 2, 512)).astype(np.float16))
            arrays[name] = {}
    manifest = {"key": {"flip": True, "cut_layer": "conv_pw_11_relu"}, "arrays": arrays, "num_classes": 10,
                "labels": {"train": tiny_splits.y_train.tolist(), "test": tiny_splits.y_test.tolist()}}
    return Cache(path, manifest)


def test_stratified_rows_keep_class_shares():
    labels = np.repeat(np.arange(10), 30)
    rows = batches.stratified_rows(labels, np.arange(300), 50, seed=1)
    assert len(rows) == 50 and len(set(rows)) == 50
    assert np.all(np.bincount(labels[rows], minlength=10) == 5)
    assert np.array_equal(batches.stratified_rows(labels, np.arange(300), None), np.arange(300))


def test_pooled_subset_takes_mirrors_of_the_same_rows(tiny_cache, tiny_splits):
    data = batches.PooledData.from_cache(tiny_cache, tiny_splits)
    n = len(tiny_splits.train_idx)
    assert data.views == 2 and len(data.x_train) == 2 * n
    sub = data.subset(30, mirrored=True)
    assert len(sub.x_train) == 60 and sub.views == 2
    np.testing.assert_array_equal(sub.y_train[:30], sub.y_train[30:])
    plain = data.subset(30, mirrored=False)
    np.testing.assert_array_equal(plain.x_train, sub.x_train[:30])


def test_pooled_datasets_visit_every_row_once_per_epoch_in_a_seeded_order():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 3)).astype(np.float32)
    y = np.eye(5, dtype=np.float32)[np.arange(50) % 5]
    data = batches.PooledData(x, y, x[:7], y[:7])

    def epochs(seed, n=2):
        train_ds = data.dataset(8, seed)
        return [np.concatenate([b[0].numpy() for b in train_ds]) for _ in range(n)]

    first, second = epochs(seed=3)
    assert [len(b) for b, _ in data.dataset(8, 3)] == [8] * 6 + [2]
    for rows in (first, second):  # every row exactly once, with its own label
        np.testing.assert_array_equal(np.sort(rows[:, 0]), np.sort(x[:, 0]))
    assert not np.array_equal(first, second)  # reshuffled every epoch
    again = epochs(seed=3)
    np.testing.assert_array_equal(first, again[0])
    np.testing.assert_array_equal(second, again[1])
    assert not np.array_equal(first, epochs(seed=4, n=1)[0])
    drawn = list(data.dataset(8, 3))
    order = [int(np.flatnonzero((x == r).all(1))[0]) for r in np.concatenate([b[0].numpy() for b in drawn])]
    np.testing.assert_array_equal(np.concatenate([b[1].numpy() for b in drawn]), y[order])  # labels follow rows


@pytest.mark.parametrize("batch_norm", [False, True])
def test_eager_validation_writes_what_keras_validation_computes(batch_norm):
    from search import heads

    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 6)).astype(np.float32)
    y = np.eye(4, dtype=np.float32)[rng.integers(0, 4, 300)]
    data = batches.PooledData(x[:200], y[:200], x[200:], y[200:])
    params = {"n_layers": 1, "units_0": 8, "batch_norm": batch_norm, "dropout": 0.3, "optimizer": "adam",
              "learning_rate": 1e-2, "label_smoothing": 0.1}
    keras.utils.set_random_seed(0)
    model = heads.compile_for(heads.build_head(params, (6,), num_classes=4), params)
    history = train.fit_head(model, data, epochs=3, seed=0)
    assert len(history["val_accuracy"]) == len(history["val_loss"]) == len(history["loss"]) == 3
    loss, accuracy = model.evaluate(x[200:], y[200:], verbose=0)
    logs: dict = {}
    validation = data.validation(batch_size=32)  # several batches, the last one short
    validation.set_model(model)
    validation.on_epoch_end(0, logs)
    assert logs["val_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert logs["val_loss"] == pytest.approx(loss, rel=1e-5)
    assert logs["val_accuracy"] != pytest.approx(0.0)


def test_a_head_objective_freezes_the_long_lived_objects_and_the_plain_keras_baseline_does_not():
    import gc

    from search.engines.objective import HeadObjective

    x, y = np.zeros((20, 3), np.float32), np.eye(10, dtype=np.float32)[np.arange(20) % 10]
    data = batches.PooledData(x, y, x[:5], y[:5])
    alive = [[]]
    alive.append(alive)  # a cycle made before the objectives
    gc.unfreeze()
    HeadObjective(data, "t", plain_keras=True)
    assert gc.get_freeze_count() == 0 and any(o is alive for o in gc.get_objects())
    HeadObjective(data, "t")
    assert gc.get_freeze_count() > 0
    assert not any(o is alive for o in gc.get_objects())  # frozen: out of the collector's view


def test_shift_maps_moves_content_and_fills_zeros():
    x = np.arange(2 * 4 * 4 * 1, dtype=np.float32).reshape(2, 4, 4, 1) + 1

    class Fixed:
        def integers(self, low, high, size):
            return np.array([[0, 2], [2, 1]])  # dy for both images, then dx for both

    out = batches.shift_maps(x, 1, Fixed())
    # image 0: dy=0, dx=2 -> content moves down 1 and left 1
    np.testing.assert_array_equal(out[0, 1:, :3, 0], x[0, :3, 1:, 0])
    assert np.all(out[0, 0] == 0) and np.all(out[0, :, 3] == 0)
    # image 1: dy=2, dx=1 -> up 1, no horizontal move
    np.testing.assert_array_equal(out[1, :3, :, 0], x[1, 1:, :, 0])


def test_augmented_batches_do_not_depend_on_the_order_they_are_built(maps_cache, tiny_splits):
    rows = tiny_splits.train_idx
    a = batches.CachedMaps(maps_cache, "train", rows, 16, augment=True, shift=1, seed=3)
    b = batches.CachedMaps(maps_cache, "train", rows, 16, augment=True, shift=1, seed=3)
    forward = [a[i][0] for i in range(len(a))]
    backward = [b[i][0] for i in reversed(range(len(b)))][::-1]
    for x, y in zip(forward, backward, strict=True):
        np.testing.assert_array_equal(x, y)
    a.epoch = 1
    assert not np.array_equal(a[0][0], forward[0]), "a new epoch draws a new order and augmentation"
    assert a[0][0].dtype == np.float16, "cast to float32 happens in the graph"


@pytest.fixture(scope="module")
def parts(spec):
    keras.utils.set_random_seed(0)
    backbone = spec.build(weights=None, size=TINY_RES)
    return finetune.TailParts.from_backbone(backbone, spec.cut_layer())


def _head(parts):
    features = parts.tail.output.shape[-1]
    return train.build_head_model({}, features, 10)


def test_head_rate_multiplier_and_frozen_bn(maps_cache, tiny_splits, parts):
    head = _head(parts)
    head_weights = head.get_weights()
    params = {"head_lr_multiplier": 1e-9, "bn_mode": "frozen", "warmup_fraction": 0.0, "weight_decay": 1e-3}
    train_data, val = finetune.tail_batches(maps_cache, tiny_splits, params, batch_size=32)
    trainer = finetune.build_tail_trainer(parts, head, head_weights, params, len(train_data), 1)
    bn = [la for la in parts.tail.layers if isinstance(la, keras.layers.BatchNormalization)]
    moving = [np.array(la.moving_mean) for la in bn]
    tail_before = [np.array(w) for w in parts.tail.trainable_weights]
    finetune.fit_tail(trainer, train_data, val, 1)
    # the head's rate is ~0: its weights barely move; the tail's moved
    assert max(np.abs(a - b).max() for a, b in zip(head.get_weights(), head_weights, strict=True)) < 1e-5
    assert any(np.abs(np.array(w) - b).max() > 1e-6 for w, b in zip(parts.tail.trainable_weights, tail_before,
                                                                      strict=True))
    # frozen BN: moving statistics unchanged
    for la, m in zip(bn, moving, strict=True):
        np.testing.assert_array_equal(np.array(la.moving_mean), m)
    # the next trial starts from the pretrained tail again
    parts.reset()
    for w, b in zip(parts.tail.get_weights(), parts.initial_weights, strict=True):
        np.testing.assert_array_equal(w, b)


def test_batch_bn_mode_updates_statistics_with_its_momentum(maps_cache, tiny_splits, parts):
    head = _head(parts)
    params = {"bn_mode": "batch", "bn_momentum": 0.9}
    train_data, val = finetune.tail_batches(maps_cache, tiny_splits, params, batch_size=32)
    trainer = finetune.build_tail_trainer(parts, head, head.get_weights(), params, len(train_data), 1)
    bn = [la for la in parts.tail.layers if isinstance(la, keras.layers.BatchNormalization)]
    assert bn and all(la.trainable and la.momentum == 0.9 for la in bn)
    before = np.array(bn[0].moving_mean)
    finetune.fit_tail(trainer, train_data, val, 1)
    assert not np.array_equal(np.array(bn[0].moving_mean), before)


class _Killed(Exception):
    pass


class _KillAfterFirstEpoch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            raise _Killed  # after BackupAndRestore saved epoch 1: what a SIGKILL here would leave


def test_killed_tail_training_resumes_from_its_last_epoch(maps_cache, tiny_splits, parts, tmp_path):
    """The resumed epoch is the uninterrupted run's: training and validation loss of epoch 2 equal
    to float rounding. (They once differed by up to 1 %: Keras's ``fit`` shuffled the batch order
    with Python's global ``random``, whose state a resumed run does not share; ``fit_tail`` turns
    that off, the batches hold the epoch's own seeded permutation.) Weights are not compared: the
    best-epoch restore chooses among the epochs a run saw, which differ after a resume. Dropout's
    random state is not in the backup, so a head with dropout resumes with other masks."""
    head = train.build_head_model({"dropout": 0.0}, parts.tail.output.shape[-1], 10)  # no unsaved RNG state
    h0 = head.get_weights()
    params = {"shift": 1, "bn_mode": "batch"}

    resumes = []

    def run(root, callbacks=()):
        head.set_weights(h0)
        return finetune.train_tail(maps_cache, tiny_splits, parts, head, params, 2, batch_size=32, seed=5,
                                backup_root=str(root), callbacks=list(callbacks),
                                on_resume=lambda k, n: resumes.append((k, n)))

    _, history = run(tmp_path / "clean")
    assert len(history["loss"]) == 2
    with pytest.raises(_Killed):
        run(tmp_path / "killed", [_KillAfterFirstEpoch()])
    assert any((tmp_path / "killed").iterdir()), "a backup was left for the rerun"
    trainer, resumed = run(tmp_path / "killed")
    assert len(resumed["loss"]) == 1, "the rerun trained only the epoch left"
    assert resumes == [(1, 2)], "the rerun said it resumed from epoch 1 of 2 (and the clean runs said nothing)"
    np.testing.assert_allclose(resumed["loss"], history["loss"][1:], rtol=1e-6)
    np.testing.assert_allclose(resumed["val_loss"], history["val_loss"][1:], rtol=1e-6)
    assert not any((tmp_path / "killed").iterdir()), "the backup is removed once training completes"


def test_allocator_probe_reports_cpu_seconds_and_both_precisions_tail_steps():
    """The probe bench-cache runs once per allocator in a fresh process (here in-process, tiny).
    (Which allocator TensorFlow uses is fixed when it loads: bench-cache starts a process per
    allocator with the variable set; an in-process test cannot observe it, so none claims to.)"""
    from search import bench

    out = bench.allocator_probe("MobileNet", None, TINY_RES, None, images=20, tail_steps=1)
    assert out["frozen_pass_user_cpu_seconds"] + out["frozen_pass_system_cpu_seconds"] > 0
    assert out["first_call_images_per_second"] > 0 and out["tail_steps"] == 1
    assert out["tail_step_seconds"] > 0 and out["tail_step_seconds_mixed_bfloat16"] > 0  # both precisions timed


def test_mirrored_maps_augmentation_and_flipped_view(maps_cache, tiny_splits):
    rows = tiny_splits.train_idx
    orig = np.asarray(maps_cache.array("train", "cut", "orig"))
    maps = batches.CachedMaps(maps_cache, "train", rows, 64, augment=True, seed=5, mirror="maps")
    none = batches.CachedMaps(maps_cache, "train", rows, 64, augment=True, seed=5, mirror="none")
    order = np.sort(np.random.default_rng([5, 0]).permutation(rows)[:64])
    x_maps, x_none = maps[0][0], none[0][0]
    np.testing.assert_array_equal(x_none, orig[order], "mirror='none', shift 0: the cached maps as they are")
    mirrored = np.array([not np.array_equal(a, b) for a, b in zip(x_maps, orig[order], strict=True)])
    assert 0 < mirrored.sum() < len(order), "about half the maps are mirrored"
    np.testing.assert_array_equal(x_maps[mirrored], orig[order][mirrored][:, :, ::-1])
    flipped = batches.CachedMaps(maps_cache, "train", rows[:10], 10, view="flipped_maps")
    np.testing.assert_array_equal(flipped[0][0], orig[np.sort(rows[:10])][:, :, ::-1])
    assert batches.resolve_mirror("auto", maps_cache) == "images"


def test_fixed_shifts_are_the_training_shifts_in_numpy_and_in_the_graph():
    """``batches.offsets`` lists exactly the offsets ``shift_maps`` draws, ``shift_by`` moves a map
    by one of them, and the saved model's ``shift_cells`` Lambda computes the same."""
    x = np.random.default_rng(0).normal(size=(64, 5, 4, 3)).astype(np.float32)
    assert batches.offsets(1)[0] == (0, 0) and len(set(batches.offsets(1))) == 9 and batches.offsets(0) == ((0, 0),)
    drawn = batches.shift_maps(x, 1, np.random.default_rng(1))
    fixed = {o: batches.shift_by(x, *o) for o in batches.offsets(1)}
    hits = [[o for o, y in fixed.items() if np.array_equal(y[i], drawn[i])] for i in range(len(x))]
    assert all(len(h) == 1 for h in hits), "every random shift is one of the fixed offsets"
    assert len({h[0] for h in hits}) == 9, "and every offset is drawn"
    np.testing.assert_array_equal(fixed[1, -1][:, :4, 1:], x[:, 1:, :3])  # out[i, j] = x[i + 1, j - 1]
    assert not fixed[1, -1][:, 4].any() and not fixed[1, -1][:, :, 0].any(), "zero fill"
    for o, y in fixed.items():
        np.testing.assert_array_equal(np.asarray(backbones.shift_cells(x, *o)), y)


def test_mirror_images_needs_a_cache_of_mirrored_images(maps_cache, tiny_splits):
    no_flip = Cache(maps_cache.path, {**maps_cache.manifest, "key": {**maps_cache.key, "flip": False}})
    assert batches.resolve_mirror("auto", no_flip) == "maps"
    with pytest.raises(UserError, match="mirrored images"):
        batches.CachedMaps(no_flip, "train", tiny_splits.train_idx, 8, augment=True, mirror="images")
    with pytest.raises(UserError, match="mirror must be one of"):
        batches.resolve_mirror("sideways", no_flip)


@pytest.mark.parametrize("release", [True, False])
def test_trials_release_the_graphs_tensorflow_keeps(tiny_cache, tiny_splits, release):
    """Each new model's train function registers custom gradients (swish) in TensorFlow's global
    registry, which keeps its graph alive: a long search leaked megabytes per trial. A trial's
    build releases the previous trials'; without it the registry grows with every trial."""
    from search import space
    from search.engines.objective import HeadObjective

    data = batches.PooledData.from_cache(tiny_cache, tiny_splits)
    objective = HeadObjective(data, "tiny", max_epochs=1, release_graphs=release)
    params = {**space.DEFAULT_HEAD, "units_0": 16, "units_1": 16, "activation": "swish"}
    sizes = []
    for trial in range(3):
        objective.fit(objective.build(params, seed=trial), 1)
        sizes.append(len(tfgraph.custom_gradients()))
    if release:
        assert sizes[2] == sizes[1], sizes
    else:
        assert sizes[0] < sizes[1] < sizes[2], sizes
    tfgraph.release_custom_gradients(objective._keep)


def test_tail_trains_in_bfloat16_and_is_returned_in_float32(maps_cache, tiny_splits, parts):
    """``precision="mixed_bfloat16"``: the tail's layers and the head's hidden layers compute in
    bfloat16 while training (softmax output and variables float32); the returned model is set back
    to float32, so its predictions equal a float32 forward pass of the same weights."""
    head = train.build_head_model({"dropout": 0.0}, parts.tail.output.shape[-1], 10)
    seen = {}

    class Spy(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen["tail"] = {la.compute_dtype for la in parts.tail.layers[1:]}
            seen["head"] = [la.compute_dtype for la in head.layers[1:]]
            seen["variables"] = {v.dtype for v in self.model.weights}

    trainer, history = finetune.train_tail(maps_cache, tiny_splits, parts, head, {}, 1, batch_size=32,
                                        callbacks=[Spy()], precision="mixed_bfloat16")
    assert seen["tail"] == {"bfloat16"} and set(seen["head"][:-1]) == {"bfloat16"} and seen["head"][-1] == "float32"
    assert seen["variables"] == {"float32"} and np.isfinite(history["loss"]).all()
    assert {la.compute_dtype for la in [*parts.tail.layers[1:], *head.layers[1:]]} == {"float32"}
    x = np.asarray(maps_cache.array("train", "cut", "orig")[:8], np.float32)
    reference = keras.Model(parts.tail.input, head(parts.tail.output))(x, training=False)
    np.testing.assert_allclose(trainer.predict(x, verbose=0), np.asarray(reference), atol=1e-5)
    with pytest.raises(UserError, match="precision"):
        finetune.resolve_precision("float16")


def test_weight_averaging_validates_and_returns_the_best_epochs_averaged_weights(maps_cache, tiny_splits, parts):
    """``ema_momentum`` > 0: both optimizers average their weights (``use_ema``); each epoch's
    validation scores the averages, not the weights as trained, training itself goes on from the
    weights as trained, and the model ends with the best epoch's averages."""
    head = train.build_head_model({"dropout": 0.0}, parts.tail.output.shape[-1], 10)
    params = {"ema_momentum": 0.5, "bn_mode": "frozen", "warmup_fraction": 0.0, "tail_learning_rate": 0.05}
    train_data, val = finetune.tail_batches(maps_cache, tiny_splits, params, batch_size=32)
    trainer = finetune.build_tail_trainer(parts, head, head.get_weights(), params, len(train_data), 3)
    assert trainer.optimizer.use_ema and trainer.head_optimizer.use_ema and trainer.ema is not None
    averages, raw = [], []

    class Spy(keras.callbacks.Callback):  # runs after the averages were swapped out again
        def on_epoch_end(self, epoch, logs=None):
            pairs = [(v, a) for opt in (trainer.optimizer, trainer.head_optimizer)
                     for v, a in zip(opt._trainable_variables, opt._model_variables_moving_average, strict=True)]
            averages.append({id(v): np.array(a.numpy()) for v, a in pairs})
            raw.append({id(v): np.array(v.numpy()) for v, _ in pairs})

    history = finetune.fit_tail(trainer, train_data, val, 3, callbacks=[Spy()])
    assert len(averages) == 3 and len(averages[0]) == len(trainer.trainable_variables)

    def evaluate(weights):
        for v in trainer.trainable_variables:
            v.assign(weights[id(v)])
        return trainer.evaluate(val, verbose=0, return_dict=True)

    final = {id(v): np.array(v.numpy()) for v in trainer.trainable_variables}
    best = int(np.argmax(history["val_accuracy"]))
    for v in trainer.trainable_variables:
        np.testing.assert_array_equal(final[id(v)], averages[best][id(v)])
    for epoch in range(3):
        scored = evaluate(averages[epoch])
        np.testing.assert_allclose(scored["loss"], history["val_loss"][epoch], rtol=1e-5)
        assert abs(evaluate(raw[epoch])["loss"] - history["val_loss"][epoch]) > 1e-4, "the raw weights were scored"


def test_weight_averaging_re_estimates_batch_norm_statistics_for_the_averages(maps_cache, tiny_splits, parts):
    """With BN training on batch statistics, the moving statistics follow the weights as trained;
    the best epoch's averaged weights are validated and returned with statistics re-estimated for
    them, while training goes on with its own statistics."""
    head = train.build_head_model({"dropout": 0.0}, parts.tail.output.shape[-1], 10)
    params = {"ema_momentum": 0.5, "bn_mode": "batch", "warmup_fraction": 0.0, "tail_learning_rate": 0.05}
    train_data, val = finetune.tail_batches(maps_cache, tiny_splits, params, batch_size=32)
    trainer = finetune.build_tail_trainer(parts, head, head.get_weights(), params, len(train_data), 2)
    bn = [la for la in parts.tail.layers if isinstance(la, keras.layers.BatchNormalization)]
    trained = []

    class Spy(keras.callbacks.Callback):  # after the averages and their statistics were swapped out
        def on_epoch_end(self, epoch, logs=None):
            trained.append([np.array(la.moving_mean) for la in bn])

    history = finetune.fit_tail(trainer, train_data, val, 2, callbacks=[Spy()])
    best = int(np.argmax(history["val_accuracy"]))
    assert any(np.abs(np.array(la.moving_mean) - m).max() > 1e-6 for la, m in zip(bn, trained[best], strict=True))
    scored = trainer.evaluate(val, verbose=0, return_dict=True)  # the model as returned is the one validated
    np.testing.assert_allclose(scored["loss"], history["val_loss"][best], rtol=1e-5)


def test_precise_bn_sets_the_moving_statistics_from_a_batch(maps_cache, tiny_splits, parts):
    """After ``precise_bn`` the first BN layer's moving mean and variance are the batch statistics
    of its input on the given batch (whatever the momentum), momenta are restored, and a trial's
    trainer runs it before every validation."""
    from search.engines.objective import TailObjective

    head = _head(parts)
    trainer = finetune.build_tail_trainer(parts, head, head.get_weights(), {"bn_momentum": 0.99}, 1, 1)
    bn = next(la for la in parts.tail.layers if isinstance(la, keras.layers.BatchNormalization))
    assert bn.trainable
    x = np.asarray(maps_cache.array("train", "cut", "orig")[:16], np.float32)
    before = np.array(bn.moving_mean)
    finetune.precise_bn(parts.tail, x)
    feeding = keras.ops.convert_to_tensor(x)
    for layer in parts.tail.layers[1:]:  # MobileNet's tail is a chain: the layers before the first BN
        if layer is bn:
            break
        feeding = layer(feeding)
    mean = np.asarray(feeding).mean(axis=(0, 1, 2))
    var = np.asarray(feeding).var(axis=(0, 1, 2))
    np.testing.assert_allclose(np.array(bn.moving_mean), mean, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(np.array(bn.moving_variance), var, rtol=1e-2, atol=1e-4)
    assert not np.allclose(before, mean) and bn.momentum == 0.99
    calls = []
    objective = TailObjective(maps_cache, tiny_splits, parts, head, head.get_weights(), "maps", rows=None,
                              max_epochs=1, batch_size=32, precise_bn_rows=40)
    model = objective.build({})
    inner = model.before_evaluate
    model.before_evaluate = lambda: (calls.append(1), inner())
    objective.fit(model, 2)
    assert len(calls) == 2, "once before each epoch's validation"
    del trainer


@pytest.mark.parametrize("resident", [True, False])
def test_a_head_trial_steps_in_its_budgets_batches_and_the_final_head_in_its_own(resident):
    from search import space
    from search.engines.objective import HeadObjective
    from search.errors import UserError

    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 6)).astype(np.float32)
    y = np.eye(10, dtype=np.float32)[np.arange(300) % 10]
    data = batches.PooledData(x[:250], y[:250], x[250:], y[250:])
    trial = HeadObjective(data, "t", rows=200, max_epochs=2, batch_size=16, plain_keras=not resident)
    assert trial.budget["batch_size"] == 16
    params = {"n_layers": 0, "dropout": 0.0, "optimizer": "adam", "learning_rate": 1e-6}  # no early stop
    model = trial.build(params)
    trial.fit(model, 2)
    assert int(model.optimizer.iterations) == 2 * 13  # ceil(200 / 16) steps per epoch
    final = HeadObjective(data, "t", max_epochs=1, plain_keras=not resident)
    model = final.build(params)
    final.fit(model, 1)
    assert final.batch_size == space.HEAD_BATCH_SIZE and int(model.optimizer.iterations) == 1  # 250 rows < 512
    with pytest.raises(UserError, match="batch size"):
        HeadObjective(data, "t", batch_size=0)


def _variables_created_in_functions(fit) -> list[str]:
    """Names of the variables ``fit()`` creates while tracing a ``tf.function``."""
    import tensorflow as tf

    made = []

    def creator(next_creator, **kwargs):
        if tf.inside_function():
            made.append(kwargs.get("name"))
        return next_creator(**kwargs)

    with tf.variable_creator_scope(creator):
        fit()
    return made


@pytest.mark.parametrize("plain_keras", [False, True])
def test_a_head_is_traced_once_because_its_training_state_exists_before_fit(plain_keras):
    """A ``tf.function`` whose first trace creates variables is traced again: the head's optimizer
    slots and metric variables are made before ``fit`` (the plain-Keras baseline makes them lazily)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 6)).astype(np.float32)
    y = np.eye(10, dtype=np.float32)[np.arange(64) % 10]
    data = batches.PooledData(x[:48], y[:48], x[48:], y[48:])
    params = {"n_layers": 1, "units_0": 8, "optimizer": "adamw", "learning_rate": 1e-3}
    model = train.build_head_model(params, 6, 10, plain_keras=plain_keras)
    made = _variables_created_in_functions(lambda: train.fit_head(model, data, 1, batch_size=16,
                                                                  resident=not plain_keras))
    if plain_keras:
        assert any("momentum" in str(n) for n in made), made  # what build_training_state prevents
    else:
        assert made == []


def test_the_tail_trainer_is_traced_once(maps_cache, tiny_splits, parts):
    head = _head(parts)
    params = {"bn_mode": "batch"}
    train_data, val = finetune.tail_batches(maps_cache, tiny_splits, params, batch_size=32)
    trainer = finetune.build_tail_trainer(parts, head, head.get_weights(), params, len(train_data), 1)
    assert _variables_created_in_functions(lambda: finetune.fit_tail(trainer, train_data, val, 1)) == []


def test_a_tail_trial_validates_without_keras_test_or_predict_functions_and_keeps_its_best_epochs_hits(
        maps_cache, tiny_splits, parts):
    """A phase-2 trial validates with ``MapsValidation``: Keras traces neither a test nor a predict
    function, and the hits the study keeps are what the restored best epoch predicts (the old way:
    a predict over the validation rows after ``fit``); the logged loss and accuracy are Keras's
    ``evaluate``'s."""
    from search import selection
    from search.engines.objective import TailObjective

    head = _head(parts)
    objective = TailObjective(maps_cache, tiny_splits, parts, head, head.get_weights(), "maps", rows=None,
                              max_epochs=3, batch_size=32, precise_bn_rows=40, precision="float32")
    model = objective.build({"tail_learning_rate": 3e-3}, seed=0)
    value = objective.fit(model, 3)
    assert model.test_function is None and model.predict_function is None
    score = objective.last_score
    hits = selection.unpack_hits(score.hits, score.n)
    val = objective._data[1]
    predicted = model.predict(val, verbose=0).argmax(1) == tiny_splits.y_train[val.rows]
    assert hits.tolist() == predicted.tolist() and value == pytest.approx(hits.mean())
    check = finetune.MapsValidation(val)
    check.set_model(model)
    check.on_train_begin()
    logs: dict = {}
    model.before_evaluate = None  # evaluate below as validation saw it: no PreciseBN again
    check.on_epoch_end(0, logs)
    loss, accuracy = model.evaluate(val, verbose=0)
    assert logs["val_accuracy"] == pytest.approx(accuracy) and logs["val_loss"] == pytest.approx(loss, rel=1e-4)


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_fused_optimizers_take_keras_steps(name):
    """The fused kernels compute Keras's own update: same weights after a few steps, to float32 rounding."""
    from search import heads

    rng = np.random.default_rng(0)
    x = rng.standard_normal((96, 12)).astype(np.float32)
    y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 96)]
    params = {"n_layers": 1, "units_0": 16, "optimizer": name, "learning_rate": 1e-2, "weight_decay": 1e-2}
    weights = []
    for fused in (False, True):
        keras.utils.set_random_seed(0)
        model = heads.compile_for(heads.build_head(params, (12,)), params, fused=fused)
        assert (type(model.optimizer).__module__ == "search.heads") == fused
        start = [np.array(w) for w in model.get_weights()]
        model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
        weights.append(model.get_weights())
    moved = max(np.abs(a - b).max() for a, b in zip(weights[0], start, strict=True))
    assert moved > 1e-3
    for keras_w, fused_w in zip(*weights, strict=True):
        np.testing.assert_allclose(fused_w, keras_w, rtol=1e-4, atol=1e-6)


def test_graph_rewrites_are_restored_after_the_block():
    import tensorflow as tf

    before = tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False)
    with tfgraph.graph_rewrites(False):
        assert tf.config.optimizer.get_experimental_options()["disable_meta_optimizer"] is True
    assert tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False) == before


@pytest.mark.parametrize("unfreeze", [0, 1, 2])
def test_only_the_last_unfrozen_blocks_of_the_tail_train(unfreeze, spec, tiny_cache, tiny_splits):
    """unfreeze_blocks d: the tail's last d blocks train; the blocks before them keep their
    pretrained weights and BN statistics (they run frozen, in inference mode); 0 is the head alone."""
    keras.utils.set_random_seed(0)
    backbone = spec.build(weights=None, size=TINY_RES)
    cut = spec.cut_layer("last2")
    parts = finetune.TailParts.from_backbone(backbone, cut, spec.tail_blocks(cut))
    assert parts.n_blocks == 2 and parts.blocks == (spec.cuts["last1"],)
    head = heads.build_head(space.DEFAULTS["head"], (backbone.output.shape[-1],), num_classes=10)
    params = {"unfreeze_blocks": unfreeze, "tail_learning_rate": 1e-2, "warmup_fraction": 0.0}
    data = finetune.tail_batches(tiny_cache, tiny_splits, params, batch_size=32)
    trainer = finetune.build_tail_trainer(parts, head, head.get_weights(), params, len(data[0]), 1)
    before = {la.name: [np.array(w) for w in la.get_weights()] for la in parts.tail.layers}
    finetune.fit_tail(trainer, *data, 1)
    moved = {la.name for la in parts.tail.layers if la.weights and any(
        not np.array_equal(w, w0) for w, w0 in zip(la.get_weights(), before[la.name], strict=True))}
    block1 = {la.name for la in backbones.frozen_layers(parts.tail, spec.cuts["last1"]) if la.weights}
    tail = {la.name for la in parts.tail.layers if la.weights}
    expected = {0: set(), 1: tail - block1, 2: tail}[unfreeze]
    assert moved == expected and (unfreeze == 0 or moved)
    assert len([v for v in trainer.trainable_variables if id(v) not in trainer._head_ids]) == sum(
        len(la.trainable_weights) for la in parts.tail.layers if la.name in expected)


def test_auto_precision_is_measured_on_the_tail_and_leaves_it_as_it_was(parts, maps_cache, tiny_splits):
    head = train.build_head_model({}, parts.tail.output.shape[-1], 10)
    before_head = [np.array(w) for w in head.get_weights()]
    before_tail = [np.array(w) for w in parts.tail.get_weights()]
    maps = batches.CachedMaps(maps_cache, "train", tiny_splits.train_idx[:16], 16)[0][0]
    probe = finetune.measure_precision(parts, head, maps, steps=2)
    speedup = probe["step_seconds"]["float32"] / probe["step_seconds"]["mixed_bfloat16"]
    assert probe["speedup"] == pytest.approx(speedup) and probe["batch"] == 16
    assert probe["chosen"] == ("mixed_bfloat16" if speedup >= finetune.PRECISION_GAIN else "float32")
    assert all(np.array_equal(a, b) for a, b in zip(head.get_weights(), before_head, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(parts.tail.get_weights(), before_tail, strict=True))
    assert all(la.dtype_policy.name == "float32" for la in parts.tail.layers)
    assert finetune.resolve_precision("auto") == "float32"  # nothing measured: float32


def test_the_precision_probe_alternates_the_precisions_round_by_round(parts, maps_cache, tiny_splits, monkeypatch):
    """A drift of the machine's speed during the probe must fall on both precisions alike: after
    one warm-up step each, the timed steps alternate float32/bfloat16, bfloat16/float32, ..."""
    head = train.build_head_model({}, parts.tail.output.shape[-1], 10)
    maps = batches.CachedMaps(maps_cache, "train", tiny_splits.train_idx[:16], 16)[0][0]
    calls = []
    build = finetune.build_tail_trainer

    class Logged:
        def __init__(self, trainer, policy):
            self.trainer, self.policy = trainer, policy

        def train_on_batch(self, x, y):
            calls.append(self.policy)
            return self.trainer.train_on_batch(x, y)

    built = {}

    def logged_build(parts_, head_, weights, params, steps, epochs, precision="float32"):
        built[precision] = Logged(build(parts_, head_, weights, params, steps, epochs, precision), precision)
        return built[precision]

    monkeypatch.setattr(finetune, "build_tail_trainer", logged_build)
    probe = finetune.measure_precision(parts, head, maps, steps=4)
    f, b = "float32", "mixed_bfloat16"
    assert calls == [f, b, f, b, b, f, f, b, b, f]  # warm-ups, then rounds in alternating order
    assert {p: len(t) for p, t in probe["times"].items()} == {f: 4, b: 4}
    assert probe["step_seconds"][b] == pytest.approx(float(np.median(probe["times"][b])))

    def traced(fn, depth=0):  # the tf.functions Keras's train function closes over
        if hasattr(fn, "_list_all_concrete_functions"):
            return [c.graph for c in fn._list_all_concrete_functions()]
        cells = [c.cell_contents for c in getattr(fn, "__closure__", None) or ()]
        return [g for c in cells if callable(c) and depth < 3 for g in traced(c, depth + 1)]

    def bf16_ops(trainer):  # the traced train step keeps the precision it was traced in
        graphs = traced(trainer.train_function)
        return sum(op.type == "Cast" and op.get_attr("DstT").name == "bfloat16" for g in graphs
                   for op in g.get_operations())

    assert bf16_ops(built[f].trainer) == 0 < bf16_ops(built[b].trainer)


def test_tail_fidelity_trains_each_configuration_at_every_budget_and_the_reference(maps_cache, tiny_splits, parts):
    """bench-tail's measurement: the same random configurations at each trial budget and at the
    reference, from one head; the partial result is reported after every configuration."""
    from search import bench
    from search.engines.objective import TailObjective

    head = _head(parts)
    objective = TailObjective(maps_cache, tiny_splits, parts, head, head.get_weights(), "maps", rows=None,
                              max_epochs=1, batch_size=32, precise_bn_rows=0, precision="float32")
    partial = []
    out = bench.tail_fidelity(objective, [(40, 1), (60, 2)], (80, 3), configs=3, on_row=partial.append)
    assert [p["configs"] for p in partial] == [1, 2, 3]
    assert set(out["budgets"]) == {"40x1", "60x2"} and out["budgets"]["60x2"]["budget"]["rows"] == 60
    assert out["reference"]["rows"] == 80 and out["reference"]["max_epochs"] == 3
    for row in out["rows"]:
        assert [len(row[f"{k}_history"]) for k in ("40x1", "60x2", "full")] == [1, 2, 3]
        assert row["60x2"] == max(row["60x2_history"])  # a budget's score is its best epoch
    assert len({json.dumps(r["params"], sort_keys=True) for r in out["rows"]}) == 3, "three configurations"
    # of the search's space: the whole tail fine-tuned, and recorded so
    assert out["search_depth"] is False and {r["params"]["unfreeze_blocks"] for r in out["rows"]} == {parts.n_blocks}
    taus = [out["budgets"][k][t] for k in ("40x1", "60x2") for t in ("kendall_tau", "kendall_tau_within_depth")]
    assert all(-1.0 <= t <= 1.0 for t in taus)
    # ASHA judges a 2-epoch trial after its first epoch (rung_epochs(2) == (0,)), then its budget
    assert [r["epochs"] for r in out["budgets"]["60x2"]["rungs"]] == [1, "budget"]
    assert [r["epochs"] for r in out["budgets"]["40x1"]["rungs"]] == ["budget"]


def test_tail_trial_times_runs_the_baseline_then_the_search_and_normalizes_the_goals_trials(
        maps_cache, tiny_splits, parts):
    """bench-tail --time-trials: the Keras-validated baseline's trials, then the search's, with
    the reference timed before and after; the goal's trials at the search's mean wall seconds per
    trial normalized as a final's minutes are."""
    from search import bench
    from search.config import GOALS
    from search.engines.objective import TailObjective

    head = _head(parts)
    objective = TailObjective(maps_cache, tiny_splits, parts, head, head.get_weights(), "maps", rows=None,
                              max_epochs=1, batch_size=32, precise_bn_rows=0, precision="float32")
    speeds = iter([120.0, 80.0])
    calls = []

    def reference() -> dict:
        calls.append(1)
        speed = next(speeds)
        return {"images_per_second": speed, "min": speed, "max": speed, "speeds": [speed]}

    out = bench.tail_trial_times(objective, trials=3, baseline_trials=2, reference=reference)
    assert len(calls) == 2 and len(out["trial_seconds"]) == 3 and len(out["baseline"]["trial_seconds"]) == 2
    assert out["states"]["COMPLETE"] + out["states"]["PRUNED"] == 3
    median = float(np.median(out["trial_seconds"]))
    normalized = out["goal_trials_normalized"]  # at the mean wall seconds per trial: pruned trials are shorter
    assert out["wall_seconds_per_trial"] >= float(np.mean(out["trial_seconds"]))
    assert normalized["wall_minutes"] == pytest.approx(GOALS.tail_trials * out["wall_seconds_per_trial"] / 60)
    assert normalized["normalized_minutes"] == pytest.approx(normalized["wall_minutes"] * 100.0 / 60)
    assert out["speedup_median"] == pytest.approx(out["baseline"]["trial_seconds_median"] / median)
    assert not objective.keras_validation, "the baseline ran on a copy"


def _untrained_row(params: dict, objectives: dict, seed: int) -> dict:
    """Stands in for ``bench._train_at_each``: a row of made-up scores (``0.5 + seed / 10``), one
    epoch each, for every budget in ``objectives``, without training."""
    return {"params": params, **{key: value for name in objectives for key, value in (
        (name, 0.5 + seed / 10), (f"{name}_seconds", 1.0), (f"{name}_history", [0.5 + seed / 10]))}}


def test_tail_fidelity_reuses_the_trainings_an_earlier_result_made_with_the_same_settings(
        maps_cache, tiny_splits, parts, monkeypatch):
    """A new trial budget is ranked against the reference measured before: a (configuration,
    budget) pair trained before with the same settings is taken over, not trained again; a
    reference of other settings, or configurations of another seed, are trained."""
    from search import bench
    from search.engines.objective import TailObjective

    head = _head(parts)
    objective = TailObjective(maps_cache, tiny_splits, parts, head, head.get_weights(), "maps", rows=None,
                              max_epochs=1, batch_size=32, precise_bn_rows=0, precision="float32")
    trained = []

    def logged(params, objectives, seed):  # what is asked to train (the training itself: the test above)
        trained.append(sorted(objectives))
        return _untrained_row(params, objectives, seed)

    monkeypatch.setattr(bench, "_train_at_each", logged)
    first = bench.tail_fidelity(objective, [(40, 1)], (60, 2), configs=2)
    assert trained == [["40x1", "full"], ["40x1", "full"]]
    trained.clear()
    second = bench.tail_fidelity(objective, [(40, 1), (50, 1)], (60, 2), configs=3, previous=first)
    assert trained == [["50x1"], ["50x1"], ["40x1", "50x1", "full"]]  # the third configuration is new
    for old, new in zip(first["rows"], second["rows"], strict=False):
        assert sorted(new["reused"]) == ["40x1", "full"] and new["params"] == old["params"]
        assert [new["full_history"], new["40x1"]] == [old["full_history"], old["40x1"]]
    assert "reused" not in second["rows"][2]
    trained.clear()
    bench.tail_fidelity(objective, [(40, 1)], (60, 1), configs=2, previous=first)  # another reference
    assert trained == [["full"], ["full"]]
    trained.clear()
    bench.tail_fidelity(objective, [(40, 1)], (60, 2), configs=2, configs_seed=4, previous=first)
    assert trained == [["40x1", "full"], ["40x1", "full"]]
    # a result recorded before budgets said whether the rate was searched trained the same way
    older = json.loads(json.dumps(first))
    for budget in [older["reference"], *(b["budget"] for b in older["budgets"].values())]:
        assert budget.pop("search_rate") is False
    trained.clear()
    bench.tail_fidelity(objective, [(40, 1)], (60, 2), configs=2, previous=older)
    assert trained == [[], []]


def test_tail_fidelity_holds_fixed_parameters_in_every_configuration(maps_cache, tiny_splits, parts, monkeypatch):
    """bench-tail --fix: the configurations keep the fixed values and sample the rest; the result
    says what was fixed and is written under its own key."""
    from search import bench, space
    from search.config import fidelity_key
    from search.engines.objective import TailObjective

    head = _head(parts)
    objective = TailObjective(maps_cache, tiny_splits, parts, head, head.get_weights(), "maps", rows=None,
                              max_epochs=1, batch_size=32, precise_bn_rows=0, precision="float32",
                              search_rate=True)  # as bench_tail makes it: the whole space, the rate in it
    monkeypatch.setattr(bench, "_train_at_each", _untrained_row)
    fixed = space.parse_fixed("tail", ["tail_learning_rate=0.001", "bn_mode=frozen"])
    assert fixed == {"tail_learning_rate": 0.001, "bn_mode": "frozen"}
    out = bench.tail_fidelity(objective, [(40, 1)], (60, 2), configs=4, fixed=fixed)
    assert out["fixed"] == fixed
    assert all(r["params"]["tail_learning_rate"] == 0.001 and r["params"]["bn_mode"] == "frozen" for r in out["rows"])
    assert len({r["params"]["weight_decay"] for r in out["rows"]}) == 4, "the rest is still sampled"
    free = bench.tail_fidelity(objective, [(40, 1)], (60, 2), configs=4)
    assert free["fixed"] == {} and len({r["params"]["tail_learning_rate"] for r in free["rows"]}) == 4
    assert fidelity_key(False, tuple(fixed)) == "phase2_fidelity_fixed_bn_mode_fixed_tail_learning_rate"
    assert fidelity_key(False) == "phase2_fidelity" and fidelity_key(True) == "phase2_fidelity_search_depth"


def test_a_tail_trial_on_data_smaller_than_its_rows_trains_for_the_finals_epochs(maps_cache, tiny_splits, parts):
    """On a small folder a phase-2 trial already sees every training image; its epochs become the
    final's, so the trial ranks configurations as the final trains them (and the pruner has rungs)."""
    from search.engines.objective import TailObjective, tail_trial_epochs

    assert tail_trial_epochs(45000, 4000, 2, 7) == 2  # CIFAR-10: the budget as given
    assert tail_trial_epochs(1500, 4000, 2, 7) == 7  # a small folder: the final's epochs
    assert tail_trial_epochs(1500, None, 2, 7) == 2  # all rows asked for: the budget as given
    assert tail_trial_epochs(1500, 4000, 9, 7) == 9  # never fewer than asked
    head = _head(parts)
    available = len(tiny_splits.train_idx)

    def budget(rows: int | None, max_epochs: int = 1, **options) -> dict:
        return TailObjective(maps_cache, tiny_splits, parts, head, head.get_weights(), "maps", rows=rows,
                             max_epochs=max_epochs, batch_size=32, precise_bn_rows=0, precision="float32",
                             full_epochs=3, **options).budget

    assert (budget(available - 10)["max_epochs"], budget(available + 10)["max_epochs"]) == (1, 3)
    # the tail rate is searched only by a trial that trains as the final does (a budget that trains
    # less ranks rates in reverse), unless asked for
    assert [budget(rows, epochs)["search_rate"] for rows, epochs in
            ((available - 10, 1), (None, 1), (None, 3), (available + 10, 1))] == [False, False, True, True]
    assert budget(available - 10, search_rate=True)["search_rate"] is True
    objective = TailObjective(maps_cache, tiny_splits, parts, head, head.get_weights(), "maps", rows=available - 10,
                              max_epochs=1, batch_size=32, precise_bn_rows=0, precision="float32", full_epochs=3)
    trial = optuna.create_study().ask()
    assert space.suggest("tail", trial, **objective.space_options)["tail_learning_rate"] == \
        space.DEFAULT_TAIL["tail_learning_rate"]


def test_a_small_data_tail_trial_is_cross_validated_and_keeps_every_held_out_images_hits(
        maps_cache, tiny_splits, parts):
    """On small data a phase-2 trial trains one tail per fold and is scored on every training
    image once, held out: the study compares two such trials image by image over all of them."""
    from search import selection
    from search.batches import stratified_folds
    from search.engines.objective import TailObjective, trial_folds

    rows = tiny_splits.train_idx
    folds = stratified_folds(rows, tiny_splits.y_train[rows], 3)
    held = np.concatenate([h for _, h in folds])
    assert sorted(held) == sorted(rows)  # every training image held out exactly once
    assert all(not set(fit) & set(h) and len(fit) + len(h) == len(rows) for fit, h in folds)
    again = stratified_folds(rows, tiny_splits.y_train[rows], 3)  # the same seed: the same folds
    assert [h.tolist() for _, h in again] == [h.tolist() for _, h in folds]
    assert trial_folds(tiny_splits, rows=4000) == trial_folds(tiny_splits) > 1  # a small folder
    head = _head(parts)
    common = dict(rows=None, max_epochs=1, batch_size=32, precise_bn_rows=0, precision="float32", folds=3)
    with pytest.raises(UserError, match="trained without that fold's images: 3 heads needed, 0 given"):
        TailObjective(maps_cache, tiny_splits, parts, head, head.get_weights(), "maps", **common)
    objective = TailObjective(maps_cache, tiny_splits, parts, head, head.get_weights(), "maps",
                              fold_head_weights=[head.get_weights()] * 3, **common)
    assert objective.budget["folds"] == 3
    value = objective.fit(objective.build(space.DEFAULTS["tail"], seed=0), 1)
    score = objective.last_score
    hits = selection.unpack_hits(score.hits, score.n)
    assert score.folds == 3 and score.n == len(rows) and value == pytest.approx(np.mean(score.scores))
    sizes = [len(h) for _, h in folds]  # the hits are the folds' best-epoch predictions, in fold order
    per_fold = np.split(hits, np.cumsum(sizes)[:-1])
    assert [float(f.mean()) for f in per_fold] == pytest.approx(score.scores, abs=1e-6)
    out = selection.decide(score, selection.Score(value, score.scores, score.n, selection.pack_hits(~hits)))
    assert out["test"].startswith(f"paired over {len(rows)} out-of-fold images (3 folds)")
