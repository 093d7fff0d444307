"""Sorting token rows by destination and undoing it (pure torch, vectorized).

Every dispatch step in :mod:`megatron_grace.dispatch` has the same shape: rows carry an integer
key (``dest_rank * num_slots + slot`` for the expert exchange, ``dest_node * T + token`` for the
node exchange), they are put in key order with one stable sort, sent as contiguous chunks, and
the results are put back in the original order with :func:`unpermute` (an index assignment
with unique indices: deterministic, no accumulation).

Each function runs the compiled op of :mod:`megatron_grace._ops` (CUDA kernel on GPU tensors,
C++ kernel on CPU tensors) when the extension is built, else the pure-torch code kept here as the
reference (``GRACE_OPS=torch`` forces it). Both give identical results.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_grace import _ops
from megatron_grace._segments import position_in_run, run_starts  # noqa: F401 - re-exported


@dataclass(frozen=True)
class Permutation:
    """A stable sort of ``n`` rows by an integer key.

    Attributes:
        order: int64 ``[n]``; sorted position ``i`` holds input row ``order[i]``.
        counts: int64 ``[num_keys]``; rows per key value (the chunk sizes in sorted order).
    """

    order: torch.Tensor
    counts: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.order.numel())


def sort_by_key(key: torch.Tensor, num_keys: int) -> Permutation:
    """Stable sort of rows by ``key``.

    Args:
        key: int64 ``[n]`` with values in ``[0, num_keys)``.
        num_keys: number of key values (length of ``counts``).

    Returns:
        The :class:`Permutation`; rows with equal keys keep their input order.
    """
    order, counts = _ops.sort_by_key(key, num_keys)
    return Permutation(order=order, counts=counts.to(key.device))


def permute(x: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """``x[perm.order]``: rows ``[n, ...]`` in key order."""
    return _ops.gather_rows(x, perm.order)


def unpermute(y: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """Inverse of :func:`permute`: ``out[perm.order[i]] = y[i]``; ``y`` is ``[n, ...]`` in key order."""
    return _ops.scatter_rows(y, perm.order)


def padded_weighted_sum(values: torch.Tensor, row: torch.Tensor, pos: torch.Tensor, weight: torch.Tensor, num_rows: int,
                        width: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Deterministic segmented weighted sum (see :func:`padded_weighted_sum_torch` for the contract):
    the compiled ``grace::weighted_combine`` kernel when available, else the pure-torch reference.
    Both add each row's terms in ``pos`` order in float32 and give bit-identical results.
    """
    return _ops.weighted_combine(values, row, pos, weight, num_rows, width, out_dtype)


def padded_weighted_sum_torch(values: torch.Tensor, row: torch.Tensor, pos: torch.Tensor, weight: torch.Tensor, num_rows: int,
                              width: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Deterministic segmented weighted sum: ``out[r] = sum_p weight[p] * values[p]`` over entries with ``row[p] = r``,
    added one position at a time in the order of ``pos`` (0, 1, 2, ...).

    Implemented as an index table ``[R, width]`` (entry of each (row, position), or a zero row)
    and ``width`` gathers accumulated in float32 (or wider): a fixed summation order, no
    scatter-add races, and only ``[R, h]`` extra memory.

    Args:
        values: ``[n, h]`` rows to combine.
        row: int64 ``[n]`` output row of each entry.
        pos: int64 ``[n]`` position of the entry inside its output row (unique per row, < width).
        weight: float ``[n]`` weights.
        num_rows: R, number of output rows.
        width: max entries per output row.
        out_dtype: dtype of the result.

    Returns:
        ``[R, h]`` in ``out_dtype``; rows without entries are 0.
    """
    acc = torch.promote_types(values.dtype, torch.float32)
    n, h = values.shape[0], values.shape[-1]
    dev = values.device
    table = torch.full((num_rows, max(width, 1)), n, dtype=torch.int64, device=dev)  # n = the zero row
    table[row, pos] = torch.arange(n, device=dev)
    ext = torch.cat([values.to(acc), values.new_zeros((1, h), dtype=acc)])
    w_ext = torch.cat([weight.to(acc), weight.new_zeros(1, dtype=acc)])
    out = torch.zeros(num_rows, h, dtype=acc, device=dev)
    for j in range(table.shape[1]):  # positions (<= top-k or node count), not tokens
        idx = table[:, j]
        out += w_ext.index_select(0, idx)[:, None] * ext.index_select(0, idx)
    return out.to(out_dtype)
