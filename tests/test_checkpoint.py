"""``grace checkpoint`` on checkpoints the real frameworks write in the test (gloo, CPU).

One 2-rank Megatron-Core spawn (expert-parallel size 2) writes a small GPT-MoE as a
``torch_dist`` checkpoint (``dist_checkpointing.save``) and as Megatron legacy per-rank ``torch``
files (``iter_XXXXXXX/mp_rank_00_EEE/model_optim_rng.pt``, the state Megatron-LM saves: model,
args, RNG state), a gelu model as ``torch_dist``, and a larger model for the kill test; one
2-rank DeepSpeed spawn writes a MoE model with ``engine.save_checkpoint``. Each spawn also
records every expert's output on fixed tokens through the framework's own expert module.

Checked: patch with a 4-GPU plan that has replicas and unequal slot counts (and an 8-GPU one:
source EP 2 differs from both), ``verify --against``, ``unpatch`` to EP 1, 2 and 4 equal to the
source bit for bit, the source unchanged; then 4 gloo ranks each load only their slots
(:func:`load_rank_slots`) into ``GraceMoELayer.from_full_weights`` and match the framework's
experts to 1e-6 (float32). Reliability: one-line errors with exit code 2 and nothing written,
a flipped byte in any output file, ``kill -9`` at random points of a patch.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("deepspeed") is None:
    pytest.skip("megatron-core and deepspeed are needed for the checkpoint tests", allow_module_level=True)

from megatron_grace.checkpoint import load_rank_slots, open_source, patch_checkpoint, unpatch_checkpoint, verify_checkpoint  # noqa: E402
from megatron_grace.checkpoint import manifest as mf  # noqa: E402
from megatron_grace.checkpoint.safe_load import load_torch_file  # noqa: E402
from megatron_grace.cli.main import main as grace_main  # noqa: E402
from megatron_grace.layer.launch import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
E, K, H, F, T = 8, 2, 16, 8, 12  # experts, top-k, hidden, expert FFN, tokens
PLAN4 = [[[0, 1, 2, 5], [3, 4], [5, 6, 0], [7, 1]], [[7], [0, 1, 2, 3], [4, 5, 6, 2], [7, 6]]]  # replicas, unequal counts
PLAN8 = [[[e, (e + 3) % E] for e in range(E)], [[e] if e % 2 else [e, (e + 1) % E, (e + 5) % E] for e in range(E)]]


# ---------------------------------------------------------------------------------------------- spawning
def _entry(rank: int, world: int, port: int, fn, args) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", LOCAL_RANK=str(rank), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_SIZE=str(world), DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        if "deepspeed" in sys.modules:  # its CPU accelerator leaves a 69 MB /dev/shm segment per rank
            from megatron_grace.adapters.deepspeed.testing import release_cpu_allreduce_buffer

            release_cpu_allreduce_buffer()
        dist.destroy_process_group()


def spawn(fn, world: int, *args) -> None:
    """Run ``fn(rank, world, *args)`` on gloo ranks in non-daemon processes (Megatron's checkpoint
    writer starts a multiprocessing manager, which daemon processes may not)."""
    import torch.multiprocessing as tmp

    tmp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)


def _tokens() -> torch.Tensor:
    return torch.randn(T, H, generator=torch.Generator().manual_seed(7))


def _topology(nodes: int, gpn: int):
    from megatron_grace.plan.topology import Topology

    base = Topology.preset("a100-2x4")
    return Topology(name=f"test-{nodes}x{gpn}", num_nodes=nodes, gpus_per_node=gpn, intra_node=base.intra_node,
                    inter_node=base.inter_node, gpu_flops=base.gpu_flops)


def _plan(gpu_experts, nodes: int, gpn: int, num_experts: int = E):
    from megatron_grace.plan.placement import PlacementPlan

    return PlacementPlan(_topology(nodes, gpn), num_experts, gpu_experts, planner="test")


# ---------------------------------------------------------------------------------------------- writers (real frameworks)
def _megatron_writer(rank: int, world: int, out: str) -> None:
    import random as pyrandom

    from megatron.core import dist_checkpointing

    from megatron_grace.adapters.megatron.testing import build_gpt, init_megatron_parallel, moe_layers, randomize_experts, small_moe_config

    init_megatron_parallel(world)
    torch.cuda.synchronize = lambda *a, **k: None  # dist_checkpointing's writer calls it; there is no CUDA here
    x = _tokens()
    root = Path(out)
    models = (("swiglu", dict(hidden_size=H, moe_ffn_hidden_size=F, num_experts=E)),
              ("gelu", dict(hidden_size=H, moe_ffn_hidden_size=F, num_experts=E)),
              ("big", dict(hidden_size=128, moe_ffn_hidden_size=512, num_experts=16)))
    for tag, kw in models:
        act = "gelu" if tag == "gelu" else "swiglu"
        cfg = small_moe_config(top_k=K, num_layers=2, num_attention_heads=4, activation=act, expert_parallel_size=world, **kw)
        model = build_gpt(cfg, vocab_size=32, max_sequence_length=16)
        refs = {}
        with torch.no_grad():
            for li, layer in enumerate(moe_layers(model)):
                randomize_experts(layer, seed=3, moe_index=li)
                if tag != "big":
                    for e, mlp in zip(layer.local_expert_indices, layer.experts.local_experts, strict=True):
                        refs[f"{li}.{int(e)}"] = mlp(x)[0].detach().clone()
        if tag != "big":
            torch.save(refs, root / f"ref_megatron_{tag}_{rank}.pt")
            d = root / f"megatron_dist_{tag}"
            d.mkdir(exist_ok=True)
            torch.distributed.barrier()
            dist_checkpointing.save(model.sharded_state_dict(), str(d))
        if tag in ("swiglu", "big"):
            it = root / f"megatron_torch_{tag}" / "iter_0000003" / f"mp_rank_00_{rank:03d}"
            it.mkdir(parents=True, exist_ok=True)
            args = argparse.Namespace(num_layers=2, hidden_size=kw["hidden_size"], num_experts=kw["num_experts"],
                                      expert_model_parallel_size=world, params_dtype=torch.float32)
            rng = [{"random_rng_state": pyrandom.getstate(), "np_rng_state": np.random.get_state(),
                    "torch_rng_state": torch.get_rng_state()}]
            torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 3, "model": model.state_dict(), "rng_state": rng},
                       it / "model_optim_rng.pt")
            if rank == 0:
                (it.parent.parent / "latest_checkpointed_iteration.txt").write_text("3")


class SwiGLUExpert(torch.nn.Module):
    """A user expert module in Hugging Face naming (gate_proj, up_proj, down_proj)."""

    def __init__(self, h: int, f: int) -> None:
        super().__init__()
        self.gate_proj = torch.nn.Linear(h, f, bias=False)
        self.up_proj = torch.nn.Linear(h, f, bias=False)
        self.down_proj = torch.nn.Linear(f, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DSNet(torch.nn.Module):
    def __init__(self, ep: int) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE

        self.proj = torch.nn.Linear(H, H)
        self.moe = torch.nn.ModuleList([MoE(hidden_size=H, expert=SwiGLUExpert(H, F), num_experts=E, ep_size=ep, k=K) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        for m in self.moe:
            x = x + m(x)[0]
        return x


def _deepspeed_writer(rank: int, world: int, out: str) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    net = DSNet(world)
    with torch.no_grad():  # distinct weights per global expert
        for m in net.moe:
            for p in m.deepspeed_moe.experts.parameters():
                p.normal_(0.0, 0.3)
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(),
                                      config={"train_batch_size": world, "optimizer": {"type": "Adam", "params": {"torch_adam": True}}})
    x = _tokens()
    refs = {}
    with torch.no_grad():
        for li, m in enumerate(net.moe):
            local = m.deepspeed_moe.experts.deepspeed_experts
            for j, expert in enumerate(local):
                refs[f"{li}.{rank * len(local) + j}"] = expert(x).detach().clone()
    torch.save(refs, Path(out) / f"ref_deepspeed_{rank}.pt")
    engine.save_checkpoint(str(Path(out) / "deepspeed"), tag="global_step5")


def _refs(root: Path, name: str) -> dict[str, torch.Tensor]:
    out = {}
    for r in range(2):
        out.update(torch.load(root / f"ref_{name}_{r}.pt", weights_only=True))
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Real checkpoints (EP 2) and the framework's per-expert outputs on fixed tokens."""
    root = tmp_path_factory.mktemp("framework_ckpts")
    spawn(_megatron_writer, 2, str(root))
    spawn(_deepspeed_writer, 2, str(root))
    sources = {"megatron-dist": (root / "megatron_dist_swiglu", _refs(root, "megatron_swiglu"), "swiglu"),
               "megatron-dist-gelu": (root / "megatron_dist_gelu", _refs(root, "megatron_gelu"), "gelu"),
               "megatron-torch": (root / "megatron_torch_swiglu", _refs(root, "megatron_swiglu"), "swiglu"),
               "deepspeed": (root / "deepspeed", _refs(root, "deepspeed"), "swiglu")}
    return root, sources


def _tree_hashes(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _all_weights(src: Path, fmt: str) -> tuple[dict, dict]:
    reader = open_source(src, fmt)
    experts = {(li, e): {k: v.clone() for k, v in t.items()} for li, e, t in reader.iter_experts()}
    dense = {k: v.clone() for k, v in reader.iter_dense()}
    return experts, dense


# ---------------------------------------------------------------------------------------------- formats
SOURCE_FORMAT = {"megatron-dist": "megatron-dist", "megatron-dist-gelu": "megatron-dist", "megatron-torch": "megatron-torch",
                 "deepspeed": "deepspeed"}


@pytest.mark.parametrize("name", sorted(SOURCE_FORMAT))
def test_patch_verify_unpatch_roundtrip(ckpts, tmp_path, name):
    root, sources = ckpts
    src, _, act = sources[name]
    fmt = SOURCE_FORMAT[name]
    before = _tree_hashes(src)
    plan_file = tmp_path / "plan4.json"
    _plan(PLAN4, 2, 2).save(plan_file)
    assert grace_main(["checkpoint", "patch", str(src), str(tmp_path / "p4"), "--plan", str(plan_file), "--hash-source"]) == 0
    m = mf.read_manifest(tmp_path / "p4")
    assert m["source"]["format"] == fmt and m["source"]["ep_size"] == (1 if fmt == "megatron-dist" else 2)
    assert m["source"]["files"] and all(rec["sha256"] == before[rel] for rel, rec in m["source"]["files"].items())
    assert len(m["slots"]) == sum(len(g) for layer in PLAN4 for g in layer)
    row = next(r for r in m["slots"] if r["layer"] == 1 and r["rank"] == 2 and r["slot"] == 3)
    assert row["expert"] == 2 and all(d["dtype"] == "float32" for d in row["tensors"].values())
    assert grace_main(["checkpoint", "verify", str(tmp_path / "p4"), "--against", str(src)]) == 0
    # the buffer path (no kernel copy) writes the same bytes
    assert grace_main(["checkpoint", "patch", str(src), str(tmp_path / "p4b"), "--plan", str(plan_file), "--no-kernel-copy"]) == 0
    assert _tree_hashes(tmp_path / "p4b" / "experts") == _tree_hashes(tmp_path / "p4" / "experts")
    # an 8-GPU plan from the same EP-2 source, and back
    patch_checkpoint(src, tmp_path / "p8", _plan(PLAN8, 2, 4), show_progress=False)
    assert not verify_checkpoint(tmp_path / "p8", against=src, show_progress=False).problems
    experts, dense = _all_weights(src, fmt)
    assert len(experts) == 2 * E and dense
    for patched, ep in (("p4", 1), ("p4", 4), ("p8", 2)):
        out = tmp_path / f"un_{patched}_{ep}"
        assert grace_main(["checkpoint", "unpatch", str(tmp_path / patched), str(out), "--ep-size", str(ep)]) == 0
        reader = open_source(out, "auto")
        assert reader.info.format == fmt
        if fmt == "megatron-torch":
            assert reader.info.ep_size == ep and len(list((out / "iter_0000003").iterdir())) == ep
        got_e, got_d = _all_weights(out, fmt)
        assert set(got_e) == set(experts) and set(got_d) == set(dense)
        assert all(_same_bits(got_e[k][n], experts[k][n]) for k in experts for n in experts[k])
        assert all(_same_bits(got_d[k], dense[k]) for k in dense)
    # the patched slots hold the framework's own weights: rank 2's copy of expert 2 (layer 1) equals the source
    slots = load_rank_slots(tmp_path / "p4", 1, 2, plan=_plan(PLAN4, 2, 2), activation=act)
    assert slots.expert_ids == [4, 5, 6, 2]
    assert _tree_hashes(src) == before, "the source checkpoint changed"


def test_patch_parses_each_legacy_rank_file_once(ckpts, tmp_path, monkeypatch):
    """The reader keeps rank 0's split from describing the checkpoint for iter_experts and iter_dense."""
    from collections import Counter

    from megatron_grace.checkpoint import megatron_torch

    loads, splits = Counter(), Counter()
    load, split = megatron_torch.load_torch_file_located, megatron_torch._split

    def counted_load(path):
        loads[Path(path).parent.name] += 1
        return load(path)

    def counted_split(model, path):
        splits[Path(path).parent.name] += 1
        return split(model, path)

    monkeypatch.setattr(megatron_torch, "load_torch_file_located", counted_load)
    monkeypatch.setattr(megatron_torch, "_split", counted_split)
    patch_checkpoint(ckpts[1]["megatron-torch"][0], tmp_path / "p4", _plan(PLAN4, 2, 2), show_progress=False)
    assert loads == splits == Counter({"mp_rank_00_000": 1, "mp_rank_00_001": 1})


def _megatron_reload(rank: int, world: int, ckpt: str) -> dict[str, float]:
    """Load a torch_dist checkpoint with Megatron's own dist_checkpointing.load at EP = world; compare experts."""
    from megatron.core import dist_checkpointing

    from megatron_grace.adapters.megatron.testing import build_gpt, init_megatron_parallel, moe_layers, randomize_experts, small_moe_config

    init_megatron_parallel(world)
    torch.cuda.synchronize = lambda *a, **k: None
    cfg = small_moe_config(top_k=K, num_layers=2, num_attention_heads=4, activation="swiglu", expert_parallel_size=world,
                           hidden_size=H, moe_ffn_hidden_size=F, num_experts=E)
    model = build_gpt(cfg, vocab_size=32, max_sequence_length=16, seed=99)  # different init: the load must overwrite it
    state = dist_checkpointing.load(model.sharded_state_dict(), ckpt)
    model.load_state_dict(state)
    expected = build_gpt(cfg, vocab_size=32, max_sequence_length=16)
    for li, layer in enumerate(moe_layers(expected)):
        randomize_experts(layer, seed=3, moe_index=li)
    err, n = 0.0, 0
    for a, b in zip(moe_layers(model), moe_layers(expected), strict=True):
        for ma, mb in zip(a.experts.local_experts, b.experts.local_experts, strict=True):
            for pa, pb in zip(ma.parameters(), mb.parameters(), strict=True):
                err = max(err, float((pa - pb).abs().max()))
            n += 1
    return {"experts": n, "max_err": err}


# ---------------------------------------------------------------------------------------------- GRACE layer from patched slots
def _grace_forward(rank: int, world: int, jobs: list, out: str, unpatched_dist: str) -> None:
    from megatron_grace.layer.grace_moe import GraceMoELayer
    from megatron_grace.plan.placement import PlacementPlan

    x = _tokens()
    gen = torch.Generator().manual_seed(100 + rank)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])  # [T, K]
    w = torch.rand(T, K, generator=gen)
    result = {}
    for name, patched, refs_path, act in jobs:
        refs = torch.load(refs_path, weights_only=True)
        plan = PlacementPlan.read(Path(patched) / "plan.json")
        res = {"err": 0.0, "bytes": [], "rchar": []}
        for li in range(plan.num_layers):
            io0 = _rchar()
            slots = load_rank_slots(patched, li, rank, plan=plan, activation=act)
            res["rchar"].append(_rchar() - io0)
            res["bytes"].append([slots.bytes_read, slots.manifest_bytes])
            layer = GraceMoELayer.from_full_weights(plan, li, slots, hidden_size=slots.hidden_size, ffn_size=slots.ffn_size,
                                                    activation=act, dtype=torch.float32)
            y = layer(x, ids, w)
            ref = sum(w[:, k, None] * torch.stack([refs[f"{li}.{int(e)}"][t] for t, e in enumerate(ids[:, k])]) for k in range(K))
            res["err"] = max(res["err"], float((y - ref).abs().max() / ref.abs().max().clamp_min(1.0)))
        result[name] = res
    result["reload"] = _megatron_reload(rank, world, unpatched_dist)
    Path(out, f"grace_{rank}.json").write_text(json.dumps(result))


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return -1


def test_grace_layer_from_patched_checkpoint_matches_framework(ckpts, tmp_path):
    """Each format, patched for 4 GPUs (replicas, unequal counts), loaded by 4 gloo ranks from their own
    slots only: GraceMoELayer outputs equal the framework's experts (1e-6, float32). In the same
    spawn, Megatron's own dist_checkpointing.load reads the unpatched torch_dist checkpoint at EP 4
    (saved at EP 2) and gets the original expert weights exactly."""
    root, sources = ckpts
    plan = _plan(PLAN4, 2, 2)
    jobs = []
    for name, (src, refs, act) in sorted(sources.items()):
        patch_checkpoint(src, tmp_path / name, plan, show_progress=False)
        ref_file = tmp_path / f"refs_{name}.pt"
        torch.save(refs, ref_file)
        jobs.append((name, str(tmp_path / name), str(ref_file), act))
    unpatch_checkpoint(tmp_path / "megatron-dist", tmp_path / "unpatched", show_progress=False)
    spawn(_grace_forward, 4, jobs, str(tmp_path), str(tmp_path / "unpatched"))
    results = [json.loads((tmp_path / f"grace_{r}.json").read_text()) for r in range(4)]
    assert all(r["reload"] == {"experts": 2 * (E // 4), "max_err": 0.0} for r in results), [r["reload"] for r in results]
    for name, patched, _, _ in jobs:
        m = mf.read_manifest(Path(patched))
        layers = mf.manifest_layers(m)
        per_slot = [sum(s.nbytes for s in layer.tensors.values()) for layer in layers]
        for r, res in enumerate(results):
            assert res[name]["err"] <= 1e-6, (name, r, res[name]["err"])
            rank_size = (Path(patched) / mf.rank_file(r)).stat().st_size
            for li, (nbytes, _) in enumerate(res[name]["bytes"]):
                tensors = len(PLAN4[li][r]) * per_slot[li]
                assert tensors < nbytes < tensors + 4096, (name, r, li, nbytes)  # its slots + the header only
                assert nbytes < rank_size or len(PLAN4[1 - li][r]) == 0
                # the process read the manifest, plan and its slots, and no other rank's file
                assert res[name]["rchar"][li] < nbytes + 2 * (Path(patched) / mf.MANIFEST).stat().st_size + 65536


def _deepspeed_reload(rank: int, world: int, ckpt: str, out: str) -> None:
    """DeepSpeed's own engine.load_checkpoint of an unpatched checkpoint (module weights only: the
    optimizer state is not part of a patched checkpoint); every parameter is written out."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(1234)  # other initial weights: the load must overwrite them
    net = DSNet(world)
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(),
                                      config={"train_batch_size": world, "optimizer": {"type": "Adam", "params": {"torch_adam": True}}})
    path, _ = engine.load_checkpoint(ckpt, tag="global_step5", load_optimizer_states=False, load_lr_scheduler_states=False)
    assert path is not None, "DeepSpeed found no checkpoint to load"
    torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, Path(out) / f"ds_reload_{rank}.pt")


def test_unpatched_deepspeed_checkpoint_reloads_with_deepspeed(ckpts, tmp_path):
    """patch -> unpatch (EP 2) -> DeepSpeed's engine.load_checkpoint on 2 gloo ranks: every module
    and expert weight equals the source checkpoint's, bit for bit (the dropped optimizer state is
    listed in the manifest)."""
    _, sources = ckpts
    src = sources["deepspeed"][0]
    patch_checkpoint(src, tmp_path / "patched", _plan(PLAN4, 2, 2), show_progress=False)
    dropped = mf.read_manifest(tmp_path / "patched")["source"]["dropped"]
    assert "optimizer" in dropped and any(d.endswith("_optim_states.pt") for d in dropped)
    unpatch_checkpoint(tmp_path / "patched", tmp_path / "unpatched", 2, show_progress=False)
    spawn(_deepspeed_reload, 2, str(tmp_path / "unpatched"), str(tmp_path))
    experts, dense = _all_weights(src, "deepspeed")
    for r in range(2):
        got = torch.load(tmp_path / f"ds_reload_{r}.pt", weights_only=True)
        n_expert = 0
        for key, t in got.items():
            if "deepspeed_experts." in key:  # local expert j of rank r is global expert r * E/2 + j
                prefix, rest = key.split("deepspeed_experts.", 1)
                j, name = rest.split(".", 1)
                li = int(prefix.split("moe.", 1)[1].split(".", 1)[0])
                assert _same_bits(t, experts[(li, r * (E // 2) + int(j))][name]), key
                n_expert += 1
            else:
                assert _same_bits(t, dense[key]), key
        assert n_expert == 2 * (E // 2) * 3 and set(dense) <= set(got)


# ---------------------------------------------------------------------------------------------- reliability
@pytest.fixture
def ds_src(ckpts, tmp_path):
    """A private copy of the DeepSpeed checkpoint to damage."""
    _, sources = ckpts
    dst = tmp_path / "src"
    shutil.copytree(sources["deepspeed"][0], dst)
    return dst


def _check_refused(capsys, argv, needle, must_not_exist):
    code = grace_main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not Path(must_not_exist).exists()
    assert not [p for p in Path(must_not_exist).parent.iterdir() if p.name.startswith(f".{Path(must_not_exist).name}")]


def test_plan_mismatches_are_refused(ds_src, tmp_path, capsys):
    dst = tmp_path / "dst"
    cases = [(_plan([PLAN4[0]] * 3, 2, 2), [], "plan has 3 MoE layers, the deepspeed checkpoint has 2"),
             (_plan([[list(range(8)), list(range(8, 16))]] * 2, 1, 2, num_experts=16), [], "plan has 16 experts per layer"),
             (_plan(PLAN4, 2, 2), ["--hidden-size", "32"], "hidden size: the checkpoint's experts have h=16"),
             (_plan(PLAN4, 2, 2), ["--ffn-size", "4"], "ffn size: the checkpoint's experts have f=8"),
             (_plan(PLAN4, 2, 2), ["--dtype", "bfloat16"], "is float32, expected bfloat16")]
    for plan, extra, needle in cases:
        plan.save(tmp_path / "plan.json")
        _check_refused(capsys, ["checkpoint", "patch", str(ds_src), str(dst), "--plan", str(tmp_path / "plan.json"), *extra], needle, dst)


class _NotAllowlisted:
    """A class no library registers with torch.serialization.add_safe_globals (a weights_only load refuses it)."""


def test_missing_truncated_and_unsafe_sources_are_refused(ckpts, ds_src, tmp_path, capsys):
    root, sources = ckpts
    plan = tmp_path / "plan.json"
    _plan(PLAN4, 2, 2).save(plan)
    dst = tmp_path / "dst"
    tag = ds_src / "global_step5"
    (tag / "layer_1_expert_3_mp_rank_00_model_states.pt").unlink()
    _check_refused(capsys, ["checkpoint", "patch", str(ds_src), str(dst), "--plan", str(plan)], "expert file(s) [3] missing", dst)
    legacy = tmp_path / "legacy"
    shutil.copytree(sources["megatron-torch"][0], legacy)
    f = legacy / "iter_0000003" / "mp_rank_00_001" / "model_optim_rng.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _check_refused(capsys, ["checkpoint", "patch", str(legacy), str(dst), "--plan", str(plan)], "truncated or corrupt", dst)
    dist_copy = tmp_path / "dist"
    shutil.copytree(sources["megatron-dist"][0], dist_copy)
    chunk = max(dist_copy.glob("*.distcp"), key=lambda p: p.stat().st_size)
    chunk.write_bytes(chunk.read_bytes()[:100])
    _check_refused(capsys, ["checkpoint", "patch", str(dist_copy), str(dst), "--plan", str(plan)], "truncated", dst)
    # a file that needs arbitrary code to unpickle is refused, never loaded
    unsafe = tmp_path / "unsafe"
    shutil.copytree(sources["megatron-torch"][0], unsafe)
    f = unsafe / "iter_0000003" / "mp_rank_00_000" / "model_optim_rng.pt"
    state = load_torch_file(f)  # the project's safe loader (weights_only=True, Namespace and numpy allowed)
    state["args"].tokenizer_path = _NotAllowlisted()  # not Path: megatron.core allowlists it once imported
    torch.save(state, f.with_suffix(".new"))  # not onto f itself: the loaded tensors are memory-mapped from it
    os.replace(f.with_suffix(".new"), f)
    _check_refused(capsys, ["checkpoint", "patch", str(unsafe), str(dst), "--plan", str(plan)], "weights_only=True", dst)
    _check_refused(capsys, ["checkpoint", "patch", str(tmp_path / "nothing"), str(dst), "--plan", str(plan)], "not found", dst)


def test_existing_dst_and_disk_space(ds_src, tmp_path, capsys, monkeypatch):
    plan = tmp_path / "plan.json"
    _plan(PLAN4, 2, 2).save(plan)
    dst = tmp_path / "dst"
    assert grace_main(["checkpoint", "patch", str(ds_src), str(dst), "--plan", str(plan)]) == 0
    first = _tree_hashes(dst)
    assert grace_main(["checkpoint", "patch", str(ds_src), str(dst), "--plan", str(plan)]) == 2
    assert "already exists (pass --overwrite" in capsys.readouterr().err
    assert _tree_hashes(dst) == first
    _plan(PLAN8, 2, 4).save(plan)
    assert grace_main(["checkpoint", "patch", str(ds_src), str(dst), "--plan", str(plan), "--overwrite"]) == 0
    assert mf.read_manifest(dst)["plan"]["num_gpus"] == 8
    import megatron_grace._files as files

    real = shutil.disk_usage
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    _check_refused(capsys, ["checkpoint", "patch", str(ds_src), str(tmp_path / "dst2"), "--plan", str(plan)],
                   "not enough disk space: the patched checkpoint needs up to", tmp_path / "dst2")
    _check_refused(capsys, ["checkpoint", "unpatch", str(dst), str(tmp_path / "out")], f"1.0 kB are free in {tmp_path}", tmp_path / "out")


def test_verify_catches_one_flipped_byte_in_any_file(ds_src, tmp_path, capsys):
    dst = tmp_path / "dst"
    patch_checkpoint(ds_src, dst, _plan(PLAN4, 2, 2), show_progress=False)
    rng = random.Random(0)
    files = sorted(p for p in dst.rglob("*") if p.is_file())
    assert len(files) == 4 + 3  # 4 rank files, dense, plan, manifest
    for path in files:
        for where in ("header", "data"):
            raw = bytearray(path.read_bytes())
            if path.suffix == ".safetensors":
                head = 8 + int.from_bytes(raw[:8], "little")
                pos = rng.randrange(8, head) if where == "header" else rng.randrange(head, len(raw))
            else:
                pos = rng.randrange(len(raw))
            backup = bytes(raw)
            raw[pos] ^= 0xFF
            path.write_bytes(raw)
            assert grace_main(["checkpoint", "verify", str(dst)]) == 2, (path, pos)
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "error:" in err
            path.write_bytes(backup)
    assert grace_main(["checkpoint", "verify", str(dst)]) == 0
    # a slot whose bytes no longer match the manifest: unpatch and the loader refuse it too
    rank0 = dst / mf.rank_file(0)
    raw = bytearray(rank0.read_bytes())
    raw[-3] ^= 0x01
    rank0.write_bytes(raw)
    assert grace_main(["checkpoint", "unpatch", str(dst), str(tmp_path / "out")]) == 2
    assert "does not match the manifest" in capsys.readouterr().err and not (tmp_path / "out").exists()
    with pytest.raises(Exception, match="does not match the manifest"):
        load_rank_slots(dst, 1, 0)


def _temporaries(folder: Path, target: Path) -> list[Path]:
    """The temporary directories of runs writing ``target`` (``.NAME.grace{pid}h{host}.{random}.tmpdir``)."""
    return [p for p in folder.iterdir() if p.name.startswith(f".{target.name}.grace") and p.name.endswith(".tmpdir")]


def test_kill_9_leaves_no_half_written_checkpoint(ckpts, tmp_path):
    """SIGKILL ``grace checkpoint patch`` at random moments while it writes: DST is absent or complete
    (a previous complete copy survives an interrupted --overwrite), and the next run cleans up."""
    root, _ = ckpts
    src = root / "megatron_torch_big"  # 2 layers x 16 experts x 0.75 MiB
    plan = _plan([[list(range(0, 9)), list(range(7, 16))], [list(range(0, 16, 2)) + [1], list(range(1, 16, 2)) + [0]]], 1, 2,
                 num_experts=16)
    plan.save(tmp_path / "plan.json")
    t0 = time.monotonic()
    patch_checkpoint(src, tmp_path / "dst1", plan, show_progress=False)  # the complete copy odd runs must not lose
    full = time.monotonic() - t0
    rng = random.Random(1)
    mid_write = 0
    env = dict(os.environ, PYTHONPATH=str(REPO), GRACE_NO_PROGRESS="1")
    for i in range(4):
        target = tmp_path / f"dst{i % 2}"
        proc = subprocess.Popen([sys.executable, "-m", "megatron_grace", "checkpoint", "patch", str(src), str(target), "--plan",
                                 str(tmp_path / "plan.json"), "--overwrite"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:  # wait for the temporary directory
            if _temporaries(tmp_path, target):
                break
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, full))
        was_writing = bool(_temporaries(tmp_path, target))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        mid_write += was_writing and proc.returncode == -signal.SIGKILL
        if target.exists():
            assert not verify_checkpoint(target, show_progress=False).problems, f"run {i}: half-written {target}"
        assert i % 2 == 0 or target.exists(), "an interrupted --overwrite lost the previous complete copy"
    assert mid_write >= 2, "fewer than 2 kills landed while the checkpoint was being written"
    # the next run removes the temporaries the killed runs left and succeeds
    for name in ("dst0", "dst1"):
        patch_checkpoint(src, tmp_path / name, plan, overwrite=True, show_progress=False)
        assert not verify_checkpoint(tmp_path / name, show_progress=False).problems
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmpdir") or ".grace-old-" in p.name]
