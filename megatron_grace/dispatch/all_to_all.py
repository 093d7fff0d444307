"""Collective building blocks: uneven ``all_to_all_single``, count exchange, traffic log, and the
exchange of rows to (rank, slot) destinations inside one process group and back.

Only ``all_to_all_single`` is used (the list form fails with uneven sizes on gloo); every
tensor stays on the device of the input rows, so the same code runs on gloo (CPU) and NCCL
(CUDA). A group of size 1 is served by a local copy, without a collective.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_grace.dispatch.permute import Permutation, labels_from_counts, permute, sort_by_key, unpermute

TRAFFIC_KINDS = ("dispatch", "combine", "meta")


def all_to_all_uneven(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group: Any, group_size: int) -> torch.Tensor:
    """Send chunk ``i`` of ``x`` (``send_splits[i]`` rows) to group rank ``i``; receive ``recv_splits[j]`` rows from ``j``.

    Args:
        x: ``[sum(send_splits), ...]`` rows in destination order (contiguous chunks).
        send_splits: rows for each group rank (``group_size`` ints, zeros allowed).
        recv_splits: rows coming from each group rank.
        group: the process group (``None`` = default group).
        group_size: its size.

    Returns:
        ``[sum(recv_splits), ...]`` rows grouped by source rank, same dtype and device as ``x``.
    """
    if group_size == 1:
        return x
    out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv_splits, input_split_sizes=send_splits, group=group)
    return out


def exchange_counts(send_counts: torch.Tensor, group: Any, group_size: int) -> torch.Tensor:
    """All-to-all of per-destination counts.

    Args:
        send_counts: int64 ``[W, C]``; row ``i`` goes to group rank ``i``.

    Returns:
        int64 ``[W, C]``; row ``j`` is what group rank ``j`` sent to this rank.
    """
    if group_size == 1:
        return send_counts.clone()
    send = send_counts.contiguous()
    out = torch.empty_like(send)
    dist.all_to_all_single(out, send, group=group)
    return out


@dataclass
class TrafficLog:
    """Bytes and rows this rank sent to / received from every GPU during one forward pass.

    Attributes:
        num_gpus: G (GPUs of the plan = ranks of the expert-parallel group).
        sent_bytes / recv_bytes: kind -> int64 ``[G]`` (kinds: ``dispatch`` = hidden rows going to
            experts, ``combine`` = results coming back, ``meta`` = counts and routing metadata).
        sent_rows / recv_rows: kind -> int64 ``[G]`` rows (``meta`` counts records).
        times: phase -> seconds spent (filled by :meth:`tick` when ``timing`` is on): ``route``,
            ``permute_pre`` (sorting and gathering before the first collective), ``comm``,
            ``permute`` (later sorting), ``experts``, ``combine``.
        timing: whether :meth:`tick` measures.
        sync: called before each measurement (e.g. ``torch.cuda.synchronize``) so that
            asynchronous device work is attributed to its phase; None on CPU.
    """

    num_gpus: int
    sent_bytes: dict[str, np.ndarray] = field(default_factory=dict)
    recv_bytes: dict[str, np.ndarray] = field(default_factory=dict)
    sent_rows: dict[str, np.ndarray] = field(default_factory=dict)
    recv_rows: dict[str, np.ndarray] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)
    timing: bool = True
    sync: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        for table in (self.sent_bytes, self.recv_bytes, self.sent_rows, self.recv_rows):
            for kind in TRAFFIC_KINDS:
                table.setdefault(kind, np.zeros(self.num_gpus, dtype=np.int64))
        self._last = time.perf_counter()

    def tick(self, phase: str) -> None:
        """Charge the time since the previous tick to ``phase``."""
        if not self.timing:
            return
        if self.sync is not None:
            self.sync()
        now = time.perf_counter()
        self.times[phase] = self.times.get(phase, 0.0) + (now - self._last)
        self._last = now

    def record(self, kind: str, peers: list[int], send_rows: list[int], recv_rows: list[int], row_bytes: int) -> None:
        """Add one all-to-all: ``peers[i]`` is the GPU of group rank ``i``; row counts per group rank."""
        idx = np.asarray(peers, dtype=np.int64)
        s = np.asarray(send_rows, dtype=np.int64)
        r = np.asarray(recv_rows, dtype=np.int64)
        np.add.at(self.sent_rows[kind], idx, s)
        np.add.at(self.recv_rows[kind], idx, r)
        np.add.at(self.sent_bytes[kind], idx, s * row_bytes)
        np.add.at(self.recv_bytes[kind], idx, r * row_bytes)


def row_nbytes(x: torch.Tensor) -> int:
    """Bytes of one row of ``x [n, ...]``."""
    per = x.element_size()
    for d in x.shape[1:]:
        per *= int(d)
    return per


@dataclass(frozen=True)
class GroupSpec:
    """A process group and where its members sit in the plan.

    Attributes:
        group: the torch.distributed group (``None`` = default group).
        size: number of ranks.
        rank: this process's rank in it.
        peers: GPU index (plan numbering) of each group rank.
    """

    group: Any
    size: int
    rank: int
    peers: tuple[int, ...]


@dataclass
class SlotHandle:
    """What :meth:`SlotExchange.send_back` needs to return results to their senders."""

    perm: Permutation  # sender side: rows sorted by (dest, slot)
    recv_perm: Permutation  # receiver side: received rows sorted by slot
    send_splits: list[int]
    recv_splits: list[int]


class SlotExchange:
    """Send rows to (group rank, slot) destinations, group them by slot at the receiver, and back.

    Args:
        spec: the group.
        max_slots: S_max, the largest slot count of any member (width of the count matrix).
        local_slots: S, slots hosted by this rank.
    """

    def __init__(self, spec: GroupSpec, max_slots: int, local_slots: int) -> None:
        self.spec, self.max_slots, self.local_slots = spec, max_slots, local_slots

    def send(self, source: torch.Tensor, row: torch.Tensor, dest: torch.Tensor, slot: torch.Tensor, log: TrafficLog | None = None,
             first: bool = True) -> tuple[torch.Tensor, list[int], SlotHandle]:
        """Dispatch rows ``source[row]`` to (group rank, slot) destinations.

        Args:
            source: ``[N, h]`` rows to pick from (e.g. the hidden states).
            row: int64 ``[n]`` which row of ``source`` each item sends (one item per (token, expert) pair).
            dest: int64 ``[n]`` destination group rank of each item.
            slot: int64 ``[n]`` slot on the destination, in ``[0, max_slots)``.
            log: traffic log to add this exchange to.
            first: whether this is the forward pass's first exchange (its sorting is timed as
                ``permute_pre``, the work done before any collective).

        Returns:
            ``(rows [m, h]`` received and grouped by local slot (slot 0 first, then 1, ...),
            ``slot_counts`` (S ints, rows per local slot), handle for :meth:`send_back`).
        """
        spec, S_max, S = self.spec, self.max_slots, self.local_slots
        W = spec.size
        pre = "permute_pre" if first else "permute"
        perm = sort_by_key(dest * S_max + slot, W * S_max)  # one stable sort by (dest rank, slot)
        x_sorted = source.index_select(0, row.index_select(0, perm.order))  # one gather, already in send order
        send_counts = perm.counts.view(W, S_max)
        mark_phase(log, pre)
        recv_counts = exchange_counts(send_counts, spec.group, W)
        host = torch.cat([send_counts.sum(1), recv_counts.sum(1), recv_counts.sum(0)]).cpu().tolist()  # one device sync
        send_splits, recv_splits, per_slot = host[:W], host[W:2 * W], host[2 * W:]
        if any(per_slot[S:]):
            raise RuntimeError(f"received rows for slots >= {S}, which this rank does not host: the ranks use different plans")
        x_recv = all_to_all_uneven(x_sorted, send_splits, recv_splits, spec.group, W)
        mark_phase(log, "comm")
        recv_perm = sort_by_key(labels_from_counts(recv_counts), S_max)
        x_slots = permute(x_recv, recv_perm)
        if log is not None:
            log.record("meta", list(spec.peers), [S_max] * W, [S_max] * W, 8)
            log.record("dispatch", list(spec.peers), send_splits, recv_splits, row_nbytes(source))
        mark_phase(log, "permute")
        return x_slots, per_slot[:S], SlotHandle(perm, recv_perm, send_splits, recv_splits)

    def send_back(self, y: torch.Tensor, handle: SlotHandle, log: TrafficLog | None = None) -> torch.Tensor:
        """Return results: ``y [m, h]`` in the slot order of :meth:`send` -> ``[n, h]`` in the sender's input order."""
        W = self.spec.size
        y_recv = unpermute(y, handle.recv_perm)
        mark_phase(log, "permute")
        y_back = all_to_all_uneven(y_recv, handle.recv_splits, handle.send_splits, self.spec.group, W)
        mark_phase(log, "comm")
        if log is not None:
            log.record("combine", list(self.spec.peers), handle.recv_splits, handle.send_splits, row_nbytes(y))
        out = unpermute(y_back, handle.perm)
        mark_phase(log, "permute")
        return out


def mark_phase(log: TrafficLog | None, phase: str) -> None:
    """``log.tick(phase)`` when there is a log."""
    if log is not None:
        log.tick(phase)
