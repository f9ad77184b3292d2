"""make paper: every section, the picture on top, no placeholder left, missing numbers fail."""

import json
import re
import shutil

import numpy as np
import pytest

from conftest import ROOT, synthetic_arrays
from search.errors import UserError
from search.paper import _defaults_trial_sentence, render, write_paper

SECTIONS = ["Abstract", "Introduction", "Materials and Methods", "Results", "Discussion", "Acknowledgments",
            "Literature Cited", "Appendices"]


@pytest.fixture
def tiny_results(tmp_path):
    """The paper's inputs as small JSON files: a copy of the committed ``results/*.json`` (what
    ``make paper`` renders), the committed study figures, and CIFAR-shaped test images for the
    picture on top (its indices reach the last of the 10,000)."""
    results, docs = tmp_path / "results", tmp_path / "docs"
    results.mkdir()
    for path in (ROOT / "results").glob("*.json"):
        shutil.copy(path, results / path.name)
    shutil.copytree(ROOT / "docs" / "figures", docs / "figures")
    shutil.copy(ROOT / "docs" / "paper_template.md", docs / "paper_template.md")
    xtr, ytr, _, _ = synthetic_arrays(n_train=40)
    xte, yte = np.resize(xtr, (10000, 32, 32, 3)), np.resize(ytr, (10000, 1))
    npz = tmp_path / "images.npz"
    np.savez(npz, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    return results, docs, npz


def test_paper_sections_picture_and_no_placeholders(tiny_results):
    results, docs, npz = tiny_results
    path = write_paper(results, docs, str(npz))
    text = path.read_text()
    first = text.lstrip().splitlines()[0]
    assert first.startswith("![") and "figures/predictions.png" in first
    headings = re.findall(r"^## (.+)$", text, re.M)
    assert headings == SECTIONS
    assert "{{" not in text and "}}" not in text
    assert "`results/bench_memory.json`" in text  # the memory goal is reported from its file
    assert "results/v1" not in text and "rerun" not in text.lower()  # the repo's history is not the paper's
    final = json.loads((results / "final.json").read_text())
    assert f"{100 * final['test_accuracy']:.2f} %" in text
    page = (docs / "paper.html").read_text()
    assert page.count("data:image/png;base64,") >= 6 and 'src="figures/' not in page
    assert re.search(r"<body><p><img", page), "the top element of the HTML is the picture"


def test_missing_number_fails(tiny_results):
    with pytest.raises(UserError, match="missing from results"):
        render("accuracy {{ final.test_accuracy | pct }}", {})
    results, docs, npz = tiny_results
    (results / "seeds.json").rename(results / "seeds.json.bak")
    try:
        with pytest.raises(UserError, match="seeds"):
            write_paper(results, docs, str(npz))
    finally:
        (results / "seeds.json.bak").rename(results / "seeds.json")


ALLOWED = [  # names and numbering that contain digits, not numbers
    r"CIFAR-10", r"cifar10", r"\.h5\b", r"MobileNetV2", r"\bv[12]\b", r"v1/v2", r"sha256", r"0-transfer",
    r"[Pp]hase[- ][12]",
    r"(?:Figure|Table|Listing)s? \d+(?: and \d+)?", r"(?:et al\.|[A-Z][a-z]+),\s*(?:19|20)\d{2}",
]


def test_template_types_no_numbers():
    """Outside the reference list, every digit of the template belongs to a name or a numbering."""
    text = (ROOT / "docs" / "paper_template.md").read_text()
    body = text.split("## Literature Cited")[0] + text.split("## Appendices")[1]
    body = re.sub(r"\{\{.*?\}\}", "", body, flags=re.S)
    for pattern in ALLOWED:
        body = re.sub(pattern, "", body)
    assert not re.findall(r".{0,30}\d.{0,30}", body), "digits typed in the template"


def test_captions_numbered_and_referenced_and_abstract_matches(tiny_results):
    results, docs, npz = tiny_results
    text = write_paper(results, docs, str(npz)).read_text()
    for kind in ("Figure", "Table", "Listing"):
        captions = re.findall(rf"^\*{kind} (\d+)\.", text, re.M)
        assert captions == [str(i) for i in range(1, len(captions) + 1)], f"{kind}s numbered in order"
        body = re.sub(rf"^\*{kind} \d+\..*$|!\[{kind} \d+\]", "", text, flags=re.M)
        for n in captions:
            assert re.search(rf"{kind}s? (?:\d+ and )?{n}\b", body), f"{kind} {n} is never referenced"
    abstract = text.split("## Abstract")[1].split("## Introduction")[0]
    final = json.loads((results / "final.json").read_text())
    evaluate = json.loads((results / "evaluate.json").read_text())
    seeds = json.loads((results / "seeds.json").read_text())
    for value in (final["frozen_val_accuracy"], final["val_accuracy_plain"], evaluate["accuracy"],
                  seeds["mean_test_accuracy"]):
        assert f"{100 * value:.2f} %" in abstract


def test_defaults_trial_reported_against_the_best():
    study = {"best_value": 0.8, "finished": [{"number": 3, "state": "COMPLETE", "epochs": 2, "value": 0.75},
                                             {"number": 8, "state": "PRUNED", "epochs": 1, "value": 0.7,
                                              "defaults": True}]}
    text = _defaults_trial_sentence(study)
    assert "trial 8 (pruned after 1 epoch(s)), scored 70.00 %" in text and "best trial's 80.00 %" in text
    assert "not run as a trial" in _defaults_trial_sentence({"finished": study["finished"][:1]})


def test_bench_cache_timing_is_said_relative_to_the_final_run():
    from search.paper import bench_cache_when

    final = {"finished": "2026-11-30T14:40:00", "timings_seconds": {"total": 1800.0}}  # started 14:10
    assert bench_cache_when("2026-11-30T14:05:00", final) == "just before the run"
    assert bench_cache_when("2026-11-30T05:40:00", final) == "8.5 h before the run started"
    assert bench_cache_when("2026-11-30T15:10:00", final).startswith("1.0 h after")
    assert bench_cache_when(None, final) == "at a time not recorded"
    from search.paper import _indicative

    assert _indicative({"bench_cache_recorded": "2026-11-30T14:05:00"}, final) == ""
    late = {"bench_cache_recorded": "2026-11-30T05:40:00"}
    assert _indicative(late, final).startswith(", so the normalization is indicative")
    assert _indicative(late, final, "; ").startswith("; the normalization")  # after "goal ...: not met"


def test_variant_sentence_compares_a_params_variant_with_the_default_run_of_its_seed():
    from search.paper import _variant_sentence

    def row(params, seed, val, stage="final, plain", chosen=True, cut="c11"):
        return {"params": params, "seed": seed, "val_accuracy": val, "stage": stage, "chosen": chosen, "cut": cut,
                "resolution": 224}

    rows = [row("default/default", 0, 0.80), row("default/default", 0, 0.88),
            row("default/default, warmup_fraction=0.0", 0, 0.87, stage="tail fine-tuned", chosen=None),
            row("default/default, warmup_fraction=0.0", 0, 0.86),
            row("default/default, warmup_fraction=0.0", 1, 0.85),  # no default run of seed 1: no comparison
            row("default/default", 0, 0.70, cut="c12")]  # the latest default run, but of another cut
    text = _variant_sentence(rows)
    assert "warmup_fraction=0.0 (seed 0)" in text and "86.00 %" in text and "88.00 %" in text
    assert "seed 1" not in text and "80.00 %" not in text and "70.00 %" not in text
    assert _variant_sentence([row("default/default", 0, 0.88)]) == ""


def test_a_frozen_statistics_run_answers_the_bn_question_with_its_measurement():
    from search.paper import _search_texts

    def row(params, val):
        return {"params": params, "seed": 0, "val_accuracy": val, "stage": "final, plain", "chosen": True,
                "cut": "c11", "resolution": 224}

    assert "did not measure" in _search_texts({"ablation": [row("default/default", 0.88)]})["bn_sentence"]
    text = _search_texts({"ablation": [row("default/default", 0.88), row("default/default, bn_mode=frozen", 0.84)]})
    assert "frozen (`bn_mode` frozen, seed 0" in text["bn_sentence"]
    assert "reached 84.00 % validation accuracy against 88.00 % with batch statistics" in text["bn_sentence"]


def test_versions_sentence_flags_runs_not_known_to_share_code():
    from search.final import code_version
    from search.paper import _versions_sentence

    assert _versions_sentence("abc1234", "abc1234") == ""
    assert "not recorded" in _versions_sentence("abc1234", None)
    assert "indicative" in _versions_sentence("abc1234", "def5678")
    assert "indicative" in _versions_sentence("abc1234-dirty", "abc1234-dirty")
    assert code_version() is None or len(code_version()) >= 7  # a commit here, None outside git


def test_search_sentences_say_when_the_defaults_won_trials_were_judged_late_and_the_margin_is_noise():
    from search.paper import _defaults_trial_sentence, _margin, _pruned_at_last_epoch_sentence, _same_tail_sentence

    finished = [{"number": 0, "defaults": True, "state": "COMPLETE", "epochs": 2, "value": 0.80},
                {"number": 1, "defaults": False, "state": "PRUNED", "epochs": 2, "value": 0.79},
                {"number": 2, "defaults": False, "state": "PRUNED", "epochs": 1, "value": 0.70}]
    study = {"finished": finished, "best_number": 0, "best_value": 0.80,
             "best_user_attrs": {"budget": {"max_epochs": 2}}}
    assert "documented defaults themselves (trial 0" in _defaults_trial_sentence(study)
    late = _pruned_at_last_epoch_sentence(study)
    assert late.startswith(" 1 of its pruned trials had trained all 2 epochs") and "unchanged" in late
    finished[1]["value"] = 0.81  # a trial judged late beat the best completed one
    assert "would choose differently" in _pruned_at_last_epoch_sentence(study)
    study["best_number"] = 1
    assert "run as trial 0" in _defaults_trial_sentence(study)
    assert _pruned_at_last_epoch_sentence({**study, "finished": finished[:1]}) == ""
    ctx = {"final": {"data": {"val": 5000}}}
    assert "by 1 of the 5,000 validation images" in _margin({"val_difference": -0.0002}, ctx)
    assert _margin({"val_difference": -0.0072}, ctx) == ""  # 36 images: not called noise
    head_a, head_b, tail = {"units_0": 1}, {"units_0": 2}, {"shift": 1}
    default = {"params": {"head": head_a, "tail": tail}}
    assert "searched head alone" in _same_tail_sentence(default, {"params": {"head": head_b, "tail": tail}})
    assert _same_tail_sentence(default, {"params": {"head": head_b, "tail": {}}}) == ""


def test_cut_and_resolution_are_reported_only_when_the_ablation_varies_them():
    from search.paper import _scope_sentence, _scopes

    rows = [{"cut": "c11", "resolution": 224}] * 3 + [{"cut": "c12", "resolution": 224}]
    assert _scopes(rows[:3]) == [("c11", 224)]
    assert "makes no claim" in _scope_sentence(_scopes(rows[:3]), {})
    assert _scopes(rows) == [("c11", 224), ("c12", 224)], "the most frequent scope first"

    def run(cut: str, val: float, seed: int = 0, params: str = "default/default", finished: str = "T2") -> dict:
        return {"cut_layer": cut, "resolution": 224, "seed": seed, "params": params, "cache_bytes": 6e9,
                "finished": finished, "weights_fingerprint": "w1",
                "extraction_seconds": 300.0, "final": {"val_accuracy": val, "test_accuracy": val - 0.01,
                                                       "seconds": 1800.0}}

    runs = {"a": run("c11", 0.88), "b": run("c12", 0.86), "seed1": run("c12", 0.5, seed=1),
            "c_older": run("c12", 0.3, finished="T1"),
            "searched": run("c12", 0.4, params="search/search")}
    text = _scope_sentence(_scopes(rows), runs)
    assert "`c11` at 224 px: validation 88.00 %, test 87.00 %" in text
    assert "`c12` at 224 px: validation 86.00 %, test 85.00 %, a cache of 6.0 GB" in text
    assert "50.00 %" not in text and "40.00 %" not in text, "only seed-0 default runs are compared"
    assert "30.00 %" not in text, "the latest run of a scope is reported"
    assert "same backbone weights (fingerprint `w1`)" in text
    seeds = {"runs": [{"val_accuracy": 0.88}, {"val_accuracy": 0.875}]}
    assert "2 seeds of the default recipe differ by 0.50 points" in _scope_sentence(_scopes(rows), runs, seeds)
    runs["b"]["weights_fingerprint"] = "w2"
    assert "same backbone weights" not in _scope_sentence(_scopes(rows), runs)
    assert "makes no claim" not in text


def test_precision_and_mirror_sentences_report_the_runs_own_measurements():
    from search.paper import _mirror_sentence, _precision_sentence

    probe = {"speedup": 1.36, "threshold": 1.1, "chosen": "mixed_bfloat16"}
    text = _precision_sentence({"tail_precision_resolved": "mixed_bfloat16", "precision_probe": probe})
    assert "mixed bfloat16" in text and "1.36x" in text and "1.10x" in text and "AMX" not in text
    assert _precision_sentence({}) == "The tail trained in float32."
    assert "1.05x" in _precision_sentence({"tail_precision_resolved": "float32",
                                           "precision_probe": {**probe, "speedup": 1.05}})
    text = _mirror_sentence({"val_accuracy_plain": 0.88, "val_accuracy_tta_candidates": {"images": 0.883}})
    assert "88.00 %" in text and "mirrored images 88.30 %" in text
    assert _mirror_sentence({"val_accuracy_plain": 0.88}) == ""
