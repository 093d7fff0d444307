"""`SlotExperts`: the expert MLPs hosted by one rank, one per slot, stacked.

One rank hosts ``S`` slots of a MoE layer (its share of the experts plus any copies), each
holding the weights of one logical expert. Weights are stacked per slot in the ``[out, in]``
layout of ``nn.Linear`` (and of Megatron-Core's grouped experts), gate and up fused:

- ``swiglu``: ``w_gate_up [S, 2f, h]`` (rows ``[0, f)`` gate, ``[f, 2f)`` up), ``w_down [S, h, f]``;
  ``y = silu(x W_gate^T) * (x W_up^T)) W_down^T``;
- ``gelu``: ``w_fc1 [S, f, h]``, ``w_fc2 [S, h, f]``; ``y = gelu(x W_fc1^T) W_fc2^T`` (exact erf GELU).

With ``bias=True`` every projection also adds a bias, stacked per slot like the weights:
``b_gate_up [S, 2f]`` and ``b_down [S, h]`` (swiglu), ``b_fc1 [S, f]`` and ``b_fc2 [S, h]`` (gelu)
(DeepSpeed's experts are ``nn.Linear`` with a bias by default).

Compute (:meth:`SlotExperts.forward`) is one grouped GEMM per projection over all local slots:
``torch._grouped_mm`` with the slot offsets on the device where torch supports it for the
dtype (bf16 on CPU and Hopper GPUs, fp16/fp32 in eager mode), else a padded batched matmul
``[S, rows_max, h]`` (no Python loop over slots in either).

One expert's weights, as passed to :meth:`SlotExperts.from_full_weights` or returned by
:meth:`SlotExperts.expert_state`, are a dict with the same names without the slot axis:
``{"gate": [h, f], "up": [h, f], "down": [f, h]}`` (swiglu) or ``{"fc1": [h, f], "fc2": [f, h]}`` (gelu),
plus, with biases, ``{name}_bias`` vectors: ``gate_bias [f]``, ``up_bias [f]``, ``down_bias [h]``
(swiglu) or ``fc1_bias [f]``, ``fc2_bias [h]`` (gelu).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import math
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from megatron_grace._debug import debug_enabled
from megatron_grace.errors import GraceInputError

ACTIVATIONS = ("swiglu", "gelu")

ExpertState = Mapping[str, torch.Tensor]
WeightSource = Union[Mapping[int, ExpertState], Callable[[int], ExpertState]]


def expert_weight_shapes(activation: str, hidden_size: int, ffn_size: int, bias: bool = False) -> dict[str, tuple[int, ...]]:
    """Name -> shape of one expert's weights: the ``[in, out]`` matrices, then (``bias``) the ``[out]`` biases."""
    h, f = hidden_size, ffn_size
    if activation == "swiglu":
        shapes: dict[str, tuple[int, ...]] = {"gate": (h, f), "up": (h, f), "down": (f, h)}
    elif activation == "gelu":
        shapes = {"fc1": (h, f), "fc2": (f, h)}
    else:
        raise GraceInputError(f"unknown expert activation {activation!r}; known: {', '.join(ACTIVATIONS)}")
    if bias:
        shapes.update({f"{name}_bias": (shape[1],) for name, shape in list(shapes.items())})
    return shapes


def fetch_expert(weights: WeightSource, expert: int) -> ExpertState:
    """One expert's weights from a mapping or a callable; a missing expert raises GraceInputError."""
    try:
        state = weights(expert) if callable(weights) else weights[expert]
    except KeyError:
        raise GraceInputError(f"no weights given for expert {expert}") from None
    if not isinstance(state, Mapping):
        raise GraceInputError(f"weights of expert {expert} must be a dict of tensors, got {type(state).__name__}")
    return state


def check_expert_state(state: ExpertState, expert: int, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise GraceInputError unless ``state`` has exactly the names and shapes of ``shapes``, in floating point."""
    if set(state) != set(shapes):
        raise GraceInputError(f"weights of expert {expert} have names {sorted(state)}, expected {sorted(shapes)}")
    for name, shape in shapes.items():
        t = state[name]
        if not isinstance(t, torch.Tensor):
            raise GraceInputError(f"weight {name!r} of expert {expert} is a {type(t).__name__}, not a tensor")
        if tuple(t.shape) != tuple(shape):
            raise GraceInputError(f"weight {name!r} of expert {expert} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if not t.is_floating_point():
            raise GraceInputError(f"weight {name!r} of expert {expert} has dtype {t.dtype}, expected a floating type")


def unpack_expert(flat: torch.Tensor, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """``[floats_per_expert]`` wire row (weights flattened and concatenated in ``shapes`` order) -> ``{name: view}``."""
    out, offset = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        out[name] = flat[offset: offset + n].view(shape)
        offset += n
    return out


def grouped_mm_supported(dtype: torch.dtype, device: torch.device, compiling: bool = False) -> bool:
    """Whether ``torch._grouped_mm`` runs for ``dtype`` on ``device`` (probed once per combination).

    Under ``torch.compile`` torch's meta kernel accepts bf16 only, so ``compiling`` narrows it to bf16.
    """
    if compiling and dtype != torch.bfloat16:
        return False
    key = (dtype, device.type, device.index if device.type == "cuda" else None)
    if key not in _GROUPED_MM_OK:
        ok = hasattr(torch, "_grouped_mm")
        if ok:
            try:
                a = torch.zeros(8, 16, dtype=dtype, device=device)
                b = torch.zeros(2, 16, 16, dtype=dtype, device=device)
                torch._grouped_mm(a, b.transpose(-2, -1), offs=torch.tensor([4, 8], dtype=torch.int32, device=device))
            except (RuntimeError, NotImplementedError, TypeError):
                ok = False
        _GROUPED_MM_OK[key] = ok
    return _GROUPED_MM_OK[key]


_GROUPED_MM_OK: dict[tuple, bool] = {}


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, padded: PaddedRows | None) -> torch.Tensor:
    """``out[rows of slot s] = x[rows of slot s] @ weight[s]^T`` for rows grouped by slot.

    Args:
        x: ``[n, in]`` rows grouped by slot (slot 0's rows first).
        weight: ``[S, out, in]``.
        offsets: int32 ``[S]`` end row of each slot (cumulative counts) on ``x``'s device.
        padded: the layout of the padded fallback, or None to use ``torch._grouped_mm``.

    Returns:
        ``[n, out]``; rows past ``offsets[-1]`` are unspecified (never read by the layer).
    """
    if padded is None:
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    S, width = weight.shape[0], padded.width
    buf = x.new_zeros((S * width + 1, x.shape[1]))  # the last row takes the padding rows of x
    buf.index_copy_(0, padded.dest, x)
    y = torch.bmm(buf[: S * width].view(S, width, -1), weight.transpose(-2, -1)).view(S * width, -1)
    return torch.cat([y, y.new_zeros((1, y.shape[1]))]).index_select(0, padded.dest)


def row_slots(ends: torch.Tensor, rows: int) -> torch.Tensor:
    """int64 ``[rows]``: the slot of each row grouped by slot, from the slots' end rows ``ends [S]``
    (cumulative counts, device); padding rows past the last slot get ``S``. Device ops only."""
    return torch.searchsorted(ends, torch.arange(rows, device=ends.device), right=True)


@dataclass(frozen=True)
class PaddedRows:
    """Where each grouped row sits in a ``[S, width]`` padded batch (the fallback of :func:`grouped_linear`).

    Attributes:
        dest: int64 ``[n]``: padded position ``slot * width + rank in slot`` of each row; rows past
            the last slot (padding) map to ``S * width``, a spare row.
        width: rows per slot in the padded batch (>= the largest slot count).
        slot: int64 ``[n]``: slot of each row (padding rows: the last slot).
    """

    dest: torch.Tensor
    width: int
    slot: torch.Tensor

    @staticmethod
    def from_counts(counts: torch.Tensor, ends: torch.Tensor, rows: int, width: int) -> PaddedRows:
        """Layout for ``rows`` rows grouped by slot with per-slot ``counts [S]`` and their cumulative sums
        ``ends [S]`` (device; the rest is padding); ``width`` >= the largest count (a host bound). Device ops only."""
        width = max(width, 1)
        S = counts.shape[0]
        p = torch.arange(rows, device=counts.device)
        slot = row_slots(ends, rows)
        real = slot < S
        slot = slot.clamp(max=S - 1)
        dest = slot * width + p - (ends - counts).index_select(0, slot)
        return PaddedRows(dest=torch.where(real, dest, torch.full_like(dest, S * width)), width=width, slot=slot)


class SlotExperts(nn.Module):
    """The expert MLPs of one rank's slots (inference: parameters do not require grad).

    Args:
        expert_ids: logical expert held by each slot, ``S`` ints (the plan's list for this rank).
        hidden_size: h.
        ffn_size: f (expert MLP inner width).
        activation: ``swiglu`` or ``gelu``.
        dtype, device: of the weights (zeros until loaded).
        bias: every projection adds a per-slot bias (``b_first [S, 2f | f]``, ``b_second [S, h]``).
    """

    def __init__(self, expert_ids: Sequence[int], hidden_size: int, ffn_size: int, activation: str = "swiglu",
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None, bias: bool = False) -> None:
        super().__init__()
        if hidden_size < 1 or ffn_size < 1:
            raise GraceInputError(f"hidden_size and ffn_size must be >= 1, got {hidden_size} and {ffn_size}")
        self.shapes = expert_weight_shapes(activation, hidden_size, ffn_size, bias)
        self.expert_ids = tuple(int(e) for e in expert_ids)
        self.hidden_size, self.ffn_size, self.activation, self.bias = hidden_size, ffn_size, activation, bool(bias)
        S, h, f = len(self.expert_ids), hidden_size, ffn_size
        first = (2 * f, h) if activation == "swiglu" else (f, h)
        suffix = ("gate_up", "down") if activation == "swiglu" else ("fc1", "fc2")
        self.first_name, self.second_name = (f"w_{x}" for x in suffix)

        def zeros(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.zeros(shape, dtype=dtype, device=device), requires_grad=False)

        self.register_parameter(self.first_name, zeros(S, *first))
        self.register_parameter(self.second_name, zeros(S, h, f))
        self._bias_names = (f"b_{suffix[0]}", f"b_{suffix[1]}")  # b_gate_up / b_down (b_fc1 / b_fc2)
        if self.bias:
            self.register_parameter(self._bias_names[0], zeros(S, first[0]))
            self.register_parameter(self._bias_names[1], zeros(S, h))

    # ------------------------------------------------------------------ properties
    @property
    def num_slots(self) -> int:
        return len(self.expert_ids)

    @property
    def w_first(self) -> torch.Tensor:
        """``[S, 2f, h]`` (swiglu, gate then up) or ``[S, f, h]`` (gelu)."""
        return getattr(self, self.first_name)

    @property
    def w_second(self) -> torch.Tensor:
        """``[S, h, f]``."""
        return getattr(self, self.second_name)

    @property
    def b_first(self) -> torch.Tensor | None:
        """``[S, 2f]`` (swiglu, gate then up) or ``[S, f]`` (gelu); None without biases."""
        return getattr(self, self._bias_names[0]) if self.bias else None

    @property
    def b_second(self) -> torch.Tensor | None:
        """``[S, h]``; None without biases."""
        return getattr(self, self._bias_names[1]) if self.bias else None

    @property
    def dtype(self) -> torch.dtype:
        return self.w_first.dtype

    @property
    def device(self) -> torch.device:
        return self.w_first.device

    @property
    def floats_per_expert(self) -> int:
        """Number of weight values of one expert (all matrices and biases)."""
        return sum(math.prod(shape) for shape in self.shapes.values())

    # ------------------------------------------------------------------ weights
    def check_expert_state(self, state: ExpertState, expert: int) -> None:
        """Raise GraceInputError unless ``state`` has exactly this layer's weight names and shapes."""
        check_expert_state(state, expert, self.shapes)

    @torch.no_grad()
    def load_slot(self, slot: int, state: ExpertState) -> None:
        """Copy one expert's weights (dict, see the module docstring) into ``slot``."""
        self.check_expert_state(state, self.expert_ids[slot])
        for name, view in self.expert_state(slot).items():
            view.copy_(state[name])

    def expert_state(self, slot: int) -> dict[str, torch.Tensor]:
        """The weights held in ``slot`` in the dict layout of the module docstring (views: writing them writes the slot)."""
        f = self.ffn_size
        if self.activation == "swiglu":
            out = {"gate": self.w_first[slot, :f].t(), "up": self.w_first[slot, f:].t(), "down": self.w_second[slot].t()}
        else:
            out = {"fc1": self.w_first[slot].t(), "fc2": self.w_second[slot].t()}
        if self.b_first is not None and self.b_second is not None:  # i.e. self.bias (typed for the checker)
            if self.activation == "swiglu":
                out.update(gate_bias=self.b_first[slot, :f], up_bias=self.b_first[slot, f:], down_bias=self.b_second[slot])
            else:
                out.update(fc1_bias=self.b_first[slot], fc2_bias=self.b_second[slot])
        return out

    def flat_slot(self, slot: int) -> torch.Tensor:
        """``[floats_per_expert]``: the slot's matrices in the dict layout, flattened and concatenated (wire format)."""
        state = self.expert_state(slot)
        return torch.cat([state[name].reshape(-1) for name in self.shapes])

    @torch.no_grad()
    def load_flat_slot(self, slot: int, flat: torch.Tensor) -> None:
        """Inverse of :meth:`flat_slot`."""
        self.load_slot(slot, unpack_expert(flat, self.shapes))

    @staticmethod
    def from_full_weights(expert_ids: Sequence[int], weights: WeightSource, hidden_size: int, ffn_size: int,
                          activation: str = "swiglu", dtype: torch.dtype = torch.float32,
                          device: torch.device | str | None = None, bias: bool = False) -> SlotExperts:
        """Experts for the given slots, each loaded from the full dense state.

        Args:
            expert_ids: logical expert of each slot.
            weights: ``expert id -> {name: tensor}`` as a mapping or a callable (called only for
                the experts in ``expert_ids``).
        """
        experts = SlotExperts(expert_ids, hidden_size, ffn_size, activation, dtype, device, bias)
        for slot, e in enumerate(experts.expert_ids):
            experts.load_slot(slot, fetch_expert(weights, e))
        return experts

    # ------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor, slot_counts: torch.Tensor | Sequence[int], max_rows_per_slot: int | None = None) -> torch.Tensor:
        """Run every slot's MLP on its rows: two grouped GEMMs (gate/up fused, then down), no loop over slots.

        Args:
            x: ``[n, h]`` rows grouped by slot (``slot_counts[0]`` rows of slot 0, then slot 1, ...);
                rows past ``slot_counts.sum()`` (padding) are allowed and give unspecified output.
            slot_counts: int ``[S]`` rows per slot, on ``x``'s device (or host ints).
            max_rows_per_slot: a host bound on the largest slot count, used only by the padded
                fallback (default: ``n``, always safe).

        Returns:
            ``[n, h]`` expert outputs in the same order, dtype of ``x``.
        """
        if not isinstance(slot_counts, torch.Tensor):  # host ints (tests, tools): no device read involved
            slot_counts = torch.as_tensor(list(slot_counts), dtype=torch.int64, device=x.device)
        if slot_counts.shape != (self.num_slots,):
            raise GraceInputError(f"slot_counts must be [{self.num_slots}] (one count per slot), got shape {tuple(slot_counts.shape)}")
        n = x.shape[0]
        if debug_enabled() and int(slot_counts.sum()) > n:
            raise GraceInputError(f"slot_counts sum to {int(slot_counts.sum())} rows but x has {n}")
        if n == 0 or self.num_slots == 0:
            return torch.zeros_like(x)
        counts = slot_counts.to(torch.int64)
        ends = torch.cumsum(counts, 0)
        if grouped_mm_supported(x.dtype, x.device, torch.compiler.is_compiling()):
            offsets, padded = ends.to(torch.int32), None
        else:
            offsets = None
            padded = PaddedRows.from_counts(counts, ends, n, n if max_rows_per_slot is None else max_rows_per_slot)
        row_slot = None
        if self.bias:  # slot of each row (padding rows: the last slot; their output is unspecified)
            row_slot = padded.slot if padded is not None else row_slots(ends, n).clamp_(max=self.num_slots - 1)
        hidden = grouped_linear(x, self.w_first, offsets, padded)  # [n, 2f] or [n, f]
        if row_slot is not None:
            hidden.add_(self.b_first.index_select(0, row_slot))
        if self.activation == "swiglu":
            f = self.ffn_size
            hidden = F.silu(hidden[:, :f]) * hidden[:, f:]
        else:
            hidden = F.gelu(hidden)
        out = grouped_linear(hidden, self.w_second, offsets, padded)
        if row_slot is not None:
            out.add_(self.b_second.index_select(0, row_slot))
        return out

    def extra_repr(self) -> str:
        return (f"slots={self.num_slots}, experts={list(self.expert_ids)}, hidden={self.hidden_size}, ffn={self.ffn_size}, "
                f"{self.activation}{', bias' if self.bias else ''}")
