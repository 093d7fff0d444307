"""Simulation: replay routing traces through placement plans and replica-choice policies.

See :mod:`megatron_grace.simulation.simulator` for the counting and time model and
:mod:`megatron_grace.simulation.policies` for how the routing module's replica-choice policies
(the distributed layer's code) are run on a trace.
"""

from megatron_grace.simulation.policies import (
    DEFAULT_POLICY,
    POLICY_NAMES,
    CustomPolicy,
    PolicyContext,
    check_policy,
    choose_gpus,
    policy_names,
)
from megatron_grace.simulation.simulator import (
    DISPATCH_ALIASES,
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
    "DEFAULT_POLICY", "POLICY_NAMES", "CustomPolicy", "PolicyContext", "check_policy", "choose_gpus", "policy_names",
    "DISPATCH_ALIASES", "DISPATCH_MODES", "TOKEN_PLACEMENTS", "DispatchCost", "SimulationResult", "count_decisions",
    "load_decisions", "recount_decisions", "resolve_model_shape", "simulate", "token_start_gpus",
]
