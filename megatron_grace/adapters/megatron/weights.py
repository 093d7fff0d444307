"""Megatron-Core expert weights <-> the GRACE expert state (pure tensor views, no communication).

Megatron holds, on expert-parallel rank ``r`` of ``W``, the experts ``r * n .. r * n + n - 1``
(``n = E / W``, contiguous), in one of three expert modules; per local expert ``i`` the matrices
in ``nn.Linear``'s ``[out, in]`` layout are:

- ``SequentialMLP``: ``local_experts[i].linear_fc1.weight`` and ``local_experts[i].linear_fc2.weight``;
- ``TEGroupedMLP``: ``linear_fc1.weight{i}`` and ``linear_fc2.weight{i}``;
- ``GroupedMLP``: ``weight1.view(n, h, -1)[i].T`` and ``weight2.view(n, -1, h)[i].T`` (its
  grouped GEMM computes ``x @ w1[i]`` with ``trans_b=False``).

``fc1`` is ``[2f, h]`` with gated linear units (rows ``[0, f)`` the gate, ``[f, 2f)`` the up
projection: ``MLP.forward``'s ``x_glu, x_linear = chunk(x, 2)``), ``[f, h]`` without; ``fc2`` is ``[h, f]``.

A Linear computes ``x @ W.T``, so GRACE's ``[h, f]`` / ``[f, h]`` matrices
(:mod:`megatron_grace.experts.mlp`) are the transposes:

- ``swiglu``: ``gate = fc1[:f].T``, ``up = fc1[f:].T``, ``down = fc2.T``;
- ``gelu``: ``fc1 = fc1.T``, ``fc2 = fc2.T``.

Moving experts between ranks (Megatron's layout -> a plan's slots and back) is the core's
:mod:`megatron_grace.experts.exchange`; this module only reads and writes the matrices.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from megatron_grace.errors import GraceInputError


def megatron_activation(config: Any) -> str:
    """GRACE activation name (``swiglu`` or ``gelu``) for a ``TransformerConfig``'s experts.

    Raises:
        GraceInputError: expert settings the GRACE experts do not compute the same way (biases,
            other activations, clamped or offset GLU, probabilities on the input, latent MoE, FP8/FP4).
    """
    problems = []
    if getattr(config, "add_bias_linear", False):
        problems.append("add_bias_linear=True (expert biases are not supported under the GRACE Megatron dispatcher)")
    for flag in ("moe_shared_expert_overlap", "moe_pad_expert_input_to_capacity", "moe_router_padding_for_quantization"):
        if getattr(config, flag, False):
            problems.append(f"{flag}=True (not supported by the GRACE dispatcher)")
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


EXPERT_MODULES = ("SequentialMLP", "TEGroupedMLP", "GroupedMLP")


def expert_matrices(experts_module: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(fc1 [rows, h], fc2 [h, f])]`` per local expert, views into the module's parameters (``[out, in]``)."""
    kind = type(experts_module).__name__
    n = int(getattr(experts_module, "num_local_experts", 0))
    if kind == "SequentialMLP":
        return [(_weight(m.linear_fc1, "linear_fc1"), _weight(m.linear_fc2, "linear_fc2")) for m in experts_module.local_experts]
    if kind == "TEGroupedMLP":
        return [(getattr(experts_module.linear_fc1, f"weight{i}"), getattr(experts_module.linear_fc2, f"weight{i}")) for i in range(n)]
    if kind == "GroupedMLP":
        h = int(experts_module.config.hidden_size)
        w1 = experts_module.weight1.view(n, h, -1)
        w2 = experts_module.weight2.view(n, -1, h)
        return [(w1[i].t(), w2[i].t()) for i in range(n)]
    raise GraceInputError(f"GRACE runs Megatron's {', '.join(EXPERT_MODULES)} experts; this layer has {kind}")


def expert_state(fc1: torch.Tensor, fc2: torch.Tensor, activation: str, hidden_size: int, ffn_size: int) -> dict[str, torch.Tensor]:
    """One Megatron expert's matrices as a GRACE expert state (views).

    Returns:
        ``{"gate": [h, f], "up": [h, f], "down": [f, h]}`` (swiglu) or ``{"fc1": [h, f], "fc2": [f, h]}`` (gelu).
    """
    h, f = hidden_size, ffn_size
    rows = 2 * f if activation == "swiglu" else f
    if tuple(fc1.shape) != (rows, h) or tuple(fc2.shape) != (h, f):
        raise GraceInputError(f"Megatron expert weights have shapes fc1 {tuple(fc1.shape)}, fc2 {tuple(fc2.shape)}; expected "
                              f"fc1 ({rows}, {h}) and fc2 ({h}, {f}) for a {activation} expert (expert tensor parallelism "
                              "must be 1)")
    if activation == "swiglu":
        return {"gate": fc1[:f].t(), "up": fc1[f:].t(), "down": fc2.t()}
    return {"fc1": fc1.t(), "fc2": fc2.t()}


@torch.no_grad()
def load_expert_state(fc1: torch.Tensor, fc2: torch.Tensor, state: Mapping[str, torch.Tensor], activation: str) -> None:
    """Inverse of :func:`expert_state`: write a GRACE expert state into one Megatron expert's matrices."""
    if activation == "swiglu":
        f = state["gate"].shape[1]
        fc1[:f].copy_(state["gate"].t())
        fc1[f:].copy_(state["up"].t())
        fc2.copy_(state["down"].t())
    else:
        fc1.copy_(state["fc1"].t())
        fc2.copy_(state["fc2"].t())


def _weight(linear: Any, what: str) -> torch.Tensor:
    w = getattr(linear, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise GraceInputError(f"{what} has no weight tensor ({type(linear).__name__})")
    return w
