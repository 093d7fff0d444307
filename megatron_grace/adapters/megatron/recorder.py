"""`RoutingRecorder`: capture `RoutingTrace`s from a running Megatron-Core model.

Forward hooks on the model's routers (``TopKRouter`` and subclasses, with or without GRACE)
record, for every router call, the chosen experts and gate weights of every token. Calls are
grouped into forward passes: a pass ends when a layer repeats. Inside a pass every MoE layer
sees the same ``s x b`` tokens, flattened in Megatron's ``[s, b]`` order (token ``i = s_i * b +
b_i``), which becomes one block of trace rows ``[s*b, layers, k]``.

Usage::

    rec = RoutingRecorder(model)
    with rec.recording(phase="prefill"):
        model(tokens, positions, attention_mask=mask)
    with rec.recording(phase="decode"):
        ...
    trace = rec.trace(model_name="my-moe")          # this rank's tokens
    full = rec.gathered_trace(group=None)           # every rank's tokens, on every rank
    rec.remove()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch.distributed as dist

from megatron_grace.adapters.megatron._compat import model_modules, router_output_to_topk
from megatron_grace.adapters.megatron.options import moe_layer_pattern, plan_layer_index
from megatron_grace.errors import GraceInputError
from megatron_grace.trace.routing_trace import PHASE_DECODE, PHASE_PREFILL, RoutingTrace

_PHASES = {"prefill": PHASE_PREFILL, "decode": PHASE_DECODE}


@dataclass
class _Record:
    layer: int
    ids: np.ndarray  # int32 [T, k]
    weights: np.ndarray  # float32 [T, k]
    seq: int
    batch: int
    phase: int
    request_ids: np.ndarray  # int64 [b]


@dataclass
class _Pass:
    tokens: int
    phase: int
    request_ids: np.ndarray  # int64 [T]
    layers: dict[int, tuple[np.ndarray, np.ndarray]]


def _routers(model: Any) -> list[Any]:
    from megatron.core.transformer.moe.router import Router

    return [m for m in model_modules(model) if isinstance(m, Router)]


class RoutingRecorder:
    """Records every router call of a Megatron-Core model (see the module docstring).

    Args:
        model: a Megatron model (or a list of virtual-pipeline chunks) with MoE layers.
        layer_map: Megatron ``layer_number`` -> MoE layer index (None = from ``moe_layer_freq``).
        record_weights: keep the gate weights (``RoutingTrace.gate_weights``).
        active: start recording at once (else only inside :meth:`recording` / after :meth:`start`).
    """

    def __init__(self, model: Any, layer_map: dict[int, int] | None = None, record_weights: bool = True, active: bool = True) -> None:
        routers = _routers(model)
        if not routers:
            raise GraceInputError("the model has no Megatron MoE router to record")
        cfg = routers[0].config
        self.num_experts = int(cfg.num_moe_experts)
        self.top_k = int(cfg.moe_router_topk)
        self.layer_map = layer_map
        if layer_map is not None:
            self.num_layers = max(int(v) for v in layer_map.values()) + 1
        else:
            _, n = plan_layer_index(cfg, 1 + _first_moe_index(cfg), None)
            self.num_layers = int(n or 0)
        self.record_weights = record_weights
        self.active = active
        self._phase: str | None = None
        self._request_ids: np.ndarray | None = None
        self._records: list[_Record] = []
        self._handles = [r.register_forward_hook(self._hook) for r in routers]
        self.dropped_records = 0

    # ------------------------------------------------------------------ control
    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False

    def remove(self) -> None:
        """Detach the hooks (the records are kept)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def clear(self) -> None:
        self._records = []
        self.dropped_records = 0

    @contextlib.contextmanager
    def recording(self, phase: str | None = None, request_ids: Sequence[int] | None = None) -> Iterator[RoutingRecorder]:
        """Record inside the block.

        Args:
            phase: ``prefill`` or ``decode`` for every token of the block; None = ``prefill``
                when a pass has more than one position (``s > 1``), else ``decode``.
            request_ids: request id of each batch column ``b`` (None = the column index).
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

    # ------------------------------------------------------------------ hook
    def _hook(self, module: Any, inputs: tuple[Any, ...], output: Any) -> None:
        if not self.active:
            return
        hidden = inputs[0]
        probs, routing = output[0], output[1]
        if hidden.dim() == 3:
            seq, batch = int(hidden.shape[0]), int(hidden.shape[1])
        else:
            seq, batch = int(hidden.reshape(-1, hidden.shape[-1]).shape[0]), 1
        ids, weights = router_output_to_topk(probs.detach(), routing.detach(), self.num_experts, self.top_k)
        ids = ids[:, : self.top_k] if ids.shape[1] > self.top_k else ids
        weights = weights[:, : ids.shape[1]]
        ids_np = ids.cpu().numpy().astype(np.int32)
        w_np = weights.detach().float().cpu().numpy()
        partial = (ids_np < 0).any(axis=1) & (ids_np >= 0).any(axis=1)
        if partial.any():  # token dropping: keep traces valid (a record is all k experts or none)
            self.dropped_records += int(partial.sum())
            ids_np[partial] = -1
        w_np = np.where(ids_np >= 0, w_np, 0).astype(np.float32)
        layer_number = getattr(module, "layer_number", None)
        layer, _ = plan_layer_index(module.config, layer_number, self.layer_map)
        phase = _PHASES[self._phase] if self._phase is not None else (PHASE_PREFILL if seq > 1 else PHASE_DECODE)
        req = self._request_ids if self._request_ids is not None else np.arange(batch, dtype=np.int64)
        if req.shape != (batch,):
            raise GraceInputError(f"request_ids has {req.shape[0]} entries but the batch has {batch} columns")
        self._records.append(_Record(layer, ids_np, w_np, seq, batch, phase, req))

    # ------------------------------------------------------------------ output
    def _passes(self) -> list[_Pass]:
        passes: list[_Pass] = []
        current: _Pass | None = None
        for r in self._records:
            T = r.ids.shape[0]
            if current is None or r.layer in current.layers or current.tokens != T:
                current = _Pass(tokens=T, phase=r.phase, request_ids=np.tile(r.request_ids, r.seq), layers={})
                passes.append(current)
            current.layers[r.layer] = (r.ids, r.weights)
        return passes

    def trace(self, model_name: str = "megatron", source: str = "megatron_grace.adapters.megatron.RoutingRecorder") -> RoutingTrace:
        """This rank's recorded tokens as a RoutingTrace ``[tokens, MoE layers, k]`` (-1 where a layer is absent)."""
        passes = self._passes()
        L, k = max(self.num_layers, 1 + max((layer for p in passes for layer in p.layers), default=0)), self.top_k
        T = sum(p.tokens for p in passes)
        ids = np.full((T, L, k), -1, dtype=np.int32)
        gw = np.zeros((T, L, k), dtype=np.float32)
        req = np.zeros(T, dtype=np.int64)
        phase = np.zeros(T, dtype=np.int8)
        row = 0
        for p in passes:
            sl = slice(row, row + p.tokens)
            for layer, (i, w) in p.layers.items():
                ids[sl, layer, : i.shape[1]] = i
                gw[sl, layer, : w.shape[1]] = w
            req[sl] = p.request_ids
            phase[sl] = p.phase
            row += p.tokens
        return RoutingTrace(expert_ids=ids, num_experts=self.num_experts, gate_weights=gw if self.record_weights else None,
                            request_ids=req, phase=phase, model=model_name, source=source,
                            extra={"passes": len(passes), "dropped_records": self.dropped_records})

    def gathered_trace(self, group: Any = None, model_name: str = "megatron") -> RoutingTrace:
        """Every rank's trace concatenated in rank order (collective over ``group``; same result on every rank).

        Request ids are made distinct across ranks: rank ``r``'s ids are offset by the number of
        requests of the ranks before it.
        """
        mine = self.trace(model_name)
        world = dist.get_world_size(group)
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, (mine.expert_ids, mine.gate_weights, mine.request_ids, mine.phase), group=group)
        return concat_traces(parts, self.num_experts, model_name, weights=self.record_weights)


def concat_traces(parts: Sequence[tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]], num_experts: int, model_name: str,
                  weights: bool = True) -> RoutingTrace:
    """One RoutingTrace from ``(ids, gate_weights, request_ids, phase)`` parts, request ids made distinct."""
    ids, gws, reqs, phases = [], [], [], []
    offset = 0
    for i, w, r, p in parts:
        ids.append(i)
        gws.append(w if w is not None else np.zeros(i.shape, dtype=np.float32))
        reqs.append(r + offset)
        phases.append(p)
        offset += int(r.max()) + 1 if r.size else 0
    return RoutingTrace(expert_ids=np.concatenate(ids), num_experts=num_experts, gate_weights=np.concatenate(gws) if weights else None,
                        request_ids=np.concatenate(reqs), phase=np.concatenate(phases), model=model_name,
                        source="megatron_grace.adapters.megatron.RoutingRecorder (gathered)")


def _first_moe_index(config: Any) -> int:
    pattern = moe_layer_pattern(config)
    if 1 not in pattern:
        raise GraceInputError("the model config has no MoE layer (moe_layer_freq)")
    return pattern.index(1)


__all__ = ["RoutingRecorder", "concat_traces"]
