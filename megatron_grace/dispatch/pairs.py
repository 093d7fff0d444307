"""`RoutedPairs`: a rank's valid (token, expert) pairs after replica choice, in token-major order."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RoutedPairs:
    """The pairs one rank sends to experts in a forward pass (dropped pairs removed).

    Pairs are ordered token-major (pair ``t * k + j`` of the router output, ascending), so the
    pairs of one token are contiguous and in top-k order.

    Attributes:
        num_tokens: T, tokens on this rank.
        top_k: k, router choices per token.
        token: int64 ``[n]`` token of each pair.
        choice: int64 ``[n]`` top-k position ``j`` of each pair.
        gpu: int64 ``[n]`` destination GPU (rank in the expert-parallel group).
        slot: int64 ``[n]`` slot on that GPU.
        weight: float ``[n]`` gate weight.
    """

    num_tokens: int
    top_k: int
    token: torch.Tensor
    choice: torch.Tensor
    gpu: torch.Tensor
    slot: torch.Tensor
    weight: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.token.numel())

    @staticmethod
    def from_router(gpu: torch.Tensor, slot: torch.Tensor, topk_weights: torch.Tensor) -> RoutedPairs:
        """From per-choice destinations.

        Args:
            gpu: int64 ``[T, k]`` destination GPU, -1 = dropped.
            slot: int64 ``[T, k]`` destination slot.
            topk_weights: float ``[T, k]`` gate weights.
        """
        T, k = gpu.shape
        index = torch.nonzero(gpu.reshape(-1) >= 0).squeeze(1)
        return RoutedPairs(num_tokens=T, top_k=k, token=torch.div(index, max(k, 1), rounding_mode="floor"),
                           choice=torch.remainder(index, max(k, 1)), gpu=gpu.reshape(-1).index_select(0, index),
                           slot=slot.reshape(-1).index_select(0, index), weight=topk_weights.reshape(-1).index_select(0, index))
