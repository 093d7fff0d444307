"""GRACE inside DeepSpeed-MoE, on real ``deepspeed.moe.layer.MoE`` modules and DeepSpeed's own groups (4 gloo ranks).

One spawn of 4 ranks runs every check and returns what it measured; the tests assert on it.
Each check builds a small model with real DeepSpeed MoE layers (8 experts, ``ep_size`` 4 or 2,
``MoE.set_deepspeed_parallelism`` creating DeepSpeed's expert-parallel groups), runs DeepSpeed's
own forward (no token dropping: ``drop_tokens=False``), converts the model with
:func:`megatron_grace.adapters.deepspeed.setup_grace` and runs it again with the same torch RNG
state (top-2's second expert is sampled, as in DeepSpeed by default):

- outputs and ``l_aux`` match within 1e-5 (float32, relative) for: gelu experts with top-1 and
  SwiGLU experts with top-2 plus PR-MoE's residual MLP (``use_residual=True``) on a 2x2 plan with
  unequal slot counts and copies, flat and hierarchical; the same model converted again to a 1x4
  plan (weights then come from the GRACE slots); top-3 with biased experts (random non-zero
  biases, ``nn.Linear``'s default) on the 2x2 plan and on the contiguous plan;
  ``ep_size=2`` on 4 ranks (two DeepSpeed expert-parallel groups, each its own GRACE layer, on a
  2x1 plan, flat and hierarchical); DeepSpeed's capacity drops (``drop_tokens=True``) reproduced;
- the converted modules are registered (``state_dict`` holds the GRACE slots, not DeepSpeed's experts)
  and the counters report every pair;
- unsupported configurations and bad plans raise GraceInputError on every rank (no hang), naming
  the problem, and leave the model unchanged.

DeepSpeed's communication layer wraps the gloo group the launcher made (``deepspeed.init_distributed``);
its optional shared-memory all-reduce op (~29 s to compile, used only by ``inference_all_reduce``,
not by the MoE path) is not built.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from torch import nn

if importlib.util.find_spec("deepspeed") is None:
    pytest.skip("deepspeed is not installed", allow_module_level=True)

from _dist_utils import run_distributed  # noqa: E402

H, F, E, T = 16, 24, 8, 24  # hidden, expert FFN, experts, tokens per rank
TOL = 1e-5


def _layers(kind: str, ep_size: int = 4) -> list[dict]:
    """MoE keyword arguments of the two layers of the test models."""
    from megatron_grace.adapters.deepspeed.testing import SwiGLUExpert, gelu_expert

    base = dict(num_experts=E, ep_size=ep_size, drop_tokens=False)
    if kind == "mixed":  # gelu top-1, then SwiGLU top-2 (second expert sampled) with PR-MoE's residual MLP
        return [dict(base, expert=gelu_expert(H, F), k=1), dict(base, expert=SwiGLUExpert(H, F), k=2, use_residual=True)]
    if kind == "swiglu":  # HF-named experts: the naming `grace checkpoint patch` reads from DeepSpeed checkpoints
        return [dict(base, expert=SwiGLUExpert(H, F), k=2)] * 2
    if kind == "top3":
        return [dict(base, expert=gelu_expert(H, F, bias=True), k=3)] * 2
    if kind == "relu":
        return [dict(base, expert=gelu_expert(H, F, activation=nn.ReLU()), k=1)] * 2
    if kind in ("dropping", "dropping-off"):
        return [dict(base, expert=gelu_expert(H, F), k=2, drop_tokens=kind == "dropping", eval_capacity_factor=0.5, min_capacity=1)] * 2
    raise ValueError(kind)


def _model(kind: str, ep_size: int = 4, parallel: bool = True):
    from megatron_grace.adapters.deepspeed.testing import TinyMoEModel, build_model

    if not parallel:  # DeepSpeed's groups never created
        torch.manual_seed(0)
        return TinyMoEModel(H, _layers(kind, ep_size)).eval()
    return build_model(H, _layers(kind, ep_size), seed=0)


def _plans() -> dict:
    from megatron_grace.plan.placement import PlacementPlan
    from megatron_grace.plan.topology import Topology

    contiguous = [[0, 1], [2, 3], [4, 5], [6, 7]]
    return {
        # unequal slot counts (GPU 1 of layer 1 hosts one expert), copies on both nodes
        "2x2": PlacementPlan(Topology.parse("2x2"), E, [[[0, 1, 5], [2, 3, 0], [4, 5], [6, 7, 1, 2]],
                                                        [[0, 1, 2, 3, 7], [4], [5, 6, 0], [7, 1, 6]]]),
        "1x4": PlacementPlan(Topology.parse("1x4"), E, [contiguous, contiguous]),
        "2x1": PlacementPlan(Topology.parse("2x1"), E, [[[0, 1, 2, 5, 6], [3, 4, 5, 6, 7, 0]], [[0, 1, 2, 3], [4, 5, 6, 7, 3]]]),
        "1x2": PlacementPlan(Topology.parse("1x2"), E, [[[0, 1, 2, 3], [4, 5, 6, 7]]] * 2),
        "2x2-16": PlacementPlan(Topology.parse("2x2"), 2 * E, [[list(range(g * 4, g * 4 + 4)) for g in range(4)]] * 2),
        "2x2-1layer": PlacementPlan(Topology.parse("2x2"), E, [contiguous]),
    }


def _inputs(rank: int) -> torch.Tensor:
    return torch.randn(T, H, generator=torch.Generator().manual_seed(100 + rank))


@torch.no_grad()
def _compare(rank: int, kind: str, plan, dispatch: str, ep_size: int = 4, seed: int = 11, **kw):
    """DeepSpeed's forward, convert, GRACE's forward (same RNG state): errors and the converted model."""
    from megatron_grace.adapters.deepspeed import setup_grace

    model = _model(kind, ep_size)
    x = _inputs(rank)
    torch.manual_seed(seed)
    ref, aux_ref = model(x)
    built = setup_grace(model, plan, dispatch=dispatch, **kw)
    torch.manual_seed(seed)
    out, aux = model(x)
    rel = float((out.double() - ref.double()).norm() / ref.double().norm())
    return {"rel": rel, "max_abs": float((out - ref).abs().max()), "aux": abs(float(aux) - float(aux_ref)),
            "layers": len(built), "ref": ref, "out": out}, model


@torch.no_grad()
def _patched_checkpoint(rank: int, plan) -> dict:
    """engine.save_checkpoint by DeepSpeed, `grace checkpoint patch` for ``plan``, then set-up reading each rank's slots."""
    import os
    import shutil
    import tempfile

    import deepspeed
    import torch.distributed as dist

    from megatron_grace.adapters.deepspeed import setup_grace
    from megatron_grace.adapters.deepspeed.testing import randomize_experts
    from megatron_grace.checkpoint.patch import patch_checkpoint

    os.environ.setdefault("LOCAL_RANK", str(rank))  # what DeepSpeed's launcher sets (one node)
    model = _model("swiglu", parallel=False)  # deepspeed.initialize creates the expert-parallel groups
    holder = [tempfile.mkdtemp(prefix="grace-ds-ckpt-") if rank == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    root = holder[0]
    try:
        with torch.enable_grad():
            engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
                "train_batch_size": dist.get_world_size(), "optimizer": {"type": "Adam", "params": {"torch_adam": True}}})
        randomize_experts(model, seed=5)  # every expert distinct
        engine.save_checkpoint(root + "/ds", tag="step1")
        model.eval()
        x = _inputs(rank)
        torch.manual_seed(11)
        ref, _ = model(x)
        if rank == 0:
            patch_checkpoint(root + "/ds", root + "/patched", plan, show_progress=False)
        dist.barrier()
        randomize_experts(model, seed=99)  # wrong experts: set-up must take them from the patched slots
        torch.manual_seed(11)
        wrong, _ = model(x)
        setup_grace(model, plan, dispatch="flat", checkpoint=root + "/patched")
        torch.manual_seed(11)
        out, _ = model(x)
        return {"rel": float((out.double() - ref.double()).norm() / ref.double().norm()),
                "wrong_rel": float((wrong.double() - ref.double()).norm() / ref.double().norm())}
    finally:
        dist.barrier()
        if rank == 0:
            shutil.rmtree(root, ignore_errors=True)


@torch.no_grad()
def _recorder_checks(rank: int) -> dict:
    """RoutingRecorder on DeepSpeed's gates vs the top-k recomputed from each gate's input (top-3, softmax, renormalised)."""
    from megatron_grace.adapters.deepspeed import RoutingRecorder

    model = _model("top3")
    seen: dict[int, torch.Tensor] = {}
    hooks = [m.deepspeed_moe.gate.register_forward_hook(lambda mod, inp, out, i=i: seen.__setitem__(i, inp[0].detach().clone()))
             for i, m in enumerate(model.moes)]
    rec = RoutingRecorder(model, active=False)
    model(_inputs(rank))  # not recording
    with rec.recording(phase="prefill"):
        model(_inputs(rank))
        model(_inputs(rank + 10))
    for h in hooks:
        h.remove()
    trace, gathered = rec.trace("ds-test"), rec.gathered_trace(model_name="ds-test")
    rec.remove()
    ids_ok, max_w_err = True, 0.0
    for layer, m in enumerate(model.moes):
        probs = torch.softmax(seen[layer].float() @ m.deepspeed_moe.gate.wg.weight.float().t(), dim=1)  # the last pass
        top = probs.topk(3, dim=1)
        order = top.indices.argsort(dim=1)
        want_ids = top.indices.gather(1, order).numpy()
        want_w = (top.values / top.values.sum(1, keepdim=True)).gather(1, order).numpy()
        got = trace.expert_ids[T:, layer]
        got_order = np.argsort(got, axis=1)
        ids_ok &= bool((np.take_along_axis(got, got_order, 1) == want_ids).all())
        got_w = np.take_along_axis(trace.gate_weights[T:, layer], got_order, 1)
        max_w_err = max(max_w_err, float(np.abs(got_w - want_w).max()))
    return {"shape": tuple(trace.expert_ids.shape), "passes": trace.extra["passes"], "phase": sorted(set(trace.phase.tolist())),
            "ids_ok": ids_ok, "max_w_err": max_w_err, "gathered_tokens": gathered.num_tokens,
            "gathered_requests": len(set(gathered.request_ids.tolist()))}


def _refusal(fn) -> str:
    from megatron_grace.errors import GraceInputError

    try:
        fn()
    except GraceInputError as exc:
        return str(exc)
    return "no error"


def _worker(rank: int, world: int) -> dict:
    from deepspeed.moe.sharded_moe import MOELayer

    from megatron_grace.adapters.deepspeed import GraceMOELayer, setup_grace
    from megatron_grace.adapters.deepspeed.testing import init_deepspeed_without_optional_ops

    init_deepspeed_without_optional_ops()
    plans = _plans()
    res: dict = {"errors": {}, "refusals": {}}

    for mode in ("flat", "hierarchical"):
        r, model = _compare(rank, "mixed", plans["2x2"], mode, counters=True)
        res["errors"][f"mixed-2x2-{mode}"] = r
        res[f"counters-{mode}"] = [(c.tokens, c.pairs, int(c.slot_load.sum()), int(c.rows_sent.sum()))
                                   for c in (m.deepspeed_moe.last_counters for m in model.moes)]
    for moe in model.moes:  # what deepspeed.initialize does to every MoE: accepted, the group is the same
        moe.set_deepspeed_parallelism()
    keys = model.state_dict().keys()
    res["state_keys"] = sorted(k for k in keys if "moes.0." in k)
    res["converted"] = [type(m.deepspeed_moe).__name__ for m in model.moes]
    res["grace_params"] = sum(p.numel() for n, p in model.named_parameters() if ".grace." in n)
    # convert the converted model again (1x4 plan): weights now come from the GRACE slots
    with torch.no_grad():
        x = _inputs(rank)
        setup_grace(model, plans["1x4"], dispatch="flat")
        torch.manual_seed(11)
        out, _ = model(x)
    ref = res["errors"]["mixed-2x2-hierarchical"]["ref"]
    res["errors"]["reconvert-1x4"] = {"rel": float((out.double() - ref.double()).norm() / ref.double().norm())}

    res["errors"]["top3-bias-1x4-hier"] = _compare(rank, "top3", plans["1x4"], "hierarchical")[0]
    res["errors"]["top3-bias-2x2-flat"] = _compare(rank, "top3", plans["2x2"], "flat")[0]
    for mode in ("flat", "hierarchical"):
        res["errors"][f"ep2-2x1-{mode}"] = _compare(rank, "mixed", plans["2x1"], mode, ep_size=2)[0]

    # DeepSpeed's capacity drops: reproduced with drop_tokens=True; never dropping = DeepSpeed without drops
    dropped = _compare(rank, "dropping", plans["2x2"], "flat", drop_tokens=True)[0]
    res["errors"]["drop-tokens"] = dropped
    nodrop_ref = _compare(rank, "dropping-off", plans["2x2"], "flat")[0]["ref"]
    kept = _compare(rank, "dropping", plans["2x2"], "flat")[0]["out"]
    res["drop_changes_ds"] = float((dropped["ref"] - nodrop_ref).abs().max())
    res["errors"]["no-drop-vs-ds-no-drop"] = {"rel": float((kept.double() - nodrop_ref.double()).norm() / nodrop_ref.norm())}

    # a DeepSpeed checkpoint patched for the plan: each rank reads only its own slots
    res["errors"]["patched-checkpoint"] = _patched_checkpoint(rank, plans["2x2"])

    res["recorder"] = _recorder_checks(rank)

    # refusals: every rank raises, the model stays DeepSpeed's
    relu = _model("relu")
    res["refusals"]["relu"] = _refusal(lambda: setup_grace(relu, plans["2x2"]))
    with torch.no_grad():
        relu(_inputs(rank))  # DeepSpeed's forward still runs
    res["unchanged_after_refusal"] = [type(m.deepspeed_moe) is MOELayer for m in relu.moes]
    res["refusals"]["ep-mismatch"] = _refusal(lambda: setup_grace(_model("mixed"), plans["1x2"]))
    res["refusals"]["experts-mismatch"] = _refusal(lambda: setup_grace(_model("mixed"), plans["2x2-16"]))
    res["refusals"]["layers-mismatch"] = _refusal(lambda: setup_grace(_model("mixed"), plans["2x2-1layer"]))
    res["refusals"]["no-group"] = _refusal(lambda: setup_grace(_model("mixed", ep_size=1, parallel=False), plans["2x2"]))
    res["refusals"]["bad-dispatch"] = _refusal(lambda: setup_grace(_model("mixed"), plans["2x2"], dispatch="ring"))
    one_rank = _model("top3")
    if rank == 3:  # one expert that only rank 3 holds has a wrong shape (say, a bad load)
        one_rank.moes[1].deepspeed_moe.experts.deepspeed_experts[1][2] = nn.Linear(F + 1, H)
    res["refusals"]["shape-on-rank-3"] = _refusal(lambda: setup_grace(one_rank, plans["2x2"]))
    res["still_ds_after_rank_problem"] = all(isinstance(m.deepspeed_moe, MOELayer) for m in one_rank.moes)
    res["grace_class"] = GraceMOELayer.__name__
    for r in res["errors"].values():
        r.pop("ref", None), r.pop("out", None)
    return res


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, 4, timeout=300)


def test_grace_matches_deepspeed_moe(results):
    names = set(results[0]["errors"])
    assert {"mixed-2x2-flat", "mixed-2x2-hierarchical", "reconvert-1x4", "top3-bias-1x4-hier", "top3-bias-2x2-flat", "ep2-2x1-flat",
            "ep2-2x1-hierarchical", "drop-tokens", "no-drop-vs-ds-no-drop", "patched-checkpoint"} <= names
    for rank, res in enumerate(results):
        assert res["errors"]["patched-checkpoint"]["wrong_rel"] > 1e-2  # the experts really were replaced before set-up
        for name, r in res["errors"].items():
            assert r["rel"] <= TOL, (rank, name, r)
            if "aux" in r:
                assert r["aux"] <= 1e-6, (rank, name, r)
                assert r["layers"] == 2


def test_routing_recorder_records_deepspeed_gates(results):
    for res in results:
        r = res["recorder"]
        assert r["shape"] == (2 * T, 2, 3) and r["passes"] == 2 and r["phase"] == [0]  # two recorded passes, prefill
        assert r["ids_ok"] and r["max_w_err"] < 1e-6, r
        assert r["gathered_tokens"] == 4 * 2 * T and r["gathered_requests"] == 4  # one request per rank, kept distinct


def test_drop_tokens_reproduces_deepspeed_capacity(results):
    # the capacity of the dropping model really dropped routes on some rank, and GRACE matched it (above)
    assert max(res["drop_changes_ds"] for res in results) > 1e-3


def test_converted_modules_are_registered_and_counted(results):
    res = results[0]
    assert res["converted"] == ["GraceMOELayer", "GraceMOELayer"]
    keys = res["state_keys"]
    assert "moes.0.deepspeed_moe.gate.wg.weight" in keys  # DeepSpeed's router weight keeps its name
    assert any(k.startswith("moes.0.deepspeed_moe.grace.experts.w_fc1") for k in keys)
    assert not any("deepspeed_experts" in k for k in keys)  # DeepSpeed's expert copies are gone
    assert res["grace_params"] > 0
    for r in results:
        for mode in ("flat", "hierarchical"):
            (t0, p0, _, _), (t1, p1, _, _) = r[f"counters-{mode}"]
            assert (t0, p0, t1, p1) == (T, T * 1, T, T * 2)  # top-1 then top-2, nothing dropped
    # every pair of the group was computed by some slot
    for mode in ("flat", "hierarchical"):
        for layer in range(2):
            assert sum(r[f"counters-{mode}"][layer][2] for r in results) == sum(r[f"counters-{mode}"][layer][1] for r in results)


@pytest.mark.parametrize("case, needles", [
    ("relu", ["DeepSpeed MoE 'moes.0' (ep_size 4, 8 experts)", "does not compute an MLP GRACE supports", "ReLU"]),
    ("ep-mismatch", ["the plan is for 2 GPUs", "expert-parallel group has 4 ranks"]),
    ("experts-mismatch", ["16 experts per layer but the model has 8"]),
    ("layers-mismatch", ["1 MoE layer(s) but the model has 2"]),
    ("no-group", ["has not created the expert-parallel group 'ep_size_1'"]),
    ("bad-dispatch", ["unknown dispatch mode 'ring'"]),
])
def test_refusals_on_every_rank(results, case, needles):
    for rank, res in enumerate(results):
        msg = res["refusals"][case]
        assert all(n in msg for n in needles), (rank, msg)
    assert all(all(res["unchanged_after_refusal"]) for res in results)


def test_problem_on_one_rank_fails_every_rank(results):
    msgs = [res["refusals"]["shape-on-rank-3"] for res in results]
    assert "weight 'fc2' of expert 7 has shape (25, 16), expected (24, 16)" in msgs[3], msgs[3]
    for msg in msgs[:3]:
        assert "failed on rank(s) 3" in msg and "of expert 7 has shape" in msg, msg
    assert all(res["still_ds_after_rank_problem"] for res in results)
    assert np.all([res["grace_class"] == "GraceMOELayer" for res in results])
