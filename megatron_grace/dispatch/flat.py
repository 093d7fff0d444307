"""Flat expert-parallel dispatch: every pair goes straight to the GPU of its chosen copy.

One all-to-all of ``[G, S_max]`` counts, one uneven all-to-all of hidden rows (one row per
pair), the experts, one uneven all-to-all back, and a weighted sum per token at the source.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_grace.dispatch.all_to_all import GroupSpec, SlotExchange, SlotHandle, TrafficLog, mark_phase
from megatron_grace.dispatch.pairs import RoutedPairs
from megatron_grace import _ops


@dataclass
class FlatHandle:
    pairs: RoutedPairs
    slot_handle: SlotHandle
    out_dtype: torch.dtype


class FlatDispatcher:
    """Dispatch pairs directly to their GPU inside the expert-parallel group.

    Args:
        spec: the expert-parallel group (group rank = GPU index of the plan).
        max_slots: largest slot count of any GPU at this layer.
        local_slots: slots on this rank.
    """

    mode = "flat"

    def __init__(self, spec: GroupSpec, max_slots: int, local_slots: int) -> None:
        self.exchange = SlotExchange(spec, max_slots, local_slots)

    def dispatch(self, hidden: torch.Tensor, pairs: RoutedPairs, log: TrafficLog | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, list[int], FlatHandle]:
        """Send one hidden row per valid pair.

        Args:
            hidden: ``[T, h]``.
            pairs: this rank's pairs (dense ``[T * k]``, dropped pairs not sent).

        Returns:
            ``(expert input [m, h]`` grouped by local slot, ``slot_counts`` int64 ``[S]`` on the device,
            the same as host ints, handle).
        """
        rows, counts, host_counts, handle = self.exchange.send(hidden, pairs.gpu, pairs.slot, pairs.top_k, log)
        return rows, counts, host_counts, FlatHandle(pairs, handle, hidden.dtype)

    def combine(self, expert_out: torch.Tensor, handle: FlatHandle, log: TrafficLog | None = None) -> torch.Tensor:
        """Return results and sum them per token with the gate weights (top-k order, float32 accumulation),
        the un-permutation fused into the weighted sum.

        Args:
            expert_out: ``[m, h]`` in the order of :meth:`dispatch`'s output.

        Returns:
            ``[T, h]`` in the hidden dtype.
        """
        p = handle.pairs
        y = self.exchange.send_back(expert_out, handle.slot_handle, log)  # [n_sent, h] in send-buffer order
        value_index = torch.where(p.valid, handle.slot_handle.position, torch.full_like(p.gpu, -1))
        out = _ops.weighted_combine(y, p.token, p.choice, p.weight, p.num_tokens, p.top_k, handle.out_dtype, value_index)
        mark_phase(log, "combine")
        return out
