"""Comparisons of final runs: frontier, seeds with binomial intervals, search effect."""

import json
from pathlib import Path

import pytest

from search.compare import compare_runs, reference_method, wilson_interval
from search.config import GOALS
from search.errors import UserError


def _run(seed: int, test: float, val: float, params: dict | None = None, reused: bool = False) -> dict:
    return {"config": {"seed": seed, "backbone": "MobileNet", "mirror": "maps", "tail_epochs": 2, "params": "auto",
                       "output": f"m{seed}.h5", "run_dir": f"results/runs/r{seed}"},
            "params": params or {"head": {}, "tail": {}}, "params_provenance": {"head": {"source": "default"}},
            "cache": {"key": {"id": "k", "cut_layer": "conv_pw_11_relu", "resolution": 224, "weights_fingerprint": "w"},
                      "reused": reused, "extraction": {"seconds": 600.0}, "bytes": 12345},
            "data": {"test": 10000}, "frozen_val_accuracy": 0.8, "val_accuracy": val, "test_accuracy": test,
            "tta_chosen": "maps", "finished": f"T{seed}", "machine": {"code_version": "c0de"},
            "tail_precision_resolved": "mixed_bfloat16",
            "timings_seconds": {"head": 60.0, "total": 1000.0 if not reused else 400.0},
            "epochs": [{"epoch": 1, "seconds": 100.0, "val_accuracy": 0.85},
                       {"epoch": 2, "seconds": 200.0, "val_accuracy": val}]}


def test_wilson_interval_contains_the_proportion_and_narrows_with_n():
    lo, hi = wilson_interval(8800, 10000)
    assert lo < 0.88 < hi and 0.005 < hi - lo < 0.015
    lo2, hi2 = wilson_interval(880, 1000)
    assert hi2 - lo2 > hi - lo


def test_frontier_and_seeds_written(tmp_path):
    paths = {}
    for label, run in (("a", _run(0, 0.891, 0.879)), ("b", _run(1, 0.883, 0.87, reused=True))):
        paths[label] = tmp_path / f"{label}.json"
        paths[label].write_text(json.dumps(run))
    out = compare_runs(paths, tmp_path / "results")
    frontier = json.loads((tmp_path / "results" / "frontier.json").read_text())["runs"]
    assert [p["seconds"] for p in frontier["a"]["points"]] == [660.0, 760.0, 860.0]
    assert frontier["a"]["tail_epochs"] == 2  # the paper names a run of other tail epochs
    assert frontier["b"]["final"]["seconds"] == 1000.0, "a reused cache's extraction is counted"
    assert (tmp_path / "results" / "frontier.png").stat().st_size > 0
    # the fixture records no tail provenance: "?"
    scope = {k: frontier["b"][k] for k in ("cut_layer", "resolution", "weights_fingerprint", "cache_bytes", "seed",
                                           "params", "finished")}
    assert scope == {"cut_layer": "conv_pw_11_relu", "resolution": 224, "weights_fingerprint": "w",
                     "cache_bytes": 12345, "seed": 1, "params": "default/?", "finished": "T1"}
    seeds = out["seeds"]
    assert [r["seed"] for r in seeds["runs"]] == [0, 1]
    assert {(r["code_version"], r["tail_precision"]) for r in seeds["runs"]} == {("c0de", "mixed_bfloat16")}
    assert seeds["mean_test_accuracy"] == pytest.approx(0.887)
    assert seeds["meets_bars"] is True and seeds["bar_each"] == GOALS.test_accuracy_each
    (tmp_path / "c.json").write_text(json.dumps(_run(2, GOALS.test_accuracy_each - 0.001, 0.9)))
    low = compare_runs({**paths, "c": tmp_path / "c.json"}, tmp_path / "results")["seeds"]
    assert low["meets_bars"] is False, "one seed below the bar fails it, whatever the mean"
    # a seed of the recipe on another kind of CPU is not among the seeds (the first run's CPU)
    cpu = {"model": "x", "flags": ["avx2", "avx512f"]}
    for label, seed in (("a", 0), ("b", 1)):
        paths[label].write_text(json.dumps({**_run(seed, 0.891 - seed * 0.008, 0.879, reused=seed == 1),
                                            "machine": {"code_version": "c0de", "cpu": cpu}}))
    avx2 = {**_run(2, 0.5, 0.5), "machine": {"code_version": "c0de", "cpu": {**cpu, "flags": ["avx2"]}}}
    (tmp_path / "d.json").write_text(json.dumps(avx2))
    mixed = compare_runs({**paths, "d": tmp_path / "d.json"}, tmp_path / "results")["seeds"]
    assert [r["seed"] for r in mixed["runs"]] == [0, 1] and mixed["other_cpu"] == ["d"]
    assert mixed["mean_test_accuracy"] == pytest.approx(0.887)
    assert seeds["runs"][0]["test_ci95"][0] < 0.891 < seeds["runs"][0]["test_ci95"][1]


def test_seeds_keep_the_latest_run_of_each_seed_and_complete_params_with_defaults(tmp_path):
    from search import space

    runs = {"new0": _run(0, 0.88, 0.88), "old1": _run(1, 0.87, 0.87), "old0": _run(0, 0.5, 0.5)}
    runs["new0"]["finished"], runs["old0"]["finished"] = "2026-12-06T04:00:00", "2026-11-30T14:00:00"
    # recorded before a setting existed: the run trained with its default, the same recipe
    runs["old1"]["params"] = {"head": {}, "tail": {k: v for k, v in space.DEFAULT_TAIL.items()
                                                   if k != "unfreeze_blocks"}}
    runs["other"] = _run(2, 0.9, 0.9, params={"head": {}, "tail": {"unfreeze_blocks": 1}})
    runs["old1"]["config"]["resolution"] = 224  # given as the default's value: the same recipe
    runs["side"] = _run(3, 0.9, 0.9)  # another side: another recipe
    runs["side"]["config"]["resolution"] = runs["side"]["cache"]["key"]["resolution"] = 176
    paths = {}
    for label, run in runs.items():
        paths[label] = tmp_path / f"{label}.json"
        paths[label].write_text(json.dumps(run))
    seeds = compare_runs(paths, tmp_path / "results")["seeds"]
    assert [r["label"] for r in seeds["runs"]] == ["new0", "old1"], "the latest per seed; not 'other', 'side'"
    assert seeds["superseded"] == ["old0"] and seeds["mean_test_accuracy"] == pytest.approx(0.875)


def test_param_changes_are_against_todays_defaults_and_skip_searched_phases():
    from search import space
    from search.compare import param_changes

    run = _run(0, 0.88, 0.88, params={"head": {"dropout": 0.1},
                                      "tail": {**space.DEFAULT_TAIL, "tail_learning_rate": 5e-4}})
    assert param_changes(run) == {"head": {"dropout": 0.1}, "tail": {"tail_learning_rate": 5e-4}}
    run["params_provenance"] = {"head": {"source": "search"}, "tail": {"source": "default"}}
    assert param_changes(run) == {"tail": {"tail_learning_rate": 5e-4}}
    assert param_changes(_run(0, 0.88, 0.88)) == {}


def test_search_effect_needs_one_seed_and_cache(tmp_path):
    searched = _run(0, 0.885, 0.884, params={"head": {"units": 1}, "tail": {}})
    default = _run(0, 0.88, 0.879)
    for label, run in (("default", default), ("searched", searched), ("other", _run(1, 0.8, 0.8))):
        (tmp_path / f"{label}.json").write_text(json.dumps(run))
    runs = {k: tmp_path / f"{k}.json" for k in ("default", "searched")}
    out = compare_runs({"d0": runs["default"], "s0": runs["searched"]}, tmp_path / "r", default_run="d0",
                       searched_run="s0")
    effect = out["search_pair"]
    assert json.loads((tmp_path / "r" / "search_pair.json").read_text()) == json.loads(json.dumps(effect))
    assert effect["searched_wins_on_validation"] is True
    assert (effect["default"]["label"], effect["searched"]["label"]) == ("d0", "s0")  # roles, not labels, are keys
    assert effect["searched"]["val_accuracy"] > effect["default"]["val_accuracy"]
    assert "seeds" not in out, "different parameters: not seeds of one recipe"
    with pytest.raises(UserError, match="one seed"):
        compare_runs({"default": runs["default"], "other": tmp_path / "other.json"}, tmp_path / "r",
                     default_run="default", searched_run="other")
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(UserError, match="not a final run"):
        compare_runs({"x": tmp_path / "junk.json"}, tmp_path / "r")


def test_the_readme_results_table_is_the_one_results_generates(tmp_path):
    from search.compare import TABLE_END, TABLE_START, results_table, update_readme

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    block = readme.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip()
    assert block == results_table(root / "results"), "README's table is stale: run `make readme`"
    copy = tmp_path / "README.md"
    copy.write_text(f"# x\n{TABLE_START}\nSTALE TABLE\n{TABLE_END}\nrest\n")
    assert update_readme(copy, root / "results") and "STALE TABLE" not in copy.read_text()
    assert copy.read_text().endswith(f"{TABLE_END}\nrest\n") and not update_readme(copy, root / "results")


def test_results_table_labels_seeds_of_another_code_version(tmp_path):
    from search.compare import results_table

    final = {"machine": {"code_version": "aaa"}, "cache": {"reused": True}, "normalized_time": {},
             "data": {"source": "cache/cifar10.npz", "test": 10000}, "config": {"seed": 0},
             "val_accuracy": 0.88, "test_accuracy": 0.877}
    row = {"val_accuracy": 0.88, "test_accuracy": 0.88, "test_images": 10000}
    (tmp_path / "final.json").write_text(json.dumps(final))
    (tmp_path / "seeds.json").write_text(json.dumps({"runs": [{**row, "seed": 0, "code_version": "aaa"},
                                                              {**row, "seed": 1, "code_version": "bbb"}]}))
    seed = {"seed": 0, "default_val": 0.8, "searched_val": 0.8, "test_images": 100, "train_images": 900}
    effect = {"name": "lowdata", "seeds": [seed], "mean_default_test": 0.8, "mean_searched_test": 0.8}
    (tmp_path / "search_effect.json").write_text(json.dumps({"datasets": [{**effect, "code_version": "aaa"},
                                                                          {**effect, "code_version": "ccc"}]}))
    lines = results_table(tmp_path).splitlines()
    assert "another code version" not in lines[-4] + lines[-3] and "mean of seeds 0 |" in lines[-4]
    assert all("mean of seeds 0 (another code version)" in line for line in lines[-2:])
    assert "| default recipe, seed 0 |" in lines[2] and "another code version" not in lines[2]
    assert "seed 1 (another code version)" in lines[3]
    assert "the latest `make final`, seed 0; cache reused" in lines[4]


def test_search_effect_resumes_only_what_the_same_code_recorded(tmp_path, monkeypatch):
    """A dataset recorded by another code version is run again, its old study folders cleared;
    one recorded by this clean commit is kept (a killed run resumes)."""
    from search import effect

    calls = []

    def fake_cli(*args: str, log) -> float:
        calls.append(args)
        out = Path(args[args.index("--results") + 1])
        out.mkdir(parents=True, exist_ok=True)
        searched = "--params" not in args
        assert not (out / "old-study.db").exists(), "a folder of older code is cleared before the search"
        (out / "final.json").write_text(json.dumps({
            "data": {"fingerprint": "f", "test": 100, "train": 400, "val": 100},
            "test_accuracy": 0.81 if searched else 0.8, "val_accuracy": 0.8,
            "params_provenance": {"head": {"source": "study" if searched else "default"},
                                  "tail": {"source": "default", "why": "noise"}}}))
        return 1.0

    monkeypatch.setattr(effect, "_cli", fake_cli)
    monkeypatch.setattr(effect, "make_digits_folder", lambda out: Path(out))
    results = tmp_path / "r"
    (results / "effect" / "digits-seed0").mkdir(parents=True)
    (results / "effect" / "digits-seed0" / "old-study.db").write_text("")
    old = {"name": "digits", "seeds_run": [0], "search_args": [], "code_version": "0ldc0de", "seeds": []}
    untouched = {**old, "name": "lowdata"}  # recorded, not asked for now: stays as it was
    (results / "search_effect.json").write_text(json.dumps({"datasets": [untouched, old], "command": "earlier",
                                                            "recorded": "T-earlier"}))
    monkeypatch.setattr(effect, "code_version", lambda: "abc1234")
    out = effect.run_effect(["digits"], [0], results=results, work=tmp_path / "w")
    assert len(calls) == 3 and out["datasets"][0]["code_version"] == "abc1234"
    assert out["datasets"][0]["command"] == out["command"] != "earlier"  # this run's row: this command
    # recorded, not asked for now: as it was, naming the command and time of the run that wrote it
    kept = {**untouched, "command": "earlier", "recorded": "T-earlier"}
    assert out["datasets"][1] == kept and len(out["datasets"]) == 2
    assert json.loads((results / "search_effect.json").read_text())["datasets"][1] == kept
    finals = [c for c in calls if c[0] == "final"]  # one precision for both: only the parameters differ
    assert [c[c.index("--tail-precision") + 1] for c in finals] == [effect.FINAL_PRECISION] * 2
    row = out["datasets"][0]["seeds"][0]
    assert (row["searched_test"], row["default_test"]) == (0.81, 0.8) and out["datasets"][0]["mean_difference"] > 0
    effect.run_effect(["digits"], [0], results=results, work=tmp_path / "w")
    assert len(calls) == 3, "the same clean commit's dataset is kept"
    monkeypatch.setattr(effect, "code_version", lambda: "abc1234-dirty")
    effect.run_effect(["digits"], [0], results=results, work=tmp_path / "w")
    assert len(calls) == 6, "a dirty tree's results are never resumed"


def test_search_effect_copies_the_searched_final_when_the_rule_shipped_the_defaults(tmp_path, monkeypatch):
    """Both phases shipped the defaults: the searched final is the default final's very run, so
    it is not trained twice; the row says the default's result is that run's."""
    from search import effect

    calls = []

    def fake_cli(*args: str, log) -> float:
        calls.append(args)
        out = Path(args[args.index("--results") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "final.json").write_text(json.dumps({
            "data": {"fingerprint": "f", "test": 100, "train": 400, "val": 100}, "test_accuracy": 0.8,
            "val_accuracy": 0.8, "params_provenance": {ph: {"source": "default"} for ph in ("head", "tail")}}))
        return 1.0

    monkeypatch.setattr(effect, "_cli", fake_cli)
    monkeypatch.setattr(effect, "make_digits_folder", lambda out: Path(out))
    monkeypatch.setattr(effect, "code_version", lambda: "abc1234")
    out = effect.run_effect(["digits"], [0], results=tmp_path / "r", work=tmp_path / "w")
    assert [c[0] for c in calls] == ["search", "final"] and "--params" not in calls[1]
    row = out["datasets"][0]["seeds"][0]
    assert row["default_final"] == effect.REUSED and row["default_test"] == row["searched_test"]
    copied = json.loads((tmp_path / "r" / "effect" / "digits-seed0-default" / "final.json").read_text())
    assert copied["copied_from"].endswith("digits-seed0/final.json")


def test_frontier_normalizes_stage_by_stage_and_borrows_a_reused_caches_extraction(tmp_path):
    def with_factors(run: dict, training: float, inference: float, minutes: float) -> dict:
        run["normalized_time"] = {"by_stage": {"training_factor": training, "inference_factor": inference,
                                               "normalized_minutes": minutes}}
        return run

    def with_reference(run: dict, wall: float, factor: float) -> dict:
        run["normalized_time"].update(wall_minutes=wall, normalized_minutes=wall * factor)
        return run

    cold = with_reference(with_factors(_run(0, 0.88, 0.88), 0.5, 2.0, 30.0), 12.0, 2.5)
    reused = with_reference(with_factors(_run(0, 0.89, 0.89, reused=True), 2.0, 1.0, 10.0), 2.0, 3.0)
    other = with_factors(_run(0, 0.87, 0.87, reused=True), 1.0, 1.0, 7.0)
    other["cache"]["key"] = {**other["cache"]["key"], "cut_layer": "conv_pw_12_relu"}
    reused["normalized_time"]["reference"] = {"images_per_second": 200.0, "start": {"method": "compiled"}}
    other["normalized_time"]["reference"] = {"images_per_second": 100.0}  # recorded before the method was
    paths = {}
    for label, run in (("cold", cold), ("reused", reused), ("other", other)):
        paths[label] = tmp_path / f"{label}.json"
        paths[label].write_text(json.dumps(run))
    frontier = compare_runs(paths, tmp_path / "results")["frontier"]
    # cold: 600 s of extraction x 2 = 20 min, then head 60 s and epochs at 100 and 200 s, x 0.5
    assert frontier["cold"]["normalized"]["points"] == pytest.approx([20.5, 21.333333, 22.166667])
    assert frontier["cold"]["normalized"]["final_minutes"] == 30.0
    assert [frontier[k]["normalized"]["reference_method"] for k in ("cold", "reused")] == [None, "compiled"]
    assert reference_method(other) == "predict"
    # reused: the cold run's 20 normalized minutes of extraction, then its own stages x 2
    assert frontier["reused"]["normalized"]["extraction_from"] == "cold"
    assert frontier["reused"]["normalized"]["points"] == pytest.approx([22.0, 25.333333, 28.666667])
    assert frontier["reused"]["normalized"]["final_minutes"] == pytest.approx(30.0)
    assert frontier["other"]["normalized"] is None, "no run of the comparison built its cache"
    # the bar's measure: the cold run's whole wall time x its factor; the reused run's own, plus the
    # cold run's 10 minutes of extraction at the cold run's factor
    assert frontier["cold"]["normalized"]["reference"]["final_minutes"] == pytest.approx(30.0)
    assert frontier["cold"]["normalized"]["reference"]["extraction_minutes"] == pytest.approx(25.0)
    assert frontier["reused"]["normalized"]["reference"]["final_minutes"] == pytest.approx(6.0 + 25.0)
    written = json.loads((tmp_path / "results" / "frontier.json").read_text())["runs"]
    assert written["reused"]["normalized"]["extraction_from"] == "cold"
    # two runs built the cache: the later one's extraction is taken, whatever the order given
    later = with_factors(_run(0, 0.88, 0.88), 0.5, 3.0, 40.0)
    later["finished"] = "T0-later"
    (tmp_path / "later.json").write_text(json.dumps(later))
    for order in (("later", "cold", "reused"), ("cold", "later", "reused")):
        given = {label: tmp_path / "later.json" if label == "later" else paths[label] for label in order}
        frontier = compare_runs(given, tmp_path / "results")["frontier"]
        assert frontier["reused"]["normalized"]["extraction_from"] == "later"
        assert frontier["reused"]["normalized"]["points"][0] == pytest.approx(30.0 + 2.0)  # 600 s x 3, then head x 2
    # with CPUs recorded, the latest builder on the reused run's CPU is taken, not a later one on another CPU
    for run, flags in ((cold, ["avx2", "avx512f"]), (reused, ["avx2", "avx512f"]), (later, ["avx2"])):
        run["machine"] = {**run["machine"], "cpu": {"model": "x", "flags": flags}}
    for label, run in (("cold", cold), ("reused", reused), ("later", later)):
        (tmp_path / f"{label}.json").write_text(json.dumps(run))
    frontier = compare_runs({k: tmp_path / f"{k}.json" for k in ("later", "cold", "reused")},
                            tmp_path / "results")["frontier"]
    assert frontier["later"]["cpu_flags"] == ["avx2"] and frontier["cold"]["cpu_flags"] == ["avx2", "avx512f"]
    assert frontier["reused"]["normalized"]["extraction_from"] == "cold"


def test_code_version_is_dirty_for_changed_code_but_not_for_changed_results(tmp_path):
    import subprocess

    from search.io import code_version

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "results").mkdir()
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "results" / "final.json").write_text("{}\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "one")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert code_version(tmp_path) == head
    (tmp_path / "results" / "final.json").write_text('{"test_accuracy": 0.9}\n')  # a run's output
    (tmp_path / "new.txt").write_text("untracked\n")
    assert code_version(tmp_path) == head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert code_version(tmp_path) == f"{head}-dirty"
    assert code_version(tmp_path.parent / "not-a-checkout-here") is None
