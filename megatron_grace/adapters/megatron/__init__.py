"""Megatron-Core drop-in for GRACE-MoE (inference): a token dispatcher chosen through the layer spec.

Swap the spec, load the weights as usual, then set up with a plan::

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron_grace.adapters.megatron import grace_spec, setup_grace

    spec = grace_spec(get_gpt_layer_local_spec(num_experts=128), dispatch="hierarchical")
    model = GPTModel(config, spec, vocab_size=..., max_sequence_length=...)  # a plain MoE model until set-up
    load_checkpoint(model)                                                  # Megatron's layout and checkpoints
    setup_grace(model, plan="plan.json")                                    # every rank: experts placed by the plan
    model.eval(); logits = model(tokens, positions, attention_mask)         # MoE layers now dispatch with GRACE

:class:`GraceTokenDispatcher` maps the router's ``(probs, routing_map)`` to physical (GPU, slot)
copies and moves tokens with the core's :class:`~megatron_grace.layer.GraceDispatch`; Megatron's
own experts compute. Also: :func:`register` (GRACE in Megatron's own spec builders),
:func:`teardown_grace`, :class:`RoutingRecorder` (traces from a running model),
:func:`install_cpu_stubs` (CPU/gloo runs for tests and demos).

Scope and limits (each raises GraceInputError naming it, at set-up):

- inference (the GRACE dispatcher has no backward);
- expert modules ``SequentialMLP`` (tested), 0.16's legacy ``GroupedMLP`` (tested in bf16 on CPU
  with a CPU stand-in for grouped_gemm's CUDA kernel) and ``TEGroupedMLP`` (weight views written
  from its layout; not run: no Transformer Engine on the test machine); expert tensor parallel size 1; no expert biases; swiglu (``F.silu`` + GLU) or exact
  gelu; no FP8/FP4, latent MoE, ``moe_apply_probs_on_input``, shared-expert overlap or router
  padding for quantization;
- GPU ``g`` of the plan is rank ``g`` of the layer's expert-parallel group (node-major).

Importing this package does not import Megatron: the names that need it import ``megatron.core``
on first use, and raise GraceInputError with an install hint when it is missing. The rest of
:mod:`megatron_grace` never imports Megatron.
"""

from __future__ import annotations

import importlib
from typing import Any

from megatron_grace.adapters.megatron._compat import (
    PINNED_VERSION,
    megatron_core_version,
    require_megatron,
    router_output_to_topk,
    transformer_layer_passes_pg_collection_to_subclasses,
)
from megatron_grace.adapters.megatron.cpu_compat import install_cpu_stubs
from megatron_grace.adapters.megatron.options import GraceMegatronOptions, load_plan, moe_layer_pattern, plan_layer_index
from megatron_grace.adapters.megatron.weights import expert_matrices, expert_state, load_expert_state, megatron_activation

_LAZY = {  # name -> sub-module; these import megatron.core
    "GraceMegatronMoELayer": "layer", "grace_counters": "layer", "grace_layers": "layer", "setup_grace": "layer",
    "teardown_grace": "layer", "GraceTokenDispatcher": "dispatcher",
    "RoutingRecorder": "recorder", "concat_traces": "recorder",
    "register": "registry", "unregister": "registry", "is_registered": "registry", "registered_options": "registry",
    "grace_spec": "spec", "get_grace_moe_module_spec": "spec",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        require_megatron()
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "PINNED_VERSION", "megatron_core_version", "require_megatron", "router_output_to_topk",
    "transformer_layer_passes_pg_collection_to_subclasses", "install_cpu_stubs",
    "GraceMegatronOptions", "load_plan", "moe_layer_pattern", "plan_layer_index",
    "expert_matrices", "expert_state", "load_expert_state", "megatron_activation",
    *_LAZY,
]
