"""A single-process dense MoE with the same weights as the GRACE layer, for tests and checks.

It loops over experts (no dispatch, no replicas): ``out[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t])``.
Also :func:`random_expert_weights`, a deterministic weight source any rank can evaluate lazily.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_grace.errors import GraceInputError
from megatron_grace.experts.mlp import ExpertState, WeightSource, expert_weight_shapes, fetch_expert


def random_expert_weights(num_experts: int, hidden_size: int, ffn_size: int, activation: str = "swiglu", seed: int = 0,
                          dtype: torch.dtype = torch.float32, bias: bool = False):
    """A callable ``expert -> {name: tensor}`` with reproducible random weights (std ``1/sqrt(fan_in)``; biases std 0.1
    with ``bias=True``).

    Expert ``e``'s weights depend only on ``(seed, e)``, so every rank can build any expert
    without holding the full state.
    """
    shapes = expert_weight_shapes(activation, hidden_size, ffn_size, bias)

    def weights(expert: int) -> dict[str, torch.Tensor]:
        if not 0 <= int(expert) < num_experts:
            raise KeyError(expert)
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(expert))
        return {name: (torch.randn(shape, generator=gen, dtype=torch.float64) * (0.1 if len(shape) == 1 else shape[0] ** -0.5)).to(dtype)
                for name, shape in shapes.items()}

    return weights


class DenseReferenceMoE:
    """Dense MoE on one process, one loop iteration per expert.

    Args:
        weights: ``expert -> {name: tensor}`` (mapping or callable), as for the GRACE layer.
        num_experts: E.
        hidden_size, ffn_size, activation: expert shape (``swiglu`` or ``gelu``).
        dtype: compute dtype (float64 by default: a gold standard for float32 checks).
        bias: the experts' projections add biases (``{name}_bias`` entries of the weights).
    """

    def __init__(self, weights: WeightSource, num_experts: int, hidden_size: int, ffn_size: int, activation: str = "swiglu",
                 dtype: torch.dtype = torch.float64, bias: bool = False) -> None:
        self.shapes = expert_weight_shapes(activation, hidden_size, ffn_size, bias)
        self.num_experts, self.activation, self.dtype = num_experts, activation, dtype
        self.experts: list[dict[str, torch.Tensor]] = []
        for e in range(num_experts):
            state: ExpertState = fetch_expert(weights, e)
            self.experts.append({name: state[name].detach().to("cpu", dtype) for name in self.shapes})

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` applied to ``x [n, h]``."""
        w = self.experts[e]

        def linear(inp: torch.Tensor, name: str) -> torch.Tensor:
            y = inp @ w[name]
            return y + w[f"{name}_bias"] if f"{name}_bias" in w else y

        if self.activation == "swiglu":
            return linear(F.silu(linear(x, "gate")) * linear(x, "up"), "down")
        return linear(F.gelu(linear(x, "fc1")), "fc2")

    def __call__(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """Dense MoE output.

        Args:
            hidden: ``[T, h]``.
            topk_ids: int ``[T, k]``, -1 = dropped.
            topk_weights: float ``[T, k]``.

        Returns:
            ``[T, h]`` in the reference dtype, on CPU.
        """
        x = hidden.detach().to("cpu", self.dtype)
        ids = topk_ids.detach().cpu().long()
        w = topk_weights.detach().to("cpu", self.dtype)
        if ids.shape != w.shape or ids.dim() != 2 or ids.shape[0] != x.shape[0]:
            raise GraceInputError(f"reference MoE needs hidden [T, h], topk_ids and topk_weights [T, k]; got {tuple(x.shape)}, "
                                  f"{tuple(ids.shape)}, {tuple(w.shape)}")
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            tok, j = torch.nonzero(ids == e, as_tuple=True)
            if tok.numel():
                out.index_add_(0, tok, w[tok, j, None] * self.expert(e, x[tok]))
        return out
