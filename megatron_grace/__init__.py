"""megatron-grace: GRACE-MoE expert placement, replication and locality-aware routing.

The data flows trace -> statistics -> plan -> routing -> dispatch -> experts; framework
adapters for Megatron-Core and DeepSpeed sit at the edge; ``checkpoint`` patches Megatron-Core
and DeepSpeed checkpoints to a plan's layout. The core imports neither Megatron nor DeepSpeed.
"""

__version__ = "0.1.0"

from megatron_grace.errors import GraceInputError
from megatron_grace.statistics.expert_stats import ExpertStats
from megatron_grace.trace.routing_trace import RoutingTrace

__all__ = ["GraceInputError", "ExpertStats", "RoutingTrace", "__version__"]
