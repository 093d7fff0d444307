"""``patch``: a framework checkpoint -> the GRACE layout of a placement plan.

Streams the source one expert at a time (one source file at most in memory, memory-mapped),
writing each expert's bytes into every slot the plan gives it (replicas included) and reading
each slot back at once to compare it byte for byte with the source tensor still in memory; then
hashes every output file once for the manifest (several files in parallel) and writes it; all of it in a temporary directory renamed onto ``DST`` only when complete
(:mod:`megatron_grace.checkpoint.atomic_dir`). The source is only ever opened for reading.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_grace._files import save_json_atomic
from megatron_grace._progress import progress
from megatron_grace.checkpoint import manifest as mf
from megatron_grace.checkpoint.atomic_dir import atomic_dir, check_space, check_target
from megatron_grace.checkpoint.convert import expert_geometry
from megatron_grace.checkpoint.detect import open_source
from megatron_grace.checkpoint.safetensors_io import SafetensorsLayout, tensor_bytes, write_tensor
from megatron_grace.checkpoint.scan import scan_many
from megatron_grace.checkpoint.source import SourceInfo, TensorSpec, dtype_name, sha256_file
from megatron_grace.errors import GraceInputError
from megatron_grace.plan.placement import PlacementPlan


@dataclass(frozen=True)
class PatchSummary:
    """What a patch wrote: bytes read from the source, bytes written, files, seconds."""

    format: str
    source_bytes: int
    written_bytes: int
    files: int
    slots: int
    seconds: float


def check_plan(info: SourceInfo, plan: PlacementPlan, hidden_size: int | None = None, ffn_size: int | None = None,
               dtype: str | None = None) -> None:
    """Raise GraceInputError naming the first mismatch between the plan (and expectations) and the checkpoint."""
    if plan.num_layers != len(info.layers):
        raise GraceInputError(f"plan has {plan.num_layers} MoE layers, the {info.format} checkpoint has {len(info.layers)}")
    for li, layer in enumerate(info.layers):
        if layer.num_experts != plan.num_experts:
            raise GraceInputError(f"plan has {plan.num_experts} experts per layer, the checkpoint's MoE layer {li} "
                                  f"({layer.source_layer}) has {layer.num_experts}")
        if hidden_size is not None or ffn_size is not None:
            _, h, f = expert_geometry({k: v.shape for k, v in layer.tensors.items()})
            if hidden_size is not None and h != hidden_size:
                raise GraceInputError(f"hidden size: the checkpoint's experts have h={h} (MoE layer {li}), expected {hidden_size}")
            if ffn_size is not None and f != ffn_size:
                raise GraceInputError(f"ffn size: the checkpoint's experts have f={f} (MoE layer {li}), expected {ffn_size}")
        if dtype is not None:
            for name, spec in layer.tensors.items():
                if dtype_name(spec.dtype) != dtype:
                    raise GraceInputError(f"dtype: {name} of MoE layer {li} is {dtype_name(spec.dtype)}, expected {dtype}")


def _rank_layouts(info: SourceInfo, plan: PlacementPlan) -> list[SafetensorsLayout]:
    layouts = []
    for g in range(plan.num_gpus):
        entries = []
        for li, layer in enumerate(info.layers):
            for s, _e in enumerate(plan.gpu_experts[li][g]):
                entries += [(mf.slot_key(li, s, name), spec) for name, spec in layer.tensors.items()]
        layouts.append(SafetensorsLayout(entries, {"format": mf.FORMAT, "rank": str(g)}))
    return layouts


def _file_record(path: Path, hashed: bool = True) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, **({"sha256": sha256_file(path)} if hashed else {})}


def patch_checkpoint(src: str | os.PathLike[str], dst: str | os.PathLike[str], plan: PlacementPlan | str | os.PathLike[str], *,
                     fmt: str = "auto", overwrite: bool = False, hidden_size: int | None = None, ffn_size: int | None = None,
                     dtype: str | None = None, hash_source: bool = False, show_progress: bool = True) -> PatchSummary:
    """Write ``dst``: the experts of checkpoint ``src`` placed as ``plan`` says (see the package docstring).

    The manifest records every source file's size, and its sha256 with ``hash_source`` (one more
    read of the source).

    Raises:
        GraceInputError: bad source, plan mismatch (layers, experts, hidden or ffn size, dtype),
            ``dst`` exists without ``overwrite``, not enough disk space; nothing is written then.
    """
    t0 = time.perf_counter()
    src, dst = Path(src).absolute(), Path(dst).absolute()
    if dst == src or src in dst.parents:
        raise GraceInputError("DST must not be SRC or inside it", dst)
    check_target(dst, overwrite)
    plan_obj = plan if isinstance(plan, PlacementPlan) else PlacementPlan.read(plan)
    reader = open_source(src, fmt)
    info = reader.info
    check_plan(info, plan_obj, hidden_size, ffn_size, dtype)
    layouts = _rank_layouts(info, plan_obj)
    dense_specs = [(k, TensorSpec.of(t)) for k, t in reader.iter_dense()]
    dense_layout = SafetensorsLayout(dense_specs, {"format": mf.FORMAT})
    blobs = list(reader.iter_blobs())
    extra_layout = SafetensorsLayout([(k, TensorSpec((len(b),), torch.uint8)) for k, b in blobs]) if blobs else None
    needed = sum(lay.size for lay in layouts) + dense_layout.size + (extra_layout.size if extra_layout else 0)
    needed += 200 * sum(len(r) for layer in plan_obj.gpu_experts for r in layer) + (1 << 20)  # manifest
    check_space(dst, needed)
    source_files = {rel: _file_record(src / rel, hash_source)
                    for rel in progress(info.files, "hashing source" if hash_source else "listing source", len(info.files), show_progress)}

    expert_sha: list[list[dict[str, str]]] = [[{} for _ in range(layer.num_experts)] for layer in info.layers]
    dense_sha: dict[str, str] = {}
    with atomic_dir(dst, overwrite) as tmp:
        (tmp / "experts").mkdir()
        fds = []
        try:
            for g, lay in enumerate(layouts):
                lay.create(tmp / mf.rank_file(g))
                fds.append(os.open(tmp / mf.rank_file(g), os.O_RDWR))
            total = sum(layer.num_experts for layer in info.layers)
            for li, e, tensors in progress(reader.iter_experts(), "patching experts", total, show_progress):
                hosts = plan_obj.expert_gpus[li, e]
                slots = plan_obj.expert_slots[li, e]
                for name, t in tensors.items():
                    data = tensor_bytes(t)
                    expert_sha[li][e][name] = hashlib.sha256(data).hexdigest()
                    for g, s in zip(hosts.tolist(), slots.tolist(), strict=True):
                        if g >= 0:
                            write_tensor(fds[g], layouts[g].entries[mf.slot_key(li, s, name)], data, read_back=True)
                tensors = t = data = None  # let the reader unmap a finished source file
        finally:
            for fd in fds:
                os.close(fd)
        missing = [(li, e) for li, layer in enumerate(expert_sha) for e, d in enumerate(layer) if not d]
        if missing:
            raise GraceInputError(f"the source never provided expert {missing[0][1]} of MoE layer {missing[0][0]}", src)
        _write_stream(tmp / mf.DENSE, dense_layout, reader.iter_dense(), dense_sha)
        blob_sha: dict[str, str] = {}
        if extra_layout is not None:
            _write_stream(tmp / mf.EXTRA, extra_layout, ((k, torch.frombuffer(bytearray(b), dtype=torch.uint8)) for k, b in blobs),
                          blob_sha)
        plan_obj.save(tmp / mf.PLAN)

        slots = []
        for g in range(plan_obj.num_gpus):
            for li, layer in enumerate(info.layers):
                for s, e in enumerate(plan_obj.gpu_experts[li][g]):
                    row = {"layer": li, "rank": g, "slot": s, "expert": e, "file": mf.rank_file(g), "tensors": {}}
                    for name, spec in layer.tensors.items():
                        row["tensors"][name] = {"key": mf.slot_key(li, s, name), **spec.to_dict()}
                    slots.append(row)
        written = [mf.rank_file(g) for g in range(plan_obj.num_gpus)] + [mf.DENSE] + ([mf.EXTRA] if extra_layout is not None else [])
        files: dict[str, Any] = {}
        scans = scan_many([(tmp / rel, None) for rel in written])  # each tensor was read back when written
        for rel, (sha, size, problems) in progress(zip(written, scans), "verifying output", len(written), show_progress):
            if problems:
                raise GraceInputError(f"written file failed its read-back check: {problems[0]}")
            files[rel] = {"bytes": size, "sha256": sha}
        files[mf.PLAN] = _file_record(tmp / mf.PLAN)
        manifest = {
            "format": mf.FORMAT,
            "source": {"path": str(src), "format": info.format, "ep_size": info.ep_size, "files": source_files,
                       "extra": info.extra, "dropped": info.dropped},
            "plan": {"file": mf.PLAN, "sha256": files[mf.PLAN]["sha256"], "num_gpus": plan_obj.num_gpus,
                     "num_layers": plan_obj.num_layers, "num_experts": plan_obj.num_experts},
            "layers": [layer.to_dict() for layer in info.layers],
            "expert_sha256": expert_sha,
            "dense_sha256": dense_sha,
            "blob_sha256": blob_sha,
            "slots": slots,
            "files": files,
        }
        manifest["manifest_sha256"] = mf.content_sha256(manifest)
        save_json_atomic(tmp / mf.MANIFEST, manifest)
    return PatchSummary(info.format, sum(r["bytes"] for r in source_files.values()), sum(r["bytes"] for r in files.values()),
                        len(files) + 1, len(slots), time.perf_counter() - t0)


def _write_stream(path: Path, layout: SafetensorsLayout, items: Any, hashes: dict[str, str]) -> None:
    layout.create(path)
    fd = os.open(path, os.O_RDWR)
    try:
        seen = set()
        for key, t in items:
            data = tensor_bytes(t)
            hashes[key] = hashlib.sha256(data).hexdigest()
            write_tensor(fd, layout.entries[key], data, read_back=True)
            seen.add(key)
        if seen != set(layout.entries):
            raise GraceInputError(f"{path.name}: the source changed while reading (tensor set differs)")
    finally:
        os.close(fd)
