#!/usr/bin/env python
"""A DeepSpeed-MoE inference job: DeepSpeed's own MoE, then the same model converted to GRACE.

Run under DeepSpeed's launcher (CPU/gloo here; NCCL where CUDA is available)::

    DS_ACCELERATOR=cpu deepspeed --num_gpus 4 scripts/deepspeed_infer.py                   # plan made from a calibration pass
    DS_ACCELERATOR=cpu deepspeed --num_gpus 4 scripts/deepspeed_infer.py --plan plan.json  # a given plan (ep_size GPUs)

The model: a projection and ``--layers`` residual blocks, each a real ``deepspeed.moe.layer.MoE``
(``--experts`` experts, ``ep_size`` = the world size unless ``--ep-size``, top-``--top-k``
``TopKGate`` without token dropping, gelu or SwiGLU experts, every expert with its own random
weights), its expert-parallel groups created by ``MoE.set_deepspeed_parallelism``. Each rank
runs ``--steps`` batches of ``--tokens`` tokens:

1. DeepSpeed's own ``MOELayer`` (gate, capacity-padded all-to-all, experts): reference outputs;
   every MoE layer's input, output and torch RNG state are kept, and its traffic (rows of the
   padded ``[E, capacity, h]`` buffer sent to each rank, and the token rows among them);
2. GRACE (``megatron_grace.adapters.deepspeed.setup_grace``, each ``--dispatch`` mode):

   - per layer: each converted MoE runs on DeepSpeed's input of that layer from the same RNG
     state (top-2 samples its second expert); its output is compared with DeepSpeed's (relative
     Frobenius error, the worst layer and batch). This is the agreement verdict, and the core
     counters of these passes give the rows GRACE sent per link (the same routes as DeepSpeed's);
   - end to end: the whole model on the same batches. Two float32 implementations sum in
     different orders (~1e-7), and over many layers such differences can flip a near-tied top-k
     choice, after which the outputs legitimately diverge; the end-to-end error is printed, not judged.

Without ``--plan`` the plan is made by the project's planner (``--planner``) from the routing of a
calibration pass on DeepSpeed's path, for ``--topology NxG`` (N x G = ep_size GPUs; ``--links``)
with ``--extra-slots`` spare slots per GPU. With ``--plan``, ``--experts`` and ``--layers`` default to
the plan's. Exit code 0 when every mode agrees within ``--tolerance``, 1 when not, 2 on bad input.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_grace.errors import GraceInputError  # noqa: E402

LINKS = ("same_gpu", "intra_node", "inter_node")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--plan", help="placement plan JSON for ep_size GPUs; default: make one from a calibration pass")
    p.add_argument("--planner", default="grace", choices=["vanilla", "eplb", "affinity", "grace"], help="planner without --plan")
    p.add_argument("--topology", default=None, metavar="NxG", help="cluster to plan for without --plan, N x G = ep_size GPUs "
                   "(default: 2 x ep_size/2 when ep_size is a multiple of 4, else 1 x ep_size)")
    p.add_argument("--links", default=None, help="link profile of --topology (grace plan --help lists them)")
    p.add_argument("--extra-slots", type=int, default=1, help="spare expert slots per GPU for copies, without --plan")
    p.add_argument("--save-plan", help="write the plan used to this path (rank 0)")
    p.add_argument("--dispatch", default="both", choices=["flat", "hierarchical", "both"])
    p.add_argument("--policy", default="grace", help="GRACE replica-choice policy")
    p.add_argument("--ep-size", type=int, default=None, help="DeepSpeed expert-parallel size (default: the world size)")
    p.add_argument("--experts", type=int, default=None, help="experts per MoE layer (default: the plan's, else 16)")
    p.add_argument("--layers", type=int, default=None, help="MoE layers (default: the plan's, else 2)")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--activation", default="gelu", choices=["gelu", "swiglu"], help="expert MLP")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--ffn", type=int, default=64, help="expert FFN width")
    p.add_argument("--expert-bias", action="store_true", help="the experts' Linear layers have biases (nn.Linear's default)")
    p.add_argument("--tokens", type=int, default=64, help="tokens per rank per batch")
    p.add_argument("--steps", type=int, default=3, help="batches")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=1e-5, help="max relative error accepted (exit code 1 above)")
    p.add_argument("--json", help="write every rank's results to this file (rank 0)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds a collective may wait (a dead rank fails the job)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    return p.parse_args(argv)


def init(timeout_s: float) -> tuple[int, int]:
    """Join the launcher's job through DeepSpeed's communication layer; returns (rank, world)."""
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed(dist_backend=None if torch.cuda.is_available() else "gloo", timeout=timedelta(seconds=timeout_s))
    torch.set_grad_enabled(False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def build(args: argparse.Namespace, ep_size: int):
    from megatron_grace.adapters.deepspeed.testing import SwiGLUExpert, build_model, gelu_expert

    bias = args.expert_bias
    expert = gelu_expert(args.hidden, args.ffn, bias) if args.activation == "gelu" else SwiGLUExpert(args.hidden, args.ffn, bias)
    spec = dict(expert=expert, num_experts=args.experts, ep_size=ep_size, k=args.top_k, drop_tokens=False)
    model = build_model(args.hidden, [spec] * args.layers, seed=args.seed)
    return model.cuda() if torch.cuda.is_available() else model


class GateRecorder:
    """Forward hooks on DeepSpeed's gates: each pass's routes ``[T, k]`` and capacity, per MoE layer."""

    def __init__(self, model: Any) -> None:
        from megatron_grace.adapters.deepspeed import moe_modules

        self.moes = [m for _, m in moe_modules(model)]
        self.ids: list[list[np.ndarray]] = [[] for _ in self.moes]
        self.capacity: list[list[int]] = [[] for _ in self.moes]
        self.handles = [m.deepspeed_moe.gate.register_forward_hook(self._hook(i)) for i, m in enumerate(self.moes)]

    def _hook(self, layer: int):
        def hook(_module, _inputs, out):  # sparse routes: (l_aux, capacity, E, indices [k, T], locations, gates, counts)
            self.capacity[layer].append(int(out[1]))
            self.ids[layer].append(out[3].t().cpu().numpy().astype(np.int32))
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class LayerTaps:
    """Forward hooks on the MoE modules: every call's ``(layer, input, RNG states, output)`` (DeepSpeed's reference)."""

    def __init__(self, moes: list[Any]) -> None:
        self.calls: list[list[Any]] = []
        self.handles = [h for i, m in enumerate(moes) for h in (m.register_forward_pre_hook(self._pre(i)),
                                                                 m.register_forward_hook(self._post))]

    def _pre(self, layer: int):
        def hook(_module, inputs):
            cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
            self.calls.append([layer, inputs[0].detach().clone(), torch.get_rng_state(), cuda, None])
        return hook

    def _post(self, _module, _inputs, out) -> None:
        self.calls[-1][4] = out[0].detach().clone()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    den = float(ref.double().norm())
    return float((y.double() - ref.double()).norm()) / (den if den > 0 else 1.0)


def replay(moes: list[Any], taps: LayerTaps, on_layer=None) -> float:
    """Run each MoE on DeepSpeed's recorded input from the recorded RNG state; worst relative error to DeepSpeed's output."""
    worst = 0.0
    for layer, x, cpu_state, cuda_state, want in taps.calls:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state)
        worst = max(worst, _rel(moes[layer](x)[0], want))
        if on_layer is not None:
            on_layer(layer)
    return worst


def run(model: Any, batches: list[torch.Tensor], seed: int, on_pass=None) -> list[torch.Tensor]:
    """Model outputs ``[T, h]`` per batch; the torch RNG is reseeded per batch (top-2 samples its second expert)."""
    outs = []
    for step, x in enumerate(batches):
        torch.manual_seed(seed * 7919 + step)
        outs.append(model(x)[0].float())
        if on_pass is not None:
            on_pass()
    return outs


def make_plan(args: argparse.Namespace, model: Any, ep_group: Any, ep_size: int) -> tuple[Any, str]:
    """The plan (same on every rank): read, contiguous (``vanilla``), or planned from a calibration pass."""
    import torch.distributed as dist

    from megatron_grace.adapters.deepspeed import RoutingRecorder
    from megatron_grace.plan.placement import PlacementPlan
    from megatron_grace.plan.planners import plan_placement
    from megatron_grace.plan.topology import Topology
    from megatron_grace.statistics.expert_stats import ExpertStats

    if args.plan:
        return PlacementPlan.read(args.plan), f"file {args.plan}"
    topo = Topology.parse(args.topology or (f"2x{ep_size // 2}" if ep_size % 4 == 0 else f"1x{ep_size}"), args.links)
    if topo.num_gpus != ep_size:
        raise GraceInputError(f"--topology {topo.num_nodes}x{topo.gpus_per_node} has {topo.num_gpus} GPUs, ep_size is {ep_size}")
    topo = topo.with_extra_slots(args.experts, args.extra_slots)
    rec = RoutingRecorder(model, active=False)
    gen = torch.Generator().manual_seed(args.seed * 7919 + 1000 + dist.get_rank())
    with rec.recording(phase="prefill"):
        run(model, [torch.randn(args.tokens, args.hidden, generator=gen).to(_device()) for _ in range(2)], args.seed + 1)
    rec.remove()
    trace = rec.gathered_trace(group=ep_group, model_name="deepspeed-infer-calibration")  # the whole EP group's routing
    holder: list[Any] = [None]
    if dist.get_rank(ep_group) == 0:  # planned once per EP group, then broadcast: every rank holds the same plan
        holder[0] = plan_placement(ExpertStats.from_trace(trace), topo, args.planner).to_dict()
    dist.broadcast_object_list(holder, src=dist.get_global_rank(ep_group, 0), group=ep_group)
    return PlacementPlan.from_dict(holder[0]), f"{args.planner} from {trace.num_tokens} calibration tokens"


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def deepspeed_rows(rec: GateRecorder, ep_rank: int, ep_size: int, gpus_per_node: int, num_experts: int) -> dict[str, dict[str, int]]:
    """Rows DeepSpeed's dispatch all-to-all sent per link type: the padded ``[E, capacity, h]`` buffer
    (``E / ep`` experts x capacity rows to every rank) and the token rows among them."""
    from megatron_grace.layer.counters import link_types

    link = link_types(ep_rank, ep_size, gpus_per_node)
    local = num_experts // ep_size
    padded = dict.fromkeys(LINKS, 0)
    tokens = dict.fromkeys(LINKS, 0)
    for caps, ids_list in zip(rec.capacity, rec.ids):
        for cap, ids in zip(caps, ids_list):
            for g in range(ep_size):
                padded[LINKS[link[g]]] += local * cap
            owner = ids[ids >= 0] // local
            for i, name in enumerate(LINKS):
                tokens[name] += int((link[owner] == i).sum())
    return {"padded": padded, "tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank, world = init(args.timeout)
    import torch.distributed as dist

    try:
        return _job(args, rank, world)
    finally:
        from megatron_grace.adapters.deepspeed.testing import release_cpu_allreduce_buffer

        release_cpu_allreduce_buffer()  # DeepSpeed's CPU accelerator never unlinks its 69 MB /dev/shm segment per rank
        # Tear the groups down while the interpreter is whole: gloo groups (the world, DeepSpeed's expert
        # groups, GRACE's hierarchical ones) left to interpreter shutdown can abort the rank with
        # "terminate called without an active exception" after the job itself succeeded.
        dist.destroy_process_group()


def _job(args: argparse.Namespace, rank: int, world: int) -> int:
    """The job proper: build, plan, compare GRACE with DeepSpeed, report. Returns the exit status."""
    import torch.distributed as dist

    from megatron_grace.adapters.deepspeed import expert_parallel_group, moe_modules, setup_grace
    from megatron_grace.plan.placement import PlacementPlan

    ep_size = args.ep_size or world
    if args.plan:
        plan = PlacementPlan.read(args.plan)
        args.experts = args.experts or plan.num_experts
        args.layers = args.layers or plan.num_layers
    args.experts, args.layers = args.experts or 16, args.layers or 2
    if world % ep_size or args.experts % ep_size:
        raise GraceInputError(f"DeepSpeed needs the world size ({world}) and --experts ({args.experts}) divisible by ep_size ({ep_size})")
    model = build(args, ep_size)
    ep_group = expert_parallel_group(moe_modules(model)[0][1])
    ep_rank = dist.get_rank(ep_group)
    plan, plan_source = make_plan(args, model, ep_group, ep_size)
    if args.save_plan and rank == 0:
        plan.save(args.save_plan)
    gpn = plan.topology.gpus_per_node

    gen = torch.Generator().manual_seed(args.seed * 7919 + rank)
    batches = [torch.randn(args.tokens, args.hidden, generator=gen).to(_device()) for _ in range(args.steps)]
    moes = [m for _, m in moe_modules(model)]
    rec, taps = GateRecorder(model), LayerTaps(moes)
    ref = run(model, batches, args.seed)
    rec.remove()
    taps.remove()
    results: dict[str, Any] = {"rank": rank, "ep_rank": ep_rank,
                               "deepspeed": {"rows_sent_by_link": deepspeed_rows(rec, ep_rank, ep_size, gpn, args.experts)}}

    modes = ["flat", "hierarchical"] if args.dispatch == "both" else [args.dispatch]
    for mode in modes:
        layers = setup_grace(model, plan, dispatch=mode, policy=args.policy, counters=True)
        traffic = {"rows": dict.fromkeys(LINKS, 0), "bytes": dict.fromkeys(LINKS, 0), "pairs": 0}

        def on_layer(layer: int, traffic: dict[str, Any] = traffic) -> None:
            c = layers[layer].last_counters
            traffic["pairs"] += c.pairs
            for name in LINKS:
                traffic["rows"][name] += c.rows_sent_by_link[name]
                traffic["bytes"][name] += c.bytes_sent_by_link[name]

        per_layer = replay(moes, taps, on_layer)
        outs = run(model, batches, args.seed)
        results[mode] = {"max_rel_err": per_layer, "end_to_end_rel_err": max(_rel(y, r) for y, r in zip(outs, ref, strict=True)),
                         "traffic": traffic}

    everything: list[Any] = [None] * world
    dist.all_gather_object(everything, results)
    ok = all(r[m]["max_rel_err"] <= args.tolerance for r in everything for m in modes)
    if rank == 0:
        report(args, plan, plan_source, everything, modes, world, ep_size, ok)
        if args.json:
            from megatron_grace._files import save_json_atomic

            save_json_atomic(args.json, {"args": vars(args), "plan_source": plan_source, "ranks": everything, "ok": ok})
    dist.barrier()
    return 0 if ok else 1


def report(args: argparse.Namespace, plan: Any, plan_source: str, ranks: list[dict], modes: list[str], world: int, ep_size: int,
           ok: bool) -> None:
    """Print the agreement and the per-rank traffic."""
    slots = [len(x) for x in plan.gpu_experts[0]]
    topo = plan.topology
    print(f"model: {args.layers} DeepSpeed MoE layers, {args.experts} experts, top-{args.top_k} TopKGate (no token dropping), "
          f"{args.activation} experts{' with biases' if args.expert_bias else ''}, hidden {args.hidden}, FFN {args.ffn}; "
          f"{world} ranks, ep_size {ep_size}; "
          f"{args.steps} batches x {args.tokens} tokens per rank")
    print(f"plan: {plan_source}; {topo.num_nodes} node(s) x {topo.gpus_per_node} GPUs; layer 0 experts per GPU {slots} "
          f"(copies: {sum(slots) - args.experts})")
    print("\nper MoE layer, on DeepSpeed's input of that layer (worst layer, batch and rank; relative Frobenius error):")
    for mode in modes:
        worst = max(r[mode]["max_rel_err"] for r in ranks)
        e2e = max(r[mode]["end_to_end_rel_err"] for r in ranks)
        verdict = "agree" if worst <= args.tolerance else "DISAGREE"
        print(f"GRACE {mode} vs DeepSpeed MoE: {verdict} (max error {worst:.2e}, tolerance {args.tolerance:g}; whole model end "
              f"to end: {e2e:.2e})")
    print("\nhidden rows sent towards experts per rank, all layers and batches, per link (same GPU / same node / other node):")
    print("DeepSpeed sends its capacity-padded [E, capacity, h] buffer (token rows in brackets); GRACE sends one row per")
    print("(token, expert copy) it routes off the GPU (hierarchical: once per remote node, then inside the node)")
    head = f"{'rank':>4} {'DeepSpeed padded [tokens]':>34}" + "".join(f" {('GRACE ' + m):>22}" for m in modes)
    print(head)
    for r in ranks:
        ds = r["deepspeed"]["rows_sent_by_link"]
        cell = "/".join(str(ds["padded"][k]) for k in LINKS) + " [" + "/".join(str(ds["tokens"][k]) for k in LINKS) + "]"
        grace = "".join(f" {'/'.join(str(r[m]['traffic']['rows'][k]) for k in LINKS):>22}" for m in modes)
        print(f"{r['rank']:>4} {cell:>34}{grace}")
    print(f"\nagreement: {'OK' if ok else 'FAILED'}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except GraceInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
