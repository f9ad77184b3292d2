"""Atomic writes: a crash leaves either the old file or the new one, never half of one; and the
code version a result records."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from search.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Raises UserError naming the directory when it cannot be written (read-only, disk full).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise UserError(f"cannot write to {path.parent}: {exc.strerror or exc}") from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give what open() would
        os.replace(tmp_path, path)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    with atomic_path(path) as tmp:
        try:
            tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")
        except OSError as exc:
            raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None


def read_json(path: str | os.PathLike) -> Any:
    """Read JSON from ``path``."""
    return json.loads(Path(path).read_text())


def append_row(path: str | os.PathLike, obj: Any) -> None:
    """Append one row to a JSON list file (rows of an experiment log such as ``results/ablation.json``)."""
    rows = read_json(path) if Path(path).exists() else []
    rows.append(obj)
    write_json(path, rows)


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 120) -> None:
    """Save a matplotlib figure as PNG at ``path`` atomically, and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)


def _jsonable(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def code_version(where: str | os.PathLike | None = None) -> str | None:
    """The commit of the git checkout ``where`` (default: the one this package runs from), short,
    with ``-dirty`` when tracked files other than those under ``results/`` were changed (a run's
    outputs are not its code), or None outside a git checkout."""
    cwd = Path(where) if where is not None else Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return None
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude)results")
    return f"{head}-dirty" if changed else head
