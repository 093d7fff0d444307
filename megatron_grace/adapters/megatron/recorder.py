"""`RoutingRecorder`: capture `RoutingTrace`s from a running Megatron-Core model.

Forward hooks on the model's routers (``TopKRouter`` and subclasses, with or without GRACE)
hand every router call to the core's :class:`~megatron_grace.trace.recording.RouterCallLog`
(pass grouping, phases, requests, gathering; no host synchronisation while recording): the
router's ``(probs, routing_map)`` as top-k, the layer from its ``layer_number``, and Megatron's
``[s, b, h]`` token layout.

Usage::

    rec = RoutingRecorder(model)
    with rec.recording(phase="prefill"):
        model(tokens, positions, attention_mask=mask)
    with rec.recording(phase="decode"):
        ...
    trace = rec.trace(model_name="my-moe")          # this rank's tokens
    full = rec.gathered_trace(group=None)           # every rank's tokens, on every rank
    rec.remove()
"""

from __future__ import annotations

from typing import Any

from megatron_grace.adapters.megatron._compat import model_modules, router_output_to_topk
from megatron_grace.adapters.megatron.options import moe_layer_pattern, plan_layer_index
from megatron_grace.errors import GraceInputError
from megatron_grace.trace.recording import RouterCallLog, concat_traces


class RoutingRecorder(RouterCallLog):
    """Records every router call of a Megatron-Core model (see the module docstring).

    Args:
        model: a Megatron model (or a list of virtual-pipeline chunks) with MoE layers.
        layer_map: Megatron ``layer_number`` -> MoE layer index (None = from ``moe_layer_freq``).
        record_weights: keep the gate weights (``RoutingTrace.gate_weights``).
        active: start recording at once (else only inside :meth:`recording` / after :meth:`start`).
    """

    source = "megatron_grace.adapters.megatron.RoutingRecorder"

    def __init__(self, model: Any, layer_map: dict[int, int] | None = None, record_weights: bool = True, active: bool = True) -> None:
        from megatron.core.transformer.moe.router import Router

        routers = [m for m in model_modules(model) if isinstance(m, Router)]
        if not routers:
            raise GraceInputError("the model has no Megatron MoE router to record")
        cfg = routers[0].config
        if layer_map is not None:
            num_layers = max(int(v) for v in layer_map.values()) + 1
        else:
            pattern = moe_layer_pattern(cfg)
            if 1 not in pattern:
                raise GraceInputError("the model config has no MoE layer (moe_layer_freq)")
            num_layers = int(plan_layer_index(cfg, 1 + pattern.index(1), None)[1] or 0)
        super().__init__(int(cfg.num_moe_experts), int(cfg.moe_router_topk), num_layers, record_weights, active)
        self.layer_map = layer_map
        self._handles = [r.register_forward_hook(self._hook) for r in routers]

    def _hook(self, module: Any, inputs: tuple[Any, ...], output: Any) -> None:
        if not self.active:
            return
        hidden = inputs[0]
        seq, batch = (int(hidden.shape[0]), int(hidden.shape[1])) if hidden.dim() == 3 else (hidden.numel() // hidden.shape[-1], 1)
        ids, weights = router_output_to_topk(output[0].detach(), output[1].detach(), self.num_experts, self.top_k)
        layer, _ = plan_layer_index(module.config, getattr(module, "layer_number", None), self.layer_map)
        self.add(layer, ids, weights, seq, batch)


__all__ = ["RoutingRecorder", "concat_traces"]
