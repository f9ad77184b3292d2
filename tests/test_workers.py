"""Optuna workers in their own processes: a search killed by SIGKILL resumes without losing or
repeating a trial, and a trial that never beat is failed once its grace is over (SQLite)."""

import os
import signal
import subprocess
import time

import optuna
import pytest

from conftest import ROOT, LogWatch, finished_trials, search_cmd


@pytest.mark.slow  # a minute of two searches in subprocesses: make reliability runs it
def test_sigkill_midway_then_resume_keeps_completed_trials(tiny_npz, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(search_cmd(tiny_npz, tmp_path, storage, 200), env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    LogWatch(proc).wait(" COMPLETE", 3)  # the engine logs each finished trial once it is stored
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = time.monotonic()
    before = finished_trials(storage, "resume")
    assert len(before) >= 3, "search did not get going"
    # Optuna calls a trial stale once its last heartbeat is older than the grace period (twice the
    # heartbeat, 1 s here): a matter of the clock, which no event marks; wait until it has passed
    time.sleep(max(0.0, killed_at + 2 * 1 + 0.2 - time.monotonic()))
    out = subprocess.run(search_cmd(tiny_npz, tmp_path, storage, 3), env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    after = finished_trials(storage, "resume")
    assert all(after[n] == v for n, v in before.items()), "a completed trial was lost or changed"
    study = optuna.load_study(study_name="resume", storage=storage)
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.RUNNING not in states, "the killed trial must not stay RUNNING"
    new = [t for t in study.trials if t.number > max(before) and t.state.is_finished()]
    assert len([t for t in new if t.state != optuna.trial.TrialState.FAIL]) == 3



def test_a_trial_that_never_recorded_a_heartbeat_is_failed_once_its_grace_is_over(tmp_path):
    """Optuna's stale-trial check skips trials without a heartbeat row (a process killed between
    creating a trial and its first beat); a worker starting a search fails them after the grace."""
    from search.engines.optuna_engine import fail_trials_without_heartbeat

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="orphan")
    study.ask()  # RUNNING, never beats
    assert fail_trials_without_heartbeat(study, 3600) == [] and study.trials[0].state.name == "RUNNING"
    assert fail_trials_without_heartbeat(study, 0) == [0] and study.trials[0].state.name == "FAIL"
