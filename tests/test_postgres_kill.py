"""Optuna studies shared through PostgreSQL (CI starts a server and sets $OPTUNA_TEST_PG_URL): a
killed worker does not break the others. Skipped without a server."""

import os
import signal
import subprocess
import uuid

import optuna
import pytest

from conftest import ROOT, LogWatch, search_cmd


@pytest.mark.postgres
@pytest.mark.skipif(not os.environ.get("OPTUNA_TEST_PG_URL"), reason="needs $OPTUNA_TEST_PG_URL (CI starts one)")
def test_postgres_worker_killed_midway_does_not_break_the_others(tiny_npz, tmp_path):
    url = os.environ["OPTUNA_TEST_PG_URL"]
    study = f"kill-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = search_cmd(tiny_npz, tmp_path, url, 3, study, heartbeat=5)
    subprocess.run([*cmd[:3], "extract", *cmd[4:14]], env=env, cwd=ROOT, check=True, capture_output=True,
                   timeout=300)
    from search.engines.optuna_engine import open_study

    open_study(url, study)  # schema and study exist before the workers start
    victim = subprocess.Popen([*cmd, "--trials", "200", "--worker-index", "9"], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    others = [subprocess.Popen([*cmd, "--worker-index", str(w)], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True) for w in range(3)]
    watch = LogWatch(victim, *others)
    watch.wait(" COMPLETE", 2)  # the workers log each finished trial once it is stored
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    codes = [p.wait(timeout=600) for p in others]
    assert codes == [0, 0, 0], watch.text()[-3000:]
    trials = optuna.load_study(study_name=study, storage=url).trials
    assert len({t.number for t in trials}) == len(trials)
    finished = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(finished) >= 3 * 3
