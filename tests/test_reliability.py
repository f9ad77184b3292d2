"""Fault injection: SIGKILL during extraction, unwritable outputs, safe loading."""

import errno
import json
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, TINY_RES
from search.errors import UserError
from search.final import FinalConfig, build_final, save_model
from search.io import write_json


def _extract_cmd(npz, cache_dir):
    return [sys.executable, "-m", "search.cli", "extract", "--data", str(npz), "--val-size", "20",
            "--weights", "none", "--resolution", str(TINY_RES), "--cache-dir", str(cache_dir),
            "--chunk-size", "10", "--mirror", "images", "--quiet"]  # two views: 32 chunks of 10


def _progress(cache_dir):
    files = list(cache_dir.glob("*/progress.json"))
    if not files:
        return 0
    try:
        return sum(json.loads(files[0].read_text())["done"].values())
    except (ValueError, KeyError):
        return 0


KILLER = """
import os, signal, sys
sys.argv = ["search.cli"] + sys.argv[2:]
kill_at = int(sys.argv.pop(1))
from search import cache
real = cache.ensure_cache
def killing(*args, **kwargs):
    seen = []
    def on_chunk(prefix, start, stop):
        seen.append(stop)
        if len(seen) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # a real SIGKILL, right after chunk kill_at was saved
    return real(*args, **{**kwargs, "on_chunk": on_chunk})
cache.ensure_cache = killing
from search import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigkill_during_extraction_resumes(tiny_npz, tmp_path):
    # a random chunk of the 32 (2 views x (120 + 40) images / 10 per chunk), never the last; seeded
    # (KILL_SEED) so a failure can be rerun exactly
    kill_at = random.Random(os.environ.get("KILL_SEED", "6")).randrange(1, 31)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = _extract_cmd(tiny_npz, tmp_path / "a")[3:]
    proc = subprocess.run([sys.executable, "-c", KILLER, "-", str(kill_at), *argv], env=env, cwd=ROOT,
                          capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-1000:]
    done_before = _progress(tmp_path / "a")
    assert done_before == 10 * kill_at, f"killed after chunk {kill_at}, progress says {done_before} images"
    subprocess.run(_extract_cmd(tiny_npz, tmp_path / "a"), env=env, cwd=ROOT, check=True, timeout=300,
                   capture_output=True)
    manifest = json.loads(next((tmp_path / "a").glob("*/manifest.json")).read_text())
    # the rerun computed only what was left: finished chunks are not recomputed
    assert manifest["extraction"]["images"] == 320 - done_before
    subprocess.run(_extract_cmd(tiny_npz, tmp_path / "b"), env=env, cwd=ROOT, check=True, timeout=300,
                   capture_output=True)
    a, b = next((tmp_path / "a").glob("*/")), next((tmp_path / "b").glob("*/"))
    assert a.name == b.name
    for f in sorted(b.glob("*.npy")):
        np.testing.assert_array_equal(np.load(a / f.name), np.load(f), err_msg=f.name)
    assert not list(a.glob("*.partial")) and not (a / "progress.json").exists()


def test_disk_full_while_saving_leaves_no_partial_model(tmp_path, monkeypatch):
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])

    def full(self, path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(keras.Model, "save", full)
    target = tmp_path / "cifar10.h5"
    with pytest.raises(UserError, match=str(target)):
        save_model(model, target)
    assert list(tmp_path.iterdir()) == [], "no partial or temp file left"


def test_unwritable_results_dir_names_the_path(tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(UserError, match=str(blocker)):
        write_json(blocker / "final.json", {"x": 1})


def test_final_into_unwritable_output_leaves_nothing(tmp_path, tiny_splits):
    blocker = tmp_path / "out"
    blocker.write_text("not a folder")
    config = FinalConfig(weights=None, resolution=TINY_RES, reference_resolution=TINY_RES, tail_precision="float32",
                         cache_root=str(tmp_path / "cache"),
                         results=str(tmp_path / "results"), output=str(blocker / "cifar10.h5"), head_epochs=1,
                         tail_epochs=0, bn_passes=0, parity_images=5, progress=False)
    with pytest.raises(UserError, match="cannot write"):
        build_final(config, tiny_splits)
    assert blocker.read_text() == "not a folder"
    assert not (tmp_path / "results" / "final.json").exists()


def test_two_processes_one_cache_build_it_once(tiny_npz, tmp_path):
    """Two `extract` runs started together on a cold cache: one builds, the other waits and reuses."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = _extract_cmd(tiny_npz, tmp_path)
    procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-1000:] for _, e in outs]
    said = sorted(o.strip().splitlines()[-1].split(":")[0] for o, _ in outs)
    assert said == ["cache built", "cache reused"], outs
    manifest = json.loads(next(tmp_path.glob("*/manifest.json")).read_text())
    assert manifest["extraction"]["images"] == 320, "every image went through the frozen part exactly once"


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    """flock is released by the kernel when its holder dies: a SIGKILLed holder blocks nobody."""
    from search.cache import build_lock

    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path\n"
            "from search.cache import build_lock\n"
            f"with build_lock(Path({str(tmp_path / 'c')!r})):\n    print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with build_lock(tmp_path / "c"):  # returns at once; would block forever if the lock were stale
        pass
