"""DeepSpeed's own gate (``TopKGate``) as the router of the GRACE layer.

DeepSpeed's ``MOELayer`` asks its gate for sparse routes (``gate(x, used_token, sparse_routes=True)``:
per route an expert index, -1 where the capacity limit evicted it, and a combine weight) and
then pads every expert to a capacity. The GRACE layer asks a gate of the same class, with the
same router weight (``wg``, shared, not copied) and the same options, for the same sparse routes
and passes them on as ``topk_ids [T, k]`` / ``topk_weights [T, k]``. So the routing is
DeepSpeed's in every detail: top-1 (the softmax probability of the arg-max expert, not
renormalised; ``used_token`` masking; random token selection draws), top-2 (the second expert
by the Gumbel-max trick when ``top2_2nd_expert_sampling``, the two weights renormalised to sum to
1), top-k (renormalised over the k), noisy gating in training mode only, ``l_aux`` and
``exp_counts`` for ``MoE.forward``'s return value. Random draws consume the global torch RNG
exactly as DeepSpeed's gate does.

Capacity: by default (``drop_tokens=False``) the gate never drops a route (DeepSpeed's own
``drop_tokens=False`` path, its capacity computed locally with ``min_capacity=0``: capacity only
sizes DeepSpeed's padded buffers, which GRACE does not have, so no all-reduce of it over the
expert-parallel group is made). With ``drop_tokens=True`` the gate keeps the model's capacity
settings and drops exactly the routes DeepSpeed's gate drops (a local decision per rank).
"""

from __future__ import annotations

from typing import Any

import torch
from deepspeed.moe.sharded_moe import TopKGate

from megatron_grace.errors import GraceInputError

# TopKGate constructor arguments read back from an instance (ep_group is left out on purpose).
_GATE_FIELDS = ("k", "capacity_factor", "eval_capacity_factor", "min_capacity", "noisy_gate_policy", "drop_tokens", "use_rts",
                "top2_2nd_expert_sampling")


def gate_args(gate: Any, num_experts: int) -> dict[str, Any]:
    """The constructor arguments of DeepSpeed's gate ``gate`` (a ``TopKGate``); raise GraceInputError for anything else."""
    if type(gate) is not TopKGate:
        raise GraceInputError(f"the MoE's gate is a {type(gate).__module__}.{type(gate).__name__}; GRACE reuses DeepSpeed's "
                              "own deepspeed.moe.sharded_moe.TopKGate only (its routing is reproduced exactly)")
    if not 1 <= gate.k <= num_experts:
        raise GraceInputError(f"the gate's k={gate.k} must be between 1 and the number of experts ({num_experts})")
    args = {name: getattr(gate, name) for name in _GATE_FIELDS if hasattr(gate, name)}
    args.update(model_dim=gate.wg.in_features, num_experts=gate.wg.out_features)
    return args


def inference_gate(args: dict[str, Any], wg: torch.nn.Linear, drop_tokens: bool) -> TopKGate:
    """A ``TopKGate`` with DeepSpeed's options ``args`` and router weight ``wg`` (shared), without an EP group,
    in eval mode (``eval_capacity_factor``, no noise; ``model.train()`` switches it like any module).

    Args:
        args: from :func:`gate_args`.
        wg: the router's ``Linear(h, E, bias=False)``.
        drop_tokens: False = never drop (capacity unused); True = DeepSpeed's capacity and drops.
    """
    overrides = {} if drop_tokens else {"drop_tokens": False, "min_capacity": 0}
    gate = TopKGate(**{**args, **overrides})
    gate.wg = wg
    return gate.eval()


def route(gate: TopKGate, x: torch.Tensor, used_token: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSpeed's routing of ``x``.

    Args:
        gate: from :func:`inference_gate`.
        x: ``[T, h]`` hidden states.
        used_token: optional ``[T]`` mask (top-1 gating only, as in DeepSpeed).

    Returns:
        ``(l_aux, topk_ids int64 [T, k] (-1 = dropped), topk_weights float32 [T, k], exp_counts [E])``.
    """
    l_aux, _capacity, _E, indices, _locations, gates, exp_counts = gate(x, used_token, True, False)
    return l_aux, indices.t().long().contiguous(), gates.t().float().contiguous(), exp_counts
