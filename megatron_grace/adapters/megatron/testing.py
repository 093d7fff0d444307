"""Small Megatron-Core MoE models for tests, demos and benchmarks (CPU/gloo friendly).

- :func:`init_megatron_parallel`: ``parallel_state`` with the whole world as one
  expert-parallel group (tensor, pipeline and expert-tensor parallel size 1), plus the CPU
  stubs when there is no CUDA;
- :func:`small_moe_config`: a ``TransformerConfig`` for a small GPT-MoE (fusions that need
  CUDA kernels off, dropout 0, no auxiliary loss);
- :func:`build_gpt`: a ``GPTModel`` with Megatron's local layer spec, optionally swapped to GRACE;
- :func:`randomize_experts`: distinct reproducible weights for every global expert (expert
  ``e`` of MoE layer ``l`` gets :func:`~megatron_grace.layer.random_expert_weights` of seed
  ``(seed, l)``), written into Megatron's ``SequentialMLP`` layout, so any EP layout and any
  GRACE plan can be checked against the dense reference;
- :func:`causal_mask`: Megatron's boolean attention mask (True = masked).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_grace.adapters.megatron.cpu_compat import install_cpu_stubs
from megatron_grace.adapters.megatron.weights import expert_matrices, load_expert_state, megatron_activation
from megatron_grace.layer.reference import random_expert_weights


def init_megatron_parallel(expert_parallel_size: int | None = None) -> Any:
    """Initialize Megatron's ``parallel_state`` (EP = ``expert_parallel_size``, default the world size).

    Needs ``torch.distributed`` initialized. Returns the ``parallel_state`` module.
    """
    install_cpu_stubs()
    from megatron.core import parallel_state

    ep = expert_parallel_size or dist.get_world_size()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                                 expert_model_parallel_size=ep)
    return parallel_state


def small_moe_config(num_experts: int = 16, top_k: int = 4, hidden_size: int = 32, moe_ffn_hidden_size: int = 16,
                     num_layers: int = 2, num_attention_heads: int = 4, activation: str = "swiglu",
                     expert_parallel_size: int | None = None, dispatcher: str = "alltoall", **overrides: Any) -> Any:
    """A CPU-friendly ``TransformerConfig`` for a GPT-MoE (all layers MoE unless ``moe_layer_freq`` is given)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    if activation not in ("swiglu", "gelu"):
        raise ValueError(f"activation must be swiglu or gelu, got {activation!r}")
    kw: dict[str, Any] = dict(
        num_layers=num_layers, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
        ffn_hidden_size=4 * hidden_size, moe_ffn_hidden_size=moe_ffn_hidden_size, num_moe_experts=num_experts,
        moe_router_topk=top_k, moe_token_dispatcher_type=dispatcher,
        expert_model_parallel_size=expert_parallel_size or dist.get_world_size(),
        gated_linear_unit=activation == "swiglu", activation_func=F.silu if activation == "swiglu" else F.gelu,
        add_bias_linear=False, use_cpu_initialization=True, params_dtype=torch.float32, bias_activation_fusion=False,
        masked_softmax_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, normalization="RMSNorm",
        hidden_dropout=0.0, attention_dropout=0.0,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def build_gpt(config: Any, vocab_size: int = 128, max_sequence_length: int = 256, grace: Any = None, seed: int = 0) -> Any:
    """A ``GPTModel`` with Megatron's local layer spec (``SequentialMLP`` experts, ``TopKRouter``).

    Args:
        grace: None = plain Megatron; else ``grace_spec`` keyword arguments (``{"plan": ..., ...}``).
        seed: CPU seed before construction (the same on every rank gives identical dense weights).
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, normalization="RMSNorm")
    if grace is not None:
        from megatron_grace.adapters.megatron.spec import grace_spec

        spec = grace_spec(spec, **dict(grace))
    torch.manual_seed(seed)
    model = GPTModel(config, spec, vocab_size=vocab_size, max_sequence_length=max_sequence_length, position_embedding_type="rope")
    return model.eval()


def build_from_spec(spec: Any, **kwargs: Any) -> Any:
    """Instantiate a module spec of either style: ``ModuleSpec`` (0.16) or ``functools.partial`` / class (0.19)."""
    if callable(spec) and type(spec).__name__ != "ModuleSpec":
        return spec(**kwargs)
    from megatron.core.transformer.spec_utils import build_module

    return build_module(spec, **kwargs)


def moe_layers(model: Any) -> list[Any]:
    """The model's Megatron ``MoELayer`` modules (GRACE ones included), by layer number."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    found = [m for m in model.modules() if isinstance(m, MoELayer)]
    return sorted(found, key=lambda m: m.layer_number or 0)


@torch.no_grad()
def randomize_experts(moe_layer: Any, seed: int = 0, moe_index: int | None = None) -> None:
    """Write distinct reproducible weights for this rank's local experts into Megatron's layout.

    Expert ``e`` gets ``random_expert_weights(E, h, f, activation, seed=seed * 1009 + moe_index)(e)``
    (``moe_index`` defaults to ``layer_number - 1``), independent of the EP layout.
    """
    cfg = moe_layer.config
    activation = megatron_activation(cfg)
    f = int(cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size)
    idx = moe_index if moe_index is not None else int((moe_layer.layer_number or 1) - 1)
    mats = expert_matrices(moe_layer.experts)
    weights = random_expert_weights(int(cfg.num_moe_experts), int(cfg.hidden_size), f, activation, seed=seed * 1009 + idx,
                                    dtype=mats[0][0].dtype)
    for e, (fc1, fc2) in zip(moe_layer.local_expert_indices, mats, strict=True):
        load_expert_state(fc1, fc2, weights(int(e)), activation)


@torch.no_grad()
def sync_replicated_params(module: Any, group: Any = None) -> int:
    """Broadcast every non-expert parameter from rank 0 of ``group`` (router, attention, embeddings, ...).

    Expert weights (``SequentialMLP`` of every MoE layer) are left alone: they differ per
    expert-parallel rank. Returns the number of tensors broadcast.
    """
    expert_params = {id(p) for m in moe_layers(module) for p in m.experts.parameters()}
    src = dist.get_process_group_ranks(group)[0] if group is not None else 0
    n = 0
    for p in module.parameters():
        if id(p) not in expert_params:
            dist.broadcast(p.data, src=src, group=group)
            n += 1
    return n


def causal_mask(queries: int, keys: int | None = None) -> torch.Tensor:
    """bool ``[1, 1, q, k]``: True where query ``i`` must not see key ``j`` (keys after its position)."""
    k = keys if keys is not None else queries
    return torch.triu(torch.ones(queries, k, dtype=torch.bool), diagonal=k - queries + 1)[None, None]


__all__ = ["init_megatron_parallel", "small_moe_config", "build_gpt", "build_from_spec", "moe_layers", "randomize_experts",
           "sync_replicated_params", "causal_mask"]


def quiet_megatron_warnings() -> list[str]:
    """Silence the known, harmless start-up warnings of a Megatron-Core run without Transformer Engine or Apex.

    Filters Apex's "Falling back to Torch Norm" warnings, torch's ``all_gather_into_tensor``
    deprecation (raised inside Megatron) and Megatron's "Unknown MLP type ... Using default
    kwargs" for a ``MoELayer`` subclass (harmless: the layer then takes Megatron's default
    process groups, the same ones). Returns the optional packages that are missing, for one
    line in the caller's output.
    """
    import importlib.util
    import logging
    import warnings

    warnings.filterwarnings("ignore", message="Apex is not installed")
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    warnings.filterwarnings("ignore", message=".*Transformer Engine.*not installed")
    warnings.filterwarnings("ignore", message="full scope is deprecated")  # Megatron 0.16's own cuda_graph_scope default
    warnings.filterwarnings("ignore", message="Using a large number of experts")
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated")
    logging.getLogger("megatron.core.transformer.transformer_layer").setLevel(logging.ERROR)
    return [name for name, mod in (("Transformer Engine", "transformer_engine"), ("Apex", "apex"))
            if importlib.util.find_spec(mod) is None]
