"""preprocess_data: shapes, dtypes, errors; importing 0-transfer trains nothing; the shim."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def transfer():
    spec = importlib.util.spec_from_file_location("transfer0", ROOT / "0-transfer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shapes_and_dtypes(transfer):
    x = np.random.default_rng(0).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    y = np.array([0, 1, 2, 3, 9, 8, 5])
    xp, yp = transfer.preprocess_data(x, y)
    assert xp.shape == (7, 32, 32, 3) and xp.dtype == np.float32
    assert np.array_equal(xp, x.astype(np.float32))
    assert yp.shape == (7, 10) and yp.dtype == np.float32
    assert np.array_equal(yp.argmax(1), y) and np.all(yp.sum(1) == 1)


def test_accepts_column_labels(transfer):
    x = np.zeros((3, 32, 32, 3), np.uint8)
    _, yp = transfer.preprocess_data(x, np.array([[4], [5], [6]], np.uint8))
    assert list(yp.argmax(1)) == [4, 5, 6]


@pytest.mark.parametrize("x, y, message", [
    (np.zeros((32, 32, 3)), np.zeros(1), "rank 4"),
    (np.zeros((2, 32, 32, 1)), np.zeros(2), "(m, 32, 32, 3)"),
    (np.zeros((2, 64, 64, 3)), np.zeros(2), "(m, 32, 32, 3)"),
    (np.zeros((3, 32, 32, 3)), np.zeros(2), "3 images but Y has 2"),
    (np.zeros((2, 32, 32, 3)), np.array([0, 10]), "0..9"),
    (np.zeros((2, 32, 32, 3)), np.array([-1, 0]), "0..9"),
    (np.zeros((2, 32, 32, 3)), np.array([0.5, 1.0]), "whole numbers"),
    (np.full((1, 32, 32, 3), "a"), np.zeros(1), "numeric"),
    (np.zeros((1, 32, 32, 3)), np.array(["cat"]), "integer class ids"),
    (np.zeros((0, 32, 32, 3)), np.zeros(0), "empty"),
])
def test_bad_input_raises_value_error(transfer, x, y, message):
    with pytest.raises(ValueError, match=None) as info:
        transfer.preprocess_data(x, y)
    assert message in str(info.value)


def test_import_trains_nothing_and_loads_nothing_heavy(tmp_path):
    """Importing 0-transfer builds no model, reads no data, writes no file; it sets the allocator."""
    code = (
        "import os, sys, json;"
        f"sys.path.insert(0, {str(ROOT)!r}); m = __import__('0-transfer');"
        "print(json.dumps({'files': sorted(os.listdir('.')), "
        "'heavy': sorted(n for n in ('search.final', 'search.cache', 'search.engines', 'optuna', 'keras_tuner')"
        " if n in sys.modules), 'alloc': os.environ.get('TF_CPU_ALLOCATOR_USE_BFC')}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_CPU_ALLOCATOR_USE_BFC"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["files"] == [], "importing 0-transfer must not write files"
    assert got["heavy"] == [], f"importing 0-transfer loaded training modules: {got['heavy']}"
    assert got["alloc"] == "true", "search/__init__ sets TensorFlow's BFC allocator before TensorFlow loads"


def test_learning_phase_shim(transfer):
    from tensorflow import keras as K

    assert callable(K.backend.learning_phase)
    assert K.backend.learning_phase() == 0
