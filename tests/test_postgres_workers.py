"""Optuna studies shared through PostgreSQL (CI starts a server and sets $OPTUNA_TEST_PG_URL):
four workers lose and repeat no trial. Skipped without a server. (The PostgreSQL tests are a file
each so that the test workers share them out: each starts several processes and takes a minute.)"""

import os
import subprocess
import uuid

import optuna
import pytest

from conftest import ROOT, search_cmd


@pytest.mark.postgres
@pytest.mark.skipif(not os.environ.get("OPTUNA_TEST_PG_URL"), reason="needs $OPTUNA_TEST_PG_URL (CI starts one)")
def test_postgres_four_workers_no_lost_or_duplicated_trials(tiny_npz, tmp_path):
    url = os.environ["OPTUNA_TEST_PG_URL"]
    study = f"workers-{uuid.uuid4().hex[:8]}"
    per_worker = 2
    cmd = search_cmd(tiny_npz, tmp_path, url, per_worker, study, heartbeat=5)
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
