"""Compiled ops against the pure-torch reference, and the GRACE_OPS switch."""

from __future__ import annotations

import pytest
import torch

from megatron_grace import _ops


@pytest.mark.parametrize("n, bins", [(0, 4), (1, 1), (1000, 7), (200_000, 33)])
def test_destination_histogram_matches_reference(n, bins, monkeypatch):
    gen = torch.Generator().manual_seed(n)
    dest = torch.randint(-1, bins, (n,), generator=gen, dtype=torch.int32)
    expected = torch.zeros(bins, dtype=torch.int64)
    for value in dest.tolist():  # brute-force reference
        if value >= 0:
            expected[value] += 1
    for mode in ("torch", "auto"):
        monkeypatch.setenv("GRACE_OPS", mode)
        assert torch.equal(_ops.destination_histogram(dest, bins), expected)
        assert torch.equal(_ops.destination_histogram(dest.long(), bins), expected)


def test_destination_histogram_rejects_out_of_range(monkeypatch):
    for mode in ("torch", "auto"):
        monkeypatch.setenv("GRACE_OPS", mode)
        with pytest.raises(RuntimeError, match="out of range"):
            _ops.destination_histogram(torch.tensor([0, 5]), 3)


def test_native_mode_uses_extension_or_says_it_is_missing(monkeypatch):
    monkeypatch.setenv("GRACE_OPS", "native")
    dest = torch.tensor([0, 1, 1, -1])
    if _ops.extension_available():
        assert torch.equal(_ops.destination_histogram(dest, 2), torch.tensor([1, 2]))
    else:
        with pytest.raises(RuntimeError, match="not built"):
            _ops.destination_histogram(dest, 2)


def test_bad_mode_is_named(monkeypatch):
    monkeypatch.setenv("GRACE_OPS", "fast")
    with pytest.raises(ValueError, match="GRACE_OPS"):
        _ops.use_native()
