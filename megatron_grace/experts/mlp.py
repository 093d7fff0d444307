"""`SlotExperts`: the expert MLPs hosted by one rank, one per slot, stacked.

One rank hosts ``S`` slots of a MoE layer (its share of the experts plus any copies), each
holding the weights of one logical expert. Weights are stacked per slot:

- ``swiglu``: ``w_gate [S, h, f]``, ``w_up [S, h, f]``, ``w_down [S, f, h]``;
  ``y = (silu(x @ w_gate) * (x @ w_up)) @ w_down``;
- ``gelu``: ``w_fc1 [S, h, f]``, ``w_fc2 [S, f, h]``; ``y = gelu(x @ w_fc1) @ w_fc2`` (exact erf GELU).

One expert's weights, as passed to :meth:`SlotExperts.from_full_weights` or returned by
:meth:`SlotExperts.expert_state`, are a dict with the same names without the slot axis:
``{"gate": [h, f], "up": [h, f], "down": [f, h]}`` (swiglu) or ``{"fc1": [h, f], "fc2": [f, h]}`` (gelu).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from megatron_grace.errors import GraceInputError

ACTIVATIONS = ("swiglu", "gelu")

ExpertState = Mapping[str, torch.Tensor]
WeightSource = Union[Mapping[int, ExpertState], Callable[[int], ExpertState]]


def expert_weight_shapes(activation: str, hidden_size: int, ffn_size: int) -> dict[str, tuple[int, int]]:
    """Name -> shape of one expert's weight matrices."""
    h, f = hidden_size, ffn_size
    if activation == "swiglu":
        return {"gate": (h, f), "up": (h, f), "down": (f, h)}
    if activation == "gelu":
        return {"fc1": (h, f), "fc2": (f, h)}
    raise GraceInputError(f"unknown expert activation {activation!r}; known: {', '.join(ACTIVATIONS)}")


def fetch_expert(weights: WeightSource, expert: int) -> ExpertState:
    """One expert's weights from a mapping or a callable; a missing expert raises GraceInputError."""
    try:
        state = weights(expert) if callable(weights) else weights[expert]
    except KeyError:
        raise GraceInputError(f"no weights given for expert {expert}") from None
    if not isinstance(state, Mapping):
        raise GraceInputError(f"weights of expert {expert} must be a dict of tensors, got {type(state).__name__}")
    return state


class SlotExperts(nn.Module):
    """The expert MLPs of one rank's slots (inference: parameters do not require grad).

    Args:
        expert_ids: logical expert held by each slot, ``S`` ints (the plan's list for this rank).
        hidden_size: h.
        ffn_size: f (expert MLP inner width).
        activation: ``swiglu`` or ``gelu``.
        dtype, device: of the weights (zeros until loaded).
    """

    def __init__(self, expert_ids: Sequence[int], hidden_size: int, ffn_size: int, activation: str = "swiglu",
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        if hidden_size < 1 or ffn_size < 1:
            raise GraceInputError(f"hidden_size and ffn_size must be >= 1, got {hidden_size} and {ffn_size}")
        self.shapes = expert_weight_shapes(activation, hidden_size, ffn_size)
        self.expert_ids = tuple(int(e) for e in expert_ids)
        self.hidden_size, self.ffn_size, self.activation = hidden_size, ffn_size, activation
        S = len(self.expert_ids)
        for name, shape in self.shapes.items():
            self.register_parameter(f"w_{name}", nn.Parameter(torch.zeros((S,) + shape, dtype=dtype, device=device), requires_grad=False))

    # ------------------------------------------------------------------ properties
    @property
    def num_slots(self) -> int:
        return len(self.expert_ids)

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.parameters())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.parameters())).device

    @property
    def floats_per_expert(self) -> int:
        """Number of weight values of one expert (all matrices)."""
        return sum(a * b for a, b in self.shapes.values())

    # ------------------------------------------------------------------ weights
    def check_expert_state(self, state: ExpertState, expert: int) -> None:
        """Raise GraceInputError unless ``state`` has exactly this layer's weight names and shapes."""
        names = set(state)
        if names != set(self.shapes):
            raise GraceInputError(f"weights of expert {expert} have names {sorted(names)}, a {self.activation} expert needs {sorted(self.shapes)}")
        for name, shape in self.shapes.items():
            t = state[name]
            if not isinstance(t, torch.Tensor):
                raise GraceInputError(f"weight {name!r} of expert {expert} is a {type(t).__name__}, not a tensor")
            if tuple(t.shape) != shape:
                raise GraceInputError(f"weight {name!r} of expert {expert} has shape {tuple(t.shape)}, expected {shape} "
                                      f"(hidden {self.hidden_size}, ffn {self.ffn_size})")
            if not t.is_floating_point():
                raise GraceInputError(f"weight {name!r} of expert {expert} has dtype {t.dtype}, expected a floating type")

    @torch.no_grad()
    def load_slot(self, slot: int, state: ExpertState) -> None:
        """Copy one expert's weights (dict, see the module docstring) into ``slot``."""
        self.check_expert_state(state, self.expert_ids[slot])
        for name in self.shapes:
            getattr(self, f"w_{name}")[slot].copy_(state[name])

    def expert_state(self, slot: int) -> dict[str, torch.Tensor]:
        """The weights held in ``slot`` (views)."""
        return {name: getattr(self, f"w_{name}")[slot] for name in self.shapes}

    def flat_slot(self, slot: int) -> torch.Tensor:
        """``[floats_per_expert]``: the slot's matrices flattened and concatenated (wire format)."""
        return torch.cat([getattr(self, f"w_{name}")[slot].reshape(-1) for name in self.shapes])

    @torch.no_grad()
    def load_flat_slot(self, slot: int, flat: torch.Tensor) -> None:
        """Inverse of :meth:`flat_slot`."""
        offset = 0
        for name, (a, b) in self.shapes.items():
            getattr(self, f"w_{name}")[slot].copy_(flat[offset: offset + a * b].view(a, b))
            offset += a * b

    @staticmethod
    def from_full_weights(expert_ids: Sequence[int], weights: WeightSource, hidden_size: int, ffn_size: int,
                          activation: str = "swiglu", dtype: torch.dtype = torch.float32,
                          device: torch.device | str | None = None) -> SlotExperts:
        """Experts for the given slots, each loaded from the full dense state.

        Args:
            expert_ids: logical expert of each slot.
            weights: ``expert id -> {name: tensor}`` as a mapping or a callable (called only for
                the experts in ``expert_ids``).
        """
        experts = SlotExperts(expert_ids, hidden_size, ffn_size, activation, dtype, device)
        for slot, e in enumerate(experts.expert_ids):
            experts.load_slot(slot, fetch_expert(weights, e))
        return experts

    # ------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor, slot_counts: Sequence[int]) -> torch.Tensor:
        """Run every slot's MLP on its rows.

        Args:
            x: ``[n, h]`` rows grouped by slot (``slot_counts[0]`` rows of slot 0, then slot 1, ...).
            slot_counts: S ints summing to n.

        Returns:
            ``[n, h]`` expert outputs in the same order, dtype of ``x``.
        """
        if len(slot_counts) != self.num_slots or sum(slot_counts) != x.shape[0]:
            raise GraceInputError(f"slot_counts must be {self.num_slots} ints summing to {x.shape[0]} rows")
        out = torch.empty_like(x)
        start = 0
        for s, n in enumerate(slot_counts):  # one matmul chain per slot with rows (S is small)
            if n:
                out[start: start + n] = self._mlp(x[start: start + n], s)
            start += n
        return out

    def _mlp(self, x: torch.Tensor, s: int) -> torch.Tensor:
        if self.activation == "swiglu":
            return (F.silu(x @ self.w_gate[s]) * (x @ self.w_up[s])) @ self.w_down[s]
        return F.gelu(x @ self.w_fc1[s]) @ self.w_fc2[s]

    def extra_repr(self) -> str:
        return f"slots={self.num_slots}, experts={list(self.expert_ids)}, hidden={self.hidden_size}, ffn={self.ffn_size}, {self.activation}"
