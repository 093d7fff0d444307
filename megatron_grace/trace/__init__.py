"""Routing traces: the per-token expert choices of an MoE model, their importers and synthesis."""

from megatron_grace.trace.routing_trace import PHASE_DECODE, PHASE_PREFILL, RoutingTrace

__all__ = ["RoutingTrace", "PHASE_PREFILL", "PHASE_DECODE", "import_any", "synthesize_trace", "synthesis_fidelity"]


def __getattr__(name: str):
    """Lazy access to the importers and the synthesis (they pull in more modules)."""
    if name == "import_any":
        from megatron_grace.trace.importers import import_any

        return import_any
    if name in ("synthesize_trace", "synthesis_fidelity"):
        from megatron_grace.trace import synthesis

        return getattr(synthesis, name)
    raise AttributeError(name)
