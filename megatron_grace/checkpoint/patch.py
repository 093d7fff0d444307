"""``patch``: a framework checkpoint -> the GRACE layout of a placement plan.

Streams the source one expert at a time, in the order the reader yields them
(``info.expert_order``), through :class:`~megatron_grace.checkpoint.stream_copy.StreamWriter`:
each tensor's bytes are read once (``pread`` of its byte range in the source file where the
reader can locate it, else from the loaded tensor) into a fixed buffer, written into every slot
the plan gives the expert (replicas included) and hashed from that same buffer, for the tensor
and for each output file. Every rank file is laid out in that same expert order, so each output
file is written front to back and its sha256 is known when the last byte is written; nothing is
read back but the headers (the check before the rename is described in
:mod:`~megatron_grace.checkpoint.stream_copy`). The dense tensors are streamed once the same
way. All of it happens in a temporary directory that is fsynced and renamed onto ``DST`` only
when complete (:mod:`megatron_grace.checkpoint.atomic_dir`). The source is only ever opened for
reading.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_grace._files import check_disk_space, save_json_atomic
from megatron_grace._progress import progress
from megatron_grace.checkpoint import manifest as mf
from megatron_grace.checkpoint.atomic_dir import atomic_dir, check_target
from megatron_grace.checkpoint.convert import expert_geometry
from megatron_grace.checkpoint.detect import open_source
from megatron_grace.checkpoint.safetensors_io import SafetensorsLayout
from megatron_grace.checkpoint.source import SourceInfo, TensorSpec, dtype_name, sha256_file
from megatron_grace.checkpoint.stream_copy import StreamWriter, file_identity
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
    """One layout per GPU: its slots of every layer, ordered as the reader streams the experts
    (``info.expert_order``; replicas of one expert on one GPU by slot), so each file is written front to back."""
    rank = {le: i for i, le in enumerate(info.expert_order)}
    if len(rank) != sum(layer.num_experts for layer in info.layers):
        raise GraceInputError(f"the {info.format} reader lists {len(rank)} experts in its order, the layers have "
                              f"{sum(layer.num_experts for layer in info.layers)}", info.path)
    layouts = []
    for g in range(plan.num_gpus):
        slots = sorted(((rank[(li, e)], s, li) for li in range(len(info.layers)) for s, e in enumerate(plan.gpu_experts[li][g])))
        entries = [(mf.slot_key(li, s, name), spec) for _, s, li in slots for name, spec in info.layers[li].tensors.items()]
        layouts.append(SafetensorsLayout(entries, {"format": mf.FORMAT, "rank": str(g)}))
    return layouts


def _file_record(path: Path, hashed: bool = True) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, **({"sha256": sha256_file(path)} if hashed else {})}


def patch_checkpoint(src: str | os.PathLike[str], dst: str | os.PathLike[str], plan: PlacementPlan | str | os.PathLike[str], *,
                     fmt: str = "auto", overwrite: bool = False, hidden_size: int | None = None, ffn_size: int | None = None,
                     dtype: str | None = None, hash_source: bool = False, file_sha256: bool = False,
                     kernel_copy: bool = True, show_progress: bool = True) -> PatchSummary:
    """Write ``dst``: the experts of checkpoint ``src`` placed as ``plan`` says (see the package docstring).

    The manifest records every source file's size, and its sha256 with ``hash_source`` (one more
    read of the source); every output file's size and tree digest, and its plain sha256 with
    ``file_sha256`` (one more hash of every written byte; :mod:`~megatron_grace.checkpoint.manifest`).
    ``kernel_copy=False`` writes every block from the read buffer (see
    :class:`~megatron_grace.checkpoint.stream_copy.StreamWriter`).

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
    identities = {src / rel: file_identity(src / rel) for rel in info.files}  # checked unchanged by the writer
    check_plan(info, plan_obj, hidden_size, ffn_size, dtype)
    layouts = _rank_layouts(info, plan_obj)
    dense_layout = SafetensorsLayout(info.dense, {"format": mf.FORMAT})
    blobs = list(reader.iter_blobs())
    extra_layout = SafetensorsLayout([(k, TensorSpec((len(b),), torch.uint8)) for k, b in blobs]) if blobs else None
    needed = sum(lay.size for lay in layouts) + dense_layout.size + (extra_layout.size if extra_layout else 0)
    needed += 200 * sum(len(r) for layer in plan_obj.gpu_experts for r in layer) + (1 << 20)  # manifest
    check_disk_space(dst, needed, "the patched checkpoint")
    source_files = {rel: _file_record(src / rel, hash_source)
                    for rel in progress(info.files, "hashing source" if hash_source else "listing source", len(info.files), show_progress)}

    expert_sha: list[list[dict[str, str]]] = [[{} for _ in range(layer.num_experts)] for layer in info.layers]
    dense_sha: dict[str, str] = {}
    blob_sha: dict[str, str] = {}
    with atomic_dir(dst, overwrite) as tmp:
        (tmp / "experts").mkdir()
        outputs = {mf.rank_file(g): (tmp / mf.rank_file(g), lay) for g, lay in enumerate(layouts)}
        outputs[mf.DENSE] = (tmp / mf.DENSE, dense_layout)
        if extra_layout is not None:
            outputs[mf.EXTRA] = (tmp / mf.EXTRA, extra_layout)
        writer = StreamWriter(outputs, file_sha256=file_sha256, kernel_copy=kernel_copy, source_identity=identities)
        try:
            total = sum(layer.num_experts for layer in info.layers)
            provided = set()
            for li, e, tensors in progress(reader.iter_experts(spans=True), "patching experts", total, show_progress):
                provided.add((li, e))
                where = [(g, s) for g, s in zip(plan_obj.expert_gpus[li, e].tolist(), plan_obj.expert_slots[li, e].tolist(),
                                                strict=True) if g >= 0]
                for name in info.layers[li].tensors:
                    writer.put(tensors[name], [(mf.rank_file(g), mf.slot_key(li, s, name)) for g, s in where], expert_sha[li][e], name)
                tensors = None  # let the reader unmap a finished source file
            for key, data in reader.iter_dense(spans=True):
                writer.put(data, [(mf.DENSE, key)], dense_sha, key)
            for key, blob in blobs:
                writer.put(torch.frombuffer(bytearray(blob), dtype=torch.uint8), [(mf.EXTRA, key)], blob_sha, key)
            missing = [(li, e) for li, layer in enumerate(info.layers) for e in range(layer.num_experts) if (li, e) not in provided]
            if missing:  # before finish(), which would name the first unwritten slot key instead
                raise GraceInputError(f"the source never provided expert {missing[0][1]} of MoE layer {missing[0][0]}", src)
            files: dict[str, Any] = writer.finish()  # every key written once, sizes and headers read back
        finally:
            writer.close()
        plan_obj.save(tmp / mf.PLAN)

        slots = []
        for g in range(plan_obj.num_gpus):
            for li, layer in enumerate(info.layers):
                for s, e in enumerate(plan_obj.gpu_experts[li][g]):
                    row = {"layer": li, "rank": g, "slot": s, "expert": e, "file": mf.rank_file(g), "tensors": {}}
                    for name, spec in layer.tensors.items():
                        row["tensors"][name] = {"key": mf.slot_key(li, s, name), **spec.to_dict()}
                    slots.append(row)
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
