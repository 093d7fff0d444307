"""``unpatch``: a patched checkpoint -> the framework's standard layout (any EP size).

Each expert is read from its first slot and hash-checked against the manifest; the format's
writer produces the standard files in a temporary directory; the result is read back with
the format's reader and every expert and dense tensor is checked against the manifest's
hashes (so patch -> unpatch returns every weight bit-exactly) before the rename.
Optimizer and RNG states are not part of a patched checkpoint and are not restored.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_grace._files import check_disk_space
from megatron_grace._progress import progress
from megatron_grace.checkpoint import manifest as mf
from megatron_grace.checkpoint.atomic_dir import atomic_dir, check_target
from megatron_grace.checkpoint.deepspeed_moe import write_deepspeed
from megatron_grace.checkpoint.detect import open_source
from megatron_grace.checkpoint.megatron_dist import write_megatron_dist
from megatron_grace.checkpoint.megatron_torch import write_megatron_torch
from megatron_grace.checkpoint.safetensors_io import tensor_bytes
from megatron_grace.checkpoint.slots import SlotFiles
from megatron_grace.errors import GraceInputError


@dataclass(frozen=True)
class UnpatchSummary:
    format: str
    ep_size: int
    files: int
    bytes: int


def _dense(files: SlotFiles) -> dict[str, Any]:
    """Every dense tensor, hash-checked against the manifest."""
    entries = files.entries(mf.DENSE)
    return {k: files.read(mf.DENSE, k, files.m["dense_sha256"].get(k)) for k in entries}


def _blobs(files: SlotFiles) -> dict[str, bytes]:
    """The opaque byte records (torch_dist), hash-checked."""
    return {k: files.read(mf.EXTRA, k, sha).numpy().tobytes() for k, sha in files.m.get("blob_sha256", {}).items()}


def unpatch_checkpoint(dst: str | os.PathLike[str], out: str | os.PathLike[str], ep_size: int | None = None, *,
                       overwrite: bool = False, show_progress: bool = True) -> UnpatchSummary:
    """Write ``out`` in the source's format for ``ep_size`` expert-parallel ranks (default: the source's)."""
    dst, out = Path(dst).absolute(), Path(out).absolute()
    m = mf.read_manifest(dst)
    check_target(out, overwrite)
    if out == dst or dst in out.parents:
        raise GraceInputError("OUT must not be the patched checkpoint or inside it", out)
    fmt = m["source"]["format"]
    layers = mf.manifest_layers(m)
    ep = int(ep_size or m["source"]["ep_size"])
    if ep < 1:
        raise GraceInputError(f"EP size must be >= 1, got {ep}")
    extra = m["source"]["extra"]
    check_disk_space(out, sum(r["bytes"] for r in m["files"].values()), "the unpatched checkpoint")
    files = SlotFiles(dst, m)  # one set of open rank files for dense, blobs and experts
    total = sum(layer.num_experts for layer in layers)
    bar = iter(progress(range(total), "unpatching", total, show_progress))

    def expert(li: int, e: int) -> dict[str, Any]:
        next(bar, None)
        return files.expert(li, e)

    try:
        dense = _dense(files)
        with atomic_dir(out, overwrite) as tmp:
            if fmt == "megatron-torch":
                written = write_megatron_torch(tmp, extra, layers, ep, dense, expert)
            elif fmt == "deepspeed":
                written = write_deepspeed(tmp, extra, layers, ep, dense, expert)
            elif fmt == "megatron-dist":
                written = write_megatron_dist(tmp, extra, layers, ep, dense, expert, _blobs(files))
            else:
                raise GraceInputError(f"manifest names an unknown source format {fmt!r}", dst / mf.MANIFEST)
            _check_written(tmp, fmt, m, ep if fmt == "megatron-torch" else None)
    finally:
        files.close()
    return UnpatchSummary(fmt, ep, len(written), sum(p.stat().st_size for p in _rel(out, tmp, written)))


def _rel(out: Path, tmp: Path, written: list[Path]) -> list[Path]:
    return [out / p.relative_to(tmp) for p in written]


def _check_written(tmp: Path, fmt: str, m: dict[str, Any], ep: int | None) -> None:
    """Read the new checkpoint back with its reader; every tensor must hash to the manifest's value."""
    reader = open_source(tmp, fmt)
    if ep is not None and reader.info.ep_size != ep:
        raise GraceInputError(f"written checkpoint reads back with EP {reader.info.ep_size}, expected {ep}")
    seen = 0
    for li, e, tensors in reader.iter_experts():
        want = m["expert_sha256"][li][e]
        for name, t in tensors.items():
            if hashlib.sha256(tensor_bytes(t)).hexdigest() != want[name]:
                raise GraceInputError(f"written checkpoint: expert {e} of MoE layer {li}, {name}, does not read back bit-exactly")
        seen += 1
    if seen != sum(len(layer) for layer in m["expert_sha256"]):
        raise GraceInputError(f"written checkpoint reads back {seen} experts, expected {sum(len(x) for x in m['expert_sha256'])}")
    for key, t in reader.iter_dense():
        if hashlib.sha256(tensor_bytes(t)).hexdigest() != m["dense_sha256"].get(key):
            raise GraceInputError(f"written checkpoint: dense tensor {key} does not read back bit-exactly")
