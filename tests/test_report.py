"""The study report: files written, KerasTuner and all-pruned/failed studies, and the page
rendered in headless Chromium (plots drawn, no console errors, screenshot kept)."""

import json
import re
import shutil
import subprocess
import tempfile

import optuna
import pytest

from search import engines
from search.batches import PooledData
from search.engines.objective import HeadObjective
from search.report import FIGURES, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def optuna_results(tmp_path_factory, tiny_cache, tiny_splits):
    results = tmp_path_factory.mktemp("results")
    objective = HeadObjective(PooledData.from_cache(tiny_cache, tiny_splits), "tiny", max_epochs=3)
    engines.make_engine("optuna", pruner="median", progress=False, results=results).run(objective, 5)
    final = {"val_accuracy": 0.5, "test_accuracy": 0.25, "tta": True, "class_names": [str(i) for i in range(10)],
             "test_confusion_matrix": [[1 if i == j else 0 for j in range(10)] for i in range(10)],
             "test_per_class_accuracy": {str(i): 1.0 for i in range(10)}, "cache": {"key": {"backbone": "x"}},
             "params_provenance": {"head": {"source": "search", "study": "head-tiny"}, "tail": {"source": "default"}}}
    (results / "final.json").write_text(json.dumps(final))
    return results


def test_the_report_shows_only_a_final_model_built_from_its_study(optuna_results, tmp_path):
    results = tmp_path / "r"
    shutil.copytree(optuna_results, results)
    final = json.loads((results / "final.json").read_text())
    other = {**final, "params_provenance": {"head": {"source": "search", "study": "head-other"}}}
    (results / "final.json").write_text(json.dumps(other))  # the latest run came from another study
    write_report(results / "report", results)
    page = (results / "report" / "index.html").read_text()
    metrics = re.search(r"id='final-metrics'>(.*?)</p>", page).group(1)
    assert "No final model was built from this study" in metrics
    assert "<h1>Search head-tiny</h1>" in page  # not a cache key dressed as a title
    named = results / "runs" / "mine"
    named.mkdir(parents=True)
    (named / "final.json").write_text(json.dumps({**final, "test_accuracy": 0.375}))
    summary = write_report(results / "report", results)
    assert summary["final_source"] == str(named / "final.json")
    page = (results / "report" / "index.html").read_text()
    assert "<b>0.3750</b>" in re.search(r"id='final-metrics'>(.*?)</p>", page).group(1)


def test_report_files(optuna_results):
    summary = write_report(optuna_results / "report", optuna_results)
    out = optuna_results / "report"
    for name in ("index.html", "summary.md", "trials.csv", "optimization_history.png", "confusion_matrix.png"):
        assert (out / name).stat().st_size > 0, name
    page = (out / "index.html").read_text()
    assert not re.search(r"<script[^>]+src=\"https?:", page), "must open offline (plotly.js inlined)"
    assert "Plotly.newPlot" in page
    for name in ("optimization_history", "parallel_coordinate", "slice", "intermediate_values", "trial_durations"):
        assert f'id="{name}"' in page, name
    md = (out / "summary.md").read_text()
    assert f"Trials: {summary['trials']}" in md and "Best trial" in md
    # the engine ran the documented defaults first; the summary marks that trial
    assert [t["defaults"] for t in summary["finished"]] == [True] + [False] * (len(summary["finished"]) - 1)
    assert len((out / "trials.csv").read_text().strip().splitlines()) == summary["trials"] + 1


def test_report_kerastuner(tmp_path, tiny_cache, tiny_splits):
    objective = HeadObjective(PooledData.from_cache(tiny_cache, tiny_splits), "tiny", max_epochs=2)
    engines.make_engine("kerastuner", progress=False, results=tmp_path).run(objective, 2)
    summary = write_report(tmp_path / "report", tmp_path)
    assert summary["trials"] == 2 and (tmp_path / "report" / "index.html").exists()


def test_report_only_failed_and_pruned(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name="bad", direction="maximize")

    def objective(trial):
        trial.suggest_float("dropout", 0, 0.5)
        if trial.number % 2:
            raise optuna.TrialPruned()
        raise RuntimeError("boom")

    study.optimize(objective, n_trials=4, catch=(RuntimeError,))
    summary = write_report(tmp_path / "report", tmp_path, storage=storage, study_name="bad")
    assert summary["complete"] == 0 and summary["pruned"] == 2 and summary["failed"] == 2
    page = (tmp_path / "report" / "index.html").read_text()
    assert "No trial completed" in page
    assert "No trial completed" in (tmp_path / "report" / "summary.md").read_text()


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian chromium (CI installs it)")
def test_page_renders_in_headless_chromium(optuna_results):
    write_report(optuna_results / "report", optuna_results)
    page = (optuna_results / "report" / "index.html").resolve()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--virtual-time-budget=15000", "--enable-logging=stderr", "--v=0"]
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([CHROMIUM, *flags, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
                             capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    drawn = [name for name in FIGURES if re.search(rf'id="{name}"[^>]*>.*?<svg', dom.stdout, re.S)]
    expected = [n for n in FIGURES if f'id="{n}" class="plotly-graph-div' in page.read_text()
                or f'<div id="{n}" class="plotly-graph-div' in page.read_text()]
    assert expected and set(expected) <= set(drawn), (expected, drawn)
    console_errors = [line for line in dom.stderr.splitlines()
                      if "CONSOLE" in line and ("Error" in line or "Uncaught" in line)]
    assert console_errors == []
    shot = optuna_results / "report_screenshot.png"  # tests write only under temp folders
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([CHROMIUM, *flags, f"--user-data-dir={profile}", f"--screenshot={shot}",
                        "--window-size=1200,2400", page.as_uri()], capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000
