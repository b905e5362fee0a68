"""scikit-learn's digits (1797 8x8 images), split 80/20 with a fixed seed."""

from __future__ import annotations

from typing import Iterator

import numpy as np


def _split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    cut = int(0.8 * len(x))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def train_split() -> tuple[np.ndarray, np.ndarray]:
    x, y, _, _ = _split()
    return x, y


def evaluation(batch_size: int = 60) -> Iterator[dict[str, np.ndarray]]:
    """The held-out 20% (360 images) with labels."""
    _, _, x, y = _split()
    for i in range(0, len(x), batch_size):
        yield {"x": x[i:i + batch_size], "labels": y[i:i + batch_size]}


def calibration(batch_size: int = 64) -> Iterator[dict[str, np.ndarray]]:
    """The training split (1437 images) with labels: for calibration and for training passes."""
    x, y = train_split()
    for i in range(0, len(x), batch_size):
        yield {"x": x[i:i + batch_size], "labels": y[i:i + batch_size]}
