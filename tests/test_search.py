"""Search engines on a tiny cache: Optuna (records, resume after SIGKILL, PostgreSQL workers)
and KerasTuner; make final reads the best trial from either."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import optuna
import pytest

from conftest import ROOT
from search import engines, heads, space
from search.engines.objective import PooledData


@pytest.fixture(scope="module")
def pooled(tiny_cache, tiny_splits):
    return PooledData.from_cache(tiny_cache, tiny_splits)


def test_optuna_records_trials_and_best_params(pooled, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    summary = engines.run_search("optuna", data=pooled, cache_id="tiny", n_trials=4, storage=storage,
                                 results=tmp_path, progress=False, max_epochs=3, pruner="median")
    assert summary["trials"] == 4 and summary["complete"] + summary["pruned"] + summary["failed"] == 4
    study = optuna.load_study(study_name=summary["study_name"], storage=storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert done and all({"val_accuracy", "epochs", "seconds", "cache"} <= set(t.user_attrs) for t in done)
    assert all(t.user_attrs["val_accuracy"] == t.value for t in done)
    params, where = engines.best_params(tmp_path)
    assert params == study.best_trial.params and "optuna" in where
    head = heads.build_head(space.with_defaults(params), (pooled.x_train.shape[1],))
    assert head.output.shape[-1] == 10
    # the study opens unchanged in the optuna CLI
    optuna_cli = os.path.join(os.path.dirname(sys.executable), "optuna")
    listed = subprocess.run([optuna_cli, "studies", "--storage", storage], capture_output=True, text=True)
    assert listed.returncode == 0 and summary["study_name"] in listed.stdout, listed.stderr
    best = subprocess.run([optuna_cli, "best-trial", "--study-name", summary["study_name"], "--storage", storage,
                           "-f", "json"], capture_output=True, text=True)
    assert best.returncode == 0, best.stderr
    assert json.loads(best.stdout)["number"] == study.best_trial.number
    # same study again: load_if_exists continues it
    again = engines.run_search("optuna", data=pooled, cache_id="tiny", n_trials=2, storage=storage,
                               results=tmp_path, progress=False, max_epochs=3)
    assert again["trials"] == 6


def test_kerastuner_same_space_and_best_params(pooled, tmp_path):
    summary = engines.run_search("kerastuner", data=pooled, cache_id="tiny", n_trials=2, results=tmp_path,
                                 progress=False, max_epochs=2, oracle="bayesian")
    assert summary["trials"] == 2
    params, where = engines.best_params(tmp_path)
    assert "kerastuner" in where
    assert {"n_layers", "dropout", "optimizer", "learning_rate", "batch_size", "label_smoothing"} <= set(params)
    heads.build_head(space.with_defaults(params), (pooled.x_train.shape[1],))


def _search_cmd(npz, tmp_path, storage, trials, study="resume"):
    return [sys.executable, "-m", "search.cli", "search", "--data", str(npz), "--val-size", "20",
            "--weights", "none", "--resolution", "32", "--cache-dir", str(tmp_path / "cache"),
            "--results", str(tmp_path / "results"), "--storage", storage, "--study-name", study,
            "--trials", str(trials), "--max-epochs", "4", "--heartbeat", "1", "--quiet"]


def _finished(storage, study):
    try:
        s = optuna.load_study(study_name=study, storage=storage)
    except KeyError:
        return {}
    return {t.number: t.value for t in s.trials if t.state == optuna.trial.TrialState.COMPLETE}


def test_sigkill_midway_then_resume_keeps_completed_trials(tiny_npz, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(_search_cmd(tiny_npz, tmp_path, storage, 200), env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while len(_finished(storage, "resume")) < 3 and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _finished(storage, "resume")
    assert len(before) >= 3, "search did not get going"
    time.sleep(2.5)  # past the heartbeat grace period of the killed trial
    out = subprocess.run(_search_cmd(tiny_npz, tmp_path, storage, 3), env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    after = _finished(storage, "resume")
    assert all(after[n] == v for n, v in before.items()), "a completed trial was lost or changed"
    study = optuna.load_study(study_name="resume", storage=storage)
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.RUNNING not in states, "the killed trial must not stay RUNNING"
    new = [t for t in study.trials if t.number > max(before) and t.state.is_finished()]
    assert len([t for t in new if t.state != optuna.trial.TrialState.FAIL]) == 3


@pytest.mark.postgres
@pytest.mark.skipif(not os.environ.get("OPTUNA_TEST_PG_URL"), reason="needs $OPTUNA_TEST_PG_URL (CI starts one)")
def test_postgres_four_workers_no_lost_or_duplicated_trials(tiny_npz, tmp_path):
    url = os.environ["OPTUNA_TEST_PG_URL"]
    study = f"workers-{uuid.uuid4().hex[:8]}"
    per_worker = 3
    cmd = _search_cmd(tiny_npz, tmp_path, url, per_worker, study)
    # build the cache once so the four workers do not race to build it
    subprocess.run([*cmd[:3], "extract", *cmd[4:14]], env={**os.environ, "PYTHONPATH": str(ROOT)},
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    out = subprocess.run([*cmd, "--workers", "4"], env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    trials = optuna.load_study(study_name=study, storage=url).trials
    finished = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(finished) == 4 * per_worker
    assert len({t.number for t in trials}) == len(trials) == 4 * per_worker


@pytest.mark.postgres
@pytest.mark.skipif(not os.environ.get("OPTUNA_TEST_PG_URL"), reason="needs $OPTUNA_TEST_PG_URL (CI starts one)")
def test_postgres_worker_killed_midway_does_not_break_the_others(tiny_npz, tmp_path):
    url = os.environ["OPTUNA_TEST_PG_URL"]
    study = f"kill-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = _search_cmd(tiny_npz, tmp_path, url, 3, study)
    subprocess.run([*cmd[:3], "extract", *cmd[4:14]], env=env, cwd=ROOT, check=True, capture_output=True,
                   timeout=300)
    from search.engines.optuna_engine import open_study

    open_study(url, study)  # schema and study exist before the workers start
    victim = subprocess.Popen([*cmd, "--trials", "200", "--worker-index", "9"], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    others = [subprocess.Popen([*cmd, "--worker-index", str(w)], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True) for w in range(3)]
    deadline = time.time() + 240
    while len(_finished(url, study)) < 2 and time.time() < deadline:
        time.sleep(0.5)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    codes = [p.wait(timeout=600) for p in others]
    assert codes == [0, 0, 0], [p.stderr.read()[-1000:] for p in others]
    trials = optuna.load_study(study_name=study, storage=url).trials
    assert len({t.number for t in trials}) == len(trials)
    finished = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(finished) >= 3 * 3
