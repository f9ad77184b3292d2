"""Bad options exit non-zero with one clear line (no traceback)."""

import numpy as np
import pytest

from conftest import run_cli


def _one_line_error(out, *needles):
    assert out.returncode != 0
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in out.stderr
    assert lines[-1].startswith("error:") or "error:" in lines[-1], out.stderr[-1000:]
    for needle in needles:
        assert needle in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def wrong_keys_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad") / "wrong.npz"
    np.savez(path, images=np.zeros((2, 32, 32, 3), np.uint8))
    return path


@pytest.mark.parametrize("args, needles", [
    (["extract", "--backbone", "NoSuchNet"], ["unknown backbone", "NoSuchNet"]),
    (["extract", "--resolution", "8", "--weights", "none"], ["--resolution"]),
    (["extract", "--cut", "last9"], ["unknown cut"]),
    (["extract", "--data", "/nonexistent/cifar.npz"], ["data file not found", "/nonexistent/cifar.npz"]),
    (["search", "--engine", "sklearn"], ["unknown engine", "sklearn"]),
    (["search", "--storage", "not a url"], ["malformed storage URL"]),
    (["search", "--pruner", "sometimes"], ["unknown pruner"]),
    (["final", "--params", "{not json"], ["--params"]),
    (["evaluate", "--model", "/nonexistent/model.h5"], ["no model at"]),
])
def test_bad_options(args, needles, tiny_npz):
    env = {"CIFAR10_NPZ": str(tiny_npz)}
    if args[0] in ("extract", "search", "final"):
        args = [*args, "--val-size", "20"]
    _one_line_error(run_cli(*args, env=env), *needles)


def test_wrong_keys(wrong_keys_npz):
    _one_line_error(run_cli("extract", "--data", str(wrong_keys_npz)), "lacks keys")


def test_missing_cache_with_no_build(tiny_npz, tmp_path):
    out = run_cli("search", "--weights", "none", "--resolution", "32", "--no-build", "--val-size", "20",
                  "--cache-dir", str(tmp_path), "--data", str(tiny_npz))
    _one_line_error(out, "no usable cache")


def test_help_explains():
    out = run_cli("--help")
    assert out.returncode == 0 and "extract" in out.stdout and "search" in out.stdout
    out = run_cli("search", "--help")
    assert "--storage" in out.stdout and "--engine" in out.stdout
