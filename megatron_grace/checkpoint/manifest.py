"""The patched layout and its manifest.

A patched checkpoint ``DST`` holds::

    grace-checkpoint.json            the manifest (below)
    plan.json                        the placement plan (grace-plan/1)
    experts/rank_00000.safetensors   one file per GPU of the plan: its slots of every MoE layer,
                                     keys "layer.{l}.slot.{s}.{name}" (name as the source names
                                     the expert's tensor, e.g. "linear_fc1.weight")
    dense.safetensors                every non-expert tensor, one copy, source keys
    extra.safetensors                opaque byte records the format needs to be written back
                                     (uint8 tensors; torch_dist only; never unpickled)

Manifest (JSON, ``format = grace-checkpoint/2``): ``source`` (path, format, EP size, every file
with bytes and sha256, format facts for unpatch, what was dropped), ``plan`` (file, sha256,
GPUs, layers, experts), ``layers`` (per MoE layer: source name, experts, tensor names with shape
and dtype), ``expert_sha256[l][e][name]`` (the source expert tensor's bytes), ``dense_sha256``,
``slots`` (one row per slot: layer, rank, slot, expert, file, and each tensor's key, shape,
dtype), ``files`` (every other file of DST with its bytes and a digest) and ``manifest_sha256``,
the sha256 of the rest of the manifest as canonical JSON (sorted keys, no spaces), so a changed
manifest value is caught too.

File digests: ``plan.json`` has ``sha256`` (of its bytes). Each ``.safetensors`` file has
``tree_sha256``, the sha256 of its header bytes followed by the 32-byte sha256 of each tensor
in file order (:func:`~megatron_grace.checkpoint.safetensors_io.tree_sha256`); its tensors tile
the data section, so every byte of the file is covered (``verify`` also refuses gaps and
trailing bytes), and the patch gets it from the per-tensor hashes it computes anyway, without
hashing each replica's bytes again. ``patch --file-sha256`` records the plain ``sha256`` of
every file as well (one more hash of every written byte), e.g. to compare with ``sha256sum``.
Format 2 (this one) differs from 1 only there (1 had ``sha256`` for every file).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from megatron_grace._files import load_json
from megatron_grace.checkpoint.source import MoELayerInfo
from megatron_grace.errors import GraceInputError

FORMAT = "grace-checkpoint/2"
MANIFEST = "grace-checkpoint.json"
PLAN = "plan.json"
DENSE = "dense.safetensors"
EXTRA = "extra.safetensors"


def rank_file(rank: int) -> str:
    return f"experts/rank_{rank:05d}.safetensors"


def slot_key(layer: int, slot: int, name: str) -> str:
    return f"layer.{layer}.slot.{slot}.{name}"


def content_sha256(m: dict[str, Any]) -> str:
    """sha256 of the manifest without its ``manifest_sha256`` field, as canonical JSON."""
    body = {k: v for k, v in m.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_manifest(dst: Path) -> dict[str, Any]:
    """Load and sanity-check ``DST/grace-checkpoint.json``."""
    dst = Path(dst)
    if not dst.is_dir():
        raise GraceInputError("not a directory (expected a patched checkpoint)", dst)
    path = dst / MANIFEST
    if not path.is_file():
        raise GraceInputError(f"no {MANIFEST} (not a patched GRACE checkpoint)", dst)
    m = load_json(path)
    if isinstance(m, dict) and m.get("format") == "grace-checkpoint/1":
        raise GraceInputError(f"written by an earlier version (grace-checkpoint/1, per-file sha256 only); patch it again for {FORMAT}",
                              path)
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise GraceInputError(f"not a GRACE checkpoint manifest (format {m.get('format') if isinstance(m, dict) else None!r}, "
                              f"expected {FORMAT!r})", path)
    for key in ("manifest_sha256", "source", "plan", "layers", "slots", "files", "expert_sha256"):
        if key not in m:
            raise GraceInputError(f"manifest lacks {key!r}", path)
    if m.get("manifest_sha256") != content_sha256(m):
        raise GraceInputError("manifest content does not match its manifest_sha256 (edited or corrupt)", path)
    return m


def manifest_layers(m: dict[str, Any]) -> list[MoELayerInfo]:
    return [MoELayerInfo.from_dict(d) for d in m["layers"]]
