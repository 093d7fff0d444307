"""Megatron-Core expert weights <-> GRACE slot weights.

Megatron's ``SequentialMLP`` holds, on expert-parallel rank ``r`` of ``W``, the experts
``r * n .. r * n + n - 1`` (``n = E / W``, contiguous) as ``local_experts[i]``, each an ``MLP``:

- ``linear_fc1.weight``: ``[2f, h]`` with gated linear units, rows ``[0, f)`` the gate and rows
  ``[f, 2f)`` the up projection (``MLP.forward``'s ``glu``: ``x_glu, x_linear = chunk(x, 2)``;
  ``act(x_glu) * x_linear``; the fused ``bias_swiglu_impl`` splits the same way); ``[f, h]``
  without;
- ``linear_fc2.weight``: ``[h, f]``.

A Linear computes ``x @ W.T``, so GRACE's ``[h, f]`` / ``[f, h]`` matrices
(:mod:`megatron_grace.experts.mlp`) are the transposes:

- ``swiglu``: ``gate = fc1[:f].T``, ``up = fc1[f:].T``, ``down = fc2.T``;
- ``gelu``: ``fc1 = fc1.T``, ``fc2 = fc2.T``.

GRACE ranks host other experts than Megatron's contiguous blocks (unequal counts, copies), so
:func:`fill_slots_from_megatron` moves every expert from the Megatron rank owning it to every
GRACE rank hosting a copy, in one uneven all-to-all over the expert-parallel group (each rank
receives only its own slots: no rank ever holds all experts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from megatron_grace.dispatch.all_to_all import all_to_all_uneven
from megatron_grace.errors import GraceInputError
from megatron_grace.experts.mlp import SlotExperts
from megatron_grace.plan.placement import PlacementPlan


def megatron_activation(config: Any) -> str:
    """GRACE activation name (``swiglu`` or ``gelu``) for a ``TransformerConfig``'s experts.

    Raises:
        GraceInputError: expert settings the GRACE experts do not compute the same way (biases,
            other activations, clamped or offset GLU, probabilities on the input, latent MoE, FP8/FP4).
    """
    problems = []
    if getattr(config, "add_bias_linear", False):
        problems.append("add_bias_linear=True (GRACE experts have no biases)")
    if getattr(config, "moe_apply_probs_on_input", False):
        problems.append("moe_apply_probs_on_input=True")
    if getattr(config, "moe_latent_size", None):
        problems.append("moe_latent_size (latent MoE projections)")
    if getattr(config, "fp8", None) or getattr(config, "fp4", None):
        problems.append("fp8/fp4 expert weights")
    if getattr(config, "use_te_activation_func", False):
        problems.append("use_te_activation_func=True (Transformer Engine activation modules are not checked)")
    if getattr(config, "activation_func_clamp_value", None) is not None:
        problems.append("activation_func_clamp_value (clamped GLU)")
    if float(getattr(config, "glu_linear_offset", 0.0) or 0.0) != 0.0:
        problems.append("glu_linear_offset != 0")
    act = getattr(config, "activation_func", None)
    glu = bool(getattr(config, "gated_linear_unit", False))
    name = None
    if glu and act is F.silu:
        name = "swiglu"
    elif not glu and act is F.gelu:
        name = "gelu"
    else:
        act_name = getattr(act, "__name__", repr(act))
        problems.append(f"expert activation {act_name} with gated_linear_unit={glu} (supported: F.silu with "
                        "gated_linear_unit=True = swiglu, exact F.gelu without = gelu)")
    if problems:
        raise GraceInputError("GRACE cannot run these Megatron experts: " + "; ".join(problems))
    assert name is not None
    return name


def expert_ffn_size(config: Any) -> int:
    """The experts' inner width f (``moe_ffn_hidden_size``, else ``ffn_hidden_size``)."""
    f = getattr(config, "moe_ffn_hidden_size", None) or getattr(config, "ffn_hidden_size", None)
    if not f:
        raise GraceInputError("TransformerConfig has neither moe_ffn_hidden_size nor ffn_hidden_size")
    return int(f)


def local_expert_mlps(experts_module: Any) -> Sequence[Any]:
    """The per-expert ``MLP`` modules of a ``SequentialMLP`` (raise for other expert modules)."""
    local = getattr(experts_module, "local_experts", None)
    if local is None or type(experts_module).__name__ != "SequentialMLP":
        raise GraceInputError(f"GRACE converts Megatron SequentialMLP experts; this layer has {type(experts_module).__name__} "
                              "(build the layer spec with moe_grouped_gemm=False)")
    return list(local)


def _weight(linear: Any, what: str) -> torch.Tensor:
    w = getattr(linear, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise GraceInputError(f"{what} has no weight tensor ({type(linear).__name__})")
    return w


def expert_state_from_mlp(mlp: Any, activation: str, hidden_size: int, ffn_size: int) -> dict[str, torch.Tensor]:
    """One Megatron expert ``MLP`` as a GRACE expert state (views; see the module docstring).

    Returns:
        ``{"gate": [h, f], "up": [h, f], "down": [f, h]}`` (swiglu) or ``{"fc1": [h, f], "fc2": [f, h]}`` (gelu).
    """
    h, f = hidden_size, ffn_size
    w1 = _weight(mlp.linear_fc1, "linear_fc1")
    w2 = _weight(mlp.linear_fc2, "linear_fc2")
    rows = 2 * f if activation == "swiglu" else f
    if tuple(w1.shape) != (rows, h) or tuple(w2.shape) != (h, f):
        raise GraceInputError(f"Megatron expert weights have shapes fc1 {tuple(w1.shape)}, fc2 {tuple(w2.shape)}; expected "
                              f"fc1 ({rows}, {h}) and fc2 ({h}, {f}) for a {activation} expert (expert tensor parallelism "
                              "must be 1)")
    if activation == "swiglu":
        return {"gate": w1[:f].t(), "up": w1[f:].t(), "down": w2.t()}
    return {"fc1": w1.t(), "fc2": w2.t()}


@torch.no_grad()
def load_expert_state_into_mlp(mlp: Any, state: Mapping[str, torch.Tensor], activation: str) -> None:
    """Inverse of :func:`expert_state_from_mlp`: write a GRACE expert state into a Megatron ``MLP``."""
    w1 = _weight(mlp.linear_fc1, "linear_fc1")
    w2 = _weight(mlp.linear_fc2, "linear_fc2")
    if activation == "swiglu":
        f = state["gate"].shape[1]
        w1[:f].copy_(state["gate"].t())
        w1[f:].copy_(state["up"].t())
        w2.copy_(state["down"].t())
    else:
        w1.copy_(state["fc1"].t())
        w2.copy_(state["fc2"].t())


def megatron_owner(expert: int, num_local_experts: int) -> int:
    """Expert-parallel rank that holds ``expert`` in Megatron's contiguous layout."""
    return expert // num_local_experts


def _flat(state: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, int]], dtype: torch.dtype,
          device: torch.device) -> torch.Tensor:
    return torch.cat([state[name].detach().to(device=device, dtype=dtype).contiguous().reshape(-1) for name in shapes])


@torch.no_grad()
def fill_slots_from_megatron(experts: SlotExperts, plan: PlacementPlan, layer: int, local_states: Mapping[int, Mapping[str, torch.Tensor]],
                             num_local_experts: int, group: Any, rank: int, world: int) -> dict[str, int]:
    """Load every slot of this rank from the Megatron ranks that own its experts (collective).

    Every rank of the expert-parallel group must call this together (after set-up checks have
    passed on all of them). For each destination rank ``d`` and each of its slots (ascending),
    the Megatron owner of the slot's expert sends its flattened weights; one uneven
    ``all_to_all_single`` moves them; rows arrive grouped by source rank, slots ascending.

    Args:
        experts: this rank's slots (``plan.gpu_experts[layer][rank]``), filled in place.
        plan, layer: the placement.
        local_states: ``expert id -> GRACE state`` for the experts this rank owns in Megatron's
            layout (``rank * n .. rank * n + n - 1``).
        num_local_experts: n.
        group, rank, world: the expert-parallel group, this rank in it, its size.

    Returns:
        ``{"sent": experts sent, "received": experts received, "local": slots served locally}``
        (local = owned by this rank; they still take the all-to-all's self chunk).
    """
    shapes = experts.shapes
    dtype, device = experts.dtype, experts.device
    rows, send_splits = [], []
    for d in range(world):
        mine = [e for e in plan.gpu_experts[layer][d] if megatron_owner(e, num_local_experts) == rank]
        rows.extend(_flat(local_states[e], shapes, dtype, device) for e in mine)
        send_splits.append(len(mine))
    src_of_slot = [megatron_owner(e, num_local_experts) for e in experts.expert_ids]
    recv_splits = [src_of_slot.count(r) for r in range(world)]
    B = experts.floats_per_expert
    send = torch.stack(rows) if rows else torch.zeros(0, B, dtype=dtype, device=device)
    recv = all_to_all_uneven(send, send_splits, recv_splits, group, world)
    order = sorted(range(experts.num_slots), key=lambda s: (src_of_slot[s], s))
    for row, s in enumerate(order):
        experts.load_flat_slot(s, recv[row])
    return {"sent": int(sum(send_splits)), "received": int(sum(recv_splits)), "local": int(send_splits[rank])}

