"""The framework-neutral GRACE MoE layer and its dense reference.

- :class:`~megatron_grace.layer.grace_moe.GraceMoELayer`: expert-parallel MoE with replicas;
- :class:`~megatron_grace.layer.counters.LayerCounters`: per-rank traffic and load of a pass;
- :class:`~megatron_grace.layer.reference.DenseReferenceMoE`: single-process dense reference.
"""

from megatron_grace.layer.counters import LINK_TYPES, LayerCounters
from megatron_grace.layer.grace_moe import DISPATCH_MODES, GraceMoELayer, RouteDecision
from megatron_grace.layer.reference import DenseReferenceMoE, random_expert_weights

__all__ = ["LINK_TYPES", "LayerCounters", "DISPATCH_MODES", "GraceMoELayer", "RouteDecision", "DenseReferenceMoE",
           "random_expert_weights"]
