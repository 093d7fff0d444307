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
after one all-to-all of counts (one host sync per phase).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_grace.dispatch.all_to_all import GroupSpec, TrafficLog, all_to_all_uneven, exchange_counts, mark_phase, row_nbytes
from megatron_grace.dispatch.pairs import RoutedPairs
from megatron_grace.dispatch.permute import Permutation, padded_weighted_sum, position_in_run, run_starts, sort_by_key, unpermute
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


@dataclass
class HierarchicalHandle:
    """What :meth:`HierarchicalDispatcher.combine` needs, from the three roles this rank plays."""

    pairs: RoutedPairs
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
    in_width: int  # max pairs per received row
    slot_perm: Permutation  # local pairs sorted by slot (the expert input order)


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

    def dispatch(self, hidden: torch.Tensor, pairs: RoutedPairs, log: TrafficLog | None = None
                 ) -> tuple[torch.Tensor, list[int], HierarchicalHandle]:
        """Phases 1 and 2: one row per (token, node) to the node peers, then one row per (token, GPU)
        to the expert GPUs inside each node, replicated there per pair.

        Args:
            hidden: ``[T, h]``.
            pairs: this rank's pairs.

        Returns:
            ``(expert input [m, h]`` grouped by local slot, ``slot_counts`` [S], handle).
        """
        N, P = self.groups.num_nodes, self.groups.gpus_per_node
        inter, intra = self.groups.inter, self.groups.intra
        S_max, S = self.max_slots, self.local_slots
        T, dev = pairs.num_tokens, hidden.device
        node = torch.div(pairs.gpu, P, rounding_mode="floor")
        local = pairs.gpu - node * P
        # ---- phase 1 (source): group the pairs by (destination node, token); one row per group crosses.
        order = torch.sort(node * T + pairs.token, stable=True).indices  # keeps top-k order inside a token
        s_node = node.index_select(0, order)
        s_token = pairs.token.index_select(0, order)
        starts = run_starts(s_node * T + s_token)
        row_id = torch.cumsum(starts.long(), 0) - 1  # [n] global row of each sorted pair
        row_token = s_token[starts]
        row_node = s_node[starts]
        rows_per_node = torch.bincount(row_node, minlength=N)
        pairs_per_node = torch.bincount(s_node, minlength=N)
        row_start = torch.cumsum(rows_per_node, 0) - rows_per_node
        meta = torch.stack([
            (row_id - row_start.index_select(0, s_node)).int(),
            local.index_select(0, order).int(),
            pairs.slot.index_select(0, order).int(),
            pairs.weight.index_select(0, order).float().view(torch.int32),
        ], dim=1) if order.numel() else torch.zeros(0, _META_FIELDS, dtype=torch.int32, device=dev)
        x_rows = hidden.index_select(0, row_token)
        send_counts = torch.stack([rows_per_node, pairs_per_node, torch.full_like(rows_per_node, pairs.top_k)], dim=1)
        mark_phase(log, "permute_pre")
        recv_counts = exchange_counts(send_counts, inter.group, N)
        host = torch.cat([send_counts[:, :2].reshape(-1), recv_counts.reshape(-1)]).cpu().tolist()  # one device sync
        send_rows, send_pairs = host[0:2 * N:2], host[1:2 * N:2]
        recv = host[2 * N:]
        recv_rows, recv_pairs, recv_k = recv[0::3], recv[1::3], recv[2::3]
        x_peer = all_to_all_uneven(x_rows, send_rows, recv_rows, inter.group, N)
        meta_peer = all_to_all_uneven(meta, send_pairs, recv_pairs, inter.group, N)
        mark_phase(log, "comm")
        if log is not None:
            log.record("meta", list(inter.peers), [3] * N, [3] * N, 8)
            log.record("dispatch", list(inter.peers), send_rows, recv_rows, row_nbytes(hidden))
            log.record("meta", list(inter.peers), send_pairs, recv_pairs, row_nbytes(meta))
        # ---- phase 2 (peer): rows from every source node, pairs referencing them (ascending row,
        # top-k order inside a row). Group the pairs by (destination GPU, row): one row per group.
        R = sum(recv_rows)
        recv_rows_t = torch.tensor(recv_rows, dtype=torch.int64, device=dev)
        src = torch.repeat_interleave(torch.arange(N, device=dev), torch.tensor(recv_pairs, dtype=torch.int64, device=dev))
        peer_row = (torch.cumsum(recv_rows_t, 0) - recv_rows_t).index_select(0, src) + meta_peer[:, 0].long()
        dest = meta_peer[:, 1].long()
        order2 = torch.sort(dest * R + peer_row, stable=True).indices  # keeps top-k order inside a row
        d_dest = dest.index_select(0, order2)
        d_row = peer_row.index_select(0, order2)
        d_slot = meta_peer[:, 2].long().index_select(0, order2)
        starts2 = run_starts(d_dest * R + d_row)
        fwd_id = torch.cumsum(starts2.long(), 0) - 1  # [nr] forwarded row of each sorted pair
        fwd_row = d_row[starts2]
        fwd_dest = d_dest[starts2]
        fwd_per_dest = torch.bincount(fwd_dest, minlength=P)
        fwd_start = torch.cumsum(fwd_per_dest, 0) - fwd_per_dest
        meta2 = torch.stack([
            (fwd_id - fwd_start.index_select(0, d_dest)).int(),
            d_slot.int(),
            meta_peer[:, 3].index_select(0, order2),
        ], dim=1) if order2.numel() else torch.zeros(0, _FWD_META_FIELDS, dtype=torch.int32, device=dev)
        # each forwarded row's rank among the GPUs its phase-1 row goes to (GPU order): the combine's summation order
        by_row = torch.sort(fwd_row * P + fwd_dest).indices  # unique keys
        fwd_pos = torch.empty_like(fwd_row)
        fwd_pos[by_row] = position_in_run(fwd_row.index_select(0, by_row))
        x_fwd = x_peer.index_select(0, fwd_row)
        pair_slots = torch.bincount(d_dest * S_max + d_slot, minlength=P * S_max).view(P, S_max)
        width = max(recv_k, default=1) if any(recv_pairs) else 1
        send_counts2 = torch.cat([fwd_per_dest[:, None], torch.full_like(fwd_per_dest, width)[:, None], pair_slots], dim=1)
        mark_phase(log, "permute")
        recv_counts2 = exchange_counts(send_counts2, intra.group, P)
        host = torch.cat([fwd_per_dest, pair_slots.sum(1), recv_counts2[:, 0], recv_counts2[:, 1], recv_counts2[:, 2:].sum(1),
                          recv_counts2[:, 2:].sum(0)]).cpu().tolist()  # one device sync
        fwd_send, fwd_send_pairs = host[:P], host[P:2 * P]
        fwd_recv, recv_width, fwd_recv_pairs, per_slot = host[2 * P:3 * P], host[3 * P:4 * P], host[4 * P:5 * P], host[5 * P:]
        if any(per_slot[S:]):
            raise RuntimeError(f"received rows for slots >= {S}, which this rank does not host: the ranks use different plans")
        x_in = all_to_all_uneven(x_fwd, fwd_send, fwd_recv, intra.group, P)
        meta_in = all_to_all_uneven(meta2, fwd_send_pairs, fwd_recv_pairs, intra.group, P)
        mark_phase(log, "comm")
        if log is not None:
            log.record("meta", list(intra.peers), [2 + S_max] * P, [2 + S_max] * P, 8)
            log.record("dispatch", list(intra.peers), fwd_send, fwd_recv, row_nbytes(hidden))
            log.record("meta", list(intra.peers), fwd_send_pairs, fwd_recv_pairs, row_nbytes(meta2))
        # ---- expert GPU: replicate each received row for its pairs, in slot order.
        fwd_recv_t = torch.tensor(fwd_recv, dtype=torch.int64, device=dev)
        src2 = torch.repeat_interleave(torch.arange(P, device=dev), torch.tensor(fwd_recv_pairs, dtype=torch.int64, device=dev))
        in_row = (torch.cumsum(fwd_recv_t, 0) - fwd_recv_t).index_select(0, src2) + meta_in[:, 0].long()  # ascending
        slot_perm = sort_by_key(meta_in[:, 1].long(), S_max)
        rows = x_in.index_select(0, in_row.index_select(0, slot_perm.order))  # one gather, grouped by slot
        handle = HierarchicalHandle(
            pairs=pairs, out_dtype=hidden.dtype, row_token=row_token, row_node=row_node, send_rows=send_rows, recv_rows=recv_rows,
            fwd_row=fwd_row, fwd_pos=fwd_pos, fwd_send=fwd_send, fwd_recv=fwd_recv,
            in_row=in_row, in_pos=position_in_run(in_row), in_weight=meta_in[:, 2].contiguous().view(torch.float32),
            in_width=max((w for w, r in zip(recv_width, fwd_recv) if r), default=1), slot_perm=slot_perm,
        )
        mark_phase(log, "permute")
        return rows, per_slot[:S], handle

    def combine(self, expert_out: torch.Tensor, handle: HierarchicalHandle, log: TrafficLog | None = None) -> torch.Tensor:
        """Weighted partial sum per (token, GPU) row, back to the peers, sum per (token, node) row, back
        across, sum over nodes.

        Args:
            expert_out: ``[m, h]`` in the order of :meth:`dispatch`'s output.

        Returns:
            ``[T, h]`` in the hidden dtype.
        """
        N, P = self.groups.num_nodes, self.groups.gpus_per_node
        inter, intra = self.groups.inter, self.groups.intra
        # expert GPU: one weighted partial sum per received row, pairs in top-k order
        y = unpermute(expert_out, handle.slot_perm)  # [m, h] in received pair order
        part_gpu = padded_weighted_sum(y, handle.in_row, handle.in_pos, handle.in_weight, sum(handle.fwd_recv), handle.in_width,
                                       handle.out_dtype)
        mark_phase(log, "combine")
        back_gpu = all_to_all_uneven(part_gpu, handle.fwd_recv, handle.fwd_send, intra.group, P)  # [F, h] forwarded-row order
        mark_phase(log, "comm")
        if log is not None:
            log.record("combine", list(intra.peers), handle.fwd_recv, handle.fwd_send, row_nbytes(part_gpu))
        # peer: one partial sum per phase-1 row, GPUs in order
        ones = torch.ones(back_gpu.shape[0], dtype=torch.float32, device=back_gpu.device)
        part_node = padded_weighted_sum(back_gpu, handle.fwd_row, handle.fwd_pos, ones, sum(handle.recv_rows), P, handle.out_dtype)
        mark_phase(log, "combine")
        back = all_to_all_uneven(part_node, handle.recv_rows, handle.send_rows, inter.group, N)  # [U, h] in row order
        mark_phase(log, "comm")
        if log is not None:
            log.record("combine", list(inter.peers), handle.recv_rows, handle.send_rows, row_nbytes(part_node))
        # source: sum over nodes, in node order
        ones = torch.ones(back.shape[0], dtype=torch.float32, device=back.device)
        out = padded_weighted_sum(back, handle.row_token, handle.row_node, ones, handle.pairs.num_tokens, N, handle.out_dtype)
        mark_phase(log, "combine")
        return out
