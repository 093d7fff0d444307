"""The GPU data path, tested on every device present: grouped experts, sync-free routing and load
prediction, the layer's dynamic and static (decode) paths on real gloo ranks, host-sync audits,
decode overflow fallback, and the fullgraph / CUDA-graph check script.

Host synchronisations are counted on the CPU with :class:`megatron_grace._sync_audit.SyncAudit`
(the aten calls that block the host on a GPU) and the dispatch's intended split-size copies
(:func:`megatron_grace._sync_audit.count_host_copies`); on a GPU ``scripts/check_graph_capture.py``
runs the static step under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _dist_utils import run_distributed

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
H, FF = 24, 16


def _loop_reference(experts, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Slot-by-slot float64 MLPs from the dict weights (the simple reference of the grouped GEMM)."""
    out, start = [], 0
    for s, n in enumerate(counts):
        st = {k: v.double() for k, v in experts.expert_state(s).items()}
        xs = x[start:start + n].double()

        def lin(v: torch.Tensor, name: str) -> torch.Tensor:
            return v @ st[name] + st[f"{name}_bias"] if f"{name}_bias" in st else v @ st[name]

        if experts.activation == "swiglu":
            out.append(lin(F.silu(lin(xs, "gate")) * lin(xs, "up"), "down"))
        else:
            out.append(lin(F.gelu(lin(xs, "fc1")), "fc2"))
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float64, 1e-12)])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("bias", [False, True])
def test_grouped_experts_match_a_loop_over_slots(device, dtype, tol, activation, bias):
    from megatron_grace._sync_audit import SyncAudit
    from megatron_grace.experts import SlotExperts
    from megatron_grace.layer.reference import random_expert_weights

    weights = random_expert_weights(6, H, FF, activation, seed=2, bias=bias)
    experts = SlotExperts.from_full_weights([5, 0, 3, 3 - 2], weights, H, FF, activation, dtype, device, bias)
    counts = [3, 0, 7, 1]  # an empty slot in the middle
    x = torch.randn(sum(counts) + 2, H, generator=torch.Generator().manual_seed(0)).to(device, dtype)  # 2 padding rows
    slot_counts = torch.tensor(counts, device=device)
    with SyncAudit() as audit:
        y = experts(x, slot_counts, max(counts))
    assert audit.count == 0, dict(audit.ops)  # biases included: no host synchronisation
    ref = _loop_reference(experts, x, counts)
    n = sum(counts)
    assert y.shape == x.shape and y.dtype == dtype
    assert float((y[:n].double() - ref).norm() / ref.norm()) < tol
    # the wire format round-trips (used to copy replicas between ranks)
    other = SlotExperts([5], H, FF, activation, dtype, device, bias)
    other.load_flat_slot(0, experts.flat_slot(0))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(other.parameters(), experts.parameters(), strict=True))


@pytest.mark.parametrize("device", DEVICES)
def test_routing_and_predictor_have_no_hidden_syncs(device):
    from megatron_grace._sync_audit import SyncAudit
    from megatron_grace.plan.placement import PlacementPlan
    from megatron_grace.plan.topology import Topology
    from megatron_grace.routing import LoadPredictor, ReplicaTable, choose_copies, copy_destinations

    rng = np.random.default_rng(0)
    topo = Topology.preset("a100-2x4")
    gpus = [sorted(set(rng.choice(16, 4, replace=False).tolist())) for _ in range(8)]
    for e in range(16):  # every expert somewhere
        if not any(e in g for g in gpus):
            gpus[e % 8].append(e)
    plan = PlacementPlan(topo, 16, [gpus])
    table = ReplicaTable.from_plan(plan, 0, device=device)
    ids = torch.as_tensor(np.stack([rng.permutation(16)[:4] for _ in range(64)])).to(device)
    ids[::7, 1] = -1
    predictor = LoadPredictor(plan, device=device)
    step = torch.zeros((), dtype=torch.int64, device=device)
    with SyncAudit() as audit:
        for policy in ("grace", "static-local", "primary", "position"):
            pred = predictor.predict(0, pairs=(ids >= 0).sum())
            copy = choose_copies(policy, ids, 3, table, pred, step=step)
            gpu, _ = copy_destinations(ids, copy, table)
            counts = torch.zeros(8, dtype=torch.float64, device=device).scatter_add_(
                0, gpu.clamp(min=0).reshape(-1), (gpu >= 0).reshape(-1).double())
            predictor.observe(counts, layer=0)
            predictor.end_step()
            step.add_(1)
    assert audit.count == 0, dict(audit.ops)
    assert predictor.predict_share(0).device.type == torch.device(device).type
    # a token goes to a copy of its own expert, never elsewhere
    copy = choose_copies("grace", ids, 3, table, predictor.predict(0, 100.0), step=step)
    gpu, slot = copy_destinations(ids, copy, table)
    valid = ids >= 0
    assert bool((copy[~valid] == -1).all()) and bool((gpu[valid] >= 0).all())
    hosted = [[plan.gpu_experts[0][int(g)][int(s)] for g, s in zip(gr, sr)] for gr, sr in zip(gpu.tolist(), slot.tolist())]
    assert all(h == e for row, ids_row in zip(hosted, ids.tolist()) for h, e in zip(row, ids_row) if e >= 0)


# ---------------------------------------------------------------------------------------------- distributed
def _layer_worker(rank: int, world: int) -> dict:
    import test_layer_distributed as T

    from megatron_grace._sync_audit import SyncAudit, count_host_copies
    from megatron_grace.layer import DecodeGraph, DecodeOptions, DenseReferenceMoE, GraceMoELayer
    from megatron_grace.layer.reference import random_expert_weights

    torch.manual_seed(0)
    plan = T._random_plan(2, world // 2, 16, seed=3)
    weights = random_expert_weights(16, T.H, T.F, seed=1)
    ref = DenseReferenceMoE(weights, 16, T.H, T.F)
    out: dict = {"err": {}, "syncs": {}, "copies": {}}

    def rel(a, b):
        return float((a.double() - b).norm() / b.norm())

    for dispatch in ("flat", "hierarchical"):
        layer = GraceMoELayer.from_full_weights(plan, 0, weights, hidden_size=T.H, ffn_size=T.F, dispatch=dispatch,
                                                decode=DecodeOptions(max_tokens=64, capacity_factor=4.0))
        for static in (False, True):
            if static and dispatch == "hierarchical":
                continue  # the static path is flat by design
            key = f"{dispatch}/{'static' if static else 'dynamic'}"
            x, ids, w = T._batch(10 * rank, 40, 16, 4)
            layer(x, ids, w, static=static)  # warm-up
            with count_host_copies() as copies, SyncAudit() as audit:
                y = layer(x, ids, w, static=static)
            out["err"][key] = rel(y, ref(x, ids, w))
            out["syncs"][key] = dict(audit.ops)
            out["copies"][key] = copies[0]
    # static path with a capacity too small: DecodeGraph re-runs the step on the dynamic path
    small = GraceMoELayer.from_full_weights(plan, 0, weights, hidden_size=T.H, ffn_size=T.F,
                                            decode=DecodeOptions(max_tokens=64, capacity_factor=0.25))
    x, ids, w = T._batch(10 * rank + 1, 40, 16, 4, hot=0)  # hot expert: some destination overflows
    graph = DecodeGraph(lambda a, b, c: small(a, b, c), [x, ids, w], [small])
    y = graph(x, ids, w)
    out["fallback_err"] = rel(y, ref(x, ids, w))
    out["fallbacks"] = graph.fallbacks
    y_static = small(x, ids, w)  # without the check: overflowed pairs are missing, and counted
    out["static_missing_err"] = rel(y_static, ref(x, ids, w))
    out["overflowed"] = small.overflowed()
    # a predictor with host-side counters (window mode, cross-rank merging) would freeze in a CUDA graph: refused
    from megatron_grace.errors import GraceInputError
    from megatron_grace.routing import LoadPredictor

    windowed = GraceMoELayer.from_full_weights(plan, 0, weights, hidden_size=T.H, ffn_size=T.F, decode=DecodeOptions(max_tokens=64),
                                               predictor=LoadPredictor(plan, mode="window"))
    try:
        DecodeGraph(lambda a, b, c: windowed(a, b, c), [x, ids, w], [windowed], use_graph=True)
        out["graph_refusal"] = "no error"
    except GraceInputError as exc:
        out["graph_refusal"] = str(exc)
    return out


@pytest.fixture(scope="module")
def layer_results():
    return run_distributed(_layer_worker, world_size=4, timeout=240)


def test_layer_paths_match_the_dense_reference(layer_results):
    for r in layer_results:
        for key, err in r["err"].items():
            assert err < 1e-5, (key, err)


def test_forward_has_one_host_copy_per_all_to_all_and_no_other_sync(layer_results):
    for r in layer_results:
        assert all(not ops for ops in r["syncs"].values()), r["syncs"]
        assert r["copies"] == {"flat/dynamic": 1, "flat/static": 0, "hierarchical/dynamic": 2}


def test_graph_capture_refuses_a_predictor_with_host_side_state(layer_results):
    for r in layer_results:
        assert "mode='window'" in r["graph_refusal"] and "CUDA graph would freeze" in r["graph_refusal"], r["graph_refusal"]


def test_decode_overflow_is_counted_and_falls_back_on_every_rank(layer_results):
    assert all(r["fallbacks"] == 1 for r in layer_results)  # every rank took the same decision
    assert all(r["fallback_err"] < 1e-5 for r in layer_results)
    assert all(r["overflowed"] for r in layer_results)
    assert max(r["static_missing_err"] for r in layer_results) > 1e-3  # the static result alone is incomplete


def test_check_graph_capture_script_passes_on_this_machine():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_graph_capture.py")], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "check_graph_capture: PASS" in proc.stdout
