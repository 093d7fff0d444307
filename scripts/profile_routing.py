#!/usr/bin/env python
"""Record a RoutingTrace from a running Megatron-Core GPT-MoE (the profiling step before planning).

Run with torchrun (CPU/gloo here; NCCL when CUDA is available)::

    torchrun --nproc-per-node 4 scripts/profile_routing.py --out trace.npz
    torchrun --nproc-per-node 4 scripts/profile_routing.py --out trace.npz --stats stats.npz --plan-out plan.json

Builds the same small GPT-MoE as ``scripts/megatron_infer.py`` (Qwen3-30B-A3B's 128 experts and
top-8, random weights), attaches a :class:`~megatron_grace.adapters.megatron.RoutingRecorder`
to its routers, runs a prefill and a greedy decode loop with a KV cache on every rank (each rank
its own prompts), gathers every rank's tokens and saves the trace on rank 0 (``.npz``, see
:class:`~megatron_grace.trace.RoutingTrace`; prefill and decode tokens are marked, request ids
are distinct across ranks). ``--stats`` also writes the ExpertStats, ``--plan-out`` a placement
plan for the same number of ranks made from them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from megatron_grace.errors import GraceInputError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="trace file to write (.npz)")
    p.add_argument("--stats", help="also write the ExpertStats (.npz)")
    p.add_argument("--plan-out", help="also write a placement plan for this number of ranks (JSON)")
    p.add_argument("--planner", default="grace", choices=["vanilla", "eplb", "affinity", "grace"])
    p.add_argument("--gpus-per-node", type=int, default=None, help="plan topology (default: 2 when the world size is a "
                   "multiple of 4, else one node)")
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--moe-ffn", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--batch", type=int, default=8, help="prompts per rank")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--decode", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-name", default="megatron-gpt-moe-small")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_infer import _topology, generate, init_torchrun

    rank, world = init_torchrun()

    import megatron_grace.adapters.megatron as g
    from megatron_grace.adapters.megatron import testing as mt

    mt.init_megatron_parallel(world)
    if args.experts % world:
        raise GraceInputError(f"Megatron needs --experts ({args.experts}) divisible by the number of ranks ({world})")
    cfg = mt.small_moe_config(num_experts=args.experts, top_k=args.top_k, hidden_size=args.hidden, moe_ffn_hidden_size=args.moe_ffn,
                              num_layers=args.layers, num_attention_heads=args.heads, expert_parallel_size=world)
    model = mt.build_gpt(cfg, vocab_size=args.vocab, max_sequence_length=args.prompt + args.decode + 8, seed=args.seed)
    if torch.cuda.is_available():
        model = model.cuda()
    for layer in mt.moe_layers(model):
        mt.randomize_experts(layer, seed=args.seed)
    mt.sync_replicated_params(model)

    gen = torch.Generator().manual_seed(args.seed * 7919 + rank)
    prompts = torch.randint(0, args.vocab, (args.batch, args.prompt), generator=gen).to(next(model.parameters()).device)
    rec = g.RoutingRecorder(model, active=False)
    with rec.recording():  # phase per pass: prefill when s > 1, else decode
        generate(model, prompts, args.decode, None, mt)
    trace = rec.gathered_trace(model_name=args.model_name)
    rec.remove()
    if rank == 0:
        trace.save(args.out)
        n_pre = int((trace.phase == 0).sum())
        print(f"saved {trace!r} to {args.out}: {n_pre} prefill + {trace.num_tokens - n_pre} decode tokens from {world} ranks, "
              f"{len(set(trace.request_ids.tolist()))} requests")
        if args.stats or args.plan_out:
            from megatron_grace.plan.planners import plan_placement
            from megatron_grace.statistics.expert_stats import ExpertStats

            stats = ExpertStats.from_trace(trace)
            if args.stats:
                stats.save(args.stats)
                print(f"saved {stats!r} to {args.stats}")
            if args.plan_out:
                gpn = args.gpus_per_node or (2 if world % 4 == 0 else world)
                plan = plan_placement(stats, _topology(world // gpn, gpn), args.planner)
                plan.save(args.plan_out)
                print(f"saved a {args.planner} plan for {world // gpn} x {gpn} GPUs to {args.plan_out}: experts per GPU "
                      f"{[len(x) for x in plan.gpu_experts[0]]} (layer 0)")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except GraceInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
