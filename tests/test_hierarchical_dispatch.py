"""Hierarchical dispatch on real gloo process groups: exact results, traffic, and host synchronisations.

One spawn of 8 ranks (module-scoped fixture) runs every case and returns what it measured
(process start-up dominates: each rank imports torch): 2 nodes x 4 GPUs and 4 x 2 on the world,
then two expert-parallel groups of 4 side by side (2 x 2 in float32 and bfloat16, 4 x 1, 1 x 4).
Every rank builds all ranks' inputs from the same seed, so it can compute the reference for its
own tokens without any communication:
``out[t] = sum_j w[t, j] * f_{gpu, slot}(x[t])`` with an elementwise expert
``f_{g, s}(x) = x * a[g, s] + b[g, s]`` (bit-reproducible row by row), summed in the dispatcher's
documented order (top-k order per (token, GPU), then GPUs in order per node, then nodes in order),
so float32 and bfloat16 results must be *equal*, not just close. A float64 reference in plain
pair order checks that order reference.

Host synchronisations are counted with the project's ``SyncAudit`` (a ``TorchDispatchMode``
recording every aten call that synchronises on CUDA: ``_local_scalar_dense``, ``nonzero``,
``bincount``, a boolean index, a ``repeat_interleave`` without ``output_size``, ...), plus every
``tolist``/``numpy``/``cpu`` call (invisible to a dispatch mode on CPU tensors); the dispatcher's
one batched copy per phase, ``all_to_all.to_host``, is counted apart, as is the
``all_to_all.to_host`` it goes through (``count_host_copies``).
"""

from __future__ import annotations

import os

import pytest
import torch

from _dist_utils import run_distributed

H, K = 16, 4


# ---------------------------------------------------------------------------------------------- inputs and references
def _case_inputs(seed: int, G: int, dtype: torch.dtype, empty_rank: int | None):
    """All ranks' inputs: tokens, pairs (dense, some dropped), hidden states, expert parameters."""
    g = torch.Generator().manual_seed(seed)
    slots = [int(s) for s in torch.randint(1, 4, (G,), generator=g)]  # slots per GPU (unequal)
    S_max = max(slots)
    a = torch.randn(G, S_max, H, generator=g).to(dtype)
    b = torch.randn(G, S_max, H, generator=g).to(dtype)
    ranks = []
    for r in range(G):
        T = 0 if r == empty_rank else int(torch.randint(5, 40, (1,), generator=g))
        x = torch.randn(T, H, generator=g).to(dtype)
        gpu = torch.randint(0, G, (T, K), generator=g)
        if T:  # make some tokens stay local / on the own node, so every path is used
            gpu[: T // 4, 0] = r
        slot = torch.stack([torch.randint(0, slots[int(d)], (1,), generator=g)[0] for d in gpu.reshape(-1)]).reshape(T, K) if T \
            else torch.zeros(0, K, dtype=torch.int64)
        drop = torch.rand(T, K, generator=g) < 0.2
        if T > 2:
            drop[1] = True  # a token with every pair dropped
        gpu[drop], slot[drop] = -1, -1
        w = torch.rand(T, K, generator=g)
        w[drop] = float("nan")  # meaningless where dropped: must not leak into anything
        ranks.append((x, gpu, slot, w))
    return slots, S_max, a, b, ranks


def _expert(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return x * a + b


def _ordered_reference(x, gpu, slot, w, a, b, P: int, N: int, dtype) -> torch.Tensor:
    """The documented summation order, with the dispatcher's intermediate dtypes (float32 accumulation)."""
    T = x.shape[0]
    out = torch.zeros(T, H, dtype=dtype)
    for t in range(T):
        total = torch.zeros(H, dtype=torch.float32)
        for n in range(N):
            node_acc, node_hit = torch.zeros(H, dtype=torch.float32), False
            for p in range(P):
                d = n * P + p
                acc, hit = torch.zeros(H, dtype=torch.float32), False
                for j in range(K):
                    if int(gpu[t, j]) == d:
                        s = int(slot[t, j])
                        acc = acc + w[t, j].float() * _expert(x[t], a[d, s], b[d, s]).float()
                        hit = True
                if hit:
                    node_acc, node_hit = node_acc + acc.to(dtype).float(), True
            if node_hit:
                total = total + node_acc.to(dtype).float()
        out[t] = total.to(dtype)
    return out


def _plain_reference(x, gpu, slot, w, a, b) -> torch.Tensor:
    """float64, pairs in plain order."""
    out = torch.zeros(x.shape[0], H, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(K):
            d = int(gpu[t, j])
            if d >= 0:
                s = int(slot[t, j])
                out[t] += float(w[t, j]) * _expert(x[t].double(), a[d, s].double(), b[d, s].double())
    return out


def _expected_dispatch_rows(ranks, P: int, G: int):
    """``sent[src][dst]``: hidden rows sent per GPU pair (phase 1: one per (token, node) to the peer;
    phase 2: one per (token, GPU) from the peer; a GPU's rows to itself included)."""
    sent = [[0] * G for _ in range(G)]
    for src, (_, gpu, _, _) in enumerate(ranks):
        n_s, p_s = divmod(src, P)
        for t in range(gpu.shape[0]):
            dests = sorted({int(d) for d in gpu[t] if int(d) >= 0})
            for m in sorted({d // P for d in dests}):
                peer = m * P + p_s
                sent[src][peer] += 1
                for d in dests:
                    if d // P == m:
                        sent[peer][d] += 1
    return sent


# ---------------------------------------------------------------------------------------------- sync counting
class _Counter:
    """Host synchronisations seen while active."""

    def __init__(self):
        self.sync_ops: dict[str, int] = {}  # SyncAudit: aten calls that block the host on a GPU
        self.host_reads: list[str] = []  # tolist / numpy / cpu / to("cpu") outside the intended copies
        self.to_host = 0  # calls of all_to_all.to_host, the one intended copy per phase
        self.host_copies = 0  # calls of all_to_all.to_host (what count_host_copies sees)


def _counting(fn):
    """Run ``fn()`` under :class:`~megatron_grace._sync_audit.SyncAudit` (through the ops of :mod:`megatron_grace._ops`
    too), counting the intended copies and any other read of tensor values on the host; ``(result, counter)``."""
    from megatron_grace._sync_audit import SyncAudit, count_host_copies
    from megatron_grace.dispatch import all_to_all

    c = _Counter()
    inside = [0]  # > 0 while inside the intended copy
    original_to_host = all_to_all.to_host

    def to_host(t):
        c.to_host += 1
        inside[0] += 1
        try:
            return original_to_host(t)
        finally:
            inside[0] -= 1

    def host_read(name, f):  # on a CPU tensor these never reach the dispatcher, so SyncAudit cannot see them
        def wrapper(self, *a, **kw):
            if not inside[0] and (name != "to" or any(str(x) == "cpu" for x in (*a, kw.get("device")))):
                c.host_reads.append(name)
            return f(self, *a, **kw)
        return wrapper

    patched = [(all_to_all, "to_host", to_host)]
    patched += [(torch.Tensor, n, host_read(n, getattr(torch.Tensor, n))) for n in ("tolist", "numpy", "cpu", "to")]
    missing = object()
    saved = [(obj, n, vars(obj).get(n, missing)) for obj, n, _ in patched]  # Tensor methods may live on a base class
    for obj, n, new in patched:
        setattr(obj, n, new)
    try:
        with count_host_copies() as copies, SyncAudit() as audit:
            out = fn()
    finally:
        for obj, n, old in saved:
            if old is missing:
                delattr(obj, n)
            else:
                setattr(obj, n, old)
    c.sync_ops, c.host_copies = dict(audit.ops), copies[0]
    return out, c


# ---------------------------------------------------------------------------------------------- the worker
# (seed, expert-parallel group size, gpus_per_node, dtype, rank of the group without tokens)
CASES = [
    (1, 8, 4, "float32", None),  # 2 nodes x 4 GPUs
    (2, 8, 2, "float32", 5),  # 4 nodes x 2 GPUs, one rank without tokens
    (3, 4, 2, "float32", None),  # two expert-parallel groups of 2 nodes x 2 GPUs side by side
    (4, 4, 2, "bfloat16", 3),
    (5, 4, 1, "float32", None),  # 4 nodes x 1 GPU (intra-node groups of one)
    (6, 4, 4, "float32", 0),  # 1 node x 4 GPUs (inter-node groups of one)
]
WORLD = 8


def _worker(rank: int, world: int, cases: list[tuple[int, int, int, str, int | None]]) -> list[dict]:
    from megatron_grace.dispatch.all_to_all import TrafficLog
    from megatron_grace.dispatch.hierarchical import HierarchicalDispatcher, HierarchicalGroups
    from megatron_grace.dispatch.pairs import RoutedPairs

    results = []
    for seed, G, gpn, dtype_name, empty_rank in cases:
        dtype = getattr(torch, dtype_name)
        P, N = gpn, G // gpn
        ep_groups = [list(range(i, i + G)) for i in range(0, world, G)]
        groups = HierarchicalGroups.build(gpn) if G == world else HierarchicalGroups.build_all(ep_groups, gpn)
        me, ep_index = rank % G, rank // G  # GPU in the plan, which expert-parallel group
        slots, S_max, a, b, ranks = _case_inputs(seed + 100 * ep_index, G, dtype, empty_rank)
        x, gpu, slot, w = ranks[me]
        S = slots[me]
        disp = HierarchicalDispatcher(groups, S_max, S)
        pairs = RoutedPairs.from_router(gpu, slot, w)

        def expert(rows, counts):
            out, start = torch.empty_like(rows), 0
            for s, c in enumerate(counts):
                out[start:start + c] = _expert(rows[start:start + c], a[me, s], b[me, s])
                start += c
            return out

        # 1. counters off (log None): count the host synchronisations of dispatch + experts + combine
        def forward():
            rows, counts_dev, counts_host, handle = disp.dispatch(x, pairs, None)
            return rows, counts_dev, counts_host, disp.combine(expert(rows, counts_host), handle, None)

        (rows, counts_dev, counts_host, y), c = _counting(forward)
        # 2. with a traffic log: the same result, and the traffic of the documented scheme
        log = TrafficLog(G, timing=False)
        rows2, _, counts2, h2 = disp.dispatch(x, pairs, log)
        y2 = disp.combine(expert(rows2, counts2), h2, log)
        expected_sent = _expected_dispatch_rows(ranks, P, G)
        f32 = dtype == torch.float32
        results.append(dict(
            case=(seed, G, gpn, dtype_name, empty_rank),
            sync_ops=c.sync_ops, host_reads=c.host_reads, to_host=c.to_host, host_copies=c.host_copies,
            exact=bool(torch.equal(y, _ordered_reference(x, gpu, slot, w, a, b, P, N, dtype))),
            close=bool(torch.allclose(y.double(), _plain_reference(x, gpu, slot, w, a, b), rtol=1e-5 if f32 else 3e-2,
                                      atol=1e-5 if f32 else 5e-2)),
            shape_ok=tuple(y.shape) == (x.shape[0], H) and y.dtype == dtype,
            repeat_equal=bool(torch.equal(y, y2)) and bool(torch.equal(rows, rows2)),
            counts_ok=counts_dev.dtype == torch.int64 and counts_dev.device == x.device and counts_dev.tolist() == counts_host
            and len(counts_host) == S and sum(counts_host) == rows.shape[0],
            sent=log.sent_rows["dispatch"].tolist(), expected_sent=expected_sent[me],
            recv=log.recv_rows["dispatch"].tolist(), expected_recv=[expected_sent[s][me] for s in range(G)],
            combine_sent=log.sent_rows["combine"].tolist(), combine_recv=log.recv_rows["combine"].tolist(),
            bytes_ok=bool((log.sent_bytes["dispatch"] == log.sent_rows["dispatch"] * H * x.element_size()).all()
                          and (log.sent_bytes["combine"] == log.sent_rows["combine"] * H * x.element_size()).all()),
        ))
    return results


@pytest.fixture(scope="module")
def measured() -> list[tuple[int, dict]]:
    """One spawn of 8 gloo ranks runs every case; ``(rank, result)`` for every rank and case."""
    old = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "GRACE_DEBUG")}
    os.environ.update(OMP_NUM_THREADS="1", GRACE_DEBUG="0")  # the ranks inherit it; debug checks would synchronise
    try:
        by_rank = run_distributed(_worker, world_size=WORLD, args=(CASES,), timeout=150)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return [(rank, r) for rank, results in enumerate(by_rank) for r in results]


def test_exactly_two_host_syncs_per_forward(measured):
    """Dispatch + combine: no synchronising op, no host read, exactly one batched copy per phase."""
    for rank, r in measured:
        where = f"rank {rank}, case {r['case']}"
        assert r["sync_ops"] == {}, f"{where}: synchronising ops {r['sync_ops']}"
        assert r["host_reads"] == [], f"{where}: host reads outside _to_host {r['host_reads']}"
        assert r["to_host"] == 2 and r["host_copies"] == 2, f"{where}: {r['to_host']} batched copies, expected 2 (one per phase)"


def test_results_equal_the_ordered_reference(measured):
    """Bit-equal to the documented summation order (float32 and bfloat16), close to float64, with or without a log."""
    for rank, r in measured:
        where = f"rank {rank}, case {r['case']}"
        assert r["exact"], f"{where}: result differs from the ordered reference"
        assert r["close"], f"{where}: result differs from the float64 reference"
        assert r["shape_ok"] and r["repeat_equal"] and r["counts_ok"], where


def test_traffic_is_node_then_gpu_deduplicated(measured):
    """Hidden rows: one per (token, node) to the peer, one per (token, GPU) from it; results retrace them."""
    for rank, r in measured:
        where = f"rank {rank}, case {r['case']}"
        assert r["sent"] == r["expected_sent"] and r["recv"] == r["expected_recv"], where
        assert r["combine_sent"] == r["recv"] and r["combine_recv"] == r["sent"] and r["bytes_ok"], where


# ---------------------------------------------------------------------------------------------- in-process checks
def _single_gpu_groups():
    """Groups of one (1 node x 1 GPU): every exchange is a local copy, no process group needed."""
    from megatron_grace.dispatch.all_to_all import GroupSpec
    from megatron_grace.dispatch.hierarchical import HierarchicalGroups

    one = GroupSpec(group=None, size=1, rank=0, peers=(0,))
    return HierarchicalGroups(num_nodes=1, gpus_per_node=1, inter=one, intra=one)


def test_single_gpu_in_process(monkeypatch):
    """The whole device path (both phases, the combine) without processes: exact, two batched copies."""
    from megatron_grace.dispatch.hierarchical import HierarchicalDispatcher
    from megatron_grace.dispatch.pairs import RoutedPairs

    from megatron_grace import _debug

    monkeypatch.setattr(_debug, "_override", False)  # debug checks synchronise
    slots, S_max, a, b, ranks = _case_inputs(7, 1, torch.float32, None)
    x, gpu, slot, w = ranks[0]
    disp = HierarchicalDispatcher(_single_gpu_groups(), S_max, slots[0])
    pairs = RoutedPairs.from_router(gpu, slot, w)

    def forward():
        rows, _, counts, handle = disp.dispatch(x, pairs, None)
        out, start = torch.empty_like(rows), 0
        for s, c in enumerate(counts):
            out[start:start + c] = _expert(rows[start:start + c], a[0, s], b[0, s])
            start += c
        return disp.combine(out, handle, None)

    y, c = _counting(forward)
    assert c.sync_ops == {} and c.host_reads == [] and c.to_host == 2 and c.host_copies == 2
    assert torch.equal(y, _ordered_reference(x, gpu, slot, w, a, b, 1, 1, torch.float32))
    # no tokens at all
    empty = RoutedPairs.from_router(torch.zeros(0, K, dtype=torch.int64), torch.zeros(0, K, dtype=torch.int64), torch.zeros(0, K))
    rows, counts_dev, counts, handle = disp.dispatch(x[:0], empty, None)
    assert rows.shape == (0, H) and counts == [0] * slots[0] and counts_dev.tolist() == counts
    assert disp.combine(rows, handle, None).shape == (0, H)


def test_debug_mode_checks_the_pairs(monkeypatch):
    """GRACE_DEBUG=1: destinations out of range, or dropped in one field only, fail before any collective."""
    from megatron_grace.dispatch.hierarchical import HierarchicalDispatcher
    from megatron_grace.dispatch.pairs import RoutedPairs
    from megatron_grace.errors import GraceInputError

    from megatron_grace import _debug

    monkeypatch.setattr(_debug, "_override", True)
    disp = HierarchicalDispatcher(_single_gpu_groups(), 2, 2)
    x, w = torch.randn(2, H), torch.rand(2, K)
    good = torch.zeros(2, K, dtype=torch.int64)
    for gpu, slot in [(good + 1, good), (good, good + 2), (good - 1, good)]:
        with pytest.raises(GraceInputError):
            disp.dispatch(x, RoutedPairs.from_router(gpu, slot, w), None)
