"""GRACE inside Megatron-Core, on real Megatron objects (gloo, 2 and 4 CPU ranks).

One spawn of 4 ranks (importing megatron.core costs seconds per process) runs every check
twice: with one expert-parallel group of 4 ranks (2 nodes x 2 GPUs), then, after re-initializing
Megatron's ``parallel_state``, with two expert-parallel groups of 2 ranks (1 node x 2 GPUs; the
EP group is then not the whole world, as with data-parallel copies). The tests assert on what
the ranks measured:

- ``GraceMegatronMoELayer`` with the ``GraceTokenDispatcher`` (Megatron's own ``SequentialMLP``
  re-built for the plan's slots, padded to the largest slot count) equals Megatron's own
  ``MoELayer`` with the alltoall dispatcher on the same weights and router, for several plans
  (contiguous, unequal expert counts, copies, a nearly empty GPU), flat and hierarchical
  dispatch, every replica policy, swiglu and gelu experts, with a shared expert; set-up again
  with another plan re-places the experts from the current slots, and ``teardown_grace``
  restores Megatron's layout bit-exactly;
- Megatron's own output equals a float64 dense reference built from the same per-expert
  weights (this pins the ``linear_fc1`` gate/up order and the transposes);
- a GPT-MoE model with the GRACE spec equals the same model on Megatron's dispatcher, and the
  routing recorder's trace has the right shape and the router's choices;
- bad plans (another expert count, another EP size, plans differing across ranks) raise
  GraceInputError on every rank at set-up, and the layer still works after.

The CUDA-only calls Megatron makes are stubbed in the worker processes
(:func:`megatron_grace.adapters.megatron.install_cpu_stubs`).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
    pytest.skip("megatron-core is not installed", allow_module_level=True)

from _dist_utils import run_distributed  # noqa: E402

TOL = 1e-5  # float32, relative (Frobenius)
E, K, H, F = 16, 4, 32, 16  # experts, top-k, hidden, expert FFN width
LAYERS = 2  # MoE layers of the test models (every layer is MoE)


# ---------------------------------------------------------------------------------------------- plans
def _topology(nodes: int, gpn: int):
    from megatron_grace.plan.topology import Topology

    base = Topology.preset("a100-2x4")
    return Topology(name=f"test-{nodes}x{gpn}", num_nodes=nodes, gpus_per_node=gpn, intra_node=base.intra_node,
                    inter_node=base.inter_node, gpu_flops=base.gpu_flops)


def _contiguous(G: int, num_experts: int = E) -> list[list[int]]:
    return [list(range(g * num_experts // G, (g + 1) * num_experts // G)) for g in range(G)]


def _unequal(G: int, seed: int, copies: int = 2, num_experts: int = E) -> list[list[int]]:
    """Every expert once on a random GPU (unequal counts), plus ``copies * G`` random extra copies."""
    rng = np.random.default_rng(seed)
    gpus: list[list[int]] = [[] for _ in range(G)]
    for e in rng.permutation(num_experts):
        gpus[int(rng.integers(G))].append(int(e))
    for _ in range(copies * G):
        e, g = int(rng.integers(num_experts)), int(rng.integers(G))
        if e not in gpus[g]:
            gpus[g].append(e)
    return gpus


def _skewed(G: int, num_experts: int = E) -> list[list[int]]:
    """GPU 0 holds one expert, the last GPU most of them; experts 0-2 have a copy on every GPU."""
    gpus: list[list[int]] = [[] for _ in range(G)]
    gpus[0] = [num_experts - 1]
    rest = list(range(num_experts - 1))
    for i, e in enumerate(rest):
        gpus[G - 1 if i % 3 else 1 + (i // 3) % (G - 1)].append(e)
    for e in (0, 1, 2):
        for g in range(G):
            if e not in gpus[g]:
                gpus[g].append(e)
    return gpus


def _plan(nodes: int, gpn: int, layers: list[list[list[int]]], num_experts: int = E):
    from megatron_grace.plan.placement import PlacementPlan

    return PlacementPlan(_topology(nodes, gpn), num_experts, layers)


def _rel(y, ref) -> float:
    y64, r64 = y.double(), ref.double()
    den = float(r64.norm())
    return float((y64 - r64).norm()) / den if den > 0 else float(y64.norm())


# ---------------------------------------------------------------------------------------------- worker
PHASES = {"ep4-2x2": (4, 2, 2), "ep2-1x2": (2, 1, 2)}  # name -> (EP size, nodes, GPUs per node)


def _megatron_worker(rank: int, world: int) -> dict:
    import torch

    from megatron_grace.adapters.megatron import testing as mt

    torch.set_grad_enabled(False)
    results = {}
    for name, (ep, nodes, gpn) in PHASES.items():
        ps = mt.init_megatron_parallel(ep)
        results[name] = _phase(rank, world, ep, nodes, gpn)
        ps.destroy_model_parallel()
    return results


def _phase(rank: int, world: int, G: int, nodes: int, gpn: int) -> dict:
    import torch
    import torch.distributed as dist
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    import megatron_grace.adapters.megatron as g
    from megatron_grace.adapters.megatron import testing as mt
    from megatron_grace.errors import GraceInputError
    from megatron_grace.layer import DenseReferenceMoE, random_expert_weights
    from megatron_grace.routing import POLICY_NAMES

    out: dict = {"rel": {}, "dense": {}, "errors": {}, "info": {}}
    pg = get_default_pg_collection()
    ep_rank = dist.get_rank(pg.ep)
    out["info"]["ep_group"] = dist.get_process_group_ranks(pg.ep)
    from megatron_grace.dispatch.hierarchical import HierarchicalGroups

    hier_groups = HierarchicalGroups.for_group(pg.ep, gpn)  # collective over the world (EP group may be smaller)
    plans = {
        "contiguous": _plan(nodes, gpn, [_contiguous(G), _contiguous(G)]),
        "unequal+copies": _plan(nodes, gpn, [_contiguous(G), _unequal(G, seed=1)]),
        "unequal+copies-b": _plan(nodes, gpn, [_unequal(G, seed=7), _unequal(G, seed=2, copies=3)]),
        "skewed": _plan(nodes, gpn, [_contiguous(G), _skewed(G)]),
    }
    out["info"]["slots"] = {name: [len(x) for x in p.gpu_experts[1]] for name, p in plans.items()}

    def pair(activation: str, seed: int, shared: int | None = None):
        """Megatron's MoELayer and a GraceMegatronMoELayer with the same state (layer number 2 = plan layer 1)."""
        cfg = mt.small_moe_config(num_experts=E, top_k=K, hidden_size=H, moe_ffn_hidden_size=F, num_layers=LAYERS,
                                  activation=activation, expert_parallel_size=G, moe_shared_expert_intermediate_size=shared)
        spec = get_moe_module_spec(use_te=False, num_experts=E, moe_grouped_gemm=False)
        ref, gl = _layer_pair(spec, cfg, pg, plans["contiguous"], seed)
        out["info"][f"same_state_keys/{activation}"] = sorted(gl.state_dict()) == sorted(ref.state_dict())
        weights = random_expert_weights(E, H, F, activation, seed=seed * 1009 + 1)
        return ref, gl, DenseReferenceMoE(weights, E, H, F, activation)

    def batch(step: int, tag: int):
        gen = torch.Generator().manual_seed(1000 * tag + 17 * rank + step)
        return torch.randn(3 + 2 * rank + step, 2, H, generator=gen)  # [s, b, h]: different token counts per rank

    def compare(ref, gl, key: str, steps: int = 2, dense=None) -> None:
        worst = 0.0
        for step in range(steps):
            x = batch(step, len(key))
            y_ref, _ = ref(x)
            y, bias = gl(x)
            assert bias is None and y.shape == x.shape
            worst = max(worst, _rel(y, y_ref))
            if dense is not None:
                probs, rmap = ref.router(x)
                ids, w = g.router_output_to_topk(probs, rmap, E, K)
                d = dense(x.reshape(-1, H), ids, w).reshape(x.shape)
                if ref.use_shared_expert:
                    d = d + ref.shared_experts(x).double()
                out["dense"][key] = max(out["dense"].get(key, 0.0), _rel(y_ref, d), _rel(y, d))
        out["rel"][key] = worst

    # A. MoE layer: GRACE vs Megatron's alltoall MoELayer, every plan x dispatch, every policy, swiglu and gelu
    ref, gl, dense = pair("swiglu", seed=3)
    for name, plan in plans.items():
        for mode in ("flat", "hierarchical"):
            gl.setup_grace(plan=plan, dispatch=mode, hierarchical_groups=hier_groups, counters=True)
            compare(ref, gl, f"swiglu/{name}/{mode}", dense=dense if name == "unequal+copies" else None)
    c = gl.grace_counters
    totals = torch.tensor([c.pairs, int(c.slot_load.sum())], dtype=torch.int64)
    dist.all_reduce(totals, group=pg.ep)
    out["info"]["pairs_vs_slot_load"] = totals.tolist()
    out["info"]["setup"] = dict(gl.grace_setup_info)
    out["info"]["registered"] = "grace" in dict(gl.named_modules()) and "grace.step_counter" in dict(gl.named_buffers())
    expert_params = sum(p.numel() for p in gl.experts.parameters())
    per_expert = sum(p.numel() for p in ref.experts.parameters()) // ref.num_local_experts
    out["info"]["experts_held_once"] = (expert_params, per_expert * gl.grace_setup_info["padded_to"])
    for policy in POLICY_NAMES:
        gl.setup_grace(plan=plans["unequal+copies-b"], dispatch="flat", policy=policy)
        compare(ref, gl, f"swiglu/policy-{policy}/flat", steps=1)
    ref_g, gl_g, dense_g = pair("gelu", seed=4, shared=F)  # gelu experts plus a shared expert
    out["info"]["shared_expert"] = bool(gl_g.use_shared_expert)
    for mode in ("flat", "hierarchical"):
        gl_g.setup_grace(plan=plans["unequal+copies"], dispatch=mode, hierarchical_groups=hier_groups)
        compare(ref_g, gl_g, f"gelu+shared/unequal+copies/{mode}", dense=dense_g)

    # B. bad input at set-up -> GraceInputError on every rank; the layer works afterwards
    bad = {
        "experts": _plan(nodes, gpn, [_contiguous(G, 2 * E)] * LAYERS, num_experts=2 * E),
        "ep_size": _plan(1, 2 * G, [_contiguous(2 * G)] * LAYERS),  # plan for twice the EP size
        "layers": _plan(nodes, gpn, [_contiguous(G)] * (LAYERS + 1)),
        "per_rank": plans["contiguous"] if ep_rank == 0 else plans["skewed"],
    }
    for name, plan in bad.items():
        try:
            gl.setup_grace(plan=plan, dispatch="flat")
            out["errors"][name] = None
        except GraceInputError as exc:
            out["errors"][name] = str(exc)
    try:
        gl.setup_grace(plan=plans["skewed"], dispatch="sideways")
        out["errors"]["dispatch"] = None
    except GraceInputError as exc:
        out["errors"]["dispatch"] = str(exc)
    gl.setup_grace(plan=plans["skewed"], dispatch="flat", policy="grace")
    compare(ref, gl, "swiglu/after-errors/flat", steps=1)
    # back to Megatron's layout and dispatcher: bit-exact weights and outputs
    gl.teardown_grace()
    ref_state, gl_state = ref.state_dict(), gl.state_dict()
    out["info"]["teardown_state_equal"] = sorted(ref_state) == sorted(gl_state) and all(
        torch.equal(ref_state[k], gl_state[k]) for k in ref_state if isinstance(ref_state[k], torch.Tensor))
    x = batch(0, 3)
    out["info"]["teardown_output_equal"] = bool(torch.equal(gl(x)[0], ref(x)[0]))
    out["info"]["teardown_dispatcher"] = type(gl.token_dispatcher).__name__

    # C. GPT-MoE model: GRACE spec vs Megatron's dispatcher; routing recorder
    cfg = mt.small_moe_config(num_experts=E, top_k=K, hidden_size=H, moe_ffn_hidden_size=F, num_layers=LAYERS,
                              expert_parallel_size=G)
    model = mt.build_gpt(cfg, vocab_size=64, grace={"plan": plans["unequal+copies-b"], "dispatch": "hierarchical"})
    for layer in mt.moe_layers(model):
        mt.randomize_experts(layer, seed=5)
    mt.sync_replicated_params(model, pg.ep)
    out["info"]["grace_layers"] = [type(m).__name__ for m in mt.moe_layers(model)]
    S, B = 5 + rank, 2
    gen = torch.Generator().manual_seed(99 + rank)
    tokens = torch.randint(0, 64, (B, S), generator=gen)
    pos = torch.arange(S).expand(B, S)
    logits_megatron = model(tokens, pos, attention_mask=mt.causal_mask(S))  # before set-up: a plain Megatron model
    g.setup_grace(model)
    out["info"]["dispatchers"] = sorted({type(m.token_dispatcher).__name__ for m in mt.moe_layers(model)})
    seen: dict[int, tuple] = {}
    hooks = [m.router.register_forward_hook(lambda mod, inp, o, n=m.layer_number: seen.__setitem__(n, (inp[0], o[1])))
             for m in mt.moe_layers(model)]
    rec = g.RoutingRecorder(model, active=False)
    with rec.recording():
        logits_grace = model(tokens, pos, attention_mask=mt.causal_mask(S))
    out["rel"]["gpt/logits"] = _rel(logits_grace, logits_megatron)
    for h in hooks:
        h.remove()
    trace = rec.trace("test")
    out["info"]["trace_shape"] = tuple(trace.expert_ids.shape)
    out["info"]["trace_expected_shape"] = (S * B, LAYERS, K)
    ok_map, ok_logits = True, True
    for moe_index, layer in enumerate(mt.moe_layers(model)):
        hidden, rmap = seen[layer.layer_number]
        got = np.sort(trace.expert_ids[:, moe_index, :], axis=1)
        from_map = np.sort(np.nonzero(rmap.numpy())[1].reshape(-1, K), axis=1)
        logits = hidden.reshape(-1, H).double() @ layer.router.weight.double().t()
        from_logits = np.sort(torch.topk(logits, K, dim=1).indices.numpy(), axis=1)
        ok_map &= bool((got == from_map).all())
        ok_logits &= bool((got == from_logits).all())
    out["info"]["trace_ids_equal_routing_map"] = ok_map
    out["info"]["trace_ids_equal_router_topk"] = ok_logits
    out["info"]["trace_phase"] = sorted(set(trace.phase.tolist()))
    gathered = rec.gathered_trace()
    out["info"]["gathered_tokens"] = gathered.num_tokens
    out["info"]["tokens_per_rank"] = S * B
    rec.remove()
    # a GRACE-placed model saves a standard distributed checkpoint (copies as replicas) that a plain model loads
    import shutil
    import tempfile

    from megatron.core import dist_checkpointing

    holder = [tempfile.mkdtemp(prefix="grace-dcp-") if rank == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    ckpt = holder[0]
    try:
        dist_checkpointing.save(model.sharded_state_dict(), ckpt)
        plain = mt.build_gpt(cfg, vocab_size=64)
        for layer in mt.moe_layers(plain):
            mt.randomize_experts(layer, seed=11)  # other weights, overwritten by the load
        plain.load_state_dict(dist_checkpointing.load(plain.sharded_state_dict(), ckpt))
        plain.eval()
        out["info"]["dcp_plain_equal"] = bool(torch.equal(plain(tokens, pos, attention_mask=mt.causal_mask(S)), logits_megatron))
        # the same checkpoint patched for the plan (grace checkpoint patch): each rank reads only its own slots
        from megatron_grace.checkpoint.patch import patch_checkpoint

        if rank == 0:
            patch_checkpoint(ckpt, ckpt + "-patched", plans["unequal+copies-b"], show_progress=False)
        dist.barrier()
        fresh = mt.build_gpt(cfg, vocab_size=64, grace={"plan": plans["unequal+copies-b"]})
        fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), ckpt))  # non-expert weights as usual
        for layer in mt.moe_layers(fresh):
            mt.randomize_experts(layer, seed=13)  # wrong experts: set-up must replace them from the patched slots
        fresh.eval()
        g.setup_grace(fresh, checkpoint=ckpt + "-patched")
        out["rel"]["gpt/patched-checkpoint"] = _rel(fresh(tokens, pos, attention_mask=mt.causal_mask(S)), logits_megatron)
        out["info"]["patched_bytes_read"] = [m.grace_setup_info["checkpoint_bytes_read"] for m in g.grace_layers(fresh)]
    finally:
        dist.barrier()
        if rank == 0:
            shutil.rmtree(ckpt, ignore_errors=True)
            shutil.rmtree(ckpt + "-patched", ignore_errors=True)
    g.teardown_grace(model)
    out["info"]["gpt_teardown_equal"] = bool(torch.equal(model(tokens, pos, attention_mask=mt.causal_mask(S)), logits_megatron))

    # D. runtime registration into Megatron's own spec builders
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    g.register(plan=plans["contiguous"], dispatch="flat")
    def built_class(builder):  # ModuleSpec (0.16) or functools.partial (0.19)
        return builder.func if hasattr(builder, "func") else builder.module

    registered = built_class(get_gpt_layer_local_spec(num_experts=E).submodules.mlp)
    g.unregister()
    restored = built_class(get_gpt_layer_local_spec(num_experts=E).submodules.mlp)
    out["info"]["register"] = (registered.__name__, restored.__name__)

    # E. Megatron's GroupedMLP experts (0.16's legacy grouped GEMM, bf16)
    out["grouped"] = _grouped_mlp_checks(rank, G, pg, plans, hier_groups, batch)
    return out


def _install_cpu_gmm() -> bool:
    """Give Megatron's ``grouped_gemm_util`` a CPU reference of ``grouped_gemm.ops.gmm`` (the package is CUDA-only).

    Only the kernel is replaced: ``GroupedMLP``'s weight layout and forward are Megatron's own.
    ``gmm(a [n, k], b [G, k, m] (trans_b: [G, m, k]), batch_sizes [G]) = cat_g(a_g @ b_g)``; like the
    real kernel it needs ``batch_sizes`` to cover every row of ``a``. Returns False where the installed
    megatron-core has no legacy ``GroupedMLP`` (0.19 removed it).
    """
    import types

    import torch
    from megatron.core.transformer.moe import experts

    if not hasattr(experts, "GroupedMLP"):
        return False
    from megatron.core.transformer.moe import grouped_gemm_util as gg

    if gg.grouped_gemm is None:
        def gmm(a, b, batch_sizes, trans_b=False):
            sizes = batch_sizes.tolist()
            assert batch_sizes.device.type == "cpu" and sum(sizes) == a.shape[0] and len(sizes) == b.shape[0], (sizes, a.shape)
            parts = [x @ (w.t() if trans_b else w) for x, w in zip(a.split(sizes), b)]
            return torch.cat(parts)

        gg.grouped_gemm = types.SimpleNamespace(ops=types.SimpleNamespace(gmm=gmm))
        gg.ops = gg.grouped_gemm.ops
    return True


def _layer_pair(spec, cfg, pg, plan, seed: int):
    """Megatron's MoELayer from ``spec`` and a GraceMegatronMoELayer with the same state (layer number 2 = plan layer 1)."""
    import torch

    import megatron_grace.adapters.megatron as g
    from megatron_grace.adapters.megatron import testing as mt

    torch.manual_seed(0)
    ref = mt.build_from_spec(spec, config=cfg, pg_collection=pg)
    gl = mt.build_from_spec(g.grace_spec(spec, plan=plan), config=cfg, pg_collection=pg)
    for m in (ref, gl):
        m.set_layer_number(2)
        m.eval()
    mt.randomize_experts(ref, seed=seed)
    mt.sync_replicated_params(ref, pg.ep)
    gl.load_state_dict(ref.state_dict(), strict=True)  # checkpoint layout is Megatron's
    return ref, gl


def _grouped_mlp_checks(rank: int, G: int, pg, plans: dict, hier_groups, batch) -> dict:
    """GRACE with Megatron's GroupedMLP (re-built for the plan's padded slots) vs Megatron's own MoELayer with it."""
    import torch
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    from megatron_grace.adapters.megatron import testing as mt

    if not _install_cpu_gmm():
        return {}
    cfg = mt.small_moe_config(num_experts=E, top_k=K, hidden_size=H, moe_ffn_hidden_size=F, num_layers=LAYERS,
                              expert_parallel_size=G, bf16=True, params_dtype=torch.bfloat16, moe_grouped_gemm=True)
    spec = get_moe_module_spec(use_te=False, num_experts=E, moe_grouped_gemm=True, moe_use_legacy_grouped_gemm=True)
    ref, gl = _layer_pair(spec, cfg, pg, plans["contiguous"], seed=6)
    res: dict = {"kind": type(ref.experts).__name__, "rel": {}}
    for name in ("unequal+copies", "skewed"):
        for mode in ("flat", "hierarchical"):
            gl.setup_grace(plan=plans[name], dispatch=mode, hierarchical_groups=hier_groups)
            x = batch(0, 7).to(torch.bfloat16)
            res["rel"][f"{name}/{mode}"] = _rel(gl(x)[0], ref(x)[0])
    res["slots_kind"] = type(gl.experts).__name__
    gl.teardown_grace()
    x = batch(1, 7).to(torch.bfloat16)
    res["teardown_equal"] = bool(torch.equal(gl(x)[0], ref(x)[0])) and all(
        torch.equal(a, b) for a, b in zip(gl.experts.parameters(), ref.experts.parameters()))
    return res


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def megatron_runs() -> dict[str, list[dict]]:
    """phase name -> per-rank results (one 4-rank spawn for everything)."""
    results = run_distributed(_megatron_worker, world_size=4, timeout=240)
    return {name: [r[name] for r in results] for name in PHASES}


@pytest.fixture(params=list(PHASES))
def run(request, megatron_runs) -> list[dict]:
    return megatron_runs[request.param]


# ---------------------------------------------------------------------------------------------- tests
def test_expert_parallel_groups(megatron_runs):
    assert [r["info"]["ep_group"] for r in megatron_runs["ep4-2x2"]] == [[0, 1, 2, 3]] * 4
    assert [r["info"]["ep_group"] for r in megatron_runs["ep2-1x2"]] == [[0, 1], [0, 1], [2, 3], [2, 3]]


def test_grace_equals_megatron_moe_layer(run):
    keys = run[0]["rel"].keys()
    assert any("hierarchical" in k for k in keys) and any("skewed" in k for k in keys)
    for r, res in enumerate(run):
        bad = {k: v for k, v in res["rel"].items() if not v < TOL}
        assert not bad, f"rank {r}: GRACE differs from Megatron's MoELayer: {bad}"
        info = res["info"]
        assert info["teardown_state_equal"] and info["teardown_output_equal"], f"rank {r}: teardown is not bit-exact"
        assert info["teardown_dispatcher"] == "MoEAlltoAllTokenDispatcher"
        assert info["registered"], f"rank {r}: the GRACE dispatch state is not a registered sub-module"
        held, expected = info["experts_held_once"]
        assert held == expected, f"rank {r}: {held} expert weights, expected {expected} (the plan's padded slots, once)"
    slots = run[0]["info"]["slots"]
    assert len(set(slots["unequal+copies"])) > 1 or len(set(slots["skewed"])) > 1, slots  # unequal counts were tested
    assert sum(slots["skewed"]) > E  # copies were tested


def test_grouped_mlp_experts(run):
    """Megatron's GroupedMLP (grouped GEMM, bf16) under the GRACE dispatcher: padded slots, copies, both dispatch modes."""
    if not run[0]["grouped"]:
        pytest.skip("this megatron-core has no legacy GroupedMLP (0.19 removed it)")
    for r, res in enumerate(run):
        assert res["grouped"]["kind"] == res["grouped"]["slots_kind"] == "GroupedMLP", res["grouped"]
        assert len(res["grouped"]["rel"]) == 4
        bad = {k: v for k, v in res["grouped"]["rel"].items() if not v < 1e-2}  # bf16 rounding (~4e-3 seen); a wrong weight is O(1)
        assert not bad, f"rank {r}: GRACE with GroupedMLP differs from Megatron's MoELayer: {bad}"
        assert res["grouped"]["teardown_equal"], f"rank {r}: GroupedMLP teardown is not bit-exact"


def test_megatron_layout_matches_dense_reference(run):
    for r, res in enumerate(run):
        assert res["dense"], "no dense-reference comparison ran"
        bad = {k: v for k, v in res["dense"].items() if not v < TOL}
        assert not bad, f"rank {r}: Megatron or GRACE differs from the dense reference: {bad}"
        assert res["info"]["same_state_keys/swiglu"] and res["info"]["same_state_keys/gelu"] and res["info"]["shared_expert"]


def test_counters_and_setup_info(run):
    for res in run:
        pairs, slot_load = res["info"]["pairs_vs_slot_load"]
        assert pairs == slot_load > 0
        info = res["info"]["setup"]
        assert info["plan_layer"] == 1 and info["slots"] == len(info["experts"]) and info["received"] == info["slots"]


def test_gpt_model_and_recorder(run):
    for res in run:
        info = res["info"]
        assert info["grace_layers"] == ["GraceMegatronMoELayer"] * LAYERS
        assert info["dispatchers"] == ["GraceTokenDispatcher"]
        assert res["rel"]["gpt/logits"] < TOL, res["rel"]["gpt/logits"]
        assert info["gpt_teardown_equal"]
        assert info["dcp_plain_equal"], "a plain Megatron model loading GRACE's dist checkpoint differs"
        assert all(b > 0 for b in info["patched_bytes_read"]), info["patched_bytes_read"]
        assert info["trace_shape"] == info["trace_expected_shape"]
        assert info["trace_ids_equal_routing_map"] and info["trace_ids_equal_router_topk"]
        assert info["trace_phase"] == [0]  # prefill (s > 1)
        assert info["gathered_tokens"] == sum(x["info"]["tokens_per_rank"] for x in run)
        assert info["register"] == ("GraceMegatronMoELayer", "MoELayer")


def test_bad_input_fails_on_every_rank(run):
    expect = {"experts": "experts", "ep_size": "ranks", "layers": "MoE layer", "per_rank": "different placement plans",
              "dispatch": "dispatch"}
    for r, res in enumerate(run):
        for name, word in expect.items():
            msg = res["errors"][name]
            assert msg is not None, f"rank {r}: bad input {name!r} did not raise"
            assert word in msg, f"rank {r}, {name}: {msg}"
        assert res["rel"]["swiglu/after-errors/flat"] < TOL


# ---------------------------------------------------------------------------------------------- single-process checks
def test_router_output_formats():
    """TopKRouter's (probs [T, E], bool map) and 0.19 InferenceTopKRouter's (probs [T, k], indices) both convert."""
    import torch

    from megatron_grace.adapters.megatron import router_output_to_topk

    probs = torch.tensor([[0.0, 0.7, 0.0, 0.3], [0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 1.0]])
    rmap = probs > 0
    ids, w = router_output_to_topk(probs, rmap, 4, 2)
    assert ids.tolist() == [[1, 3], [0, 2], [3, -1]]  # ascending ids; the dropped slot is -1 with weight 0
    assert torch.allclose(w, torch.tensor([[0.7, 0.3], [0.5, 0.5], [1.0, 0.0]]))
    dense_ids = torch.tensor([[3, 1], [2, 0]])
    ids2, w2 = router_output_to_topk(torch.tensor([[0.3, 0.7], [0.5, 0.5]]), dense_ids, 4, 2)
    assert ids2.tolist() == dense_ids.tolist() and w2.shape == (2, 2)


def test_layer_numbering_and_options(tmp_path):
    from types import SimpleNamespace

    from megatron_grace.adapters.megatron import GraceMegatronOptions, load_plan, plan_layer_index
    from megatron_grace.errors import GraceInputError

    cfg = SimpleNamespace(num_layers=6, moe_layer_freq=2)  # MoE at layers 1, 3, 5 (1-based)
    assert [plan_layer_index(cfg, n, None) for n in (1, 3, 5)] == [(0, 3), (1, 3), (2, 3)]
    with pytest.raises(GraceInputError, match="not an MoE layer"):
        plan_layer_index(cfg, 2, None)
    with pytest.raises(GraceInputError, match="outside"):
        plan_layer_index(cfg, 7, None)  # e.g. a multi-token-prediction layer
    assert plan_layer_index(SimpleNamespace(num_layers=3, moe_layer_freq=[0, 1, 1]), 3, None) == (1, 2)
    assert plan_layer_index(cfg, 7, {7: 2}) == (2, None)
    with pytest.raises(GraceInputError, match="unknown GRACE option"):
        GraceMegatronOptions().replace(dispatch_mode="flat")
    plan = _plan(1, 2, [_contiguous(2)] * LAYERS)
    path = tmp_path / "plan.json"
    plan.save(path)
    assert GraceMegatronOptions.coerce(str(path)).plan == str(path)
    assert load_plan(str(path)).gpu_experts == plan.gpu_experts
    with pytest.raises(GraceInputError, match="cannot read the plan"):
        load_plan(tmp_path / "missing.json")
    with pytest.raises(GraceInputError, match="valid: flat, hierarchical"):
        GraceMegatronOptions(dispatch="hierarchal")  # a typo fails when the options (the spec) are made
    with pytest.raises(GraceInputError, match="valid:"):
        GraceMegatronOptions(policy="nearest")


def test_spec_time_checks(tmp_path):
    """A missing plan or a misspelt dispatch mode fails when the spec is made, not at set-up."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_grace.adapters.megatron import grace_spec
    from megatron_grace.errors import GraceInputError

    spec = get_gpt_layer_local_spec(num_experts=E)
    with pytest.raises(GraceInputError, match="cannot read the plan"):
        grace_spec(spec, plan=tmp_path / "missing.json")
    with pytest.raises(GraceInputError, match="valid: flat, hierarchical"):
        grace_spec(spec, dispatch="hierarchal")


def test_unsupported_expert_settings_are_named():
    import functools
    from types import SimpleNamespace

    import torch.nn.functional as Fn

    from megatron_grace.adapters.megatron import megatron_activation
    from megatron_grace.errors import GraceInputError

    def cfg(**kw):
        base = dict(add_bias_linear=False, gated_linear_unit=True, activation_func=Fn.silu)
        base.update(kw)
        return SimpleNamespace(**base)

    assert megatron_activation(cfg()) == "swiglu"
    assert megatron_activation(cfg(gated_linear_unit=False, activation_func=Fn.gelu)) == "gelu"
    for kw, word in [({"add_bias_linear": True}, "add_bias_linear"),
                     ({"gated_linear_unit": False, "activation_func": functools.partial(Fn.gelu, approximate="tanh")}, "activation"),
                     ({"activation_func_clamp_value": 7.0}, "clamp"), ({"glu_linear_offset": 1.0}, "glu_linear_offset"),
                     ({"moe_apply_probs_on_input": True}, "probs_on_input"), ({"fp8": "e4m3"}, "fp8")]:
        with pytest.raises(GraceInputError, match=word):
            megatron_activation(cfg(**kw))
