"""`RoutedPairs`: a rank's (token, expert copy) pairs after replica choice, dense and token-major.

The pairs keep the router's static layout ``[T * k]`` (pair ``p = t * k + j``): a dropped pair
(router id -1) stays in place with ``gpu = slot = -1`` instead of being removed, so building the
pairs never needs ``nonzero`` (a host synchronisation on a GPU) and every shape is known from
``T`` and ``k`` alone. Dispatchers send only pairs with ``gpu >= 0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RoutedPairs:
    """The pairs one rank sends to experts in a forward pass.

    Attributes:
        num_tokens: T, tokens on this rank.
        top_k: k, router choices per token.
        gpu: int64 ``[T * k]`` destination GPU (rank in the expert-parallel group); -1 = dropped.
        slot: int64 ``[T * k]`` slot on that GPU; -1 = dropped.
        weight: float ``[T * k]`` gate weight (meaningless where dropped).
    """

    num_tokens: int
    top_k: int
    gpu: torch.Tensor
    slot: torch.Tensor
    weight: torch.Tensor

    @property
    def size(self) -> int:
        """T * k (dropped pairs included)."""
        return int(self.gpu.numel())

    @property
    def valid(self) -> torch.Tensor:
        """bool ``[T * k]``: the pair is sent (not dropped)."""
        return self.gpu >= 0

    @property
    def token(self) -> torch.Tensor:
        """int64 ``[T * k]``: token of each pair (``p // k``)."""
        return torch.arange(self.size, device=self.gpu.device) // max(self.top_k, 1)

    @property
    def choice(self) -> torch.Tensor:
        """int64 ``[T * k]``: top-k position of each pair (``p % k``)."""
        return torch.arange(self.size, device=self.gpu.device) % max(self.top_k, 1)

    @staticmethod
    def from_router(gpu: torch.Tensor, slot: torch.Tensor, topk_weights: torch.Tensor) -> RoutedPairs:
        """From per-choice destinations.

        Args:
            gpu: int64 ``[T, k]`` destination GPU, -1 = dropped.
            slot: int64 ``[T, k]`` destination slot, -1 = dropped.
            topk_weights: float ``[T, k]`` gate weights.
        """
        T, k = gpu.shape
        return RoutedPairs(num_tokens=T, top_k=k, gpu=gpu.reshape(-1), slot=slot.reshape(-1), weight=topk_weights.reshape(-1))
