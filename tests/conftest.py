"""Shared fixtures: tiny synthetic CIFAR-shaped data and a tiny random-weight backbone.

Nothing here is pretrained: tests use ``weights=None`` at 32 px so they run in seconds.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TINY_RES = 32


def synthetic_arrays(n_train: int = 120, n_test: int = 40, seed: int = 0):
    """CIFAR-shaped uint8 images whose mean colour depends on the class (learnable)."""
    rng = np.random.default_rng(seed)

    def make(n):
        y = np.arange(n) % 10
        rng.shuffle(y)
        base = (np.stack([y * 25, 255 - y * 25, (y * 70) % 256], axis=1)[:, None, None, :]).astype(np.int16)
        x = np.clip(base + rng.integers(-40, 40, size=(n, 32, 32, 3)), 0, 255).astype(np.uint8)
        return x, y.reshape(-1, 1).astype(np.uint8)

    (xtr, ytr), (xte, yte) = make(n_train), make(n_test)
    return xtr, ytr, xte, yte


class LogWatch:
    """The stderr lines of running processes (``text=True`` pipes), read by one thread per pipe as
    they come, so a test waits for an event (a log line) instead of sleeping and polling."""

    def __init__(self, *procs) -> None:
        import queue
        import threading

        self.lines: queue.Queue = queue.Queue()
        self.seen: list[tuple[int, str]] = []
        self.readers = [threading.Thread(target=self._read, args=(i, proc.stderr), daemon=True)
                        for i, proc in enumerate(procs)]
        for reader in self.readers:
            reader.start()

    def _read(self, i: int, pipe) -> None:
        for line in iter(pipe.readline, ""):
            self.lines.put((i, line))

    def wait(self, needle: str, count: int, timeout: float = 240.0) -> int:
        """Block until ``count`` lines (over all the processes) contain ``needle``, or ``timeout``
        seconds pass; the number seen."""
        import queue
        import time

        deadline = time.monotonic() + timeout
        hits = sum(needle in line for _, line in self.seen)
        while hits < count and (left := deadline - time.monotonic()) > 0:
            try:
                item = self.lines.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(item)
            hits += needle in item[1]
        return hits

    def text(self, i: int | None = None) -> str:
        """All that process ``i`` (None: every one) wrote, once the processes have exited (the
        readers are joined at the pipes' ends)."""
        for reader in self.readers:
            reader.join(timeout=60)
        while not self.lines.empty():
            self.seen.append(self.lines.get_nowait())
        return "".join(line for j, line in self.seen if i is None or j == i)


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    xtr, ytr, xte, yte = synthetic_arrays()
    np.savez(path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    return path


@pytest.fixture(scope="session")
def tiny_splits(tiny_npz):
    from search.data import load_cifar10

    return load_cifar10(tiny_npz, val_size=20)


@pytest.fixture(scope="session")
def spec():
    from search.backbones import get_backbone

    return get_backbone("MobileNet")


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, tiny_splits, spec):
    from search.cache import ensure_cache

    root = tmp_path_factory.mktemp("cache")
    return ensure_cache(spec, tiny_splits, resolution=TINY_RES, weights=None, root=root,
                        chunk_size=50, progress=False, flip=True)


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 300):
    """Run ``python -m search.cli`` in a subprocess; return CompletedProcess (text)."""
    import subprocess

    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "search.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd or ROOT, timeout=timeout)


def search_cmd(npz: Path, tmp_path: Path, storage: str, trials: int, study: str = "resume",
               heartbeat: int = 1) -> list[str]:
    """A phase-1 search of the tiny data in a subprocess (tests of workers, kills and storages)."""
    return [sys.executable, "-m", "search.cli", "search", "--data", str(npz), "--val-size", "20",
            "--weights", "none", "--resolution", "32", "--cache-dir", str(tmp_path / "cache"),
            "--results", str(tmp_path / "results"), "--storage", storage, "--study-name", study,
            "--trials", str(trials), "--max-epochs", "4", "--heartbeat", str(heartbeat), "--quiet", "--phase", "head",
            "--head-rows", "0"]


def finished_trials(storage: str, study: str) -> dict[int, float]:
    """Number -> value of the study's COMPLETE trials ({} while the study does not exist)."""
    import optuna

    try:
        s = optuna.load_study(study_name=study, storage=storage)
    except KeyError:
        return {}
    return {t.number: t.value for t in s.trials if t.state == optuna.trial.TrialState.COMPLETE}
