"""`RouterCallLog`: turn the router calls of a running model into a `RoutingTrace` (framework-agnostic).

A framework adapter hooks its routers and hands every call to :meth:`RouterCallLog.add` as
``(layer, topk_ids [T, k], topk_weights [T, k], seq, batch)``; this module does the rest:

- **Passes.** Calls are grouped into forward passes: a pass ends when a layer repeats (or the
  token count changes). Inside a pass every MoE layer sees the same ``T = seq x batch`` tokens,
  flattened in the framework's ``[seq, batch]`` order (token ``i = s_i * batch + b_i``), which
  become one block of trace rows ``[T, layers, k]`` (``-1`` where a layer did not run).
- **No host synchronisation while recording.** On CUDA each call's ids and weights are copied
  into pinned host buffers with ``non_blocking=True`` (one event per call); the host waits
  only when :meth:`trace` is read. On CPU the tensors are kept as they are (a copy).
- **Phase and requests.** :meth:`recording` tags the calls of a block as ``prefill`` or
  ``decode`` (default: prefill when ``seq > 1``) and names the request of each batch column.
- **Dropped routes.** A token whose record is partly dropped (``-1`` among valid ids, from a
  capacity limit) is recorded as missing at that layer, so every record is all ``k`` experts or
  none (:class:`RoutingTrace` needs that); :attr:`RoutingTrace.extra` counts them.
- **Gathering.** :meth:`gathered_trace` concatenates every rank's trace in rank order
  (collective), with request ids made distinct across ranks.

Megatron-Core (:class:`megatron_grace.adapters.megatron.RoutingRecorder`) and DeepSpeed
(:class:`megatron_grace.adapters.deepspeed.RoutingRecorder`) subclass it with their hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_grace.errors import GraceInputError
from megatron_grace.trace.routing_trace import PHASE_DECODE, PHASE_PREFILL, RoutingTrace

_PHASES = {"prefill": PHASE_PREFILL, "decode": PHASE_DECODE}


@dataclass
class _Call:
    layer: int
    ids: torch.Tensor  # int32 [T, k] on the host (pinned and still being filled on CUDA until `ready`)
    weights: torch.Tensor | None  # float32 [T, k] on the host, or None
    seq: int
    batch: int
    phase: int
    request_ids: np.ndarray  # int64 [batch]
    ready: Any = None  # torch.cuda.Event recorded after the copies, or None


def _to_host(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as ``dtype`` on the host without waiting: a pinned buffer filled asynchronously on CUDA."""
    t = t.detach().to(dtype)
    if t.device.type != "cuda":
        return t.clone()
    out = torch.empty(t.shape, dtype=dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out


class RouterCallLog:
    """Collects router calls and builds :class:`RoutingTrace` s from them (see the module docstring).

    Args:
        num_experts: experts per MoE layer.
        top_k: experts per token (wider calls are cut to ``top_k``, narrower ones padded with -1).
        num_layers: MoE layers of the model (the trace has at least this many).
        record_weights: keep the gate weights (``RoutingTrace.gate_weights``).
        active: record at once (else only inside :meth:`recording` or after :meth:`start`).
    """

    source = "megatron_grace.trace.recording.RouterCallLog"

    def __init__(self, num_experts: int, top_k: int, num_layers: int, record_weights: bool = True, active: bool = True) -> None:
        if num_experts < 1 or top_k < 1:
            raise GraceInputError(f"a routing recorder needs num_experts >= 1 and top_k >= 1, got {num_experts} and {top_k}")
        self.num_experts, self.top_k, self.num_layers = int(num_experts), int(top_k), int(num_layers)
        self.record_weights = record_weights
        self.active = active
        self._phase: str | None = None
        self._request_ids: np.ndarray | None = None
        self._calls: list[_Call] = []
        self._handles: list[Any] = []  # hooks a framework recorder registered (removed by remove())

    # ------------------------------------------------------------------ control
    def remove(self) -> None:
        """Detach the hooks (the records are kept)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False

    def clear(self) -> None:
        """Forget every recorded call."""
        self._calls = []

    @contextlib.contextmanager
    def recording(self, phase: str | None = None, request_ids: Sequence[int] | None = None) -> Iterator[RouterCallLog]:
        """Record inside the block.

        Args:
            phase: ``prefill`` or ``decode`` for every token of the block; None = ``prefill``
                when a call has more than one position (``seq > 1``), else ``decode``.
            request_ids: request id of each batch column (None = the column index).
        """
        if phase is not None and phase not in _PHASES:
            raise GraceInputError(f"phase must be 'prefill' or 'decode', got {phase!r}")
        old = (self.active, self._phase, self._request_ids)
        self.active, self._phase = True, phase
        self._request_ids = None if request_ids is None else np.asarray(list(request_ids), dtype=np.int64)
        try:
            yield self
        finally:
            self.active, self._phase, self._request_ids = old

    # ------------------------------------------------------------------ input
    def add(self, layer: int, topk_ids: torch.Tensor, topk_weights: torch.Tensor | None, seq: int, batch: int) -> None:
        """Record one router call (a no-op while inactive).

        Args:
            layer: MoE layer index (0-based, plan order).
            topk_ids: int ``[T, k']`` expert ids, ``T = seq * batch``, ``-1`` = dropped.
            topk_weights: float ``[T, k']`` gate weights, or None.
            seq, batch: the call's ``[seq, batch]`` token layout (``batch = 1`` for flat ``[T, h]`` inputs).
        """
        if not self.active:
            return
        if not 0 <= layer:
            raise GraceInputError(f"router call for layer {layer}: layers are numbered from 0")
        req = self._request_ids if self._request_ids is not None else np.arange(batch, dtype=np.int64)
        if req.shape != (batch,):
            raise GraceInputError(f"request_ids has {req.shape[0]} entries but the batch has {batch} columns")
        phase = _PHASES[self._phase] if self._phase is not None else (PHASE_PREFILL if seq > 1 else PHASE_DECODE)
        ids = _to_host(topk_ids[:, : self.top_k], torch.int32)
        weights = _to_host(topk_weights[:, : self.top_k], torch.float32) if (self.record_weights and topk_weights is not None) else None
        ready = None
        if topk_ids.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        self._calls.append(_Call(int(layer), ids, weights, int(seq), int(batch), phase, req, ready))

    # ------------------------------------------------------------------ output
    def _host_calls(self) -> list[tuple[_Call, np.ndarray, np.ndarray | None]]:
        """Every call's ``(call, ids int32 [T, k], weights float32 [T, k] | None)`` once its copies have landed."""
        out = []
        for c in self._calls:
            if c.ready is not None:
                c.ready.synchronize()
            out.append((c, c.ids.numpy(), None if c.weights is None else c.weights.numpy()))
        return out

    def trace(self, model_name: str = "unknown", source: str | None = None) -> RoutingTrace:
        """This rank's recorded tokens as a RoutingTrace ``[tokens, MoE layers, k]`` (-1 where a layer is absent)."""
        calls = self._host_calls()
        passes: list[list[tuple[_Call, np.ndarray, np.ndarray | None]]] = []
        for item in calls:
            cur = passes[-1] if passes else None
            if cur is None or any(c.layer == item[0].layer for c, _, _ in cur) or cur[0][1].shape[0] != item[1].shape[0]:
                passes.append([item])
            else:
                cur.append(item)
        L = max([self.num_layers, *(c.layer + 1 for c, _, _ in calls)])
        k = self.top_k
        T = sum(p[0][1].shape[0] for p in passes)
        ids = np.full((T, L, k), -1, dtype=np.int32)
        gw = np.zeros((T, L, k), dtype=np.float32)
        req = np.zeros(T, dtype=np.int64)
        phase = np.zeros(T, dtype=np.int8)
        row, partial_records = 0, 0
        for p in passes:
            first = p[0][0]
            n = p[0][1].shape[0]
            for c, i, w in p:
                i = i.copy()
                partial = (i < 0).any(axis=1) & (i >= 0).any(axis=1)
                partial_records += int(partial.sum())
                i[partial] = -1
                ids[row: row + n, c.layer, : i.shape[1]] = i
                if w is not None:
                    gw[row: row + n, c.layer, : w.shape[1]] = np.where(i >= 0, w, 0)
            req[row: row + n] = np.tile(first.request_ids, first.seq)[:n]
            phase[row: row + n] = first.phase
            row += n
        return RoutingTrace(expert_ids=ids, num_experts=self.num_experts, gate_weights=gw if self.record_weights else None,
                            request_ids=req, phase=phase, model=model_name, source=source or self.source,
                            extra={"passes": len(passes), "dropped_records": partial_records})

    def gathered_trace(self, group: Any = None, model_name: str = "unknown") -> RoutingTrace:
        """Every rank's trace concatenated in rank order (collective over ``group``; same result on every rank)."""
        mine = self.trace(model_name)
        parts: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, (mine.expert_ids, mine.gate_weights, mine.request_ids, mine.phase), group=group)
        return concat_traces(parts, self.num_experts, model_name, weights=self.record_weights, source=f"{self.source} (gathered)")


def concat_traces(parts: Sequence[tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]], num_experts: int, model_name: str,
                  weights: bool = True, source: str = "concatenated traces") -> RoutingTrace:
    """One RoutingTrace from ``(ids [T_i, L, k], gate_weights | None, request_ids [T_i], phase [T_i])`` parts,
    in order; request ids are offset so that they stay distinct across parts."""
    ids, gws, reqs, phases = [], [], [], []
    offset = 0
    for i, w, r, p in parts:
        ids.append(i)
        gws.append(w if w is not None else np.zeros(i.shape, dtype=np.float32))
        reqs.append(r + offset)
        phases.append(p)
        offset += int(r.max()) + 1 if r.size else 0
    return RoutingTrace(expert_ids=np.concatenate(ids), num_experts=num_experts, gate_weights=np.concatenate(gws) if weights else None,
                        request_ids=np.concatenate(reqs), phase=np.concatenate(phases), model=model_name, source=source)


__all__ = ["RouterCallLog", "concat_traces"]
