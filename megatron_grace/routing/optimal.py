"""The optimal replica assignment of one batch: a linear-programming lower bound.

For a batch (router choices and the GPU each token starts on), a plan's layer and a topology,
find the split of every (source GPU, expert) group of token-expert pairs over the expert's
copies that minimises the modelled MoE-layer time of flat dispatch, the same model the
simulator uses::

    layer_s = 2 * dispatch_s + compute_s          (combine mirrors dispatch)
    dispatch_s >= intra bytes sent or received by any GPU / intra_node bandwidth
    dispatch_s >= inter bytes sent or received by any GPU / inter_node bandwidth
    compute_s  >= pairs on any GPU * expert_flops_per_token / gpu_flops

(plus the smallest phase latency any assignment must pay; see the code). Variables are
continuous (pairs may be split fractionally), so the optimum is a lower bound on what any
online policy, which must send whole pairs, can reach: it is the limit the policies are
measured against. Solved with scipy's HiGHS; a batch of 16k tokens x top-8 on 32 GPUs has at
most G * E * R variables and solves in well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linprog
from scipy.sparse import coo_matrix

from megatron_grace.errors import GraceInputError
from megatron_grace.plan.topology import ModelShape, Topology


@dataclass(frozen=True)
class OptimalAssignment:
    """Result of :func:`optimal_assignment`.

    Attributes:
        layer_s: modelled layer time (2 * dispatch + compute + link latencies), seconds.
        dispatch_s: dispatch time without latencies.
        compute_s: expert compute time on the slowest GPU.
        gpu_load: float64 ``[G]`` pairs per GPU (fractional).
        inter_node_pairs: pairs sent across nodes (fractional).
        intra_node_pairs: pairs sent to another GPU of the same node.
    """

    layer_s: float
    dispatch_s: float
    compute_s: float
    gpu_load: np.ndarray
    inter_node_pairs: float
    intra_node_pairs: float


def optimal_assignment(topk_ids: np.ndarray, src_gpu: np.ndarray, layer_hosts: np.ndarray, topology: Topology,
                       shape: ModelShape) -> OptimalAssignment:
    """Minimum modelled flat-dispatch layer time over all fractional copy choices (see module doc).

    Args:
        topk_ids: int ``[T, k]`` expert ids, -1 = dropped.
        src_gpu: int ``[T]`` GPU each token starts on.
        layer_hosts: int ``[E, R]`` GPUs hosting each expert, -1 padded.
        topology: cluster and link model.
        shape: model sizes (bytes per token, FLOPs per pair).
    """
    ids = np.asarray(topk_ids, dtype=np.int64)
    src = np.asarray(src_gpu, dtype=np.int64)
    hosts = np.asarray(layer_hosts, dtype=np.int64)
    G, gpn = topology.num_gpus, topology.gpus_per_node
    E, R = hosts.shape
    if ids.ndim != 2 or src.shape != (ids.shape[0],):
        raise GraceInputError(f"topk_ids must be [T, k] and src_gpu [T]; got {ids.shape} and {src.shape}")
    if ids.size and (ids.max() >= E or ids.min() < -1):
        raise GraceInputError(f"topk_ids out of range [-1, {E})")
    valid = ids >= 0
    pair_src = np.broadcast_to(src[:, None], ids.shape)[valid]
    pair_e = ids[valid]
    counts = np.bincount(pair_src * E + pair_e, minlength=G * E).astype(np.float64)  # [G*E]
    groups = np.flatnonzero(counts)
    g_src, g_e = groups // E, groups % E
    # variables: one per (group, present copy), then dispatch_s, compute_s
    cand = hosts[g_e]  # [n_groups, R]
    present = cand >= 0
    grp_idx, col = np.nonzero(present)
    dst = cand[grp_idx, col]
    s = g_src[grp_idx]
    nv = grp_idx.size
    tb = float(shape.token_bytes)
    pair_flop_s = shape.expert_flops_per_token / topology.gpu_flops
    intra_bw, inter_bw = topology.intra_node.bandwidth_bytes_per_s, topology.inter_node.bandwidth_bytes_per_s
    kind = np.where(dst == s, 0, np.where(dst // gpn == s // gpn, 1, 2))  # own GPU, same node, other node

    rows, cols, vals = [], [], []
    n_rows = 0

    def add_block(row_of_var: np.ndarray, coef: np.ndarray, mask: np.ndarray, time_col: int, n_new: int) -> None:
        """Rows: sum(coef * x over vars with this row) - t <= 0, for n_new rows."""
        nonlocal n_rows
        m = mask & (coef != 0)
        rows.append(n_rows + row_of_var[m]); cols.append(np.flatnonzero(m)); vals.append(coef[m])
        rows.append(n_rows + np.arange(n_new)); cols.append(np.full(n_new, time_col)); vals.append(-np.ones(n_new))
        n_rows += n_new

    t_disp, t_comp = nv, nv + 1
    ones = np.ones(nv)
    add_block(dst, ones * pair_flop_s, np.ones(nv, bool), t_comp, G)  # compute per receiving GPU
    for k_type, bw in ((1, intra_bw), (2, inter_bw)):
        add_block(s, ones * tb / bw, kind == k_type, t_disp, G)  # bytes sent per GPU
        add_block(dst, ones * tb / bw, kind == k_type, t_disp, G)  # bytes received per GPU
    a_ub = coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n_rows, nv + 2)).tocsr()
    b_ub = np.zeros(n_rows)
    a_eq = coo_matrix((np.ones(nv), (grp_idx, np.arange(nv))), shape=(groups.size, nv + 2)).tocsr()
    b_eq = counts[groups]
    c = np.zeros(nv + 2)
    c[t_disp], c[t_comp] = 2.0, 1.0
    if nv == 0:
        return OptimalAssignment(0.0, 0.0, 0.0, np.zeros(G), 0.0, 0.0)
    res = linprog(c, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=b_eq, bounds=(0, None), method="highs")
    if res.status != 0:
        raise RuntimeError(f"optimal assignment LP failed: {res.message}")
    x = res.x[:nv]
    load = np.bincount(dst, weights=x, minlength=G)
    # Latency is not linear in the split; add the least any assignment must pay: a group with
    # no copy on its own GPU must use a link, at best its fastest available one, and the phase
    # pays the largest latency among the links used (one phase each way).
    lat_of_kind = np.array([np.inf, topology.intra_node.latency_s, topology.inter_node.latency_s])
    has_local = np.zeros(groups.size, dtype=bool)
    has_local[grp_idx[kind == 0]] = True
    best_link = np.full(groups.size, np.inf)
    np.minimum.at(best_link, grp_idx, lat_of_kind[kind])
    forced = best_link[~has_local]
    latency = 2 * float(forced.max()) if forced.size else 0.0
    return OptimalAssignment(
        layer_s=float(res.fun + latency), dispatch_s=float(res.x[t_disp]), compute_s=float(res.x[t_comp]), gpu_load=load,
        inter_node_pairs=float(x[kind == 2].sum()), intra_node_pairs=float(x[kind == 1].sum()),
    )
