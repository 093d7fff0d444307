"""Static-shape flat dispatch for decode: fixed capacity per destination, no host synchronisation.

A decode step moves few tokens, and its cost is dominated by launch overhead and host round
trips, not bytes. This dispatcher trades some padding for shapes that depend only on
``(T, k, W, capacity)``:

1. the pairs are stably sorted by (destination GPU, slot) (one counting sort); pair ``p`` gets
   the position ``q`` inside its destination's run; pairs with ``q < capacity`` fill a send
   buffer ``[W, capacity, h]`` (one gather), the rest **overflow**;
2. one equal-split ``all_to_all_single`` moves the rows and one moves their slot ids
   (``[W, capacity]``, -1 for empty rows);
3. the receiver sorts the ``W * capacity`` rows by slot (empty rows last) for the grouped expert
   GEMM and scatters the results back to arrival order; one equal-split all-to-all returns them;
4. the sender sums each token's results in top-k order (the un-permute fused into the weighted
   combine); an overflowed pair contributes nothing here.

Overflow is never silent: ``handle.overflow`` (a device tensor, all-reduced over the group so
that every rank takes the same decision) counts the pairs left out, the layer accumulates it, and the step is re-run on the dynamic path by whoever checks it
(:meth:`megatron_grace.layer.GraceMoELayer.overflowed`, :class:`megatron_grace.layer.decode_graph.DecodeGraph`).
With ``W == 1`` no collective runs, so the whole step also compiles with
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_grace import _ops
from megatron_grace.dispatch.all_to_all import GroupSpec
from megatron_grace.dispatch.pairs import RoutedPairs
from megatron_grace.errors import GraceInputError


@dataclass(frozen=True)
class DecodeOptions:
    """Static (decode) path of the GRACE layer.

    Attributes:
        max_tokens: batches of at most this many tokens per rank take the static path.
        capacity_factor: rows reserved per destination GPU, as a multiple of the even share
            ``T * k / W`` (rounded up to a multiple of 8, at most ``T * k``). 2.0 by default:
            a destination receiving more than twice its share overflows.
    """

    max_tokens: int = 256
    capacity_factor: float = 2.0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise GraceInputError(f"decode max_tokens must be >= 1, got {self.max_tokens}")
        if not (self.capacity_factor > 0 and math.isfinite(self.capacity_factor)):
            raise GraceInputError(f"decode capacity_factor must be a positive number, got {self.capacity_factor}")

    def capacity(self, tokens: int, top_k: int, world: int) -> int:
        """Rows per destination GPU for a batch of ``tokens`` x ``top_k`` on ``world`` ranks."""
        pairs = tokens * top_k
        cap = int(math.ceil(self.capacity_factor * pairs / max(world, 1) / 8.0)) * 8
        return max(1, min(pairs, cap))


@dataclass
class StaticHandle:
    """What :meth:`StaticDispatcher.combine` needs."""

    pairs: RoutedPairs
    value_index: torch.Tensor  # int64 [T*k]: row of the returned buffer holding each pair's result, -1 = none
    recv_order: torch.Tensor  # int64 [W*C]: received row of each slot-sorted row
    overflow: torch.Tensor  # int64 [1]: valid pairs left out by the capacity, summed over the group's ranks
    out_dtype: torch.dtype


def all_to_all_equal(x: torch.Tensor, spec: GroupSpec) -> torch.Tensor:
    """Equal-split ``all_to_all_single`` of ``x [W * C, ...]`` (chunk ``i`` to group rank ``i``); identity for one rank."""
    if spec.size == 1:
        return x
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x.contiguous(), group=spec.group)
    return out


class StaticDispatcher:
    """Flat dispatch with a fixed capacity per destination (see the module docstring).

    Args:
        spec: the expert-parallel group (group rank = GPU index of the plan).
        max_slots: largest slot count of any GPU at this layer.
        local_slots: slots on this rank.
    """

    mode = "flat-static"

    def __init__(self, spec: GroupSpec, max_slots: int, local_slots: int) -> None:
        self.spec, self.max_slots, self.local_slots = spec, max_slots, local_slots

    def dispatch(self, hidden: torch.Tensor, pairs: RoutedPairs, capacity: int) -> tuple[torch.Tensor, torch.Tensor, StaticHandle]:
        """Send up to ``capacity`` rows to every GPU.

        Args:
            hidden: ``[T, h]``.
            pairs: this rank's dense pairs.
            capacity: C, rows per destination.

        Returns:
            ``(expert input [W * C, h]`` grouped by local slot, padding rows last, ``slot_counts``
            int64 ``[S]`` (device), handle).
        """
        W, S_max, S = self.spec.size, self.max_slots, self.local_slots
        n, dev = pairs.size, hidden.device
        C = capacity
        sentinel = W * S_max
        key = torch.where(pairs.valid, pairs.gpu * S_max + pairs.slot, torch.full_like(pairs.gpu, sentinel))
        order, counts = _ops.sort_by_key(key, sentinel + 1)
        per_dest = counts[:sentinel].view(W, S_max).sum(1)  # [W]
        dest_start = torch.cumsum(per_dest, 0) - per_dest
        q = torch.arange(C, device=dev)
        filled = q[None, :] < per_dest[:, None]  # [W, C]
        sorted_pos = (dest_start[:, None] + q[None, :]).clamp(max=max(n - 1, 0))  # [W, C] into the sorted pairs
        item = order.index_select(0, sorted_pos.reshape(-1)) if n else torch.zeros(W * C, dtype=torch.int64, device=dev)
        send_rows = _ops.gather_rows(hidden, item // max(pairs.top_k, 1)) if n else hidden.new_zeros((W * C, hidden.shape[1]))
        send_slot = torch.where(filled.reshape(-1), pairs.slot.index_select(0, item) if n else item, torch.full_like(item, -1))
        # where each pair's result will come back: row dest * C + q, if q < C
        position = torch.empty_like(order)
        position.scatter_(0, order, torch.arange(n, device=dev))
        safe_dest = pairs.gpu.clamp(min=0)
        q_pair = position - dest_start.index_select(0, safe_dest)
        fits = pairs.valid & (q_pair < C)
        value_index = torch.where(fits, safe_dest * C + q_pair, torch.full_like(q_pair, -1))
        overflow = (pairs.valid & ~fits).sum().reshape(1)
        if W > 1:  # every rank must agree on re-running the step (it is collective)
            dist.all_reduce(overflow, group=self.spec.group)
        # exchange rows and their slots (equal splits: static shapes)
        recv_rows = all_to_all_equal(send_rows, self.spec)
        recv_slot = all_to_all_equal(send_slot, self.spec)
        slot_key = torch.where(recv_slot >= 0, recv_slot, torch.full_like(recv_slot, S)).clamp(max=S)
        recv_order, slot_counts = _ops.sort_by_key(slot_key, S + 1)
        rows = _ops.gather_rows(recv_rows, recv_order)
        handle = StaticHandle(pairs=pairs, value_index=value_index, recv_order=recv_order, overflow=overflow, out_dtype=hidden.dtype)
        return rows, slot_counts[:S], handle

    def combine(self, expert_out: torch.Tensor, handle: StaticHandle) -> torch.Tensor:
        """Results back to their senders and the weighted top-k sum per token.

        Args:
            expert_out: ``[W * C, h]`` in the order of :meth:`dispatch`'s output.

        Returns:
            ``[T, h]`` in the hidden dtype (overflowed pairs missing: check ``handle.overflow``).
        """
        p = handle.pairs
        back = all_to_all_equal(_ops.scatter_rows(expert_out, handle.recv_order), self.spec)  # [W*C, h] in send order
        return _ops.weighted_combine(back, p.token, p.choice, p.weight, p.num_tokens, p.top_k, handle.out_dtype, handle.value_index)
