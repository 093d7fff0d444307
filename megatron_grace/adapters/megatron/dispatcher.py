"""`GraceTokenDispatcher`: a Megatron-Core ``MoETokenDispatcher`` that runs GRACE.

Megatron's ``MoELayer.forward`` calls its token dispatcher in six steps; this one fills them with
the core's :class:`~megatron_grace.layer.GraceDispatch` (one implementation of routing and
dispatch for every adapter):

========================  ===========================================================================
``dispatch_preprocess``   router output ``(probs [T, E], routing_map bool [T, E])`` -> top-k ids and
                          weights (:func:`._compat.router_output_to_topk`: one ``topk``, no sort, no
                          host read) -> copy choice (``route``)
``token_dispatch``        flat or hierarchical all-to-all of one row per (token, copy) pair
``dispatch_postprocess``  rows grouped by local slot, ``tokens_per_expert`` per slot (host ints the
                          all-to-all already has; padded to the experts' slot count), probabilities 1
``combine_preprocess``    nothing
``token_combine``         the inverse all-to-all(s) and the weighted sum per token (float32, top-k order)
``combine_postprocess``   reshape to ``[s, b, h]``; feed the load predictor
========================  ===========================================================================

Megatron's experts (``SequentialMLP``, ``GroupedMLP``, ``TEGroupedMLP``) see a batch of
*physical* experts: this rank's slots, copies included, padded with empty slots to the largest
slot count of any rank. The gate weights are applied in the combine, so the experts get
probabilities of one (Megatron 0.16+ multiplies them after the activation: ``x * 1`` is exact).
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

from megatron_grace.adapters.megatron._compat import router_output_to_topk
from megatron_grace.layer.grace_dispatch import GraceDispatch


class GraceTokenDispatcher(MoETokenDispatcher):
    """Megatron token dispatcher over a :class:`GraceDispatch` (see the module docstring).

    Args:
        engine: the layer's GRACE routing and dispatch (built by ``setup_grace``).
        num_slots: local experts of Megatron's expert module (the largest slot count of any rank).
        config, pg_collection: as for Megatron's dispatchers.
    """

    def __init__(self, engine: GraceDispatch, num_slots: int, config: Any, pg_collection: Any) -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        self.engine = engine
        self.num_slots = num_slots
        self.topk = int(config.moe_router_topk)
        self.num_experts = int(config.num_moe_experts)
        self.hidden_shape: torch.Size | None = None
        self._pass: dict[str, Any] = {}

    def dispatch_preprocess(self, tokens: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor):
        """``tokens [s, b, h]``, ``routing_map`` bool ``[T, E]`` (or int ``[T, k]`` indices), ``probs`` -> ``(x [T, h], probs)``."""
        self.hidden_shape = tokens.shape
        x = tokens.reshape(-1, tokens.shape[-1])
        ids, weights = router_output_to_topk(probs, routing_map, self.num_experts, self.topk)
        pairs, per_gpu, copy = self.engine.route(ids, weights)
        self._pass = {"pairs": pairs, "per_gpu": per_gpu, "copy": copy, "tokens": x.shape[0], "log": self.engine.new_log()}
        return x, probs

    def token_dispatch(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        """All-to-all of the rows: ``(rows [m, h] grouped by local slot, None)``."""
        rows, _, host_counts, handle = self.engine.dispatch(hidden_states, self._pass["pairs"], self._pass["log"])
        self._pass.update(handle=handle, host_counts=host_counts)
        return rows, None

    def dispatch_postprocess(self, hidden_states: torch.Tensor, probs: Any):
        """``(rows, tokens_per_expert int64 [num_slots]`` on the host (padding slots 0), ``ones [m])``."""
        counts = list(self._pass["host_counts"])
        counts += [0] * (self.num_slots - len(counts))
        tokens_per_expert = torch.tensor(counts, dtype=torch.int64)
        ones = torch.ones(hidden_states.shape[0], dtype=torch.float32, device=hidden_states.device)
        return hidden_states, tokens_per_expert, ones

    def combine_preprocess(self, hidden_states: torch.Tensor):
        return hidden_states

    def token_combine(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Expert outputs ``[m, h]`` -> weighted sums ``[T, h]`` at the tokens' ranks."""
        return self.engine.combine(hidden_states, self._pass["handle"], self._pass["log"])

    def combine_postprocess(self, hidden_states: torch.Tensor):
        """``[T, h]`` -> ``[s, b, h]``; the pass's bookkeeping (load predictor, counters)."""
        p = self._pass
        self.engine.end_pass(p["copy"], p["pairs"], p["per_gpu"])
        if p["log"] is not None:
            self.engine.record_counters(p["log"], p["tokens"], p["per_gpu"], p["host_counts"])
        self._pass = {}
        return hidden_states.view(self.hidden_shape)
