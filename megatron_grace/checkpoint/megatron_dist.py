"""Megatron-Core distributed checkpoints (``dist_checkpointing.save``, ``torch_dist`` backend).

Layout: ``metadata.json`` (``{"sharded_backend": "torch_dist", ...}``), ``common.pt``
(non-sharded state), ``.metadata`` (PyTorch DCP metadata: every tensor's global size and
chunks, and where each chunk is stored) and ``__R_T.distcp`` files holding the chunks, each a
``torch.save`` record (or raw bytes) at a byte range. Megatron saves ``SequentialMLP`` /
grouped experts under ``<prefix>.experts.experts.<name>`` with global size
``[num_layers, E, *shape]`` (layers stacked) or ``[E, *shape]``; each chunk covers one expert
(``linear_fc1`` of a gated MLP as two chunks, gate rows then up rows). The layout does not
depend on the EP size. ``.metadata`` is parsed with a restricted unpickler and chunks with
``weights_only=True`` (:mod:`megatron_grace.checkpoint.safe_load`).
"""

from __future__ import annotations

import json
import pickle
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_grace import limits
from megatron_grace._files import check_input_file
from megatron_grace.checkpoint.safe_load import load_dcp_metadata, load_torch_bytes
from megatron_grace.checkpoint.source import MoELayerInfo, SourceInfo, TensorSpec, check_expert
from megatron_grace.errors import GraceInputError

_EXPERT_FQN = re.compile(r"^(?P<prefix>.*\.experts\.experts\.)(?P<name>[^/]+\.(?P<kind>weight|bias))$")
_PARAM_NDIM = {"weight": 2, "bias": 1}
COPIED_FILES = ("metadata.json", "common.pt")


def looks_like(src: Path) -> bool:
    try:
        meta = json.loads((src / "metadata.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("sharded_backend") == "torch_dist"


def _offsets(chunk: Any) -> tuple[int, ...]:
    return tuple(int(x) for x in chunk.offsets)


def _sizes(chunk: Any) -> tuple[int, ...]:
    return tuple(int(x) for x in chunk.sizes)


def dense_key(fqn: str, offsets: tuple[int, ...], single: bool) -> str:
    """Key of one dense chunk in ``dense.safetensors``: the fqn, plus ``@o0,o1,..`` when the tensor has several chunks."""
    return fqn if single else f"{fqn}@{','.join(map(str, offsets))}"


class MegatronDistReader:
    """Reader for ``torch_dist`` checkpoints (see the module docstring)."""

    format = "megatron-dist"

    def __init__(self, src: Path) -> None:
        self.src = Path(src)
        if not looks_like(self.src):
            raise GraceInputError("not a Megatron torch_dist checkpoint (metadata.json missing or another backend)", self.src)
        self.md = load_dcp_metadata(self.src / ".metadata")
        self.storage = self.md.storage_data
        if not isinstance(self.storage, dict):
            raise GraceInputError("DCP metadata has no storage map", self.src / ".metadata")
        groups: dict[tuple[str, tuple[int, ...]], dict[str, Any]] = {}  # (prefix, layer offsets) -> name -> (fqn, lead)
        self.dense: list[tuple[str, Any]] = []
        self.blobs: list[str] = []
        for fqn, meta in self.md.state_dict_metadata.items():
            if type(meta).__name__ == "BytesStorageMetadata":
                self.blobs.append(fqn)
                continue
            m = _EXPERT_FQN.match(fqn)
            if not m:
                self.dense.append((fqn, meta))
                continue
            lead = len(meta.size) - _PARAM_NDIM[m.group("kind")]
            if lead not in (1, 2):
                raise GraceInputError(f"{fqn}: global size {tuple(meta.size)} is not [layers, experts, ...] or [experts, ...]", self.src)
            for lo in sorted({_offsets(c)[: lead - 1] for c in meta.chunks}):
                groups.setdefault((m.group("prefix"), lo), {})[m.group("name")] = (fqn, lead)
        if not groups:
            raise GraceInputError("no MoE experts ('...experts.experts.*' tensors) in this checkpoint", self.src)
        self.layer_keys = sorted(groups)
        layers = []
        for prefix, lo in self.layer_keys:
            names = groups[(prefix, lo)]
            specs, E = {}, None
            for name, (fqn, lead) in names.items():
                meta = self.md.state_dict_metadata[fqn]
                specs[name] = TensorSpec(tuple(int(x) for x in meta.size[lead:]), meta.properties.dtype)
                e_here = int(meta.size[lead - 1])
                if E not in (None, e_here):
                    raise GraceInputError(f"{prefix}: tensors disagree on the expert count ({E} vs {e_here})", self.src)
                E = e_here
            source_layer = prefix + ("" if not lo else f"[{','.join(map(str, lo))}]")
            layers.append(MoELayerInfo(source_layer, int(E or 0), specs))
        files = [p.name for p in sorted(self.src.iterdir()) if p.is_file()]
        extra = {"blob_fqns": self.blobs}
        dense = [(dense_key(fqn, _offsets(c), len(meta.chunks) == 1), TensorSpec(_sizes(c), meta.properties.dtype))
                 for fqn, meta in self.dense for c in meta.chunks]
        order = [(li, e) for li, layer in enumerate(layers) for e in range(layer.num_experts)]
        self.info = SourceInfo(self.format, self.src, 1, layers, files, extra, [], dense, order)
        self._groups = groups
        self._fh: dict[str, Any] = {}

    # ------------------------------------------------------------------ item access
    def _read(self, fqn: str, offsets: tuple[int, ...] | None) -> bytes:
        from torch.distributed.checkpoint.metadata import MetadataIndex

        idx = MetadataIndex(fqn, None if offsets is None else torch.Size(offsets))
        info = self.storage.get(idx)
        if info is None:
            raise GraceInputError(f"{fqn} chunk {offsets}: no storage entry in .metadata", self.src)
        if getattr(info, "transform_descriptors", None):
            raise GraceInputError(f"{fqn}: compressed/transformed DCP records ({info.transform_descriptors}) are not supported", self.src)
        path = self.src / info.relative_path
        if info.relative_path not in self._fh:
            if not path.exists():
                raise GraceInputError("missing chunk file", path)
            check_input_file(path)  # a folder, FIFO or device gets its own message
            self._fh[info.relative_path] = open(path, "rb")  # noqa: SIM115 - closed in close()
        fh = self._fh[info.relative_path]
        limits.check_bytes(int(info.length), f"record {fqn}", path)
        fh.seek(int(info.offset))
        blob = fh.read(int(info.length))
        if len(blob) != int(info.length):
            raise GraceInputError(f"truncated: {fqn} needs bytes {info.offset}..{info.offset + info.length}", path)
        return blob

    def _chunk(self, fqn: str, chunk: Any, dtype: torch.dtype) -> torch.Tensor:
        blob = self._read(fqn, _offsets(chunk))
        sizes = _sizes(chunk)
        if blob[:4] == b"PK\x03\x04":
            t = load_torch_bytes(blob, f"{self.src}: {fqn} chunk {_offsets(chunk)}")
        else:  # raw bytes (safetensors-style DCP serialization)
            t = torch.frombuffer(bytearray(blob), dtype=dtype)
        if not isinstance(t, torch.Tensor) or t.numel() != torch.Size(sizes).numel() or t.dtype != dtype:
            raise GraceInputError(f"{fqn} chunk {_offsets(chunk)}: record does not hold a {dtype} tensor of size {sizes}", self.src)
        return t.reshape(sizes)

    def close(self) -> None:
        for fh in self._fh.values():
            fh.close()
        self._fh.clear()

    # ------------------------------------------------------------------ streams
    def iter_experts(self, spans: bool = False) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
        """Experts assembled from their chunks (always tensors: chunks are ``torch.save`` records, not raw spans)."""
        for li, (prefix, lo) in enumerate(self.layer_keys):
            layer = self.info.layers[li]
            by_expert: dict[str, dict[int, list[Any]]] = {}
            for name, (fqn, lead) in self._groups[(prefix, lo)].items():
                meta = self.md.state_dict_metadata[fqn]
                for c in meta.chunks:
                    off = _offsets(c)
                    if off[: lead - 1] == lo:
                        by_expert.setdefault(name, {}).setdefault(off[lead - 1], []).append(c)
            for e in range(layer.num_experts):
                tensors = {}
                for name, (fqn, lead) in self._groups[(prefix, lo)].items():
                    spec = layer.tensors[name]
                    out = torch.empty(spec.shape, dtype=spec.dtype)
                    covered = 0
                    for c in by_expert.get(name, {}).get(e, []):
                        part = self._chunk(fqn, c, spec.dtype).reshape(_sizes(c)[lead:])
                        view = out
                        for d, (o, s) in enumerate(zip(_offsets(c)[lead:], _sizes(c)[lead:], strict=True)):
                            view = view.narrow(d, o, s)
                        view.copy_(part)
                        covered += part.numel()
                    if covered != out.numel():
                        raise GraceInputError(f"{fqn}: chunks of expert {e} cover {covered} of {out.numel()} values", self.src)
                    tensors[name] = out
                check_expert(self.info, li, e, tensors, str(self.src))
                yield li, e, tensors
        self.close()

    def iter_dense(self, spans: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        for fqn, meta in self.dense:
            single = len(meta.chunks) == 1
            for c in meta.chunks:
                yield dense_key(fqn, _offsets(c), single), self._chunk(fqn, c, meta.properties.dtype)
        self.close()

    def iter_blobs(self) -> Iterator[tuple[str, bytes]]:
        for fqn in self.blobs:
            yield fqn, self._read(fqn, None)
        self.close()
        yield ".metadata", (self.src / ".metadata").read_bytes()
        for name in COPIED_FILES:
            if (self.src / name).is_file():
                yield name, (self.src / name).read_bytes()


def write_megatron_dist(out: Path, extra: dict[str, Any], layers: list[MoELayerInfo], ep_size: int,
                        dense: dict[str, torch.Tensor], expert: Any, blobs: dict[str, bytes]) -> list[Path]:
    """Write a ``torch_dist`` checkpoint with the source's keys, global sizes and chunks.

    Tensors go to one ``__0_0.distcp`` file as ``torch.save`` records (as DCP writes them), byte
    records verbatim; ``.metadata`` keeps the source's tensor metadata with new storage entries;
    ``metadata.json`` and ``common.pt`` are copied byte for byte. ``ep_size`` does not change
    the layout (Megatron reshards on load).
    """
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta

    with tempfile.NamedTemporaryFile(suffix=".metadata") as tmp:
        tmp.write(blobs[".metadata"])
        tmp.flush()
        src_md = load_dcp_metadata(Path(tmp.name))
    layer_of = {}
    for li, layer in enumerate(layers):
        layer_of[layer.source_layer] = li
    storage: dict[Any, Any] = {}
    out.mkdir(parents=True, exist_ok=True)
    data_name = "__0_0.distcp"
    with open(out / data_name, "wb") as fh:
        for fqn, meta in src_md.state_dict_metadata.items():
            if type(meta).__name__ == "BytesStorageMetadata":
                offset = fh.tell()
                fh.write(blobs[fqn])
                storage[MetadataIndex(fqn)] = _StorageInfo(data_name, offset, len(blobs[fqn]))
                continue
            m = _EXPERT_FQN.match(fqn)
            single = len(meta.chunks) == 1
            for c in meta.chunks:
                off, sizes = _offsets(c), _sizes(c)
                if m:
                    lead = len(meta.size) - _PARAM_NDIM[m.group("kind")]
                    lo = off[: lead - 1]
                    li = layer_of[m.group("prefix") + ("" if not lo else f"[{','.join(map(str, lo))}]")]
                    t = expert(li, off[lead - 1])[m.group("name")]
                    for d, (o, s) in enumerate(zip(off[lead:], sizes[lead:], strict=True)):
                        t = t.narrow(d, o, s)
                    t = t.reshape(sizes)
                else:
                    t = dense[dense_key(fqn, off, single)]
                offset = fh.tell()
                torch.save(t.contiguous().clone(), fh)
                storage[MetadataIndex(fqn, torch.Size(off))] = _StorageInfo(data_name, offset, fh.tell() - offset)
    md = Metadata(state_dict_metadata=src_md.state_dict_metadata, planner_data=src_md.planner_data,
                  storage_data=storage, storage_meta=StorageMeta(), version=getattr(src_md, "version", None))
    with open(out / ".metadata", "wb") as fh:
        pickle.dump(md, fh)
    written = [out / data_name, out / ".metadata"]
    for name in COPIED_FILES:
        if name in blobs:
            (out / name).write_bytes(blobs[name])
            written.append(out / name)
    return written

