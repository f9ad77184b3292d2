"""Optuna studies shared through PostgreSQL (CI starts a server and sets $OPTUNA_TEST_PG_URL and
$OPTUNA_TEST_PG_RESTART): workers survive a server restart, and a rerun completes. Skipped
without them."""

import os
import subprocess
import uuid

import optuna
import pytest

from conftest import ROOT, LogWatch, finished_trials, search_cmd


@pytest.mark.postgres
@pytest.mark.slow  # a minute of four workers and a rerun: make reliability runs it
@pytest.mark.skipif(not (os.environ.get("OPTUNA_TEST_PG_URL") and os.environ.get("OPTUNA_TEST_PG_RESTART")),
                    reason="needs $OPTUNA_TEST_PG_URL and $OPTUNA_TEST_PG_RESTART (a command; CI sets both)")
def test_postgres_restarted_midway_workers_reconnect_and_a_rerun_completes(tiny_npz, tmp_path):
    url = os.environ["OPTUNA_TEST_PG_URL"]
    study = f"restart-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    per_worker = 3
    cmd = search_cmd(tiny_npz, tmp_path, url, per_worker, study, heartbeat=5)
    subprocess.run([*cmd[:3], "extract", *cmd[4:14]], env=env, cwd=ROOT, check=True, capture_output=True,
                   timeout=300)
    from search.engines.optuna_engine import open_study

    open_study(url, study)
    workers = [subprocess.Popen([*cmd, "--worker-index", str(w)], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True) for w in range(4)]
    watch = LogWatch(*workers)
    watch.wait(" COMPLETE", 2)
    assert len(finished_trials(url, study)) >= 2, "workers did not start"
    subprocess.run(os.environ["OPTUNA_TEST_PG_RESTART"], shell=True, check=True, timeout=120,
                   capture_output=True)
    codes = [p.wait(timeout=600) for p in workers]
    outcomes = [(code, watch.text(w)) for w, code in enumerate(codes)]
    for code, err in outcomes:  # reconnected and finished, or stopped with one clear line
        assert code == 0 or (code == 2 and "lost the study database" in err.strip().splitlines()[-1]), err[-1500:]
    rerun = subprocess.run([*cmd, "--worker-index", "7", "--trials", "2"], env=env, cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-1500:]
    trials = optuna.load_study(study_name=study, storage=url).trials
    assert len({t.number for t in trials}) == len(trials), "no trial recorded twice"
    assert optuna.trial.TrialState.RUNNING not in [t.state for t in trials], "a broken trial is marked FAIL"
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) <= len(workers), "at most the trial each worker was running when the server went away"
    assert len(trials) >= per_worker * sum(code == 0 for code, _ in outcomes) + 2, "every worker owed trials ran"
