"""`RoutingRecorder`: capture `RoutingTrace`s from a running DeepSpeed-MoE model (to plan from).

Forward hooks on the ``TopKGate`` of every ``deepspeed.moe.layer.MoE`` (plan layer = module order)
hand each gate call to the core's :class:`~megatron_grace.trace.recording.RouterCallLog` (pass
grouping, phases, requests, gathering; no host synchronisation while recording). DeepSpeed's
MoE flattens its input to ``[T, h]`` before the gate, so a call is recorded as ``T`` tokens in
one column: pass ``phase=`` to :meth:`recording` (the default, ``prefill`` for any call with
more than one token, cannot tell a decode batch apart). Routes DeepSpeed's capacity dropped are
recorded as missing at that layer.

The hooks sit on the gates present when the recorder is made: make it before
:func:`~megatron_grace.adapters.deepspeed.setup_grace` (to record the routing a plan is made
from), or again after it (a converted layer routes with its own ``TopKGate``)::

    rec = RoutingRecorder(model)
    with torch.no_grad(), rec.recording(phase="prefill"):
        model(calibration_batch)
    trace = rec.gathered_trace(group=expert_parallel_group(moe))   # the whole EP group's tokens
    rec.remove()
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from megatron_grace.errors import GraceInputError
from megatron_grace.trace.recording import RouterCallLog

from .convert import moe_modules


def _routes(out: tuple[Any, ...], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A gate's output as ``(ids [T, k] (-1 = dropped), weights [T, k])`` (sparse routes, or the dense combine weights)."""
    if len(out) == 7:  # sparse routes: (l_aux, capacity, E, indices [k, T], locations, gates [k, T], exp_counts)
        return out[3].t(), out[5].t()
    combine = out[1]  # dense: (l_aux, combine_weights [T, E, C], dispatch_mask, exp_counts)
    weights, ids = combine.sum(dim=-1).topk(k, dim=1)
    return torch.where(weights > 0, ids, torch.full_like(ids, -1)), weights


class RoutingRecorder(RouterCallLog):
    """Records every gate call of a model's DeepSpeed MoE layers (see the module docstring).

    Args:
        model: a model holding ``deepspeed.moe.layer.MoE`` modules (DeepSpeed's or converted by GRACE).
        record_weights: keep the gate weights (``RoutingTrace.gate_weights``).
        active: start recording at once (else only inside :meth:`recording` / after :meth:`start`).
    """

    source = "megatron_grace.adapters.deepspeed.RoutingRecorder"

    def __init__(self, model: nn.Module, record_weights: bool = True, active: bool = True) -> None:
        moes = [m for _, m in moe_modules(model)]
        if not moes:
            raise GraceInputError("the model has no deepspeed.moe.layer.MoE module to record")
        experts = {m.num_experts for m in moes}
        if len(experts) > 1:
            raise GraceInputError(f"the model's MoE layers have different expert counts {sorted(experts)}; a trace has one")
        gates = [m.deepspeed_moe.gate for m in moes]
        super().__init__(experts.pop(), max(int(g.k) for g in gates), len(moes), record_weights, active)
        self._handles = [g.register_forward_hook(self._hook(layer)) for layer, g in enumerate(gates)]

    def _hook(self, layer: int):
        def hook(module: Any, inputs: tuple[Any, ...], out: tuple[Any, ...]) -> None:
            if self.active:
                ids, weights = _routes(out, int(module.k))
                self.add(layer, ids, weights, int(ids.shape[0]), 1)
        return hook


__all__ = ["RoutingRecorder"]
