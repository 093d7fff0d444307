"""Shared test fixtures: where the real routing data lives, small random traces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_TRACES = REPO_ROOT.parent / "shared" / "traces"


def shared_trace(relative: str) -> Path:
    """Path of a file under ../shared/traces; skips the test when it is absent (user clones)."""
    path = SHARED_TRACES / relative
    if not path.exists():
        pytest.skip(f"real routing data not available: {path}")
    return path


def random_ids(rng: np.random.Generator, tokens: int, layers: int, experts: int, k: int, missing: float = 0.0) -> np.ndarray:
    """int32 ``[tokens, layers, k]`` distinct experts per (token, layer); a share ``missing`` set to -1."""
    keys = rng.random((tokens, layers, experts))
    ids = np.argsort(keys, axis=2)[:, :, :k].astype(np.int32)
    if missing:
        ids[rng.random((tokens, layers)) < missing] = -1
    return ids


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
