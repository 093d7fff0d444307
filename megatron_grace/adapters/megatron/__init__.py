"""Megatron-Core drop-in for GRACE-MoE (inference).

Swap the spec, pass a plan, set up after loading the weights::

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron_grace.adapters.megatron import grace_spec, setup_grace

    spec = grace_spec(get_gpt_layer_local_spec(num_experts=128), plan="plan.json", dispatch="hierarchical")
    model = GPTModel(config, spec, vocab_size=..., max_sequence_length=...)   # TopKRouter, SequentialMLP as usual
    load_checkpoint(model)                                                   # Megatron's state dict layout is unchanged
    setup_grace(model)                                                       # every rank: slots filled from Megatron's experts
    model.eval(); logits = model(tokens, positions, attention_mask)          # MoE layers now run GRACE

Pieces:

- :class:`GraceMegatronMoELayer` (``MoELayer`` subclass) and :class:`GraceMegatronOptions`;
- :func:`grace_spec` / :func:`get_grace_moe_module_spec`: spec swapping (0.16 ``ModuleSpec`` and
  0.19 ``functools.partial`` specs);
- :func:`setup_grace`, :func:`set_grace_enabled`, :func:`grace_layers`, :func:`grace_counters`;
- :class:`RoutingRecorder`: ``RoutingTrace`` capture from a running model's routers;
- :func:`register` / :func:`unregister`: runtime installation into Megatron's spec builders;
- :func:`install_cpu_stubs`: CPU-only (gloo) runs of Megatron's MoE path, for tests and demos.

Scope and limits (each raises GraceInputError naming it, at set-up):

- inference only (``model.eval()``); ``use_grace = False`` runs Megatron's own path for training;
- ``SequentialMLP`` experts (``moe_grouped_gemm=False``), expert tensor parallel size 1, no expert
  biases, swiglu (``F.silu`` + GLU) or exact gelu, no FP8/FP4, no latent MoE, no
  ``moe_apply_probs_on_input``; 0.19's ``inference_optimized`` experts (``InferenceGroupedMLP``)
  are not converted; partial CUDA-graph capture (``intermediate_tensors``) is refused;
- GPU ``g`` of the plan is rank ``g`` of the layer's expert-parallel group (node-major);
  Megatron still requires ``num_moe_experts % EP == 0`` for its own weight layout;
- the GRACE slots are built on the device of Megatron's expert weights at set-up and are not a
  registered sub-module (move the model first, then call :func:`setup_grace`).

Tested on CPU/gloo with megatron-core 0.16.1 and 0.19.0 (2 and 4 ranks); not run on GPUs/NCCL,
with Transformer Engine layers, tensor/pipeline parallelism or multi-token-prediction layers.

Importing this package does not import Megatron: the names that need it (the layer, spec,
model-level, recorder and registry functions) import ``megatron.core`` on first use, and raise
GraceInputError with an install hint when it is missing. The rest of :mod:`megatron_grace` never
imports Megatron.
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
from megatron_grace.adapters.megatron.weights import (
    expert_state_from_mlp,
    fill_slots_from_megatron,
    load_expert_state_into_mlp,
    megatron_activation,
)

_LAZY = {  # name -> sub-module; these import megatron.core
    "GraceMegatronMoELayer": "layer", "build_hierarchical_groups_all": "layer", "grace_counters": "layer",
    "grace_layers": "layer", "set_grace_enabled": "layer", "setup_grace": "layer",
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
    "expert_state_from_mlp", "load_expert_state_into_mlp", "fill_slots_from_megatron", "megatron_activation",
    *_LAZY,
]
