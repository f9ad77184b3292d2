"""The course's evaluation script, run unmodified beside ``0-transfer.py`` and a saved model.

Entry point: :func:`run_classic`. The script (``search/classic/evaluate_classic.py``, byte for
byte as the course gives it) runs in a temporary folder holding it, ``0-transfer.py`` and the
model. Offline, ``search/classic/sitecustomize.py`` on ``PYTHONPATH`` redirects only
``cifar10.load_data`` to ``$CIFAR10_NPZ``; the script's text is never changed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from search.errors import UserError
from search.io import write_json

CLASSIC = Path(__file__).resolve().parent / "classic"
SCRIPT = CLASSIC / "evaluate_classic.py"
DEFAULT_TRANSFER = Path(__file__).resolve().parent.parent / "0-transfer.py"


def run_classic(model: str | os.PathLike, data: str | None = None, results: str | os.PathLike = "results",
                transfer: str | os.PathLike = DEFAULT_TRANSFER, echo: bool = True) -> dict:
    """Run the script on ``model``; write ``results/evaluate.json``; return its accuracy and loss.

    Args:
        model: the saved ``.h5``.
        data: an ``.npz`` served as ``cifar10.load_data()`` (default ``$CIFAR10_NPZ``; without
            either, Keras downloads CIFAR-10).
        transfer: the ``0-transfer.py`` the script imports.
    """
    model, transfer = Path(model), Path(transfer)
    data = data or os.environ.get("CIFAR10_NPZ")
    if not model.is_file():
        raise UserError(f"no model at {model}; run `make final` first")
    if not transfer.is_file():
        raise UserError(f"no 0-transfer.py at {transfer} (pass --transfer)")
    env = dict(os.environ)
    if data:
        env["CIFAR10_NPZ"] = str(Path(data).resolve())
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CLASSIC), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as tmp:
        os.symlink(transfer.resolve(), Path(tmp) / "0-transfer.py")
        os.symlink(transfer.resolve().parent / "search", Path(tmp) / "search")
        os.symlink(model.resolve(), Path(tmp) / "cifar10.h5")
        shutil.copy(SCRIPT, Path(tmp) / SCRIPT.name)
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, SCRIPT.name], cwd=tmp, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        output = []
        for line in proc.stdout:
            if echo:
                sys.stdout.write(line)
            output.append(line)
        code = proc.wait()
    found = re.findall(r"accuracy: ([0-9.]+) - loss: ([0-9.]+)", "".join(output))
    if code != 0 or not found:
        tail = "".join(output).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"the evaluation script failed (exit {code}): {tail[0][:300]}")
    out = {"accuracy": float(found[-1][0]), "loss": float(found[-1][1]), "model": str(model.resolve()),
           "script": "search/classic/evaluate_classic.py (unmodified)",
           "data": env.get("CIFAR10_NPZ", "keras.datasets"), "seconds": time.perf_counter() - start,
           "recorded": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json(Path(results) / "evaluate.json", out)
    return out
