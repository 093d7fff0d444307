"""Simulation: replay routing traces through placement plans and replica-choice policies.

See :mod:`megatron_grace.simulation.simulator` for the counting and time model and
:mod:`megatron_grace.simulation.policies` for the pluggable replica-choice policies.
"""

from megatron_grace.simulation.policies import (
    POLICIES,
    PolicyContext,
    get_policy,
    load_routing_policies,
    local_first,
    policy_names,
    predicted_gpu_load,
    register_policy,
)
from megatron_grace.simulation.simulator import (
    DISPATCH_MODES,
    TOKEN_PLACEMENTS,
    DispatchCost,
    SimulationResult,
    count_decisions,
    load_decisions,
    recount_decisions,
    resolve_model_shape,
    simulate,
    token_start_gpus,
)

__all__ = [
    "POLICIES", "PolicyContext", "get_policy", "load_routing_policies", "local_first", "policy_names", "predicted_gpu_load",
    "register_policy",
    "DISPATCH_MODES", "TOKEN_PLACEMENTS", "DispatchCost", "SimulationResult", "count_decisions", "load_decisions",
    "recount_decisions", "resolve_model_shape", "simulate", "token_start_gpus",
]
