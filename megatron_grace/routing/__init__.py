"""Locality-aware replica routing: which copy of each chosen expert a token is sent to.

- :mod:`~megatron_grace.routing.replica_table`: a layer's copies as tensors;
- :mod:`~megatron_grace.routing.policies`: vectorized policies (``primary``, ``random``,
  ``position``, ``static-local``, ``grace``);
- :mod:`~megatron_grace.routing.load_predictor`: per-rank load prediction;
- :mod:`~megatron_grace.routing.optimal`: the LP lower bound a policy is measured against.
"""

from megatron_grace.routing.load_predictor import LoadPredictor, static_gpu_load
from megatron_grace.routing.policies import POLICY_NAMES, RoutingOptions, choose_copies, copy_destinations
from megatron_grace.routing.replica_table import ReplicaTable

__all__ = ["LoadPredictor", "static_gpu_load", "POLICY_NAMES", "RoutingOptions", "choose_copies", "copy_destinations", "ReplicaTable"]
