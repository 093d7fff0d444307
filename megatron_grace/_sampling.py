"""Evenly spaced indices: which tokens or layers stand for all of them when only some can be used."""

from __future__ import annotations

import numpy as np


def evenly_spaced(n: int, count: int) -> np.ndarray:
    """int64 ``[<= count]``: up to ``count`` distinct indices spread evenly over ``range(n)``, first and last
    included (all of them when ``count >= n``; empty when ``n == 0``)."""
    if n <= 0 or count <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.linspace(0, n - 1, min(n, count)).round().astype(np.int64))
