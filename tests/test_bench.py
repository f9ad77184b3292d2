"""Each benchmark's own logic, on the tiny cache (random weights, 32 px): what it measures and writes."""

import json

import keras
import pytest

from conftest import TINY_RES
from search import backbones, bench, space
from search.config import GOALS


def test_bench_cache_compares_extraction_with_raw_predict_on_the_same_images(spec, tiny_splits, tmp_path):
    out = bench.bench_cache(spec, tiny_splits, None, TINY_RES, None, 60, tmp_path, compare_allocators=False)
    assert json.loads((tmp_path / "bench_cache.json").read_text()) == json.loads(json.dumps(out))
    assert out["ratio"] == pytest.approx(out["extraction_images_per_second"] / out["raw_predict_images_per_second"])
    assert out["goal_ratio"] == GOALS.extraction_over_raw_predict and out["extraction_folds_batch_norm"]
    reference = out["reference_speed"]  # the in-run reference `final` takes: median and spread of repeats
    assert reference["min"] <= reference["images_per_second"] <= reference["max"] and reference["repeats"] >= 3
    assert reference["batch"] == backbones.REFERENCE_BATCH and reference["method"] == "compiled"  # as `final` times
    by_method = out["reference_speed_by_method"]
    assert sorted(by_method) == sorted(backbones.REFERENCE_METHODS)
    for method, row in by_method.items():
        assert row["method"] == method and row["rounds"] == 3 and len(row["speeds"]) == row["repeats"] == 15
        spread = (max(row["speeds"]) - min(row["speeds"])) / row["images_per_second"]
        assert row["relative_spread"] == pytest.approx(spread)
    assert out["allocator_comparison"] == {} and out["tail_step_speedup_bf16_over_float32"] is None


def test_bench_search_times_phase1_against_plain_keras_and_ranks_rungs(tiny_cache, tiny_splits, spec, tmp_path):
    keras.utils.set_random_seed(0)
    model = spec.build(weights=None, size=TINY_RES)
    searched = bench.bench_search(tiny_cache, tiny_splits, spec, model, 3, 2, 0, 20, tmp_path, weights=None,
                                  full_max_epochs=2, baseline_trials=2)
    phase1 = searched["phase1"]
    assert phase1["trials"] == 3 and phase1["baseline"]["trials"] == 2 and phase1["speedup_median"] > 0
    assert phase1["baseline"]["states"]["RUNNING"] == 0 and phase1["wall_seconds_per_trial"] > 0
    assert phase1["pruner"] == "asha" and phase1["other_pruners"]["hyperband"]["trials"] == 3
    rungs = searched["fidelity"]["rungs"]
    assert [r["epochs"] for r in rungs] == [2, 4, "budget"]
    assert rungs[-1]["kendall_tau"] == searched["fidelity"]["kendall_tau"]
    assert all(len(r["fast_history"]) >= 1 for r in searched["fidelity"]["rows"])
    fidelity = searched["fidelity"]
    assert fidelity["fast_budget"]["batch_size"] == space.head_trial_batch_size() != space.HEAD_BATCH_SIZE
    other = fidelity["other_budgets"][f"batch_{space.HEAD_BATCH_SIZE}"]
    assert other["budget"]["batch_size"] == space.HEAD_BATCH_SIZE == fidelity["full_budget"]["batch_size"]
    assert other["rungs"][-1]["kendall_tau"] == other["kendall_tau"]
    assert all(f"batch_{space.HEAD_BATCH_SIZE}_history" in r for r in fidelity["rows"])
    assert json.loads((tmp_path / "bench_search.json").read_text())["phase1"]["trials"] == 3


def test_bench_memory_releases_graphs_over_its_trials(tiny_cache, tiny_splits, tmp_path):
    memory = bench.bench_memory(tiny_cache, tiny_splits, 11, 0, tmp_path)
    assert memory["released"]["trials"] == 11 and memory["released"]["states"]["RUNNING"] == 0
    assert "growth_pct" in memory["released"] and "baseline_not_released" not in memory
    assert (tmp_path / "bench_memory.json").exists()

