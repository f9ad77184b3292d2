"""Search engines on a tiny cache: both engines run both phases through the same objective;
Optuna records and opens in its CLI; final reads the best trials of its own cache key only;
failing searches and options an engine cannot honour are refused. Workers in their own
processes: test_workers.py (SIGKILL, SQLite) and test_postgres_*.py."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import optuna
import pytest

from conftest import TINY_RES
from search import batches, engines, space
from search.engines.objective import HeadObjective, TailObjective, make_objective, trial_folds
from search.errors import UserError
from search.final import FinalConfig, build_final


@pytest.fixture(scope="module")
def pooled(tiny_cache, tiny_splits):
    return batches.PooledData.from_cache(tiny_cache, tiny_splits)


@pytest.fixture(scope="module")
def backbone(spec):
    keras.utils.set_random_seed(0)
    return spec.build(weights=None, size=TINY_RES)


class Spy:
    """Wraps an objective and records every build and fit the engine makes through it."""

    def __init__(self, objective):
        self.inner, self.builds, self.fits = objective, [], []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def build(self, params, seed=0):
        self.builds.append(params)
        return self.inner.build(params, seed=seed)

    def fit(self, model, epochs, callbacks=None, initial_epoch=0):
        value = self.inner.fit(model, epochs, callbacks, initial_epoch=initial_epoch)
        self.fits.append(value)
        return value


@pytest.mark.parametrize("engine_name", ["optuna", "kerastuner"])
def test_both_engines_run_both_phases_through_the_same_objective(engine_name, tiny_cache, tiny_splits, backbone,
                                                                 tmp_path):
    engine = engines.make_engine(engine_name, progress=False, results=tmp_path)
    for phase in space.PHASES:
        objective = make_objective(phase, tiny_cache, tiny_splits, rows=60, max_epochs=1, backbone=backbone,
                                   precision="float32", folds=2,  # cross-validated, as small data is; 2 for speed
                                   results=str(tmp_path))
        assert isinstance(objective, HeadObjective if phase == "head" else TailObjective)
        spy = Spy(objective)
        summary = engine.run(spy, 2)
        assert summary["trials"] == 2 and summary["complete"] == 2, summary
        # (KerasTuner also builds while it discovers the conditional space, before the first trial, and
        # scores the defaults through the objective before its tuner starts: Optuna enqueues them)
        defaults_fit = int(engine_name == "kerastuner")
        assert len(spy.fits) == 2 + defaults_fit and len(spy.builds) >= 2 + defaults_fit
        if defaults_fit:
            assert space.default_trial(phase) in spy.builds
        # every sampled configuration is one of this phase's space, and the best value is a fit's result
        declared = {row["name"] for row in space.describe(phase)}
        assert all(p and set(p) <= declared for p in spy.builds), (declared, spy.builds)
        if phase == "tail":  # the search's default space fine-tunes the whole tail
            assert {p["unfreeze_blocks"] for p in spy.builds} == {objective.parts.n_blocks}
            # and, its trials training less than the final (60 rows, 1 epoch), holds the rate
            assert objective.budget["search_rate"] is False
            assert {p["tail_learning_rate"] for p in spy.builds} == {space.DEFAULT_TAIL["tail_learning_rate"]}
        assert summary["best_value"] in spy.fits
        params, provenance = engines.best_params(tmp_path, phase, tiny_cache.path.name)
        assert provenance["engine"] == engine_name and params == summary["best_params"]
    if engine_name == "optuna":
        study = optuna.load_study(study_name=f"tail-{tiny_cache.path.name}",
                                  storage=f"sqlite:///{tmp_path / 'study.db'}")
        assert study.metric_names == ["validation accuracy"]
        # the tail study started from the phase-1 head that the shipping rule chose on this cache key
        head = study.trials[0].user_attrs["budget"]["head"]
        assert head["decision"]["ship"] == head["source"] and head["decision"]["why"]
        # each study's first trial is the documented defaults, measured at the study's budget
        for phase in space.PHASES:
            first = optuna.load_study(study_name=f"{phase}-{tiny_cache.path.name}",
                                      storage=f"sqlite:///{tmp_path / 'study.db'}").trials[0]
            assert first.user_attrs["defaults"] and first.params == space.default_trial(phase)
            assert space.with_defaults(phase, first.params) == space.DEFAULTS[phase]
        # every finished phase-2 trial kept which images it got right (the paired comparison): on this
        # small set, every training row of its budget once, held out of one of its folds
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert objective.folds == 2 and trial_folds(tiny_splits) > 1  # by default too: 100 training images
        # each fold starts from its own head, trained without the fold's held-out images
        fold_heads = objective.fold_head_weights
        def same(a, b):
            return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))

        assert len(fold_heads) == 2 and not same(fold_heads[0], fold_heads[1])
        assert not same(fold_heads[0], objective.head_weights)
        assert done and all(t.user_attrs["n"] == objective.budget["rows"] and t.user_attrs["hits"]
                            and len(t.user_attrs["scores"]) == objective.folds for t in done)
        # the BN momentum is a fixed setting, not searched (PreciseBN trials cannot see it)
        assert all("bn_momentum" not in t.params for t in study.trials)


def test_optuna_records_trials_and_opens_in_optuna_cli(pooled, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    engine = engines.make_engine("optuna", storage=storage, pruner="median", progress=False, results=tmp_path,
                                 default_trial=False)
    summary = engine.run(HeadObjective(pooled, "tiny", max_epochs=3), 3)
    assert summary["trials"] == 3 and summary["complete"] + summary["pruned"] + summary["failed"] == 3
    study = optuna.load_study(study_name=summary["study_name"], storage=storage)
    assert not any(t.user_attrs.get("defaults") for t in study.trials)  # --no-default-trial
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert done and all({"epochs", "seconds", "cache", "phase", "budget"} <= set(t.user_attrs) for t in done)
    for t in study.trials:  # inactive parameters are not sampled
        assert ("weight_decay" in t.params) == (t.params["optimizer"] != "adam")
        assert all((f"units_{i}" in t.params) == (t.params["n_layers"] > i) for i in range(space.MAX_DENSE_LAYERS))
    optuna_cli = os.path.join(os.path.dirname(sys.executable), "optuna")
    listed = subprocess.run([optuna_cli, "studies", "--storage", storage], capture_output=True, text=True)
    assert listed.returncode == 0 and summary["study_name"] in listed.stdout, listed.stderr
    best = subprocess.run([optuna_cli, "best-trial", "--study-name", summary["study_name"], "--storage", storage,
                           "-f", "json"], capture_output=True, text=True)
    assert best.returncode == 0, best.stderr
    assert json.loads(best.stdout)["number"] == study.best_trial.number
    assert study.user_attrs["pruners"] == ["median"]
    again = engines.make_engine("optuna", storage=storage, progress=False, results=tmp_path).run(
        HeadObjective(pooled, "tiny", max_epochs=3), 1)  # load_if_exists continues it, default pruner
    assert again["trials"] == 4
    assert optuna.load_study(study_name=summary["study_name"], storage=storage).user_attrs["pruners"] == [
        "median", "asha"]


@pytest.mark.parametrize("engine_name", ["optuna", "kerastuner"])
def test_a_study_refuses_trials_of_another_budget(engine_name, pooled, tmp_path):
    engine = engines.make_engine(engine_name, progress=False, results=tmp_path, default_trial=False)
    assert engine.run(HeadObjective(pooled, "tiny", max_epochs=1, batch_size=32), 1)["trials"] == 1
    saved = {k: v for k, v in json.loads(engines.pointer_path(tmp_path, "head", "tiny").read_text()).items()
             if k not in ("phase", "cache")}
    for other in ({"batch_size": 16}, {"max_epochs": 2}, {"rows": 40}):
        budget = {"max_epochs": 1, "batch_size": 32, **other}
        pointer = engines.pointer_path(tmp_path, "head", "tiny")
        pointer.unlink()
        with pytest.raises(UserError, match="name a new study"):
            engine.run(HeadObjective(pooled, "tiny", **budget), 1)
        assert not pointer.exists(), "a refused run must not point final at the study"
        engines.write_pointer(tmp_path, "head", "tiny", saved)
    more = 2 if engine_name == "kerastuner" else 1  # KerasTuner's max_trials counts the project's trials
    again = engine.run(HeadObjective(pooled, "tiny", max_epochs=1, batch_size=32), more)  # the same budget goes on
    assert again["trials"] == 2


def test_the_pruner_is_not_asked_after_a_trials_last_epoch():
    from search.engines.optuna_engine import pruning_callback

    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=2.0))
    trial = study.ask()  # every score is below 2.0: the pruner says prune whenever it is asked
    with pytest.raises(optuna.TrialPruned):
        pruning_callback(trial, max_epochs=3).on_epoch_end(0, {"val_accuracy": 0.5})
    trial = study.ask()
    pruning_callback(trial, max_epochs=3).on_epoch_end(2, {"val_accuracy": 0.5})  # the last epoch: reported only
    study.tell(trial, 0.5)
    assert study.trials[-1].intermediate_values == {2: 0.5} and study.best_trial.number == trial.number


def test_the_default_pruner_judges_a_two_epoch_trial_after_its_first_epoch(tmp_path):
    """Phase 2's CIFAR-10 budget is 2 epochs: reported from step 0, its only rung (step 1) was its
    last epoch and no trial could be pruned. Its steps start at 1: judged after epoch 1."""
    from search.engines.optuna_engine import DEFAULT_PRUNER, make_pruner, pruning_callback, rung_epochs, rung_steps

    assert rung_steps(2) == (1,) and rung_epochs(2) == (0,) and rung_steps(1) == () and rung_epochs(8) == (1, 3)
    study = optuna.create_study(direction="maximize", pruner=make_pruner(DEFAULT_PRUNER, 2))
    outcome = {}
    for value in (0.5, 0.6, 0.4, 0.7, 0.1, 0.2):
        trial = study.ask()
        try:
            pruning_callback(trial, max_epochs=2).on_epoch_end(0, {"val_accuracy": value})
        except optuna.TrialPruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            outcome[value] = "pruned"
            continue
        pruning_callback(trial, max_epochs=2).on_epoch_end(1, {"val_accuracy": value})  # not asked: the last
        study.tell(trial, value)
        outcome[value] = "complete"
    # the best third of those judged so far goes on (the first and each new best among the first few)
    assert outcome == {0.5: "complete", 0.6: "complete", 0.4: "pruned", 0.7: "complete", 0.1: "pruned",
                       0.2: "pruned"}
    assert all(t.intermediate_values.keys() == {1} for t in study.trials if t.state.name == "PRUNED")
    # through the engine's trial runner: a pruned 2-epoch trial trained one epoch, the others two
    engine = engines.make_engine("optuna", progress=False, results=tmp_path, default_trial=False)
    summary = engine.run(Scripted([0.5, 0.6, 0.4, 0.7, 0.1, 0.2], max_epochs=2), 6)
    assert (summary["complete"], summary["pruned"]) == (3, 3)
    trials = optuna.load_study(study_name="head-scripted", storage=f"sqlite:///{tmp_path / 'study.db'}").trials
    assert [t.user_attrs["epochs"] for t in trials] == [2, 2, 1, 2, 1, 1]


class Scripted:
    """A phase-1 objective that trains nothing: trial ``n`` (the engine's seed 0 + ``n``) scores
    ``scores[n]`` after each of its epochs, through the callbacks the engine gives its ``fit``."""

    phase, cache_id, space_options = "head", "scripted", {}

    def __init__(self, scores: list[float], max_epochs: int) -> None:
        self.scores, self.max_epochs = scores, max_epochs
        self.budget = {"rows": len(scores), "max_epochs": max_epochs}

    def build(self, params: dict, seed: int = 0) -> int:
        return seed

    def fit(self, model: int, epochs: int, callbacks: list) -> float:
        for epoch in range(epochs):
            for callback in callbacks:
                callback.on_epoch_end(epoch, {"val_accuracy": self.scores[model]})
        return self.scores[model]


def test_a_pruned_trial_records_the_epochs_it_trained(pooled, tmp_path, monkeypatch):
    from search.engines import optuna_engine

    monkeypatch.setattr(optuna_engine, "make_pruner", lambda name, max_epochs: optuna.pruners.ThresholdPruner(
        lower=2.0))  # every score is below 2.0: each trial is pruned after its first epoch
    engine = engines.make_engine("optuna", progress=False, results=tmp_path, default_trial=False)
    assert engine.run(HeadObjective(pooled, "tiny", max_epochs=3), 2)["pruned"] == 2
    study = optuna.load_study(study_name="head-tiny", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert [t.user_attrs["epochs"] for t in study.trials] == [1, 1]


def test_hyperband_pruner_follows_the_epoch_budget():
    from search.engines.optuna_engine import make_pruner

    assert make_pruner("hyperband", 7)._max_resource == 7
    assert make_pruner("hyperband", 2)._max_resource == 3  # a 2-epoch trial reports steps 1 and 2


def test_the_default_pruner_halves_after_the_rungs_the_benchmark_scores():
    from search.engines.optuna_engine import DEFAULT_PRUNER, make_pruner, rung_steps

    study = optuna.create_study(direction="maximize", pruner=make_pruner(DEFAULT_PRUNER, 8))
    pruned_at = []
    for value in (0.5, 0.6, 0.7, 0.1, 0.2, 0.3, 0.4):  # a trial that is not among the best third stops
        trial = study.ask()
        for step in range(8):
            trial.report(value, step)
            if trial.should_prune():
                pruned_at.append(step)
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            study.tell(trial, value)
    assert rung_steps(8) == (1, 3) and rung_steps(4) == (1,) and rung_steps(2) == (1,)
    assert pruned_at and set(pruned_at) <= set(rung_steps(8))
    assert min(pruned_at) == rung_steps(8)[0]


def test_rung_taus_score_each_rung_and_an_early_stopped_trial_by_its_best_epoch():
    from search import bench

    ranking = [{"fast_history": [0.1, 0.5], "fast": 0.5, "full": 0.9},  # stopped before step 3: scored 0.5 there
               {"fast_history": [0.2, 0.3, 0.3, 0.4], "fast": 0.4, "full": 0.8},
               {"fast_history": [0.3, 0.1, 0.2, 0.9], "fast": 0.9, "full": 0.7}]
    rungs = bench.rung_taus(ranking, steps=(0, 1, 3))
    assert [r["epochs"] for r in rungs] == [1, 2, 4, "budget"]
    assert rungs[0]["kendall_tau"] == pytest.approx(-1.0)  # 0.1 < 0.2 < 0.3 against 0.9 > 0.8 > 0.7
    assert rungs[1]["kendall_tau"] == pytest.approx(1.0)  # 0.5 > 0.3 > 0.1
    assert rungs[2]["kendall_tau"] == pytest.approx(-1 / 3)  # 0.5, 0.4, 0.9
    assert rungs[3]["kendall_tau"] == rungs[2]["kendall_tau"]
    other = [{"b_history": r["fast_history"][::-1], "b": r["fast"], "full": r["full"]} for r in ranking]
    assert bench.rung_taus(other, steps=(0,), key="b")[0]["kendall_tau"] == pytest.approx(-1 / 3)  # 0.5, 0.4, 0.9


def test_tpe_startup_is_sized_to_the_budget():
    from search.engines.optuna_engine import make_sampler

    assert make_sampler(0, 15)._n_startup_trials == 3
    assert make_sampler(0, 200)._n_startup_trials == 10


class Failing:
    phase, cache_id, max_epochs, budget, space_options = "head", "tiny", 1, {}, {}

    def build(self, params, seed=0):
        raise RuntimeError("out of memory (simulated)")

    def fit(self, model, epochs, callbacks=None, initial_epoch=0):
        raise AssertionError("not reached")


@pytest.mark.parametrize("engine_name", ["optuna", "kerastuner"])
def test_a_search_whose_trials_all_fail_is_an_error(engine_name, tmp_path):
    engine = engines.make_engine(engine_name, progress=False, results=tmp_path)
    with pytest.raises(engines.AllTrialsFailed, match="simulated"):
        engine.run(Failing(), 2)


@pytest.mark.parametrize("engine_name, options, needle", [
    ("kerastuner", {"pruner": "median"}, "--pruner"),
    ("kerastuner", {"storage": "sqlite:///x.db"}, "--storage"),
    ("kerastuner", {"heartbeat": 5}, "--heartbeat"),
    ("optuna", {"oracle": "hyperband"}, "--oracle"),
    ("optuna", {"pruner": "sometimes"}, "unknown pruner"),
    ("optuna", {"storage": "notaurl://x"}, "storage URL"),
    ("kerastuner", {"oracle": "grid"}, "unknown KerasTuner oracle"),
])
def test_an_option_an_engine_cannot_honour_is_refused(engine_name, options, needle, tmp_path):
    with pytest.raises(UserError, match=needle):
        engines.make_engine(engine_name, results=tmp_path, **options)


def test_kerastuner_hyperband_refuses_a_trial_count(pooled, tmp_path):
    engine = engines.make_engine("kerastuner", oracle="hyperband", progress=False, results=tmp_path)
    with pytest.raises(UserError, match="--trials"):
        engine.run(HeadObjective(pooled, "tiny", max_epochs=2), 5)


def test_final_takes_both_phases_of_its_own_cache_key_only(spec, tiny_splits, tmp_path):
    from search.cache import ensure_cache

    results = tmp_path / "results"
    keras.utils.set_random_seed(0)
    model = spec.build(weights=None, size=TINY_RES)
    cache = ensure_cache(spec, tiny_splits, resolution=TINY_RES, weights=None, root=tmp_path / "cache",
                         progress=False, model=model, flip=False)  # the final's default: mirrored maps
    own = cache.path.name
    # a search on another cache key (another cut, say) with very different parameters
    engines.write_pointer(results, "tail", "MobileNet-32-other-cut", {"engine": "optuna", "storage": "x",
                                                                       "study_name": "never-read"})
    with pytest.raises(UserError, match="no tail search"):
        engines.resolve_params("study", results, own, phases=("tail",))
    # this cache key's searches: phase-1 and phase-2 studies written by the engine
    storage = f"sqlite:///{results / 'study.db'}"
    for phase, params in (("head", {"n_layers": 1, "units_0": 128}), ("tail", {"shift": 2, "bn_mode": "frozen"})):
        study = optuna.create_study(storage=storage, study_name=f"{phase}-{own}", direction="maximize")
        trial = study.ask()
        for name, value in params.items():
            trial.suggest_categorical(name, [value])
        study.tell(trial, 0.5)
        engines.write_pointer(results, phase, own, {"engine": "optuna", "storage": storage,
                                                    "study_name": f"{phase}-{own}"})
    config = FinalConfig(weights=None, resolution=TINY_RES, reference_resolution=TINY_RES, tail_precision="float32",
                         cache_root=str(tmp_path / "cache"),
                         results=str(results), output=str(tmp_path / "m.h5"), head_epochs=1, tail_epochs=1,
                         tail_batch_size=32, bn_passes=1, parity_images=8, progress=False, params="study")
    summary = build_final(config, tiny_splits, model=model)
    assert summary["cache"]["reused"] and summary["cache"]["path"].endswith(own)
    assert summary["params"]["tail"]["shift"] == 2 and summary["params"]["tail"]["bn_mode"] == "frozen"
    assert summary["params"]["head"]["units_0"] == 128
    assert summary["params_provenance"]["tail"]["study"] == f"tail-{own}"
    assert summary["params_provenance"]["tail"]["trial"] == 0
    assert not any(r["stage"].endswith("BN re-estimated") for r in summary["stages"]), "frozen BN: no re-estimation"
    rows = json.loads((results / "ablation.json").read_text())
    assert rows and all(r["params"] == "search/search" for r in rows)


@pytest.mark.parametrize("engine_name", ["optuna", "kerastuner"])
def test_a_time_budget_stops_starting_trials(engine_name, pooled, tmp_path):
    engine = engines.make_engine(engine_name, progress=False, results=tmp_path)
    summary = engine.run(HeadObjective(pooled, "tiny", max_epochs=1, batch_size=32), 5, timeout=1e-3)
    assert summary["trials"] == 1, "the budget ran out during the first trial: no other started"
    unlimited = engine.run(HeadObjective(pooled, "tiny", max_epochs=1, batch_size=32), 3, study_name="more")
    assert unlimited["trials"] == 3


def test_a_stratified_kendall_tau_counts_only_the_pairs_within_a_group():
    """Phase 2's budget may rank the rates of one depth well and the depths badly: the tau within
    depth counts only the pairs that share a depth."""
    from search import bench

    short = [0.60, 0.65, 0.80, 0.82]  # two configurations of depth 2, two of depth 0
    long = [0.83, 0.84, 0.81, 0.82]  # depth 2 ahead in the long run; each depth's order kept
    depth = [2, 2, 0, 0]
    assert bench.kendall_tau(short, long) == pytest.approx(-1 / 3)  # 2 concordant, 4 discordant
    assert bench.kendall_tau(short, long, depth) == pytest.approx(1.0)
    assert bench.kendall_tau(short, long[::-1], depth) == pytest.approx(-1.0)
    assert bench.kendall_tau(short, long, [0, 1, 2, 3]) == 0.0  # no pair shares a group


def test_the_tail_depth_is_fixed_at_the_whole_tail_unless_searched():
    import keras_tuner as kt

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    searched, fixed = set(), set()
    for i in range(24):  # one study: a depth-searching trial and a fixed one do not clash
        trial = study.ask()
        params = space.suggest("tail", trial, max_unfreeze=3, search_depth=i % 2 == 0)
        assert trial.params["unfreeze_blocks"] == params["unfreeze_blocks"]  # recorded, so the final gets it
        (searched if i % 2 == 0 else fixed).add(params["unfreeze_blocks"])
        study.tell(trial, 0.5)
    assert fixed == {3} and searched <= {0, 1, 2, 3} and len(searched) > 1
    hp = kt.HyperParameters()
    assert space.suggest("tail", hp, max_unfreeze=1)["unfreeze_blocks"] == 1
    assert [type(h).__name__ for h in hp.space if h.name == "unfreeze_blocks"] == ["Fixed"]
    hp = kt.HyperParameters()
    space.suggest("tail", hp, max_unfreeze=1, search_depth=True)
    assert [type(h).__name__ for h in hp.space if h.name == "unfreeze_blocks"] == ["Int"]
    # the defaults' trial unfreezes what the space allows: all of the tail, or the default (2) when searched
    assert space.default_trial("tail", max_unfreeze=3)["unfreeze_blocks"] == 3
    assert space.default_trial("tail", max_unfreeze=3, search_depth=True)["unfreeze_blocks"] == 2
    assert space.default_trial("tail", max_unfreeze=1, search_depth=True)["unfreeze_blocks"] == 1
    rows = {search_depth: {r["name"]: r["values"] for r in space.describe("tail", search_depth=search_depth)}
            for search_depth in (False, True)}
    assert rows[False]["unfreeze_blocks"] == f"fixed at {space.MAX_UNFREEZE}"
    assert rows[True]["unfreeze_blocks"] == f"integer 0–{space.MAX_UNFREEZE}"


def test_the_tail_rate_is_held_at_its_default_unless_searched():
    import keras_tuner as kt

    rate = space.DEFAULT_TAIL["tail_learning_rate"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    held, searched = set(), set()
    for i in range(16):
        trial = study.ask()
        params = space.suggest("tail", trial, search_rate=i % 2 == 0)
        assert trial.params["tail_learning_rate"] == params["tail_learning_rate"]  # recorded, so the final gets it
        (searched if i % 2 == 0 else held).add(params["tail_learning_rate"])
        study.tell(trial, 0.5)
    assert held == {rate} and len(searched) == 8 and all(5e-5 <= r <= 3e-3 for r in searched)
    hp = kt.HyperParameters()
    assert space.suggest("tail", hp, search_rate=False)["tail_learning_rate"] == rate
    assert [type(h).__name__ for h in hp.space if h.name == "tail_learning_rate"] == ["Fixed"]
    assert space.default_trial("tail", search_rate=False)["tail_learning_rate"] == rate
    rows = {r["name"]: r["values"] for r in space.describe("tail", search_rate=False)}
    assert rows["tail_learning_rate"] == f"fixed at {rate:g}"
