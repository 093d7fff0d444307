"""What every checkpoint reader provides: the MoE layers, their experts' tensors, the rest.

A reader (one per framework format) describes a checkpoint as a :class:`SourceInfo` without
loading its tensors (expert and dense tensor specs, and the order in which it will stream the
experts), then streams them: :meth:`SourceReader.iter_experts` yields one expert
``(moe_layer, expert, {name: tensor})`` at a time in ``info.expert_order`` (``moe_layer`` counts
the model's MoE layers in order, as the plan does), holding at most one source file open
(memory-mapped); :meth:`iter_dense` yields every non-expert tensor once, in ``info.dense``
order; :meth:`iter_blobs` yields opaque byte records the format needs to be written back (never
unpickled here). With ``spans=True`` both streams give a :class:`FileSpan` instead of a tensor
wherever the tensor's bytes lie contiguously in a source file, so a writer can copy them with
``pread`` into a fixed buffer without touching (and mapping into memory) the tensor itself.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from megatron_grace.errors import GraceInputError

FORMATS = ("megatron-dist", "megatron-torch", "deepspeed")


@dataclass(frozen=True)
class FileSpan:
    """``nbytes`` bytes of file ``path`` from byte ``offset``: one tensor's raw (C-order, little-endian) bytes."""

    path: Path
    offset: int
    nbytes: int


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one tensor (JSON: ``{"shape": [...], "dtype": "float32"}``)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n * torch.empty((), dtype=self.dtype).element_size()

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": dtype_name(self.dtype)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> TensorSpec:
        return TensorSpec(tuple(int(x) for x in d["shape"]), dtype_from_name(d["dtype"]))

    @staticmethod
    def of(t: torch.Tensor) -> TensorSpec:
        return TensorSpec(tuple(t.shape), t.dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise GraceInputError(f"unknown dtype {name!r}")
    return dt


@dataclass
class MoELayerInfo:
    """One MoE layer of the source.

    Attributes:
        source_layer: how the format names the layer (a key prefix or a layer number).
        num_experts: E.
        tensors: expert tensor name (relative to the expert) -> spec, the same for every expert.
    """

    source_layer: str
    num_experts: int
    tensors: dict[str, TensorSpec]

    def to_dict(self) -> dict[str, Any]:
        return {"source_layer": self.source_layer, "num_experts": self.num_experts,
                "tensors": {k: v.to_dict() for k, v in self.tensors.items()}}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> MoELayerInfo:
        return MoELayerInfo(str(d["source_layer"]), int(d["num_experts"]),
                            {k: TensorSpec.from_dict(v) for k, v in d["tensors"].items()})


@dataclass
class SourceInfo:
    """A source checkpoint, described without loading its tensors.

    Attributes:
        format: one of :data:`FORMATS`.
        path: the checkpoint directory.
        ep_size: expert-parallel size it was saved with (1 when the format does not depend on it).
        layers: MoE layers in model order (plan layer ``i`` is ``layers[i]``).
        files: every file of the checkpoint (relative to ``path``).
        extra: JSON-able, format-specific facts needed to write the format back (unpatch).
        dropped: what is not carried over (optimizer and RNG states), for the manifest.
        dense: every non-expert tensor as ``(key, spec)``, in the order ``iter_dense`` yields them.
        expert_order: every ``(moe_layer, expert)`` in the order ``iter_experts`` yields them.
    """

    format: str
    path: Path
    ep_size: int
    layers: list[MoELayerInfo]
    files: list[str]
    extra: dict[str, Any] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    dense: list[tuple[str, TensorSpec]] = field(default_factory=list)
    expert_order: list[tuple[int, int]] = field(default_factory=list)

    @property
    def expert_bytes(self) -> int:
        """Bytes of all experts of all layers (one copy each)."""
        return sum(layer.num_experts * sum(s.nbytes for s in layer.tensors.values()) for layer in self.layers)


class SourceReader(Protocol):
    """A framework checkpoint reader (see the module docstring)."""

    info: SourceInfo

    def iter_experts(self, spans: bool = False) -> Iterator[tuple[int, int, dict[str, torch.Tensor | FileSpan]]]:
        ...

    def iter_dense(self, spans: bool = False) -> Iterator[tuple[str, torch.Tensor | FileSpan]]:
        ...

    def iter_blobs(self) -> Iterator[tuple[str, bytes]]:
        ...


def check_expert(info: SourceInfo, layer: int, expert: int, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Raise GraceInputError when one expert's tensors differ from the layer's names, shapes or dtypes."""
    want = info.layers[layer].tensors
    if set(tensors) != set(want):
        raise GraceInputError(f"{where}: expert {expert} of MoE layer {layer} has tensors {sorted(tensors)}, "
                              f"expected {sorted(want)}")
    for name, t in tensors.items():
        if TensorSpec.of(t) != want[name]:
            raise GraceInputError(f"{where}: expert {expert} of MoE layer {layer}: {name} is {tuple(t.shape)} "
                                  f"{dtype_name(t.dtype)}, expected {want[name].shape} {dtype_name(want[name].dtype)}")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False
