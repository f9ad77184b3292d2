"""Final model on a tiny random-weight backbone: stitched vs cached parity, .h5 round trip,
second run reuses the cache, atomic save."""

import dataclasses
import json

import keras
import numpy as np
import pytest

from conftest import TINY_RES
from search import backbones, finetune
from search.final import FinalConfig, build_final
from search.io import write_json

PLANTED_SPEED = 1e9


@pytest.fixture(scope="module")
def final_run(tmp_path_factory, tiny_splits):
    tmp = tmp_path_factory.mktemp("final")
    # a bench from another run: the run must not normalize by it
    write_json(tmp / "results" / "bench_cache.json", {"raw_predict_images_per_second": PLANTED_SPEED})
    config = FinalConfig(weights=None, resolution=TINY_RES, cache_root=str(tmp / "cache"),
                         results=str(tmp / "results"), output=str(tmp / "cifar10.h5"), head_epochs=3,
                         tail_epochs=1, tail_batch_size=32, bn_passes=1, parity_images=40, progress=False,
                         tail_precision="float32")
    summary = build_final(config, tiny_splits)
    return config, summary, tmp


def test_stitched_matches_cached_path(final_run):
    _, summary, _ = final_run
    parity = summary["parity"]
    assert parity["images"] == 40
    assert abs(parity["stitched_accuracy"] - parity["cached_accuracy"]) <= 0.005
    assert parity["prediction_agreement"] >= 0.975
    assert parity["max_abs_prob_diff"] < 0.05


def test_summary_and_ablation_written(final_run):
    config, summary, tmp = final_run
    on_disk = json.loads((tmp / "results" / "final.json").read_text())
    assert on_disk["test_accuracy"] == summary["test_accuracy"]
    chosen = [r for r in summary["stages"] if r["stage"].startswith("final") and r["chosen"]]
    assert len(chosen) == 1 and summary["val_accuracy"] == chosen[0]["val_accuracy"]  # the shipped model's
    confusion = np.array(summary["test_confusion_matrix"])
    assert confusion.shape == (10, 10) and confusion.sum() == 40
    assert abs(np.trace(confusion) / 40 - summary["test_accuracy"]) < 1e-9
    # each mirror was also tried over the tail's training shifts (shift 1: 9 offsets); the best on
    # validation ships (of equal scores the cheaper: the candidates' order), if it beats no averaging
    assert summary["params"]["tail"]["shift"] == 1
    scores = summary["val_accuracy_tta_candidates"]
    assert list(scores) == ["maps", "images", "maps+shifts", "images+shifts"]
    best = max(scores, key=scores.get)
    assert summary["tta_chosen"] == (best if scores[best] > summary["val_accuracy_plain"] else "none")
    assert summary["tta_views"] == {"none": 1, "maps": 2, "images": 2}.get(summary["tta_chosen"], 18)
    # the model without test-time mirroring is scored too (the averaging was chosen on validation)
    if summary["tta_chosen"] == "none":
        assert summary["test_accuracy_plain"] == summary["test_accuracy"]
    else:
        assert 0 < summary["test_accuracy_plain"] and summary["test_accuracy_plain"] * 40 == round(
            summary["test_accuracy_plain"] * 40)
    assert set(summary["timings_seconds"]) >= {"cache", "head", "tail", "bn_reestimate", "test", "stitch_and_save"}
    assert summary["params_provenance"]["head"]["source"] == "default"  # no search in this results folder
    assert summary["head_optimizer"] == "FusedAdamW"  # the default head's AdamW, fused (heads.build_optimizer)
    assert summary["params"]["tail"] == {**summary["params"]["tail"], "bn_mode": "batch"}
    assert len(summary["epochs"]) == config.tail_epochs
    rows = json.loads((tmp / "results" / "ablation.json").read_text())
    stages = [r["stage"] for r in rows]
    assert all(r["params"] == "default/default" for r in rows)  # each row says which parameters made it
    assert stages[0] == "frozen features + head" and "tail fine-tuned" in stages
    tail = next(r for r in rows if r["stage"] == "tail fine-tuned")
    head = next(r for r in rows if r["stage"] == "frozen features + head")
    decision = summary["tail_decision"]
    # the fine-tuned tail ships only if it beats the frozen-feature head on validation
    assert decision["shipped"] == ("tail" if tail["val_accuracy"] > head["val_accuracy"] else "head")
    bn = [r for r in rows if r["stage"] == "tail fine-tuned + BN re-estimated"]
    # BN statistics are re-estimated for a shipped tail only, and kept only if validation does not drop
    assert len(bn) == (decision["shipped"] == "tail")
    assert all(r["chosen"] == (r["val_accuracy"] >= tail["val_accuracy"]) for r in bn)


def test_h5_round_trip_safe_mode(final_run, tiny_splits):
    config, summary, _ = final_run
    model = keras.models.load_model(config.output)  # default safe_mode=True
    assert isinstance(model.layers[1], keras.layers.Lambda)
    assert model.layers[1].name == "upsample"
    assert model.layers[0].output.shape[1:] == (32, 32, 3)
    assert model.optimizer is not None and model.compiled
    x = tiny_splits.x_test[:8].astype(np.float32)
    probs = model.predict(x, verbose=0)
    assert probs.shape == (8, 10)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
    with open(config.output, "rb") as f:
        blob = f.read()
    assert b"__lambda__" not in blob and b"marshal" not in blob, "no serialized bytecode"
    backbone = next(la for la in model.layers if isinstance(la, keras.Model) and la.name != "head")
    frozen = backbones.frozen_layers(backbone, backbones.get_backbone("MobileNet").cut_layer())
    weighted = [la for la in frozen if la.weights]
    assert weighted and not any(la.trainable for la in weighted), [la.name for la in weighted if la.trainable]


def test_second_run_reuses_cache_records_its_code_and_probes_the_tail_it_trains(final_run, tiny_splits,
                                                                               monkeypatch):
    config, _, tmp = final_run
    # precision chosen by the probe, for a tail of one unfrozen block (of two): the probe must time that tail
    config = dataclasses.replace(config, output=str(tmp / "again.h5"), tail_precision="auto",
                                 params={"tail": {"unfreeze_blocks": 1}})
    versions = iter(["abc1234", "def5678"])  # a commit checked out while the run trains must not be recorded
    monkeypatch.setattr("search.final.code_version", lambda: next(versions))
    probe = finetune.measure_precision  # one timed round instead of six: a bfloat16 step is slow on some CPUs
    monkeypatch.setattr(finetune, "measure_precision", lambda *a, **k: probe(*a, **{**k, "steps": 1}))
    again = build_final(config, tiny_splits)
    assert again["cache"]["reused"] is True
    assert again["machine"]["code_version"] == "abc1234"
    probe = again["precision_probe"]
    assert again["params"]["tail"]["unfreeze_blocks"] == probe["unfreeze_blocks"] == 1
    spec = backbones.get_backbone(config.backbone)
    cut = spec.cut_layer(config.cut)
    tail = backbones.split_at_cut(spec.build(weights=None, size=TINY_RES), cut)
    block1 = {id(la) for la in backbones.frozen_layers(tail, spec.cuts["last1"])}  # stays frozen
    assert probe["tail_trainable_variables"] == sum(
        len(la.weights) - 2 * isinstance(la, keras.layers.BatchNormalization)  # BN's moving statistics
        for la in tail.layers if la.weights and id(la) not in block1) > 0


@pytest.fixture(scope="module")
def lively(tmp_path_factory, tiny_splits, spec):
    """A random backbone whose cut maps are not ~0 (frozen BN variances shrunk), and its cache."""
    from search.cache import ensure_cache

    keras.utils.set_random_seed(1)
    backbone = spec.build(weights=None, size=TINY_RES)
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_variance.assign(np.full(layer.moving_variance.shape, 0.01, np.float32))
    cache = ensure_cache(spec, tiny_splits, resolution=TINY_RES, weights=None, root=tmp_path_factory.mktemp("lively"),
                         flip=True, progress=False, model=backbone)
    return backbone, cache, spec.cut_layer()


@pytest.mark.parametrize("tta", ["none", "images", "maps", "images+shifts"])
def test_stitched_model_scores_as_the_cache_did(lively, tiny_splits, spec, tta, tmp_path):
    from search import train
    from search.final import cached_probs, save_model, stitch

    backbone, cache, cut = lively
    assert np.asarray(cache.array("test", "cut", "orig"), np.float32).std() > 0.01, "maps must not be ~0"
    parts = finetune.TailParts.from_backbone(backbone, cut)
    head = train.build_head_model({}, parts.tail.output.shape[-1], 10)
    trainer = finetune.build_tail_trainer(parts, head, head.get_weights(), {}, 1, 1)
    rows = np.arange(len(tiny_splits.y_test))
    cached = cached_probs(trainer, cache, "test", rows, tta, shift=1)
    model = stitch(spec, backbone, head, cut, TINY_RES, tta, shift=1)
    stitched = model.predict(tiny_splits.x_test.astype(np.float32), verbose=0)
    np.testing.assert_allclose(stitched, cached, atol=2e-3)
    shifted = [la.name for la in model.layers if la.name.startswith("shift_")]
    assert len(shifted) == (16 if tta == "images+shifts" else 0), "8 moved views of the image and of its mirror"
    if tta != "none":
        plain = cached_probs(trainer, cache, "test", rows, "none")
        assert np.abs(plain - cached).max() > 1e-3, "averaging with the mirror changes the prediction"
    if tta.endswith("+shifts"):
        unshifted = cached_probs(trainer, cache, "test", rows, tta.removesuffix("+shifts"))
        assert np.abs(unshifted - cached).max() > 1e-3, "the shifted views change the prediction"
        loaded = keras.models.load_model(save_model(model, tmp_path / "m.h5"))  # default safe_mode
        np.testing.assert_allclose(loaded.predict(tiny_splits.x_test.astype(np.float32), verbose=0), stitched,
                                   atol=1e-5)


def test_offset_probs_reads_once_and_equals_one_predict_per_offset(lively, tiny_splits):
    """All offsets from one read of each batch: the same probabilities as a ``predict`` of each
    shifted copy, in row order, whatever the chunk and batch sizes."""
    from search import batches, train
    from search.final import _predict, offset_probs

    backbone, cache, cut = lively
    parts = finetune.TailParts.from_backbone(backbone, cut)
    head = train.build_head_model({}, parts.tail.output.shape[-1], 10)
    trainer = finetune.build_tail_trainer(parts, head, head.get_weights(), {}, 1, 1)
    maps = np.asarray(cache.array("test", "cut", "orig"))
    offsets = batches.offsets(1)
    got = offset_probs(trainer, (maps[:13], maps[13:]), offsets, batch_size=8)
    assert list(got) == list(offsets)
    for offset in offsets:
        np.testing.assert_allclose(got[offset], _predict(trainer, batches.shift_by(maps, *offset)), atol=1e-6)
    assert np.abs(got[(1, 1)] - got[(0, 0)]).max() > 1e-3, "a shift changes the prediction"


def test_mirrored_images_computed_at_test_time_score_as_the_stitched_model(lively, tiny_splits, spec):
    """A cache without mirrored images: ``Run.probs(tta="images")`` runs the frozen part on the
    mirrored images (BN folded, float16 like the cache) and averages; the saved model with
    ``tta="images"`` computes the same."""
    from search import train
    from search.cache import build_extractor, ensure_cache
    from search.final import FinalConfig, Run, stitch, tta_views

    backbone, _, cut = lively
    cache = ensure_cache(spec, tiny_splits, resolution=TINY_RES, weights=None, flip=False, progress=False,
                         model=backbone, root=lively_root(lively))
    assert not cache.key["flip"]
    parts = finetune.TailParts.from_backbone(backbone, cut)
    head = train.build_head_model({}, parts.tail.output.shape[-1], 10)
    trainer = finetune.build_tail_trainer(parts, head, head.get_weights(), {}, 1, 1)
    run = Run(FinalConfig(mirror="maps"), spec, tiny_splits, backbone, cut, TINY_RES, cache=cache,
              extractor=build_extractor(backbone, spec, cut, TINY_RES), params={"tail": {"shift": 1}})
    rows = np.arange(len(tiny_splits.y_test))
    pixels = tiny_splits.x_test.astype(np.float32)
    for tta in ("images", "images+shifts"):
        mirrored = run.probs(trainer, "test", rows, tta)
        stitched = stitch(spec, backbone, head, cut, TINY_RES, tta, shift=run.shift).predict(pixels, verbose=0)
        np.testing.assert_allclose(mirrored, stitched, atol=2e-3)
    plain = run.probs(trainer, "test", rows, "none")
    assert np.abs(mirrored - plain).max() > 1e-3
    # one frozen pass gives the mirrored image's views at every offset, each its own prediction
    views = tta_views("images+shifts", 1)
    by_view = run.view_probs(trainer, "test", rows, views)
    assert set(by_view) == set(views) and len(views) == 18
    assert np.abs(by_view["flip", (0, 1)] - by_view["flip", (0, 0)]).max() > 1e-3


def lively_root(lively):
    return lively[1].path.parent


def test_normalized_time_scales_wall_time_by_the_speed_measured_in_the_run(final_run):
    from search.final import normalized_time

    out = normalized_time(600.0, {"images_per_second": 90.0, "min": 80.0, "max": 100.0})
    assert out["wall_minutes"] == 10.0 and out["normalized_minutes"] == 15.0
    assert out["normalized_minutes_range"] == pytest.approx([80 / 6, 100 / 6])
    # the run measured its own reference, and ignored the bench file planted in its results folder
    _, summary, _ = final_run
    norm = summary["normalized_time"]
    speed = norm["reference"]["images_per_second"]
    assert norm["reference"]["min"] <= speed <= norm["reference"]["max"]
    both = norm["reference"]["start"]["speeds"] + norm["reference"]["end"]["speeds"]  # measured at start and end
    assert len(both) == 2 * norm["reference"]["start"]["repeats"] >= 6 and speed == pytest.approx(np.median(both))
    assert norm["normalized_minutes"] == pytest.approx(summary["timings_seconds"]["total"] / 60 * speed / 60)
    assert speed < PLANTED_SPEED
    # at the backbone's native side though the run is at TINY_RES, so runs at any side compare
    native = backbones.get_backbone(summary["config"]["backbone"]).native_size
    assert norm["reference"]["start"]["resolution"] == norm["reference"]["end"]["resolution"] == native != TINY_RES
    assert norm["reference"]["start"]["method"] == norm["reference"]["end"]["method"] == "compiled"


def test_reference_speed_times_each_method_and_refuses_others(spec):
    from search.backbones import reference_speed

    model = spec.build(weights=None, size=TINY_RES)
    cut = spec.cut_layer()
    for method in ("compiled", "predict"):
        out = reference_speed(model, cut, TINY_RES, batch=4, repeats=3, warmups=1, method=method)
        assert out["method"] == method and len(out["speeds"]) == 3 and out["batch"] == 4
        assert out["min"] <= out["images_per_second"] <= out["max"] and out["min"] > 0
    with pytest.raises(ValueError, match="method"):
        reference_speed(model, cut, TINY_RES, method="wall clock")


def test_at_resolution_rebuilds_the_backbone_at_another_side_with_the_same_weights(spec):
    from search.backbones import at_resolution

    keras.utils.set_random_seed(0)
    model = spec.build(weights=None, size=TINY_RES)
    assert at_resolution(spec, model, TINY_RES) is model
    bigger = at_resolution(spec, model, 2 * TINY_RES)
    assert bigger.input_shape[1:3] == (2 * TINY_RES, 2 * TINY_RES)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), bigger.get_weights(), strict=True))


def test_normalized_by_stage_scales_training_by_the_runs_step_and_the_rest_by_its_inference_speed(final_run):
    from search.final import REFERENCE_TAIL_STEP_SECONDS, normalized_by_stage

    timings = {"cache": 300.0, "head": 60.0, "tail": 540.0, "test": 300.0, "total": 1200.0}
    out = normalized_by_stage(timings, 120.0, REFERENCE_TAIL_STEP_SECONDS * 3)  # training 3x slower than the reference
    assert out["training_seconds"] == 600.0 and out["other_seconds"] == 600.0
    assert out["normalized_minutes"] == pytest.approx((600 / 3 + 600 * 2) / 60)
    # a machine twice as fast in training and alike in inference: only the training share doubles
    faster = normalized_by_stage(timings, 120.0, REFERENCE_TAIL_STEP_SECONDS * 1.5)
    assert faster["normalized_minutes"] - out["normalized_minutes"] == pytest.approx(600 / 3 / 60)
    assert normalized_by_stage(timings, 120.0, None) is None
    _, summary, _ = final_run  # precision forced to float32: no probe, so no step to normalize by
    assert summary["normalized_time"]["by_stage"] is None


def test_ablation_label_names_what_given_parameters_change(tmp_path):
    from search import space
    from search.engines import resolve_params

    params, provenance = resolve_params({"tail": {"warmup_fraction": 0.0}}, tmp_path, "any")
    assert params["tail"]["warmup_fraction"] == 0.0 and params["head"] == space.with_defaults("head", {})
    assert space.params_label(provenance) == "default/default, warmup_fraction=0.0"
    assert space.params_label({"head": {"source": "search", "trial": 3}}) == "search/?"


def test_cpu_description_reads_the_first_processors_model_and_recorded_flags():
    from search.final import cpu_description

    text = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu avx2 avx512f amx_tile "
            "amx_bf16\n\nprocessor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n")
    assert cpu_description(text) == {"model": "Intel(R) Xeon(R) Processor",
                                     "flags": ["avx2", "avx512f", "amx_bf16", "amx_tile"]}
    assert cpu_description("processor\t: 0\nflags\t\t: fpu\n") == {"model": None, "flags": []}
