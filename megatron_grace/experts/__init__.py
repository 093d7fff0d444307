"""Expert MLPs stored per slot (copies included) for the GRACE MoE layer."""

from megatron_grace.experts.mlp import ACTIVATIONS, SlotExperts, expert_weight_shapes

__all__ = ["ACTIVATIONS", "SlotExperts", "expert_weight_shapes"]
