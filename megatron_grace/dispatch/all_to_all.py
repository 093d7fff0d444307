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

from megatron_grace import _ops

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


def to_host(t: torch.Tensor) -> list[int]:
    """The one device-to-host copy of a dispatch phase: an int tensor's values as Python ints.

    On a GPU this is the phase's only host synchronisation (the split sizes an uneven
    ``all_to_all_single`` needs); everything else stays on the device. Kept in one place so that
    tests can count the calls.
    """
    return t.reshape(-1).cpu().tolist()


def chunk_transpose_index(counts: torch.Tensor, total: int) -> torch.Tensor:
    """Gather index that reorders rows laid out in ``[A, B]`` chunks (row-major: chunk ``(a, b)`` holds
    ``counts[a, b]`` consecutive rows) into ``[B, A]`` chunk order, keeping the rows of a chunk in order.

    Used at the receiver: rows arrive grouped by source rank, then slot; the experts want them
    grouped by slot, then source. Device ops only (``total`` = ``counts.sum()``, known on the host).

    Args:
        counts: int64 ``[A, B]`` rows per chunk.
        total: ``counts.sum()`` as a host int.

    Returns:
        int64 ``[total]``: ``out[p] = in[index[p]]``.
    """
    A, B = counts.shape
    flat = counts.reshape(-1)
    in_start = torch.cumsum(flat, 0) - flat  # [A*B] start of chunk (a, b) in the input
    t_counts = counts.t().reshape(-1)  # [B*A] in output chunk order (b, a)
    out_end = torch.cumsum(t_counts, 0)
    p = torch.arange(total, device=counts.device)
    chunk = torch.searchsorted(out_end, p, right=True)  # output chunk c = b * A + a
    a, b = chunk % A, torch.div(chunk, A, rounding_mode="floor")
    return in_start.index_select(0, a * B + b) + p - (out_end - t_counts).index_select(0, chunk)


@dataclass
class SlotHandle:
    """What :meth:`SlotExchange.send_back` needs to return results to their senders."""

    position: torch.Tensor  # int64 [n] sender side: row of each item in the send buffer (sorted by (dest, slot))
    recv_index: torch.Tensor  # int64 [m] receiver side: received row of each slot-ordered row
    send_splits: list[int]
    recv_splits: list[int]


class SlotExchange:
    """Send rows to (group rank, slot) destinations, group them by slot at the receiver, and back.

    One fused permutation (histogram, stable positions, gather), one all-to-all of ``[W, S_max]``
    counts, **one** device-to-host copy of the split sizes (:func:`to_host`), one uneven
    all-to-all of rows; the receiver regroups by slot with one gather. No other host
    synchronisation.

    Args:
        spec: the group.
        max_slots: S_max, the largest slot count of any member (width of the count matrix).
        local_slots: S, slots hosted by this rank.
    """

    def __init__(self, spec: GroupSpec, max_slots: int, local_slots: int) -> None:
        self.spec, self.max_slots, self.local_slots = spec, max_slots, local_slots

    def send(self, source: torch.Tensor, dest: torch.Tensor, slot: torch.Tensor, items_per_row: int, log: TrafficLog | None = None,
             first: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[int], SlotHandle]:
        """Dispatch item ``i`` (row ``source[i // items_per_row]``) to (group rank ``dest[i]``, slot ``slot[i]``).

        Args:
            source: ``[N, h]`` rows (e.g. the hidden states).
            dest: int64 ``[n]`` destination group rank of each item, -1 = not sent.
            slot: int64 ``[n]`` slot on the destination, in ``[0, max_slots)`` (ignored where not sent).
            items_per_row: items per source row (top-k for token rows).
            log: traffic log to add this exchange to (None = no bookkeeping).
            first: whether this is the forward pass's first exchange (its sorting is timed as
                ``permute_pre``, the work done before any collective).

        Returns:
            ``(rows [m, h]`` received and grouped by local slot (slot 0 first, then 1, ...),
            ``slot_counts`` int64 ``[S]`` on the device, the same counts as host ints, handle for
            :meth:`send_back`).
        """
        spec, S_max, S = self.spec, self.max_slots, self.local_slots
        W = spec.size
        pre = "permute_pre" if first else "permute"
        sentinel = W * S_max  # items not sent sort last, past every real chunk
        key = torch.where(dest >= 0, dest * S_max + slot, torch.full_like(dest, sentinel))
        x_sorted, position, counts = _ops.permute_by_key(source, key, sentinel + 1, items_per_row)
        send_counts = counts[:sentinel].view(W, S_max)
        mark_phase(log, pre)
        recv_counts = exchange_counts(send_counts, spec.group, W)
        # the phase's one device sync: rows to send per rank, to receive per rank, to receive per slot (sums on the device)
        host = to_host(torch.cat([send_counts.sum(1), recv_counts.sum(1), recv_counts.sum(0)]))
        send_splits, recv_splits, per_slot = host[:W], host[W: 2 * W], host[2 * W:]
        if any(per_slot[S:]):
            raise RuntimeError(f"received rows for slots >= {S}, which this rank does not host: the ranks use different plans")
        x_recv = all_to_all_uneven(x_sorted[: sum(send_splits)], send_splits, recv_splits, spec.group, W)
        mark_phase(log, "comm")
        m = sum(recv_splits)
        recv_index = chunk_transpose_index(recv_counts[:, :S], m)
        x_slots = _ops.gather_rows(x_recv, recv_index)
        if log is not None:
            log.record("meta", list(spec.peers), [S_max] * W, [S_max] * W, 8)
            log.record("dispatch", list(spec.peers), send_splits, recv_splits, row_nbytes(source))
        mark_phase(log, "permute")
        return x_slots, recv_counts[:, :S].sum(0), per_slot[:S], SlotHandle(position, recv_index, send_splits, recv_splits)

    def send_back(self, y: torch.Tensor, handle: SlotHandle, log: TrafficLog | None = None) -> torch.Tensor:
        """Return results: ``y [m, h]`` in the slot order of :meth:`send` -> ``[n_sent, h]`` in the sender's send-buffer
        order; item ``i``'s result is row ``handle.position[i]`` (for items that were sent)."""
        W = self.spec.size
        y_recv = _ops.scatter_rows(y, handle.recv_index)
        mark_phase(log, "permute")
        y_back = all_to_all_uneven(y_recv, handle.recv_splits, handle.send_splits, self.spec.group, W)
        mark_phase(log, "comm")
        if log is not None:
            log.record("combine", list(self.spec.peers), handle.recv_splits, handle.send_splits, row_nbytes(y))
        return y_back


def mark_phase(log: TrafficLog | None, phase: str) -> None:
    """``log.tick(phase)`` when there is a log."""
    if log is not None:
        log.tick(phase)
