"""The classic evaluation script, byte for byte, on a saved model (data source redirected only)."""

import hashlib
import json
import re

import keras
import numpy as np

from conftest import TINY_RES, run_cli
from search.evaluate import SCRIPT
from search.final import FinalConfig, build_final

# sha256 of the script as given in DEVELOPERS.md (trailing space on the learning_phase line kept)
CLASSIC_SHA256 = hashlib.sha256(b"""#!/usr/bin/env python3

from tensorflow import keras as K
preprocess_data = __import__('0-transfer').preprocess_data

# to fix issue with saving keras applications
K.learning_phase = K.backend.learning_phase 

_, (X, Y) = K.datasets.cifar10.load_data()
X_p, Y_p = preprocess_data(X, Y)
model = K.models.load_model('cifar10.h5')
model.evaluate(X_p, Y_p, batch_size=128, verbose=1)
""").hexdigest()


def test_script_is_unmodified():
    assert hashlib.sha256(SCRIPT.read_bytes()).hexdigest() == CLASSIC_SHA256


def test_classic_script_runs_and_reports_the_model_accuracy(tmp_path, tiny_splits, tiny_npz):
    config = FinalConfig(weights=None, resolution=TINY_RES, reference_resolution=TINY_RES, tail_precision="float32",
                         cache_root=str(tmp_path / "cache"),
                         results=str(tmp_path / "results"), output=str(tmp_path / "cifar10.h5"),
                         head_epochs=2, tail_epochs=0, bn_passes=0, parity_images=10, progress=False)
    build_final(config, tiny_splits)
    out = run_cli("evaluate", "--model", config.output, "--data", str(tiny_npz), "--results", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    printed = float(re.findall(r"accuracy: ([0-9.]+)", out.stdout + out.stderr)[-1])
    model = keras.models.load_model(config.output)
    probs = model.predict(tiny_splits.x_test.astype(np.float32), verbose=0)
    expected = float(np.mean(probs.argmax(1) == tiny_splits.y_test))
    assert abs(printed - expected) < 1e-3
    recorded = json.loads((tmp_path / "evaluate.json").read_text())
    assert recorded["accuracy"] == printed
