"""The GRACE MoE layer on real torch.distributed process groups (gloo, CPU).

Process start-up is slow on this machine (each process imports torch), so one spawn of 4 ranks
(module-scoped fixture) performs every check and returns what it measured; the test functions
assert on those results. It first runs two 2-rank expert-parallel groups ({0, 1} and {2, 3},
``dist.new_group``) side by side, then the 4-rank checks on the world group (2 nodes x 2 GPUs).
The spawn has a timeout: a hang fails the test instead of blocking the run.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch

from _dist_utils import run_distributed

H, F = 24, 16  # hidden and expert FFN width of the test model
TOL = 1e-5  # float32 vs float64 reference, relative (Frobenius)


# ---------------------------------------------------------------------------------------------- helpers
def _topology(nodes: int, gpn: int):
    from megatron_grace.plan.topology import Topology

    base = Topology.preset("a100-2x4")
    return Topology(name=f"test-{nodes}x{gpn}", num_nodes=nodes, gpus_per_node=gpn, intra_node=base.intra_node,
                    inter_node=base.inter_node, gpu_flops=base.gpu_flops)


def _plan(nodes: int, gpn: int, num_experts: int, gpu_experts: list[list[int]]):
    from megatron_grace.plan.placement import PlacementPlan

    return PlacementPlan(_topology(nodes, gpn), num_experts, [gpu_experts])


def _contiguous(nodes: int, gpn: int, num_experts: int):
    G = nodes * gpn
    return _plan(nodes, gpn, num_experts, [list(range(g * num_experts // G, (g + 1) * num_experts // G)) for g in range(G)])


def _random_plan(nodes: int, gpn: int, num_experts: int, seed: int, extra: int = 2):
    """Every expert once on a random GPU (unequal counts) plus random copies on other GPUs."""
    rng = np.random.default_rng(seed)
    G = nodes * gpn
    gpus: list[list[int]] = [[] for _ in range(G)]
    for e in rng.permutation(num_experts):
        gpus[int(rng.integers(G))].append(int(e))
    for _ in range(extra * G):
        e, g = int(rng.integers(num_experts)), int(rng.integers(G))
        if e not in gpus[g]:
            gpus[g].append(e)
    return _plan(nodes, gpn, num_experts, gpus)


def _batch(seed: int, tokens: int, num_experts: int, k: int, drop: float = 0.1, hot: int | None = None,
           dtype: torch.dtype = torch.float32):
    """``hidden [T, H]``, distinct ``topk_ids [T, k]`` (a share ``drop`` set to -1), ``topk_weights [T, k]``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=g).to(dtype)
    keys = torch.rand(tokens, num_experts, generator=g)
    if hot is not None:
        keys[:, hot] = -1.0  # every token picks ``hot`` first
    ids = torch.argsort(keys, dim=1)[:, :k]
    ids[torch.rand(tokens, k, generator=g) < drop] = -1
    w = torch.softmax(torch.randn(tokens, k, generator=g), dim=1)
    return x, ids, w


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    y64 = y.double()
    den = float(ref.norm())
    return float((y64 - ref).norm()) / den if den > 0 else float(y64.norm())


def _forward_checks(rank: int, plan, weights, num_experts: int, k: int, tag: str, steps: int = 2, activation: str = "swiglu",
                    tokens: int | None = None, hot: int | None = None, group=None, hier=None) -> dict[str, float]:
    """Every policy x dispatch mode on one plan: relative error to the dense reference and flat-vs-hierarchical.

    ``rank`` is the rank in ``group`` (the expert-parallel group; None = world); ``hier`` maps
    gpus_per_node to pre-built :class:`HierarchicalGroups` (needed when ``group`` is not the world).
    """
    from megatron_grace.layer import DenseReferenceMoE, GraceMoELayer
    from megatron_grace.routing import POLICY_NAMES

    ref = DenseReferenceMoE(weights, num_experts, H, F, activation)
    out: dict[str, float] = {}
    for policy in POLICY_NAMES:
        hg = hier[plan.topology.gpus_per_node] if hier else None
        layers = {mode: GraceMoELayer.from_full_weights(plan, 0, weights, hidden_size=H, ffn_size=F, activation=activation,
                                                        policy=policy, dispatch=mode, num_experts=num_experts, num_model_layers=1,
                                                        group=group, hierarchical_groups=hg if mode == "hierarchical" else None)
                  for mode in ("flat", "hierarchical")}
        for step in range(steps):
            T = tokens if tokens is not None else 7 + 9 * rank + 5 * step
            x, ids, w = _batch(1000 * step + 17 * rank + len(tag), T, num_experts, k, hot=hot)
            r = ref(x, ids, w)
            ys = {mode: layer(x, ids, w) for mode, layer in layers.items()}
            for mode, y in ys.items():
                key = f"{tag}/{policy}/{mode}"
                out[key] = max(out.get(key, 0.0), _rel(y, r))
            key = f"{tag}/{policy}/flat-vs-hier"
            out[key] = max(out.get(key, 0.0), _rel(ys["hierarchical"], ys["flat"].double()))
    return out


def _expected_traffic(rank: int, world: int, gpn: int, gpu: torch.Tensor, slot: torch.Tensor, max_slots: int, mode: str, group=None):
    """Rows each rank sends to each rank in the dispatch phases, and pairs per (GPU, slot), from the decisions.

    Computed from this rank's decisions ``gpu, slot [T, k]`` and summed over ranks (all_reduce).
    Returns ``(rows [G, G] (sender, receiver), slot_pairs [G, S_max])``.
    """
    import torch.distributed as dist

    rows = torch.zeros(world, world, dtype=torch.float64)
    slot_pairs = torch.zeros(world, max_slots, dtype=torch.float64)
    valid = gpu >= 0
    d, s = gpu[valid], slot[valid]
    slot_pairs.index_put_((d, s), torch.ones_like(d, dtype=torch.float64), accumulate=True)
    if mode == "flat":
        rows[rank] += torch.bincount(d, minlength=world).double()
    else:
        node_of = lambda g: torch.div(g, gpn, rounding_mode="floor")  # noqa: E731
        local = rank % gpn
        # phase 1: one row per distinct (token, node) to the peer (node, local)
        tok = torch.nonzero(valid)[:, 0]
        pairs = torch.unique(torch.stack([tok, node_of(d)], 1), dim=0)
        peers = pairs[:, 1] * gpn + local
        rows[rank] += torch.bincount(peers, minlength=world).double()
        # phase 2: one row per distinct (token, GPU) from the peer to the expert GPU (the diagonal:
        # a row the peer needs itself, a local copy counted as same-GPU traffic)
        tok_gpu = torch.unique(torch.stack([tok, d], 1), dim=0)
        g = tok_gpu[:, 1]
        rows.index_put_((node_of(g) * gpn + local, g), torch.ones_like(g, dtype=torch.float64), accumulate=True)
    dist.all_reduce(rows, group=group)
    dist.all_reduce(slot_pairs, group=group)
    return rows.long(), slot_pairs.long()


def _counter_checks(rank: int, world: int, plan, weights, num_experts: int, k: int, group=None, hier=None) -> list[str]:
    """Counters agree with a direct count from the decisions (flat and hierarchical, two policies); ranks as in the group."""
    from megatron_grace.layer import LINK_TYPES, GraceMoELayer

    problems: list[str] = []
    gpn = plan.topology.gpus_per_node
    max_slots = int(plan.slots_used[0].max())
    for policy in ("grace", "random"):
        for mode in ("flat", "hierarchical"):
            hg = hier[gpn] if hier and mode == "hierarchical" else None
            layer = GraceMoELayer.from_full_weights(plan, 0, weights, hidden_size=H, ffn_size=F, policy=policy, dispatch=mode,
                                                    group=group, hierarchical_groups=hg, counters=True)
            x, ids, w = _batch(77 + rank, 20 + 7 * rank, num_experts, k, hot=0)
            layer(x, ids, w)
            c, route = layer.last_counters, layer.last_route
            rows, slot_pairs = _expected_traffic(rank, world, gpn, route.gpu, route.slot, max_slots, mode, group)
            tag = f"{policy}/{mode}/rank{rank}"
            if not np.array_equal(c.rows_sent, rows[rank].numpy()):
                problems.append(f"{tag}: rows_sent {c.rows_sent.tolist()} != {rows[rank].tolist()}")
            if not np.array_equal(c.rows_recv, rows[:, rank].numpy()):
                problems.append(f"{tag}: rows_recv {c.rows_recv.tolist()} != {rows[:, rank].tolist()}")
            if not np.array_equal(c.traffic.sent_bytes["dispatch"], rows[rank].numpy() * H * 4):
                problems.append(f"{tag}: dispatch bytes {c.traffic.sent_bytes['dispatch'].tolist()} != rows x {H * 4}")
            S = len(plan.gpu_experts[0][rank])
            if not np.array_equal(c.slot_load, slot_pairs[rank, :S].numpy()):
                problems.append(f"{tag}: slot_load {c.slot_load.tolist()} != {slot_pairs[rank, :S].tolist()}")
            valid_gpu = route.gpu[route.gpu >= 0]
            if not np.array_equal(c.pairs_per_gpu, torch.bincount(valid_gpu, minlength=world).numpy()) or c.pairs != int(valid_gpu.numel()):
                problems.append(f"{tag}: pairs_per_gpu {c.pairs_per_gpu.tolist()} disagrees with the decisions")
            g = np.arange(world)
            link = np.where(g == rank, 0, np.where(g // gpn == rank // gpn, 1, 2))
            expect_link = {name: int(rows[rank].numpy()[link == i].sum()) for i, name in enumerate(LINK_TYPES)}
            if c.rows_sent_by_link != expect_link:
                problems.append(f"{tag}: rows by link {c.rows_sent_by_link} != {expect_link}")
            expect_bytes = {name: v * H * 4 for name, v in expect_link.items()}
            if c.kind_bytes_sent_by_link("dispatch") != expect_bytes:
                problems.append(f"{tag}: dispatch bytes by link {c.kind_bytes_sent_by_link('dispatch')} != {expect_bytes}")
            if mode == "hierarchical" and c.rows_sent_by_link["inter_node"] > int(route.gpu.ge(0).sum()):
                problems.append(f"{tag}: more inter-node rows than pairs")
    return problems


def _catch(fn) -> str | None:
    """Run a set-up that should fail; return the GraceInputError message (or a marker when none/another error)."""
    from megatron_grace.errors import GraceInputError

    try:
        fn()
    except GraceInputError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001
        return f"UNEXPECTED {type(exc).__name__}: {exc}"
    return None


# ---------------------------------------------------------------------------------------------- workers
def _two_rank_checks(rank: int) -> dict:
    """Two 2-rank expert-parallel groups ({0, 1} and {2, 3}) side by side: 1x2 and 2x1 topologies,
    contiguous / uneven-with-copies / one-empty-GPU plans, SwiGLU and GELU, counters."""
    import torch.distributed as dist

    from megatron_grace.dispatch import HierarchicalGroups
    from megatron_grace.layer import random_expert_weights

    ep_ranks = [[0, 1], [2, 3]]
    groups = [dist.new_group(r) for r in ep_ranks]  # every process creates both, in the same order
    group = groups[rank // 2]
    hier = {gpn: HierarchicalGroups.build_all(ep_ranks, gpn) for gpn in (1, 2)}
    grank = dist.get_rank(group)
    E, k = 6, 2
    weights = random_expert_weights(E, H, F, seed=3)
    kw = dict(group=group, hier=hier)
    errors: dict[str, float] = {}
    errors.update(_forward_checks(grank, _contiguous(1, 2, E), weights, E, k, "1x2-contiguous", steps=1, **kw))
    errors.update(_forward_checks(grank, _plan(1, 2, E, [[0, 1, 2, 3, 4], [5, 0, 3]]), weights, E, k, "1x2-copies", **kw))
    errors.update(_forward_checks(grank, _plan(2, 1, E, [[0, 1, 2, 3, 4, 5], []]), weights, E, k, "2x1-empty-gpu", steps=1, **kw))
    errors.update(_forward_checks(grank, _plan(2, 1, E, [[3, 1, 5, 0], [2, 4, 0, 1]]), weights, E, k, "2x1-copies", **kw))
    gelu = random_expert_weights(E, H, F, activation="gelu", seed=4)
    errors.update(_forward_checks(grank, _plan(2, 1, E, [[3, 1, 5, 0], [2, 4, 0, 1]]), gelu, E, k, "2x1-gelu", steps=1,
                                  activation="gelu", **kw))
    counters = _counter_checks(grank, 2, _plan(2, 1, E, [[3, 1, 5, 0], [2, 4, 0, 1]]), weights, E, k, **kw)
    counters += _counter_checks(grank, 2, _plan(1, 2, E, [[0, 1, 2, 3, 4], [5, 0, 3]]), weights, E, k, **kw)
    from megatron_grace.layer import GraceMoELayer

    no_groups = _catch(lambda: GraceMoELayer.from_full_weights(_contiguous(1, 2, E), 0, weights, hidden_size=H, ffn_size=F,
                                                               group=group, dispatch="hierarchical"))
    return {"errors": errors, "counters": counters, "no_groups": no_groups}


def worker_four(rank: int, world: int) -> dict:
    """4 ranks as 2 nodes x 2 GPUs: correctness, edge cases, counters, weight loading, bad input."""
    import torch.distributed as dist

    from megatron_grace.errors import GraceInputError
    from megatron_grace.experts import SlotExperts
    from megatron_grace.layer import DenseReferenceMoE, GraceMoELayer, random_expert_weights

    E, k = 10, 3
    weights = random_expert_weights(E, H, F, seed=5)
    ref = DenseReferenceMoE(weights, E, H, F)
    hand = _plan(2, 2, E, [[0, 1, 2, 3, 9], [4, 5, 0], [6, 7, 0, 4], [8, 9, 1, 5, 2]])  # uneven, expert 0 on 3 GPUs
    res: dict = {"errors": {}, "edge": {}, "bad": {}}
    res["two"] = _two_rank_checks(rank)

    # --- correctness: every policy x mode on three plans
    res["errors"].update(_forward_checks(rank, _contiguous(2, 2, E), weights, E, k, "contiguous", steps=1))
    res["errors"].update(_forward_checks(rank, hand, weights, E, k, "hand-copies"))
    res["errors"].update(_forward_checks(rank, _random_plan(2, 2, E, seed=11), weights, E, k, "random-copies"))

    # --- edge cases (both modes, grace policy)
    for mode in ("flat", "hierarchical"):
        layer = GraceMoELayer.from_full_weights(hand, 0, weights, hidden_size=H, ffn_size=F, dispatch=mode)
        cases = {
            "zero-tokens-on-rank1": _batch(5 + rank, 0 if rank == 1 else 9, E, k),
            "zero-tokens-everywhere": _batch(6, 0, E, k),
            "all-to-one-expert": (torch.randn(12, H), torch.full((12, 1), 4), torch.rand(12, 1)),
            "hot-expert-with-copies": _batch(8 + rank, 30, E, k, hot=0),
            "all-dropped-on-rank2": (lambda b: (b[0], b[1] if rank != 2 else torch.full_like(b[1], -1), b[2]))(_batch(9 + rank, 8, E, k)),
            "few-tokens-idle-experts": _batch(10 + rank, 1, E, 1, drop=0.0),
        }
        for name, (x, ids, w) in cases.items():
            y = layer(x, ids, w)
            r = ref(x, ids, w)
            ok_shape = tuple(y.shape) == tuple(x.shape)
            err = _rel(y, r) if x.shape[0] else 0.0
            finite = bool(torch.isfinite(y).all())
            res["edge"][f"{name}/{mode}"] = err if (ok_shape and finite) else float("inf")
        # 3-D hidden states [s, b, h] as Megatron passes them
        x, ids, w = _batch(12 + rank, 12, E, k)
        y = layer(x.view(3, 4, H), ids, w)
        res["edge"][f"3d-hidden/{mode}"] = _rel(y.reshape(12, H), ref(x, ids, w)) if y.shape == (3, 4, H) else float("inf")

    # --- bf16 on gloo (looser tolerance)
    layer = GraceMoELayer.from_full_weights(hand, 0, weights, hidden_size=H, ffn_size=F, dispatch="hierarchical", dtype=torch.bfloat16)
    x, ids, w = _batch(13 + rank, 16, E, k, dtype=torch.bfloat16)
    res["bf16"] = _rel(layer(x, ids, w), ref(x, ids, w))

    # --- experts with biases (DeepSpeed's nn.Linear default), moved from the frameworks' contiguous owners
    from megatron_grace.experts.exchange import contiguous_owners

    biased = random_expert_weights(E, H, F, seed=7, bias=True)
    bref = DenseReferenceMoE(biased, E, H, F, bias=True)
    owners = contiguous_owners(E, world) if E % world == 0 else np.arange(E) % world
    res["bias"] = {}
    for act in ("swiglu", "gelu"):
        src = random_expert_weights(E, H, F, activation=act, seed=7, bias=True) if act == "gelu" else biased
        rf = DenseReferenceMoE(src, E, H, F, act, bias=True) if act == "gelu" else bref
        for mode in ("flat", "hierarchical"):
            owned = {e: src(e) for e in range(E) if int(owners[e]) == rank}
            layer = GraceMoELayer.from_owned_weights(hand, 0, owned, owners, hidden_size=H, ffn_size=F, activation=act,
                                                     dispatch=mode, bias=True)
            x, ids, w = _batch(16 + rank, 13, E, k)
            res["bias"][f"{act}/{mode}"] = _rel(layer(x, ids, w), rf(x, ids, w))
    layer = GraceMoELayer.from_full_weights(hand, 0, biased, hidden_size=H, ffn_size=F, dtype=torch.bfloat16, bias=True)
    x, ids, w = _batch(17 + rank, 16, E, k, dtype=torch.bfloat16)  # bf16: the grouped-GEMM path on CPU
    res["bias_bf16"] = _rel(layer(x, ids, w), bref(x, ids, w))

    # --- counters agree with the decisions
    res["counters"] = _counter_checks(rank, world, hand, weights, E, k)

    # --- weights: broadcast from the primary copy == loading from the full state
    primary = hand.expert_gpus[0, :, 0]
    mine = {e: weights(e) for e in range(E) if int(primary[e]) == rank}  # only this rank's primaries
    a = GraceMoELayer.broadcast_from_primary(hand, 0, mine, hidden_size=H, ffn_size=F, policy="random")
    b = GraceMoELayer.from_full_weights(hand, 0, weights, hidden_size=H, ffn_size=F, policy="random")
    same = all(torch.equal(p, q) for p, q in zip(a.experts.parameters(), b.experts.parameters()))
    x, ids, w = _batch(14 + rank, 11, E, k)
    res["broadcast_equal"] = same and torch.equal(a(x, ids, w), b(x, ids, w))
    # copies of one expert are bit-identical across GPUs
    flat = {e: a.experts.flat_slot(s) for s, e in enumerate(a.experts.expert_ids)}
    gathered: list = [None] * world
    dist.all_gather_object(gathered, {e: v.numpy().tobytes() for e, v in flat.items()})
    copies_ok = True
    for e in range(E):
        blobs = {g[e] for g in gathered if e in g}
        copies_ok &= len(blobs) == 1
    res["copies_identical"] = copies_ok

    # --- bad input: every rank must raise GraceInputError (no hang)
    bad = res["bad"]
    kw = dict(hidden_size=H, ffn_size=F)
    bad["plan-for-2-gpus"] = _catch(lambda: GraceMoELayer.from_full_weights(_contiguous(1, 2, E), 0, weights, **kw))
    bad["plan-for-8-gpus"] = _catch(lambda: GraceMoELayer.from_full_weights(_contiguous(2, 4, E), 0, weights, **kw))
    bad["model-has-12-experts"] = _catch(lambda: GraceMoELayer.from_full_weights(hand, 0, weights, num_experts=12, **kw))
    bad["model-has-3-layers"] = _catch(lambda: GraceMoELayer.from_full_weights(hand, 0, weights, num_model_layers=3, **kw))
    bad["layer-out-of-range"] = _catch(lambda: GraceMoELayer.from_full_weights(hand, 1, weights, **kw))

    def wrong_slot_count():  # rank 2 is given one slot too few
        ids = list(hand.gpu_experts[0][rank])
        experts = SlotExperts.from_full_weights(ids[:-1] if rank == 2 else ids, weights, H, F)
        GraceMoELayer(hand, 0, experts)

    def wrong_expert_in_slot():  # rank 1 has two slots swapped
        ids = list(hand.gpu_experts[0][rank])
        if rank == 1:
            ids[0], ids[1] = ids[1], ids[0]
        GraceMoELayer(hand, 0, SlotExperts.from_full_weights(ids, weights, H, F))

    def wrong_weight_shape():  # rank 3's source gives a transposed matrix for one expert
        def src(e):
            state = dict(weights(e))
            if rank == 3 and e == hand.gpu_experts[0][3][1]:
                state["down"] = state["down"].t().contiguous()
            return state
        GraceMoELayer.from_full_weights(hand, 0, src, **kw)

    def weight_source_crashes():  # rank 0's loader raises a plain exception
        def src(e):
            if rank == 0:
                raise OSError("checkpoint shard missing")
            return weights(e)
        GraceMoELayer.from_full_weights(hand, 0, src, **kw)

    def different_plans():  # rank 3 got another plan
        plan = _random_plan(2, 2, E, seed=99) if rank == 3 else _random_plan(2, 2, E, seed=11)
        GraceMoELayer.from_full_weights(plan, 0, weights, **kw)

    def missing_primary():  # rank 1 lacks one of its primary experts
        have = {e: weights(e) for e in range(E) if int(primary[e]) == rank}
        if rank == 1:
            have.pop(min(have))
        GraceMoELayer.broadcast_from_primary(hand, 0, have, **kw)

    def different_dispatch():  # rank 0 asks for hierarchical, the others for flat
        GraceMoELayer.from_full_weights(hand, 0, weights, dispatch="hierarchical" if rank == 0 else "flat", **kw)

    def bias_on_one_rank():  # rank 2's experts have biases, the others' not
        src = random_expert_weights(E, H, F, seed=5, bias=rank == 2)
        GraceMoELayer.from_full_weights(hand, 0, src, bias=rank == 2, **kw)

    for fn in (wrong_slot_count, wrong_expert_in_slot, wrong_weight_shape, weight_source_crashes, different_plans, missing_primary,
               different_dispatch, bias_on_one_rank):
        bad[fn.__name__.replace("_", "-")] = _catch(fn)
    bad["unknown-policy"] = _catch(lambda: GraceMoELayer.from_full_weights(hand, 0, weights, policy="nearest", **kw))

    # the group still works after all that
    layer = GraceMoELayer.from_full_weights(hand, 0, weights, **kw)
    x, ids, w = _batch(15 + rank, 9, E, k)
    res["after_errors"] = _rel(layer(x, ids, w), ref(x, ids, w))
    assert isinstance(GraceInputError("x"), ValueError)
    return res


def worker_nccl(rank: int, world: int) -> dict:
    """NCCL, bf16 on CUDA: both modes against the reference."""
    from megatron_grace.layer import DenseReferenceMoE, GraceMoELayer, random_expert_weights

    E, k = 8, 2
    dev = torch.device("cuda", torch.cuda.current_device())
    weights = random_expert_weights(E, H, F, seed=6)
    ref = DenseReferenceMoE(weights, E, H, F)
    plan = _random_plan(world, 1, E, seed=3) if world > 1 else _contiguous(1, 1, E)
    out = {}
    for mode in ("flat", "hierarchical"):
        layer = GraceMoELayer.from_full_weights(plan, 0, weights, hidden_size=H, ffn_size=F, dispatch=mode, dtype=torch.bfloat16,
                                                device=dev)
        x, ids, w = _batch(20 + rank, 33, E, k, dtype=torch.bfloat16)
        y = layer(x.to(dev), ids.to(dev), w.to(dev))
        out[mode] = _rel(y.cpu(), ref(x, ids, w))
    return out


# ---------------------------------------------------------------------------------------------- single process
def test_permutation_round_trip_and_fixed_order_weighted_sum():
    from megatron_grace.dispatch.permute import padded_weighted_sum, permute, position_in_run, sort_by_key, unpermute

    g = torch.Generator().manual_seed(0)
    key = torch.randint(0, 7, (50,), generator=g)
    perm = sort_by_key(key, 9)
    assert perm.counts.tolist() == torch.bincount(key, minlength=9).tolist()
    assert torch.equal(key[perm.order], torch.sort(key).values)
    same = key[perm.order]
    assert all(bool((perm.order[same == v].diff() > 0).all()) for v in range(7))  # stable
    x = torch.randn(50, 5, generator=g)
    assert torch.equal(unpermute(permute(x, perm), perm), x)
    row = torch.sort(torch.randint(0, 10, (40,), generator=g)).values
    pos = position_in_run(row)
    vals, w = torch.randn(40, 5, generator=g), torch.rand(40, generator=g)
    out = padded_weighted_sum(vals, row, pos, w, 12, int(pos.max()) + 1, torch.float32)
    expect = torch.zeros(12, 5, dtype=torch.float64)
    expect.index_add_(0, row, vals.double() * w.double()[:, None])
    assert torch.allclose(out.double(), expect, atol=1e-6)
    assert torch.equal(out, padded_weighted_sum(vals, row, pos, w, 12, int(pos.max()) + 1, torch.float32))
    empty = padded_weighted_sum(vals[:0], row[:0], pos[:0], w[:0], 3, 1, torch.float32)
    assert empty.shape == (3, 5) and not empty.any()


def test_slot_experts_check_weights_and_shapes():
    from megatron_grace.errors import GraceInputError
    from megatron_grace.experts import SlotExperts
    from megatron_grace.layer import DenseReferenceMoE, random_expert_weights

    weights = random_expert_weights(4, H, F, seed=1)
    experts = SlotExperts.from_full_weights([2, 0], weights, H, F)
    x = torch.randn(5, H)
    y = experts(x, [3, 2])
    ref = DenseReferenceMoE(weights, 4, H, F, dtype=torch.float32)
    assert torch.allclose(y[:3], ref.expert(2, x[:3]), atol=1e-6) and torch.allclose(y[3:], ref.expert(0, x[3:]), atol=1e-6)
    with pytest.raises(GraceInputError, match="names"):
        SlotExperts.from_full_weights([1], {1: {"fc1": torch.zeros(H, F), "fc2": torch.zeros(F, H)}}, H, F)
    with pytest.raises(GraceInputError, match="shape"):
        SlotExperts.from_full_weights([1], {1: {**weights(1), "up": torch.zeros(F, H)}}, H, F)
    with pytest.raises(GraceInputError, match="no weights given for expert 3"):
        SlotExperts.from_full_weights([3], {1: weights(1)}, H, F)
    with pytest.raises(GraceInputError, match="activation"):
        SlotExperts([0], H, F, activation="relu")
    with pytest.raises(GraceInputError, match="slot_counts"):
        experts(x, [3, 1, 1])  # three counts for two slots
    from megatron_grace._debug import set_debug

    set_debug(True)  # the sum is a value check: debug mode only
    try:
        with pytest.raises(GraceInputError, match="slot_counts sum to 6"):
            experts(x, [3, 3])
    finally:
        set_debug(None)


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def four_rank() -> list[dict]:
    return run_distributed(worker_four, world_size=4, timeout=150)


def _worst(results: list[dict], key: str) -> dict[str, float]:
    worst: dict[str, float] = defaultdict(float)
    for r in results:
        for name, err in r[key].items():
            worst[name] = max(worst[name], err)
    return dict(worst)


# ---------------------------------------------------------------------------------------------- tests
def test_two_rank_groups_match_dense_reference(four_rank):
    worst = _worst([r["two"] for r in four_rank], "errors")
    assert len(worst) == 5 * 5 * 3  # 5 plans x 5 policies x (flat, hierarchical, flat-vs-hier)
    bad = {k: v for k, v in worst.items() if not v < TOL}
    assert not bad, bad


def test_two_rank_groups_counters(four_rank):
    problems = [p for r in four_rank for p in r["two"]["counters"]]
    assert not problems, problems


def test_hierarchical_on_a_subgroup_needs_prebuilt_groups(four_rank):
    for r in four_rank:
        assert r["two"]["no_groups"] is not None and "for_group" in r["two"]["no_groups"], r["two"]["no_groups"]


def test_four_ranks_match_dense_reference_every_policy_and_mode(four_rank):
    worst = _worst(four_rank, "errors")
    assert len(worst) == 3 * 5 * 3
    bad = {k: v for k, v in worst.items() if not v < TOL}
    assert not bad, bad


def test_four_ranks_edge_cases(four_rank):
    worst = _worst(four_rank, "edge")
    assert len(worst) == 2 * 7
    bad = {k: v for k, v in worst.items() if not v < TOL}
    assert not bad, bad


def test_four_ranks_bf16(four_rank):
    assert max(r["bf16"] for r in four_rank) < 2e-2


def test_four_ranks_experts_with_biases(four_rank):
    worst = _worst(four_rank, "bias")
    assert len(worst) == 2 * 2
    bad = {k: v for k, v in worst.items() if not v < TOL}
    assert not bad, bad
    assert max(r["bias_bf16"] for r in four_rank) < 2e-2


def test_four_ranks_counters_agree_with_decisions(four_rank):
    problems = [p for r in four_rank for p in r["counters"]]
    assert not problems, problems


def test_broadcast_from_primary_gives_identical_copies(four_rank):
    assert all(r["broadcast_equal"] for r in four_rank)
    assert all(r["copies_identical"] for r in four_rank)


def test_bad_input_raises_on_every_rank(four_rank):
    for case in four_rank[0]["bad"]:
        messages = [r["bad"][case] for r in four_rank]
        assert all(m is not None and not m.startswith("UNEXPECTED") for m in messages), (case, messages)
    m = four_rank[2]["bad"]
    assert "plan is for 2 GPUs" in m["plan-for-2-gpus"] and "4 ranks" in m["plan-for-2-gpus"]
    assert "12" in m["model-has-12-experts"]
    assert "hosts 4 expert slots" in m["wrong-slot-count"] and "weights for 3 slots" in m["wrong-slot-count"]
    assert "rank(s) 2" in four_rank[0]["bad"]["wrong-slot-count"]  # the other ranks name the failing one
    assert "slot 0" in four_rank[1]["bad"]["wrong-expert-in-slot"]
    assert "shape" in four_rank[3]["bad"]["wrong-weight-shape"] and "rank(s) 3" in four_rank[0]["bad"]["wrong-weight-shape"]
    assert "checkpoint shard missing" in four_rank[2]["bad"]["weight-source-crashes"]
    assert "different placement plans" in four_rank[0]["bad"]["different-plans"]
    assert "no weights given for expert" in four_rank[1]["bad"]["missing-primary"]
    assert "different dispatch" in four_rank[3]["bad"]["different-dispatch"]
    assert "expert_bias" in four_rank[0]["bad"]["bias-on-one-rank"], four_rank[0]["bad"]["bias-on-one-rank"]
    assert max(r["after_errors"] for r in four_rank) < TOL


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL)")
def test_nccl_bf16_two_gpus():
    results = run_distributed(worker_nccl, world_size=2, timeout=180, backend="nccl")
    for r in results:
        assert r["flat"] < 2e-2 and r["hierarchical"] < 2e-2, r


# ---------------------------------------------------------------------------------------------- set-up watchdog
def _stalled_rank_worker(rank: int, world: int) -> tuple[float, str]:
    """Rank 2 never reaches set-up (as if stopped); the others must fail naming it, not hang.

    Returns ``(time.monotonic() when the rank finished, message)`` (CLOCK_MONOTONIC is system-wide,
    so the ranks' times compare)."""
    import os
    import time

    from megatron_grace.errors import GraceInputError
    from megatron_grace.layer import GraceMoELayer, random_expert_weights
    from megatron_grace.plan.placement import PlacementPlan
    from megatron_grace.plan.topology import Topology

    os.environ["GRACE_SETUP_TIMEOUT"] = "3"
    if rank == 2:
        time.sleep(8)  # stalled past the others' 3 s watchdog (then it simply returns)
        return time.monotonic(), "woke up"
    plan = PlacementPlan(Topology.parse("1x3"), 6, [[[0, 1], [2, 3], [4, 5]]])
    try:
        GraceMoELayer.from_full_weights(plan, 0, random_expert_weights(6, 8, 4, "swiglu"), hidden_size=8, ffn_size=4)
    except GraceInputError as exc:
        return time.monotonic(), str(exc)
    return time.monotonic(), "no error"


def test_setup_watchdog_names_the_rank_that_did_not_arrive():
    from megatron_grace.layer.launch import run_distributed

    results = run_distributed(_stalled_rank_worker, world_size=3, timeout=60)
    woke = results[2][0]
    for r in (0, 1):
        when, msg = results[r]
        assert "global rank(s) [2]" in msg and "GRACE_SETUP_TIMEOUT" in msg, msg
        assert when < woke, "the error came only after the stalled rank had moved on"  # the watchdog, not its exit
