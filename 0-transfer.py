#!/usr/bin/env python3
"""CIFAR-10 by transfer learning from a Keras Application (default: MobileNet, ImageNet).

Running this file trains the model and saves a compiled ``cifar10.h5`` in the current
directory (the same code path as ``make final``: ``search.final.build_final``). Importing it
trains nothing; it defines :func:`preprocess_data` and makes the saved model loadable:

- importing ``search.backbones`` registers the functions the model's Lambda layers call
  (``keras.saving.register_keras_serializable``), so ``load_model`` works with the default
  ``safe_mode``;
- importing ``search`` first sets ``TF_CPU_ALLOCATOR_USE_BFC=true`` (unless already set) before
  TensorFlow loads, when this file is imported or run first (see ``search/__init__.py``);
- compatibility shim: Keras 3 has no ``keras.backend.learning_phase``, which the classic
  evaluation script reads (``K.learning_phase = K.backend.learning_phase``); we define it
  (always 0, inference) on ``tensorflow.keras.backend`` and ``keras.backend`` when missing.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from tensorflow import keras as K  # noqa: E402

import search  # noqa: E402,F401  (first: sets TensorFlow's CPU allocator before TensorFlow loads)
from search import backbones  # noqa: E402
from search.data import one_hot, validate_images, validate_labels  # noqa: E402


def _learning_phase() -> int:
    """Keras 2's ``learning_phase()``; Keras 3 passes ``training=`` instead, so: inference."""
    return 0


for _backend in {id(K.backend): K.backend, id(backbones.keras.backend): backbones.keras.backend}.values():
    if not hasattr(_backend, "learning_phase"):
        _backend.learning_phase = _learning_phase


def preprocess_data(X, Y):
    """Pre-process CIFAR-10 for the saved model.

    Args:
        X: ``(m, 32, 32, 3)`` CIFAR-10 pixels (uint8 0-255, or any numeric dtype).
        Y: ``(m,)`` or ``(m, 1)`` integer labels in 0..9.

    Returns:
        ``(X_p, Y_p)``: ``X_p`` ``(m, 32, 32, 3)`` float32 pixels 0-255 (the model's first
        layer upsamples and its preprocessing layer scales), ``Y_p`` ``(m, 10)`` float32
        one-hot, matching the compiled categorical cross-entropy.

    Raises:
        ValueError: wrong rank or shape, mismatched lengths, labels outside 0..9,
            non-numeric or empty input.
    """
    X = validate_images(X, "X")
    Y = validate_labels(Y, len(X), "Y")
    return X.astype(np.float32), one_hot(Y)


def main(argv=None) -> int:
    """Train with the default recipe and save ``cifar10.h5`` here (``make final`` does the same)."""
    from search import cli

    return cli.main(["final", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
