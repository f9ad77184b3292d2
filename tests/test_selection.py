"""Selection that respects noise: the shipping rule, cross-validated head trials, the validation
size, and `final --params auto` shipping the defaults when the search's margin is noise."""

import numpy as np
import optuna
import pytest

from search import batches, engines, selection, space
from search.engines.objective import HeadObjective, trial_folds
from search.selection import Score, decide


def test_a_paired_fold_margin_larger_than_its_noise_ships_the_search():
    default = Score(0.70, [0.68, 0.70, 0.72, 0.69, 0.71], 100)
    best = Score(0.73, [0.71, 0.73, 0.75, 0.72, 0.74], 100)  # +0.03 on every fold: no spread
    out = decide(best, default)
    assert out["ship"] == "search" and out["test"].startswith("paired t") and out["margin"] == pytest.approx(0.03)


def test_a_margin_within_the_fold_noise_ships_the_defaults():
    default = Score(0.70, [0.66, 0.74, 0.70, 0.68, 0.72], 100)
    best = Score(0.71, [0.74, 0.66, 0.75, 0.69, 0.71], 100)  # +0.01 on average, folds disagree
    out = decide(best, default)
    assert out["ship"] == "default" and out["margin"] < out["threshold"]
    assert "does not beat" in out["why"]


def test_on_one_split_the_noise_is_binomial_in_the_validation_size():
    small = decide(Score(0.80, [0.80], 100), Score(0.75, [0.75], 100))
    large = decide(Score(0.80, [0.80], 5000), Score(0.75, [0.75], 5000))
    assert small["ship"] == "default" and large["ship"] == "search"
    assert small["se"] == pytest.approx(np.sqrt(0.8 * 0.2 / 100 + 0.75 * 0.25 / 100))


def test_no_defaults_trial_or_the_defaults_winning_ships_the_defaults():
    best = Score(0.9, [0.9], 1000)
    assert decide(best, None)["ship"] == "default"
    assert decide(best, Score(0.5, [0.5], 1000), best_is_default=True)["ship"] == "default"
    assert decide(Score(0.9), Score(0.5))["ship"] == "default"  # no sample size: noise unknown


def test_validation_size_scales_with_a_floor_per_class_and_a_cap():
    assert selection.default_val_size(50000, 10) == 5000  # CIFAR-10: 10 %
    assert selection.default_val_size(1000, 4) == 200  # 50 per class
    assert selection.default_val_size(1000, 10) == 300  # capped at 30 %


def test_folds_fall_back_when_a_class_is_too_small():
    assert selection.folds_for(np.repeat(np.arange(3), 40)) == 5
    assert selection.folds_for(np.r_[np.repeat(np.arange(3), 40), [3] * 6]) == 3  # 6 images: 3 folds of 2
    assert selection.folds_for(np.r_[np.repeat(np.arange(3), 40), [3]]) == 1  # one image: no cross-validation


def test_small_data_head_trials_are_cross_validated_on_shared_stratified_folds(tiny_cache, tiny_splits):
    assert trial_folds(tiny_splits) == 5  # 100 training images, 10 per class
    data = batches.PooledData.from_cache(tiny_cache, tiny_splits, mirrored=False)
    folds = data.folds(5)
    held = np.concatenate([f.x_val for f in folds])
    assert len(held) == len(data.x_train) and len(np.unique(held, axis=0)) == len(np.unique(data.x_train, axis=0))
    assert all(np.bincount(f.y_val.argmax(1), minlength=10).min() == 2 for f in folds)  # stratified
    objective = HeadObjective(data, "tiny", max_epochs=2, batch_size=16, folds=5)
    value = objective.fit(objective.build(space.DEFAULTS["head"]), 2)
    score = objective.last_score
    assert score.folds == 5 and score.n == len(data.x_train) == 100 and value == pytest.approx(np.mean(score.scores))
    assert objective.budget["folds"] == 5
    # the hits: each fold's held-out images at its best epoch, in fold order (every image once)
    hits = selection.unpack_hits(score.hits, score.n)
    per_fold = np.split(hits, np.cumsum([len(f.x_val) for f in folds])[:-1])
    assert [float(f.mean()) for f in per_fold] == pytest.approx(score.scores, abs=1e-6)
    out = selection.decide(score, selection.Score(value, score.scores, score.n, selection.pack_hits(~hits)))
    assert out["test"].startswith("paired over 100 out-of-fold images (5 folds)")
    # a defaults' trial recorded without hits (an older study): the paired t over the folds
    older = selection.decide(score, selection.Score(value - 0.01, [s - 0.01 for s in score.scores], score.n))
    assert older["test"].startswith("paired t over 5 folds")


def _study_with(tmp_path, default_scores, best_scores, cache_id="c1", phase="head", budget=None):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name=f"{phase}-{cache_id}", direction="maximize")
    name = {"head": "dropout", "tail": "weight_decay"}[phase]
    dist = {name: optuna.distributions.FloatDistribution(0.0, 0.5)}
    for scores, extra in ((default_scores, {"defaults": True}), (best_scores, {})):
        study.add_trial(optuna.trial.create_trial(
            params={name: space.DEFAULTS[phase][name] if extra else 0.1}, distributions=dist,
            value=float(np.mean(scores)), user_attrs={"scores": scores, "n": 20, "budget": budget, **extra}))
    engines.write_pointer(tmp_path, phase, cache_id, {"engine": "optuna", "storage": storage,
                                                      "study_name": study.study_name})


def test_final_auto_ships_the_search_only_beyond_the_noise_and_says_why(tmp_path):
    _study_with(tmp_path, [0.6, 0.7, 0.65, 0.7, 0.6], [0.7, 0.6, 0.7, 0.65, 0.7])  # +0.02, folds disagree
    params, prov = engines.resolve_params("auto", tmp_path, "c1", phases=("head",))
    assert prov["head"]["source"] == "default" and params["head"] == space.DEFAULTS["head"]
    assert prov["head"]["decision"]["ship"] == "default" and "noise" in prov["head"]["why"]
    params, prov = engines.resolve_params("study", tmp_path, "c1", phases=("head",))  # the best, whatever
    assert prov["head"]["source"] == "search" and params["head"]["dropout"] == 0.1


def test_final_auto_ships_a_clear_win(tmp_path):
    _study_with(tmp_path, [0.6, 0.62, 0.61, 0.6, 0.63], [0.7, 0.73, 0.71, 0.7, 0.72])
    params, prov = engines.resolve_params("auto", tmp_path, "c1", phases=("head",))
    assert prov["head"]["source"] == "search" and prov["head"]["decision"]["ship"] == "search"
    assert params["head"]["dropout"] == 0.1


def test_a_tail_search_below_the_finals_training_ships_only_when_asked(tmp_path):
    """A phase-2 win at a budget below the final's training (CIFAR-10's 4,000 images x 2 epochs)
    is not shipped by auto, which says why; a small set's trials, at the final's training, are."""
    win = ([0.6, 0.62, 0.61, 0.6, 0.63], [0.7, 0.73, 0.71, 0.7, 0.72])
    _study_with(tmp_path, *win, phase="tail", budget={"rows": 4000, "max_epochs": 2})
    params, prov = engines.resolve_params("auto", tmp_path, "c1", phases=("tail",), train_rows=45000, tail_epochs=8)
    assert prov["tail"]["source"] == "default" and params["tail"] == space.DEFAULTS["tail"]
    assert "beats the defaults" in prov["tail"]["why"] and "trained 2 epochs" in prov["tail"]["why"]
    params, prov = engines.resolve_params("study", tmp_path, "c1", phases=("tail",), train_rows=45000, tail_epochs=8)
    assert prov["tail"]["source"] == "search" and params["tail"]["weight_decay"] == 0.1
    small = tmp_path / "small"
    small.mkdir()
    _study_with(small, *win, phase="tail", budget={"rows": 1500, "max_epochs": 8, "folds": 5})
    params, prov = engines.resolve_params("auto", small, "c1", phases=("tail",), train_rows=1500, tail_epochs=8)
    assert prov["tail"]["source"] == "search" and params["tail"]["weight_decay"] == 0.1
    assert engines.below_final_fidelity({"rows": 1000, "max_epochs": 8}, 1500, 8).startswith("its trials trained on")
    assert engines.below_final_fidelity(None, 1500, 8) is None


def test_a_tail_search_that_held_the_rate_still_ships_its_win_below_the_finals_training_only_when_asked(tmp_path):
    """Holding the tail rate does not make a short budget's winner ship: with the rate held, such
    winners still lost to the defaults' tail in the final (results/search_effect_tail_shipped.json)."""
    win = ([0.6, 0.62, 0.61, 0.6, 0.63], [0.7, 0.73, 0.71, 0.7, 0.72])
    _study_with(tmp_path, *win, phase="tail", budget={"rows": 4000, "max_epochs": 2, "search_rate": False})
    params, prov = engines.resolve_params("auto", tmp_path, "c1", phases=("tail",), train_rows=45000, tail_epochs=8)
    assert prov["tail"]["source"] == "default" and "trained 2 epochs" in prov["tail"]["why"]
    params, prov = engines.resolve_params("study", tmp_path, "c1", phases=("tail",), train_rows=45000, tail_epochs=8)
    assert prov["tail"]["source"] == "search" and params["tail"]["weight_decay"] == 0.1


def test_on_one_split_trials_are_compared_image_by_image():
    rng = np.random.default_rng(0)
    default = rng.random(2000) < 0.80
    better = default.copy()
    better[np.flatnonzero(~default)[:30]] = True  # right on 30 more images, wrong on none it got
    d, b = (Score(float(h.mean()), [float(h.mean())], len(h), selection.pack_hits(h)) for h in (default, better))
    paired = decide(b, d)
    unpaired = decide(Score(b.value, b.scores, b.n), Score(d.value, d.scores, d.n))
    assert paired["test"].startswith("paired over 2000") and paired["ship"] == "search"
    assert unpaired["ship"] == "default" and paired["se"] < unpaired["se"] / 3
    assert (selection.unpack_hits(selection.pack_hits(better), 2000) == better).all()
    noisy = default.copy()
    flip = rng.choice(2000, 300, replace=False)
    noisy[flip] = ~noisy[flip]  # as many images won as lost, give or take: noise
    out = decide(Score(float(noisy.mean()) + 1e-9, [noisy.mean()], 2000, selection.pack_hits(noisy)), d)
    assert out["ship"] == "default"


def test_a_single_split_head_trial_records_the_images_it_got_right(tiny_cache, tiny_splits):
    data = batches.PooledData.from_cache(tiny_cache, tiny_splits, mirrored=False)
    objective = HeadObjective(data, "tiny", max_epochs=2, batch_size=16, folds=1)
    value = objective.fit(objective.build(space.DEFAULTS["head"]), 2)
    hits = selection.unpack_hits(objective.last_score.hits, objective.last_score.n)
    assert len(hits) == len(tiny_splits.val_idx) and hits.mean() == pytest.approx(value)


def test_too_few_images_per_class_for_the_folds_is_named_in_the_log(tiny_splits, caplog):
    from search.data import make_splits

    keep = np.flatnonzero((tiny_splits.y_train != 9) | (np.cumsum(tiny_splits.y_train == 9) <= 8))
    small = make_splits(tiny_splits.x_train[keep], tiny_splits.y_train[keep], tiny_splits.x_test,
                        tiny_splits.y_test, val_size=20, seed=0)  # class 9: 8 images, 6 left for training
    with caplog.at_level("WARNING"):
        k = trial_folds(small)
    assert k == 3 == selection.folds_for(small.y_train[small.train_idx])
    assert "cross-validated on 3 folds, not 5" in caplog.text and "smallest class has 6 images" in caplog.text
