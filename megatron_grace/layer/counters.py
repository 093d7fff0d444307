"""`LayerCounters`: what one rank's GRACE MoE layer did in its last forward pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from megatron_grace.dispatch.all_to_all import TRAFFIC_KINDS, TrafficLog

LINK_TYPES = ("same_gpu", "intra_node", "inter_node")


def link_types(rank: int, num_gpus: int, gpus_per_node: int) -> np.ndarray:
    """int64 ``[G]``: link from ``rank`` to every GPU (0 same GPU, 1 same node, 2 other node); see :data:`LINK_TYPES`."""
    g = np.arange(num_gpus)
    same_node = (g // gpus_per_node) == (rank // gpus_per_node)
    return np.where(g == rank, 0, np.where(same_node, 1, 2)).astype(np.int64)


@dataclass
class LayerCounters:
    """Per-rank counters of one forward pass (read them as ``layer.last_counters``).

    Attributes:
        step: forward-pass index of the layer (0 for the first).
        layer: MoE layer index in the plan.
        rank: this rank (= GPU index of the plan).
        mode: ``flat`` or ``hierarchical``.
        policy: replica-choice policy.
        tokens: T, tokens on this rank.
        pairs: valid (token, expert) pairs routed by this rank.
        pairs_per_gpu: int64 ``[G]``: this rank's pairs per destination GPU (what the load
            predictor observes).
        slot_load: int64 ``[S]``: pairs the local experts computed, per local slot.
        link: int64 ``[G]``: link type from this rank to every GPU (index into :data:`LINK_TYPES`).
        traffic: the detailed :class:`TrafficLog` (rows and bytes per GPU and kind: ``dispatch``
            hidden rows towards experts, over all phases; ``combine`` results coming back;
            ``meta`` counts and routing metadata).
        times: phase -> seconds (``route``, ``permute_pre``, ``comm``, ``permute``, ``experts``,
            ``combine``, ``total``).
    """

    step: int
    layer: int
    rank: int
    mode: str
    policy: str
    tokens: int
    pairs: int
    pairs_per_gpu: np.ndarray
    slot_load: np.ndarray
    link: np.ndarray
    traffic: TrafficLog
    times: dict[str, float] = field(default_factory=dict)

    # ------------------------------------------------------------------ per peer
    @property
    def rows_sent(self) -> np.ndarray:
        """int64 ``[G]``: hidden rows sent to each GPU towards experts (all dispatch phases)."""
        return self.traffic.sent_rows["dispatch"]

    @property
    def rows_recv(self) -> np.ndarray:
        """int64 ``[G]``: hidden rows received from each GPU in the dispatch phases."""
        return self.traffic.recv_rows["dispatch"]

    @property
    def bytes_sent(self) -> np.ndarray:
        """int64 ``[G]``: all bytes sent to each GPU (dispatch + combine + meta)."""
        return sum(self.traffic.sent_bytes[k] for k in TRAFFIC_KINDS)

    @property
    def bytes_recv(self) -> np.ndarray:
        """int64 ``[G]``: all bytes received from each GPU."""
        return sum(self.traffic.recv_bytes[k] for k in TRAFFIC_KINDS)

    # ------------------------------------------------------------------ per link type
    def by_link(self, per_gpu: np.ndarray) -> dict[str, int]:
        """Sum a ``[G]`` per-GPU quantity per link type."""
        sums = np.bincount(self.link, weights=per_gpu, minlength=len(LINK_TYPES))
        return {name: int(round(v)) for name, v in zip(LINK_TYPES, sums)}

    @property
    def rows_sent_by_link(self) -> dict[str, int]:
        return self.by_link(self.rows_sent)

    @property
    def bytes_sent_by_link(self) -> dict[str, int]:
        return self.by_link(self.bytes_sent)

    @property
    def bytes_recv_by_link(self) -> dict[str, int]:
        return self.by_link(self.bytes_recv)

    def kind_bytes_sent_by_link(self, kind: str) -> dict[str, int]:
        """Bytes of one kind (``dispatch``, ``combine``, ``meta``) sent per link type."""
        return self.by_link(self.traffic.sent_bytes[kind])

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary."""
        return {
            "step": self.step, "layer": self.layer, "rank": self.rank, "mode": self.mode, "policy": self.policy,
            "tokens": self.tokens, "pairs": self.pairs, "pairs_per_gpu": self.pairs_per_gpu.tolist(),
            "slot_load": self.slot_load.tolist(), "rows_sent": self.rows_sent.tolist(), "rows_recv": self.rows_recv.tolist(),
            "bytes_sent": self.bytes_sent.tolist(), "bytes_recv": self.bytes_recv.tolist(),
            "rows_sent_by_link": self.rows_sent_by_link, "bytes_sent_by_link": self.bytes_sent_by_link,
            "bytes_sent_by_link_and_kind": {k: self.kind_bytes_sent_by_link(k) for k in TRAFFIC_KINDS},
            "times": dict(self.times),
        }
