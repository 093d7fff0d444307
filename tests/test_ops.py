"""The ``_ops`` wrappers: pure-torch references against brute force, the GRACE_OPS switch, debug mode."""

from __future__ import annotations

import pytest
import torch

from megatron_grace import _ops

_CUDA_KERNELS = torch.cuda.is_available() and _ops.has_kernel("cuda")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.fixture(autouse=True)
def _no_debug_leak():
    _ops.set_debug(None)
    yield
    _ops.set_debug(None)


def _modes(device: str) -> list[str]:
    """torch always; auto (the compiled kernel where there is one for the device)."""
    return ["torch", "auto"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n, bins", [(0, 4), (1, 1), (1000, 7), (200_000, 33)])
def test_destination_histogram_matches_reference(device, n, bins, monkeypatch):
    gen = torch.Generator().manual_seed(n)
    dest = torch.randint(-1, bins, (n,), generator=gen, dtype=torch.int32)
    expected = torch.zeros(bins, dtype=torch.int64)
    for value in dest.tolist():  # brute-force reference
        if value >= 0:
            expected[value] += 1
    for mode in _modes(device):
        monkeypatch.setenv("GRACE_OPS", mode)
        for d in (dest, dest.long()):
            got = _ops.destination_histogram(d.to(device), bins)
            assert got.dtype == torch.int64 and got.shape == (bins,) and torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_destination_histogram_rejects_out_of_range_in_debug_mode(device, monkeypatch):
    _ops.set_debug(True)
    for mode in _modes(device):
        monkeypatch.setenv("GRACE_OPS", mode)
        with pytest.raises(RuntimeError, match=r"destination_histogram: dest value 5 out of range \[-1, 3\)"):
            _ops.destination_histogram(torch.tensor([0, 5], device=device), 3)


def test_torch_reference_skips_out_of_range_without_debug(monkeypatch):
    """Outside debug mode the sync-free reference cannot raise on values: it drops them."""
    monkeypatch.setenv("GRACE_OPS", "torch")
    _ops.set_debug(False)
    assert _ops.destination_histogram(torch.tensor([0, 5, -3, 2, 2]), 3).tolist() == [1, 0, 2]
    order, counts = _ops.sort_by_key(torch.tensor([1, 0, 9]), 2)
    assert order.tolist() == [1, 0, 2] and counts.tolist() == [1, 1]


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


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("0", False), ("", False)])
def test_debug_switch_reads_environment(value, expected, monkeypatch):
    monkeypatch.setenv("GRACE_DEBUG", value)
    assert _ops.debug_enabled() is expected
    _ops.set_debug(not expected)
    assert _ops.debug_enabled() is (not expected)


def test_weighted_combine_reference_matches_padded_sum(monkeypatch):
    """The wrapper's reference equals dispatch.permute.padded_weighted_sum_torch bit for bit."""
    from megatron_grace.dispatch.permute import padded_weighted_sum_torch

    monkeypatch.setenv("GRACE_OPS", "torch")
    gen = torch.Generator().manual_seed(2)
    T, k, h = 50, 4, 24
    keep = torch.rand(T, k, generator=gen) > 0.25
    row = torch.arange(T)[:, None].expand(T, k)[keep]
    pos = torch.arange(k)[None, :].expand(T, k)[keep]
    values = torch.randn(row.numel(), h, generator=gen).bfloat16()
    weight = torch.rand(row.numel(), generator=gen)
    for dtype in (torch.bfloat16, torch.float32):
        got = _ops.weighted_combine(values, row, pos, weight, T, k, dtype)
        assert torch.equal(got, padded_weighted_sum_torch(values, row, pos, weight, T, k, dtype))
