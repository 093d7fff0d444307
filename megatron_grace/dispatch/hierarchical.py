"""Hierarchical dispatch (GRACE-MoE's "hierarchical sparse communication").

GPUs are ``N`` nodes x ``P`` GPUs, node-major (GPU ``g = n * P + p``). A token on GPU
``(n_s, p_s)`` whose pairs (token, expert copy) go to GPUs of node ``m``:

1. **inter-node**: the token crosses to node ``m`` once (one row per (token, node)), to the
   *peer* GPU ``(m, p_s)`` (same local index), in an all-to-all inside the *inter-node group*
   of local index ``p_s`` (one GPU per node), together with one metadata record per pair it
   needs there: ``(row, gpu-in-node, slot, gate weight)``;
2. **intra-node**: the peer forwards each received row once to every GPU of its node that the
   row's pairs need (one row per (token, GPU)), in an all-to-all inside the *intra-node group*
   of node ``m``, with one metadata record per pair: ``(row, slot, gate weight)``. A row the
   peer itself needs goes to the peer's own chunk of that all-to-all (a local copy, counted as
   same-GPU traffic, nothing crosses NVLink);
3. **experts**: the receiving GPU replicates each received row locally for its pairs (one
   gather into slot order), runs its slots, and reduces the weighted results of each row's
   pairs (in top-k order, float32 accumulation) to one partial sum per (token, GPU) row;
4. **combine**: the partial sums go back to the peer in the inverse intra-node all-to-all
   (one row per (token, GPU)); the peer adds them per received row in GPU order (one partial
   sum per (token, node)), which crosses back in the inverse inter-node all-to-all; the source
   adds the partial sums of the nodes in node order.

Rows for the source's own node take the same path with a local copy in step 1 (the source is
its own peer), so a token needed only on its own GPU crosses no link, and a token needing GPUs
of its own node crosses NVLink once to each of them: exactly the bytes the simulator's
``hierarchical`` mode counts (:mod:`megatron_grace.simulation.simulator`). Every grouping is a
stable sort or a segmented index operation (no loops over tokens), and every sum runs in a fixed
order (no scatter-add), so results do not depend on timing. Both groups are ``dist.new_group``
sub-groups (see :class:`HierarchicalGroups`); every phase is an uneven ``all_to_all_single``
after one all-to-all of counts.

**Host synchronisation**: exactly one per phase, the batched device-to-host copy of the counts
(:func:`megatron_grace.dispatch.all_to_all.to_host`: the split sizes the uneven all-to-alls need, as in Megatron-Core), so two per
forward; :meth:`HierarchicalDispatcher.combine` reuses those sizes and adds none. Everything else
is device code with shapes known on the host: the pairs stay in the router's dense ``[T * k]``
layout (dropped pairs sort past every real destination and are never sent), counts come from
``destination_histogram``, the starts of runs (the deduplicated rows) are compacted to the front
by a stable two-key ``sort_by_key`` and cut at a length read from the phase's one copy, and the
summation widths are static (top-k, ``P``, ``N``). Per-step value checks that would read device
values run only in debug mode (``GRACE_DEBUG=1``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_grace import _ops
from megatron_grace._debug import debug_enabled
from megatron_grace._segments import position_in_run, rank_in_group, run_starts
from megatron_grace.dispatch import all_to_all as _a2a
from megatron_grace.dispatch.all_to_all import GroupSpec, TrafficLog, all_to_all_uneven, exchange_counts, mark_phase, row_nbytes
from megatron_grace.dispatch.pairs import RoutedPairs
from megatron_grace.errors import GraceInputError

_META_FIELDS = 4  # phase 1: (row in the message, gpu in node, slot, gate weight as float32 bits), int32
_FWD_META_FIELDS = 3  # phase 2: (row in the message, slot, gate weight as float32 bits), int32


@dataclass(frozen=True)
class HierarchicalGroups:
    """The sub-groups of hierarchical dispatch, from this rank's point of view.

    Attributes:
        num_nodes: N.
        gpus_per_node: P.
        inter: the inter-node group of this rank's local index (group rank = node).
        intra: the intra-node group of this rank's node (group rank = local index).
    """

    num_nodes: int
    gpus_per_node: int
    inter: GroupSpec
    intra: GroupSpec

    @staticmethod
    def build(gpus_per_node: int, group: Any = None) -> HierarchicalGroups:
        """The sub-groups when the expert-parallel group is the whole world (or None).

        Every process must call this, in the same order, with the same arguments
        (``dist.new_group`` is collective over the default group). Results are cached, so
        layers share their groups. For expert-parallel groups smaller than the world use
        :meth:`build_all`.

        Args:
            gpus_per_node: P; the world size must be a multiple of it.
            group: None or a group spanning the world (its rank ``i`` is GPU ``i``).
        """
        members = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(dist.get_world_size()))
        if len(members) != dist.get_world_size():
            raise GraceInputError("HierarchicalGroups.build needs the whole world; for smaller expert-parallel groups every "
                                  "process must call HierarchicalGroups.build_all(all_ep_groups, gpus_per_node)")
        out = HierarchicalGroups.build_all([members], gpus_per_node)
        assert out is not None
        return out

    @staticmethod
    def for_group(ep_group: Any, gpus_per_node: int | None) -> HierarchicalGroups | None:
        """This process's sub-groups for its expert-parallel group ``ep_group``, created for every EP group of the world.

        Collective over the default group: every process calls it (with None for
        ``gpus_per_node`` or ``ep_group`` when it has no GRACE layer). One ``all_gather_object``
        collects each process's (EP group members, GPUs per node); then :meth:`build_all` runs
        on the distinct entries, in the same order everywhere.

        Raises:
            GraceInputError: an EP group whose size is not a multiple of its GPUs per node
                (raised on every process).
        """
        mine = None
        if gpus_per_node is not None:
            members = tuple(dist.get_process_group_ranks(ep_group)) if ep_group is not None else tuple(range(dist.get_world_size()))
            mine = (members, int(gpus_per_node))
        entries: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(entries, mine)
        distinct = sorted({e for e in entries if e is not None})
        for members, gpn in distinct:
            if gpn < 1 or len(members) % gpn:
                raise GraceInputError(f"hierarchical dispatch needs the expert-parallel group size ({len(members)}) to be a "
                                      f"multiple of the plan's GPUs per node ({gpn})")
        result = None
        for gpn in sorted({g for _, g in distinct}):
            built = HierarchicalGroups.build_all([m for m, g in distinct if g == gpn], gpn)
            if mine is not None and gpn == mine[1]:
                result = built
        return result

    @staticmethod
    def build_all(ep_groups: Sequence[Sequence[int]], gpus_per_node: int) -> HierarchicalGroups | None:
        """Create (or reuse) the sub-groups of every expert-parallel group; return this process's.

        Every process of the default group must call this with the same list (``dist.new_group``
        is collective over the default group), e.g. ``[[0, 1, 2, 3], [4, 5, 6, 7]]`` for two
        expert-parallel groups of 4 (global ranks; position ``i`` in a group is GPU ``i`` of the
        plan, node-major).

        Args:
            ep_groups: global ranks of each expert-parallel group.
            gpus_per_node: P; every group's size must be a multiple of it.

        Returns:
            The groups of the expert-parallel group this process belongs to (None if none).
        """
        me = dist.get_rank()
        mine = None
        for members in ep_groups:
            members = tuple(int(r) for r in members)
            key = (id(dist.group.WORLD), members, gpus_per_node)
            if key not in _GROUP_CACHE:
                _GROUP_CACHE[key] = _create(members, gpus_per_node, me)
            if me in members:
                mine = _GROUP_CACHE[key]
        return mine


def _create(members: tuple[int, ...], gpus_per_node: int, me_global: int) -> HierarchicalGroups | None:
    """Create the inter- and intra-node groups of one expert-parallel group (called by every process)."""
    W = len(members)
    if gpus_per_node < 1 or W % gpus_per_node:
        raise GraceInputError(f"hierarchical dispatch needs the group size ({W}) to be a multiple of gpus_per_node ({gpus_per_node})")
    P, N = gpus_per_node, W // gpus_per_node
    member = me_global in members
    me = members.index(me_global) if member else -1
    n_me, p_me = divmod(me, P) if member else (-1, -1)

    def single() -> GroupSpec:  # a group of one: served by local copies, no process group
        return GroupSpec(group=None, size=1, rank=0, peers=(me,))

    inter = single() if N == 1 else None
    intra = single() if P == 1 else None
    if N > 1:
        for p in range(P):  # every process creates every group, in the same order
            gpus = [n * P + p for n in range(N)]
            g = dist.new_group([members[x] for x in gpus])
            if p == p_me:
                inter = GroupSpec(group=g, size=N, rank=n_me, peers=tuple(gpus))
    if P > 1:
        for n in range(N):
            gpus = [n * P + p for p in range(P)]
            g = dist.new_group([members[x] for x in gpus])
            if n == n_me:
                intra = GroupSpec(group=g, size=P, rank=p_me, peers=tuple(gpus))
    if not member:
        return None
    assert inter is not None and intra is not None
    return HierarchicalGroups(num_nodes=N, gpus_per_node=P, inter=inter, intra=intra)


_GROUP_CACHE: dict[tuple[int, tuple[int, ...], int], HierarchicalGroups | None] = {}


def _exclusive_cumsum(counts: torch.Tensor) -> torch.Tensor:
    """int64 ``[n]``: start offset of each chunk when chunks of ``counts [n]`` rows are laid out in order."""
    return torch.cumsum(counts, 0) - counts


def _chunk_of(counts: torch.Tensor, total: int) -> torch.Tensor:
    """int64 ``[total]``: chunk index of each row, for chunks of ``counts [n]`` rows (``total`` = their sum, a host int)."""
    return torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts, output_size=total)


def _compact_starts(starts: torch.Tensor) -> torch.Tensor:
    """int64 ``[n]``: the positions where ``starts [n]`` is True first (ascending), then the others.

    One stable two-key counting sort; the caller cuts the front at the number of starts, read on
    the host from its phase's one copy (a boolean-mask index would synchronise here).
    """
    return _ops.sort_by_key((~starts).long(), 2)[0]


@dataclass
class HierarchicalHandle:
    """What :meth:`HierarchicalDispatcher.combine` needs, from the three roles this rank plays.

    Row counts are host ints from the two batched copies of :meth:`HierarchicalDispatcher.dispatch`,
    so the combine needs no synchronisation.
    """

    num_tokens: int
    out_dtype: torch.dtype
    # source (phase 1 sender)
    row_token: torch.Tensor  # int64 [U] token of each row sent across (sorted by node, then token)
    row_node: torch.Tensor  # int64 [U] destination node of each row
    send_rows: list[int]  # [N] rows sent to each node's peer
    recv_rows: list[int]  # [N] rows received from each node's peer
    # peer (phase 2 sender)
    fwd_row: torch.Tensor  # int64 [F] received (phase-1) row of each forwarded row (sorted by GPU, then row)
    fwd_pos: torch.Tensor  # int64 [F] rank of the forwarded row's GPU among the GPUs its row went to
    fwd_send: list[int]  # [P] rows forwarded to each GPU of the node
    fwd_recv: list[int]  # [P] rows received from each GPU of the node (acting as peer)
    # expert GPU (phase 2 receiver)
    in_row: torch.Tensor  # int64 [m] received (phase-2) row of each local pair (ascending)
    in_pos: torch.Tensor  # int64 [m] position of the pair inside its row (top-k order)
    in_weight: torch.Tensor  # float32 [m] gate weight of each local pair
    in_width: int  # positions per received row (top-k)
    in_value: torch.Tensor  # int64 [m] row of the expert output (slot order) holding each local pair's result


class HierarchicalDispatcher:
    """Node- and GPU-deduplicated dispatch through the peer GPU of each node (see the module docstring).

    Args:
        groups: the sub-groups (:meth:`HierarchicalGroups.build`).
        max_slots: largest slot count of any GPU at this layer.
        local_slots: slots on this rank.
    """

    mode = "hierarchical"

    def __init__(self, groups: HierarchicalGroups, max_slots: int, local_slots: int) -> None:
        self.groups = groups
        self.max_slots, self.local_slots = max_slots, local_slots

    def _check_pairs(self, pairs: RoutedPairs) -> None:
        """Debug mode only (reads device values): destinations in range, dropped pairs marked in both fields."""
        G = self.groups.num_nodes * self.groups.gpus_per_node
        gpu, slot = pairs.gpu, pairs.slot
        if gpu.numel() != pairs.num_tokens * pairs.top_k or slot.shape != gpu.shape or pairs.weight.shape != gpu.shape:
            raise GraceInputError(f"pairs must be dense [T * k] = [{pairs.num_tokens * pairs.top_k}]: gpu {tuple(gpu.shape)}, "
                                  f"slot {tuple(slot.shape)}, weight {tuple(pairs.weight.shape)}")
        if gpu.numel() and (bool(((gpu < -1) | (gpu >= G)).any()) or bool(((slot < -1) | (slot >= self.max_slots)).any())
                            or bool(((gpu < 0) != (slot < 0)).any())):
            raise GraceInputError(f"pairs out of range: gpu must be in [-1, {G}), slot in [-1, {self.max_slots}), "
                                  "-1 in both or neither")

    def dispatch(self, hidden: torch.Tensor, pairs: RoutedPairs, log: TrafficLog | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, list[int], HierarchicalHandle]:
        """Phases 1 and 2: one row per (token, node) to the node peers, then one row per (token, GPU)
        to the expert GPUs inside each node, replicated there per pair.

        Two host synchronisations (one batched count copy per phase), nothing else.

        Args:
            hidden: ``[T, h]``.
            pairs: this rank's pairs, dense ``[T * k]`` (dropped pairs, ``gpu = -1``, are not sent).
            log: traffic log (None = no bookkeeping).

        Returns:
            ``(expert input [m, h]`` grouped by local slot, ``slot_counts`` int64 ``[S]`` on the
            device, the same counts as host ints, handle).
        """
        N, P = self.groups.num_nodes, self.groups.gpus_per_node
        inter, intra = self.groups.inter, self.groups.intra
        S_max, S = self.max_slots, self.local_slots
        T, k, dev = pairs.num_tokens, pairs.top_k, hidden.device
        if debug_enabled():
            self._check_pairs(pairs)
        # ---- phase 1 (source): group the pairs by (destination node, token); one row per group crosses.
        # The pairs are token-major, so a stable sort by node alone orders them by (node, token, top-k
        # position); dropped pairs get node N and sort last.
        node = torch.where(pairs.gpu >= 0, torch.div(pairs.gpu, P, rounding_mode="floor"), torch.full_like(pairs.gpu, N))
        order, pairs_per_node = _ops.sort_by_key(node, N + 1)  # pairs_per_node[N] = dropped pairs
        s_node = node.index_select(0, order)
        s_token = torch.div(order, max(k, 1), rounding_mode="floor")
        s_gpu = pairs.gpu.index_select(0, order)
        starts = run_starts(s_node * T + s_token) & (s_node < N)  # first pair of each (node, token) row
        row_id = torch.cumsum(starts.long(), 0) - 1  # [T*k] global row of each sorted (valid) pair
        rows_per_node = _ops.destination_histogram(torch.where(starts, s_node, torch.full_like(s_node, -1)), N + 1)  # [N] = 0
        row_start = _exclusive_cumsum(rows_per_node)
        meta = torch.stack([
            (row_id - row_start.index_select(0, s_node)).int(),
            (s_gpu - s_node * P).int(),
            pairs.slot.index_select(0, order).int(),
            pairs.weight.index_select(0, order).float().view(torch.int32),
        ], dim=1)  # [T*k, 4]: the valid pairs first, in send order
        row_pos = _compact_starts(starts)  # [T*k]: sorted position of each row's first pair, rows first
        send_counts = torch.stack([rows_per_node[:N], pairs_per_node[:N], torch.full_like(rows_per_node[:N], k)], dim=1)
        mark_phase(log, "permute_pre")
        recv_counts = exchange_counts(send_counts, inter.group, N)
        host = _a2a.to_host(torch.cat([send_counts[:, :2].reshape(-1), recv_counts.reshape(-1)]))  # phase 1's one host sync
        send_rows, send_pairs = host[0:2 * N:2], host[1:2 * N:2]
        recv = host[2 * N:]
        recv_rows, recv_pairs, recv_k = recv[0::3], recv[1::3], recv[2::3]
        U, V, R, Q = sum(send_rows), sum(send_pairs), sum(recv_rows), sum(recv_pairs)
        row_pos = row_pos[:U]
        row_token = s_token.index_select(0, row_pos)
        row_node = s_node.index_select(0, row_pos)
        x_rows = _ops.gather_rows(hidden, row_token)
        x_peer = all_to_all_uneven(x_rows, send_rows, recv_rows, inter.group, N)
        meta_peer = all_to_all_uneven(meta[:V], send_pairs, recv_pairs, inter.group, N)
        mark_phase(log, "comm")
        if log is not None:
            log.record("meta", list(inter.peers), [3] * N, [3] * N, 8)
            log.record("dispatch", list(inter.peers), send_rows, recv_rows, row_nbytes(hidden))
            log.record("meta", list(inter.peers), send_pairs, recv_pairs, row_nbytes(meta))
        # ---- phase 2 (peer): rows from every source node, pairs referencing them (ascending row, top-k
        # order inside a row). A stable sort by destination GPU orders them by (GPU, row, top-k position);
        # one row per (GPU, row) group is forwarded.
        peer_src = _chunk_of(recv_counts[:, 1], Q)  # source node of each received pair
        peer_row = _exclusive_cumsum(recv_counts[:, 0]).index_select(0, peer_src) + meta_peer[:, 0].long()
        dest = meta_peer[:, 1].long()
        slot = meta_peer[:, 2].long()
        order2, pairs_per_dest = _ops.sort_by_key(dest, P)
        d_dest = dest.index_select(0, order2)
        d_row = peer_row.index_select(0, order2)
        starts2 = run_starts(d_dest * R + d_row)
        fwd_id = torch.cumsum(starts2.long(), 0) - 1  # [Q] forwarded row of each sorted pair
        fwd_per_dest = _ops.destination_histogram(torch.where(starts2, d_dest, torch.full_like(d_dest, -1)), P)
        meta2 = torch.stack([
            (fwd_id - _exclusive_cumsum(fwd_per_dest).index_select(0, d_dest)).int(),
            slot.index_select(0, order2).int(),
            meta_peer[:, 3].index_select(0, order2),
        ], dim=1)  # [Q, 3]
        fwd_pos_full = _compact_starts(starts2)  # sorted position of each forwarded row's first pair, rows first
        pair_slots = _ops.destination_histogram(dest * S_max + slot, P * S_max).view(P, S_max)
        width = max(recv_k, default=1) if Q else 1  # host ints from phase 1's copy
        send_counts2 = torch.cat([fwd_per_dest[:, None], torch.full_like(fwd_per_dest, width)[:, None], pair_slots], dim=1)
        mark_phase(log, "permute")
        recv_counts2 = exchange_counts(send_counts2, intra.group, P)
        host = _a2a.to_host(torch.cat([fwd_per_dest, pairs_per_dest, recv_counts2[:, 0], recv_counts2[:, 1],
                                   recv_counts2[:, 2:].sum(1), recv_counts2[:, 2:].sum(0)]))  # phase 2's one host sync
        fwd_send, fwd_send_pairs = host[:P], host[P:2 * P]
        fwd_recv, recv_width, fwd_recv_pairs, per_slot = host[2 * P:3 * P], host[3 * P:4 * P], host[4 * P:5 * P], host[5 * P:]
        if any(per_slot[S:]):  # free: already on the host
            raise RuntimeError(f"received rows for slots >= {S}, which this rank does not host: the ranks use different plans")
        F, m = sum(fwd_send), sum(fwd_recv_pairs)
        fwd_first = fwd_pos_full[:F]
        fwd_row = d_row.index_select(0, fwd_first)
        x_fwd = _ops.gather_rows(x_peer, fwd_row)
        x_in = all_to_all_uneven(x_fwd, fwd_send, fwd_recv, intra.group, P)
        meta_in = all_to_all_uneven(meta2, fwd_send_pairs, fwd_recv_pairs, intra.group, P)
        mark_phase(log, "comm")
        if log is not None:
            log.record("meta", list(intra.peers), [2 + S_max] * P, [2 + S_max] * P, 8)
            log.record("dispatch", list(intra.peers), fwd_send, fwd_recv, row_nbytes(hidden))
            log.record("meta", list(intra.peers), fwd_send_pairs, fwd_recv_pairs, row_nbytes(meta2))
        # each forwarded row's rank among the GPUs its phase-1 row goes to (GPU order): the combine's summation order
        fwd_pos = rank_in_group(fwd_row)  # fwd_row is GPU-major, so equal rows appear in GPU order
        # ---- expert GPU: replicate each received row for its pairs, in slot order.
        in_src = _chunk_of(recv_counts2[:, 2:].sum(1), m)  # GPU of the node each local pair came from
        in_row = _exclusive_cumsum(recv_counts2[:, 0]).index_select(0, in_src) + meta_in[:, 0].long()  # ascending
        slot_order, slot_counts = _ops.sort_by_key(meta_in[:, 1].long(), S_max)
        rows = _ops.gather_rows(x_in, in_row, slot_order)  # one gather, grouped by slot
        in_value = torch.empty_like(slot_order).scatter_(0, slot_order, torch.arange(m, device=dev))
        # the static top-k, or a larger one a source announced (host ints of the same copy: free)
        in_width = max([max(k, 1)] + [w for w, r in zip(recv_width, fwd_recv) if r])
        handle = HierarchicalHandle(
            num_tokens=T, out_dtype=hidden.dtype, row_token=row_token, row_node=row_node, send_rows=send_rows,
            recv_rows=recv_rows,
            fwd_row=fwd_row, fwd_pos=fwd_pos, fwd_send=fwd_send, fwd_recv=fwd_recv,
            in_row=in_row, in_pos=position_in_run(in_row), in_weight=meta_in[:, 2].contiguous().view(torch.float32),
            in_width=in_width, in_value=in_value,
        )
        mark_phase(log, "permute")
        return rows, slot_counts[:S], per_slot[:S], handle

    def combine(self, expert_out: torch.Tensor, handle: HierarchicalHandle, log: TrafficLog | None = None) -> torch.Tensor:
        """Weighted partial sum per (token, GPU) row, back to the peers, sum per (token, node) row, back
        across, sum over nodes. No host synchronisation (the sizes come from :meth:`dispatch`).

        Args:
            expert_out: ``[m, h]`` in the order of :meth:`dispatch`'s output.
            log: traffic log (None = no bookkeeping).

        Returns:
            ``[T, h]`` in the hidden dtype.
        """
        N, P = self.groups.num_nodes, self.groups.gpus_per_node
        inter, intra = self.groups.inter, self.groups.intra
        # expert GPU: one weighted partial sum per received row, pairs in top-k order (the un-permutation
        # from slot order is fused into the sum)
        part_gpu = _ops.weighted_combine(expert_out, handle.in_row, handle.in_pos, handle.in_weight, sum(handle.fwd_recv),
                                         handle.in_width, handle.out_dtype, handle.in_value)
        mark_phase(log, "combine")
        back_gpu = all_to_all_uneven(part_gpu, handle.fwd_recv, handle.fwd_send, intra.group, P)  # [F, h] forwarded-row order
        mark_phase(log, "comm")
        if log is not None:
            log.record("combine", list(intra.peers), handle.fwd_recv, handle.fwd_send, row_nbytes(part_gpu))
        # peer: one partial sum per phase-1 row, GPUs in order
        ones = torch.ones(back_gpu.shape[0], dtype=torch.float32, device=back_gpu.device)
        part_node = _ops.weighted_combine(back_gpu, handle.fwd_row, handle.fwd_pos, ones, sum(handle.recv_rows), P,
                                          handle.out_dtype)
        mark_phase(log, "combine")
        back = all_to_all_uneven(part_node, handle.recv_rows, handle.send_rows, inter.group, N)  # [U, h] in row order
        mark_phase(log, "comm")
        if log is not None:
            log.record("combine", list(inter.peers), handle.recv_rows, handle.send_rows, row_nbytes(part_node))
        # source: sum over nodes, in node order
        ones = torch.ones(back.shape[0], dtype=torch.float32, device=back.device)
        out = _ops.weighted_combine(back, handle.row_token, handle.row_node, ones, handle.num_tokens, N, handle.out_dtype)
        mark_phase(log, "combine")
        return out
