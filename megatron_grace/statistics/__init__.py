"""Expert routing statistics: load, co-activation, between-layer transitions, summaries."""

from megatron_grace.statistics.expert_stats import ExpertStats

__all__ = ["ExpertStats"]
