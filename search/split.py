"""The stratified split both data readers carve with (validation from training images; a
folder's test split): one function, below ``data`` and ``images`` so neither imports the other
for it."""

from __future__ import annotations

import numpy as np

from search.errors import UserError


def stratified_split(y: np.ndarray, val_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split indices of ``y`` into (train, val), ``val_size`` in all, equal share per class."""
    if not 0 < val_size < len(y):
        raise UserError(f"val_size must be in 1..{len(y) - 1}, got {val_size}")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    val_parts = []
    for i, c in enumerate(classes):
        members = np.flatnonzero(y == c)
        share = val_size // len(classes) + (1 if i < val_size % len(classes) else 0)
        val_parts.append(rng.permutation(members)[: min(share, len(members) - 1)])
    val_idx = np.sort(np.concatenate(val_parts))
    train_idx = np.setdiff1d(np.arange(len(y)), val_idx)
    return train_idx.astype(np.int64), val_idx.astype(np.int64)
