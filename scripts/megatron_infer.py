#!/usr/bin/env python
"""Prefill + decode on a Megatron-Core GPT-MoE with GRACE and with Megatron's own dispatcher.

Run with torchrun (CPU/gloo here; NCCL when CUDA is available)::

    torchrun --nproc-per-node 4 scripts/megatron_infer.py                   # plan made from a calibration pass
    torchrun --nproc-per-node 4 scripts/megatron_infer.py --plan plan.json  # a given plan (4 GPUs)

The model is a small GPT-MoE with Qwen3-30B-A3B's routing shape (128 experts, top-8) and random
weights (every expert distinct), ``SequentialMLP`` experts, Megatron's ``TopKRouter`` and
alltoall dispatcher, one expert-parallel group over all ranks. Each rank generates greedily for
its own batch of prompts with a KV cache (``StaticInferenceContext``):

1. Megatron's own path (before ``setup_grace``) produces the tokens and the reference logits, and
   the routing recorder counts the rows Megatron's alltoall sends (one per token-expert pair to
   the expert's contiguous owner);
2. GRACE (``setup_grace`` per ``--dispatch`` mode: the ``GraceTokenDispatcher`` with Megatron's
   own experts re-placed by the plan) re-runs the same token sequence; its logits are compared
   with Megatron's at every step (float32, max relative error per step, Frobenius) and the GRACE
   layer counters give the rows and bytes each rank sent per link type and the MoE time.

Without ``--plan`` a plan is made for the right number of ranks: from the routing statistics of
a calibration batch recorded on Megatron's path (``--planner grace``, ``eplb``, ``affinity``) or
contiguous (``--planner vanilla``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_grace.errors import GraceInputError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--plan", help="placement plan JSON (GPUs = ranks); default: make one")
    p.add_argument("--planner", default="grace", choices=["vanilla", "eplb", "affinity", "grace"],
                   help="planner used when no --plan is given")
    p.add_argument("--save-plan", help="write the plan used to this path (rank 0)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="plan topology: GPUs per node (default: 2 when the "
                   "world size is a multiple of 4, else all ranks on one node)")
    p.add_argument("--dispatch", default="both", choices=["flat", "hierarchical", "both"])
    p.add_argument("--policy", default="grace", help="GRACE replica-choice policy")
    p.add_argument("--experts", type=int, default=None, help="experts per layer (default: the plan's, else 128)")
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--moe-ffn", type=int, default=64, help="expert FFN width (moe_ffn_hidden_size)")
    p.add_argument("--layers", type=int, default=None, help="MoE layers (default: the plan's, else 2)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--batch", type=int, default=4, help="prompts per rank")
    p.add_argument("--prompt", type=int, default=32, help="prompt length (prefill tokens per prompt)")
    p.add_argument("--decode", type=int, default=8, help="decode steps")
    p.add_argument("--calibration-batch", type=int, default=8, help="prompts per rank in the calibration pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=1e-5, help="max relative error accepted (exit code 1 above)")
    p.add_argument("--json", help="write the results to this file (rank 0)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a collective may wait before the job fails")
    return p.parse_args(argv)


def _topology(nodes: int, gpn: int):
    from megatron_grace.plan.topology import Topology

    return Topology.parse(f"{nodes}x{gpn}")


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    y64, r64 = y.double(), ref.double()
    den = float(r64.norm())
    return float((y64 - r64).norm()) / den if den > 0 else float(y64.norm())


def _barrier_time() -> float:
    dist.barrier()
    return time.perf_counter()


def generate(model: Any, prompts: torch.Tensor, steps: int, forced: torch.Tensor | None, mt: Any, on_pass=None
             ) -> tuple[list[torch.Tensor], torch.Tensor, dict[str, float]]:
    """Greedy generation with a KV cache.

    Args:
        prompts: int64 ``[B, P]``.
        steps: decode steps.
        forced: int64 ``[B, steps]`` tokens to feed instead of the argmax (teacher forcing), or None.
        on_pass: called with ``"prefill"`` / ``"decode"`` after every forward pass.

    Returns:
        ``(logits per pass: [B, V] float32 for the last position, generated tokens [B, steps], wall seconds per phase)``.
    """
    from megatron.core.inference.contexts import StaticInferenceContext

    B, P = prompts.shape
    ctx = StaticInferenceContext(B, P + steps + 1)
    out, tokens = [], []
    times = {"prefill": 0.0, "decode": 0.0}
    t0 = _barrier_time()
    logits = model(prompts, torch.arange(P).expand(B, P), attention_mask=mt.causal_mask(P), inference_context=ctx,
                   runtime_gather_output=True)
    times["prefill"] += _barrier_time() - t0
    if on_pass:
        on_pass("prefill")
    ctx.sequence_len_offset += P
    last = logits[:, -1].float()
    out.append(last)
    for t in range(steps):
        nxt = last.argmax(dim=-1) if forced is None else forced[:, t]
        tokens.append(nxt)
        t0 = _barrier_time()
        logits = model(nxt[:, None], torch.full((B, 1), P + t), attention_mask=None, inference_context=ctx,
                       runtime_gather_output=True)
        times["decode"] += _barrier_time() - t0
        if on_pass:
            on_pass("decode")
        ctx.sequence_len_offset += 1
        last = logits[:, -1].float()
        out.append(last)
    return out, torch.stack(tokens, dim=1) if tokens else prompts.new_zeros(B, 0), times


def make_plan(args: argparse.Namespace, model: Any, world: int, gpn: int, mt: Any, g: Any):
    """The placement plan (same on every rank): read, contiguous, or planned from a calibration pass."""
    from megatron_grace.plan.placement import PlacementPlan
    from megatron_grace.plan.planners import plan_placement
    from megatron_grace.statistics.expert_stats import ExpertStats

    if args.plan:
        return PlacementPlan.read(args.plan), "file"
    topo = _topology(world // gpn, gpn)
    E, L = args.experts, args.layers
    if args.planner == "vanilla":
        return PlacementPlan(topo, E, [[list(range(gi * E // world, (gi + 1) * E // world)) for gi in range(world)]] * L,
                             planner="vanilla"), "vanilla"
    rec = g.RoutingRecorder(model, active=False)
    gen = torch.Generator().manual_seed(args.seed * 7919 + 1000 + dist.get_rank())
    calib = torch.randint(0, args.vocab, (args.calibration_batch, args.prompt), generator=gen)
    with torch.no_grad(), rec.recording(phase="prefill"):
        model(calib, torch.arange(args.prompt).expand(calib.shape[0], -1), attention_mask=mt.causal_mask(args.prompt))
    trace = rec.gathered_trace(model_name="megatron-infer-calibration")
    rec.remove()
    holder: list[Any] = [None]
    if dist.get_rank() == 0:
        plan = plan_placement(ExpertStats.from_trace(trace), topo, args.planner)
        holder[0] = plan.to_dict()
    dist.broadcast_object_list(holder, src=0)
    return PlacementPlan.from_dict(holder[0]), f"{args.planner} from {trace.num_tokens} calibration tokens"


def megatron_rows_by_link(trace_ids: np.ndarray, rank: int, world: int, gpn: int, num_experts: int) -> dict[str, int]:
    """Rows Megatron's alltoall sends per link type: one per (token, expert) pair to the expert's contiguous owner."""
    from megatron_grace.layer.counters import LINK_TYPES, link_types

    ids = trace_ids[trace_ids >= 0]
    owner = ids // (num_experts // world)
    link = link_types(rank, world, gpn)[owner]
    return {name: int((link == i).sum()) for i, name in enumerate(LINK_TYPES)}


def init_torchrun(timeout_s: float) -> tuple[int, int]:
    """Join the torchrun job (NCCL on GPUs, gloo on CPU), inference mode; returns (rank, world).

    A collective that waits longer than ``timeout_s`` (a rank died or diverged) raises instead of hanging.
    """
    from datetime import timedelta

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    torch.set_grad_enabled(False)
    return dist.get_rank(), dist.get_world_size()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_grace.adapters.megatron import testing as mt

    missing = mt.quiet_megatron_warnings()
    rank, world = init_torchrun(args.timeout)
    if rank == 0 and missing:
        print(f"note: {' and '.join(missing)} not installed: Megatron uses its torch fallbacks (fine for this check)")

    import megatron_grace.adapters.megatron as g
    from megatron_grace.layer.counters import LINK_TYPES

    mt.init_megatron_parallel(world)
    if args.plan:  # the model takes the plan's shape unless given
        from megatron_grace.plan.placement import PlacementPlan

        given = PlacementPlan.read(args.plan)
        args.experts = args.experts or given.num_experts
        args.layers = args.layers or given.num_layers
    args.experts, args.layers = args.experts or 128, args.layers or 2
    if args.experts % world:
        raise GraceInputError(f"Megatron needs --experts ({args.experts}) divisible by the number of ranks ({world})")
    gpn = args.gpus_per_node or (2 if world % 4 == 0 else world)
    if world % gpn:
        raise GraceInputError(f"--gpus-per-node {gpn} does not divide the world size {world}")
    cfg = mt.small_moe_config(num_experts=args.experts, top_k=args.top_k, hidden_size=args.hidden, moe_ffn_hidden_size=args.moe_ffn,
                              num_layers=args.layers, num_attention_heads=args.heads, expert_parallel_size=world)
    model = mt.build_gpt(cfg, vocab_size=args.vocab, max_sequence_length=args.prompt + args.decode + 8,
                         grace={"plan": None, "policy": args.policy}, seed=args.seed)
    if torch.cuda.is_available():
        model = model.cuda()
    for layer in mt.moe_layers(model):
        mt.randomize_experts(layer, seed=args.seed)
    mt.sync_replicated_params(model)

    plan, plan_source = make_plan(args, model, world, gpn, mt, g)
    if args.save_plan and rank == 0:
        plan.save(args.save_plan)
    gpn = plan.topology.gpus_per_node

    gen = torch.Generator().manual_seed(args.seed * 7919 + rank)
    prompts = torch.randint(0, args.vocab, (args.batch, args.prompt), generator=gen)
    device = next(model.parameters()).device
    prompts = prompts.to(device)

    # 1. Megatron's own dispatcher (the model before set-up): reference tokens and logits, and its traffic
    rec = g.RoutingRecorder(model, active=False)
    with rec.recording():
        ref_logits, tokens, ref_times = generate(model, prompts, args.decode, None, mt)
    trace = rec.trace()
    rec.remove()
    results: dict[str, Any] = {"rank": rank, "megatron": {"wall_s": ref_times, "rows_sent_by_link": {}}}
    for phase_name, code in (("prefill", 0), ("decode", 1)):
        results["megatron"]["rows_sent_by_link"][phase_name] = megatron_rows_by_link(
            trace.expert_ids[trace.phase == code], rank, world, gpn, args.experts)

    # 2. GRACE, per dispatch mode, on the same token sequence
    modes = ["flat", "hierarchical"] if args.dispatch == "both" else [args.dispatch]
    for mode in modes:
        g.setup_grace(model, plan=plan, dispatch=mode, policy=args.policy, counters=True, timing=True)
        acc: dict[str, dict[str, Any]] = {}

        def on_pass(phase: str, acc: dict[str, dict[str, Any]] = acc) -> None:
            a = acc.setdefault(phase, {"passes": 0, "tokens": 0, "pairs": 0, "moe_time_s": 0.0,
                                       "rows_sent_by_link": dict.fromkeys(LINK_TYPES, 0),
                                       "bytes_sent_by_link": dict.fromkeys(LINK_TYPES, 0)})
            a["passes"] += 1
            for c in g.grace_counters(model).values():
                a["tokens"] += c.tokens
                a["pairs"] += c.pairs
                a["moe_time_s"] += c.times.get("total", 0.0)
                for name, v in c.rows_sent_by_link.items():
                    a["rows_sent_by_link"][name] += v
                for name, v in c.bytes_sent_by_link.items():
                    a["bytes_sent_by_link"][name] += v

        logits, _, times = generate(model, prompts, args.decode, tokens, mt, on_pass=on_pass)
        rel = [_rel(y, r) for y, r in zip(logits, ref_logits, strict=True)]
        same_argmax = [bool((y.argmax(-1) == r.argmax(-1)).all()) for y, r in zip(logits, ref_logits, strict=True)]
        results[mode] = {"max_rel_err_prefill": rel[0], "max_rel_err_decode": max(rel[1:], default=0.0),
                         "max_abs_err": max(float((y - r).abs().max()) for y, r in zip(logits, ref_logits, strict=True)),
                         "greedy_tokens_agree": all(same_argmax), "wall_s": times, "traffic": acc,
                         "slots": int(g.grace_layers(model)[0].grace_setup_info["slots"])}

    everything: list[Any] = [None] * world
    dist.all_gather_object(everything, results)
    ok = all(r[m]["max_rel_err_prefill"] < args.tolerance and r[m]["max_rel_err_decode"] < args.tolerance
             for r in everything for m in modes)
    if rank == 0:
        report(args, plan, plan_source, everything, modes, world, gpn)
        print(f"\nagreement: {'OK' if ok else 'FAILED'} (tolerance {args.tolerance:g})")
        if args.json:
            from megatron_grace._files import save_json_atomic

            save_json_atomic(args.json, {"args": vars(args), "plan_source": plan_source, "ranks": everything, "ok": ok})
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


def report(args: argparse.Namespace, plan: Any, plan_source: str, ranks: list[dict], modes: list[str], world: int, gpn: int) -> None:
    """Print the per-rank agreement, traffic and time tables."""
    slots = [len(x) for x in plan.gpu_experts[0]]
    print(f"model: {args.layers} MoE layers, {args.experts} experts, top-{args.top_k}, hidden {args.hidden}, expert FFN "
          f"{args.moe_ffn}; {world} ranks = {world // gpn} node(s) x {gpn}; batch {args.batch} x prompt {args.prompt} + "
          f"{args.decode} decode steps per rank")
    print(f"plan: {plan_source}; layer 0 experts per GPU {slots} (copies: {sum(slots) - args.experts})")
    for mode in modes:
        print(f"\n== GRACE {mode} vs Megatron alltoall (float32 logits, relative Frobenius error per step)")
        print(f"{'rank':>4} {'prefill rel':>12} {'decode rel':>12} {'max abs':>10} {'greedy':>7}")
        for r in ranks:
            m = r[mode]
            print(f"{r['rank']:>4} {m['max_rel_err_prefill']:>12.2e} {m['max_rel_err_decode']:>12.2e} {m['max_abs_err']:>10.2e} "
                  f"{'same' if m['greedy_tokens_agree'] else 'DIFF':>7}")
        print("   per link (same GPU / same node / other node), all MoE layers: hidden rows sent towards experts by GRACE and\n"
              "   by Megatron's alltoall, KB GRACE sent (rows + results + metadata); GRACE MoE-layer time; model wall time")
        print(f"{'rank':>4} {'phase':>8} {'GRACE rows':>22} {'Megatron rows':>22} {'GRACE KB sent':>22} {'MoE s':>7} "
              f"{'GRACE s':>8} {'Megatron s':>10}")
        for r in ranks:
            for phase in ("prefill", "decode"):
                t = r[mode]["traffic"].get(phase)
                if t is None:
                    continue
                gr = "/".join(str(t["rows_sent_by_link"][k]) for k in LINK)
                mr = "/".join(str(r["megatron"]["rows_sent_by_link"][phase][k]) for k in LINK)
                kb = "/".join(f"{t['bytes_sent_by_link'][k] / 1024:.0f}" for k in LINK)
                print(f"{r['rank']:>4} {phase:>8} {gr:>22} {mr:>22} {kb:>22} {t['moe_time_s']:>7.3f} "
                      f"{r[mode]['wall_s'][phase]:>8.3f} {r['megatron']['wall_s'][phase]:>10.3f}")


LINK = ("same_gpu", "intra_node", "inter_node")

if __name__ == "__main__":
    try:
        sys.exit(main())
    except GraceInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
