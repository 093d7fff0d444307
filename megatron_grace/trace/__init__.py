"""Routing traces: the per-token expert choices of an MoE model, their importers and synthesis."""

from megatron_grace.trace.routing_trace import PHASE_DECODE, PHASE_PREFILL, RoutingTrace

__all__ = ["RoutingTrace", "PHASE_PREFILL", "PHASE_DECODE"]
