"""The framework-neutral GRACE MoE layer, its decode graph and its dense reference.

- :class:`~megatron_grace.layer.grace_moe.GraceMoELayer`: expert-parallel MoE with replicas
  (dynamic path, and a static decode path with :class:`DecodeOptions`);
- :class:`~megatron_grace.layer.grace_dispatch.GraceDispatch`: the same without the experts (replica
  choice, dispatch, combine), for adapters that run a framework's own experts;
- :class:`~megatron_grace.layer.decode_graph.DecodeGraph`: a decode step captured as a CUDA graph,
  with the capacity-free fallback on overflow;
- :class:`~megatron_grace.layer.counters.LayerCounters`: per-rank traffic and load of a pass (opt-in);
- :class:`~megatron_grace.layer.reference.DenseReferenceMoE`: single-process dense reference.
"""

from megatron_grace.dispatch.static import DecodeOptions
from megatron_grace.layer.counters import LINK_TYPES, LayerCounters
from megatron_grace.layer.decode_graph import DecodeGraph
from megatron_grace.layer.grace_dispatch import ExpertShape, GraceDispatch, RouteDecision
from megatron_grace.layer.grace_moe import DISPATCH_MODES, GraceMoELayer
from megatron_grace.layer.reference import DenseReferenceMoE, random_expert_weights

__all__ = ["LINK_TYPES", "LayerCounters", "DISPATCH_MODES", "GraceMoELayer", "GraceDispatch", "ExpertShape", "RouteDecision", "DecodeOptions", "DecodeGraph",
           "DenseReferenceMoE", "random_expert_weights"]
