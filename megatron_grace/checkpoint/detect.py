"""Which framework wrote a checkpoint, and its reader."""

from __future__ import annotations

from pathlib import Path

from megatron_grace.checkpoint import deepspeed_moe, megatron_dist, megatron_torch
from megatron_grace.checkpoint.source import FORMATS, SourceReader
from megatron_grace.errors import GraceInputError

_READERS = {"megatron-dist": megatron_dist.MegatronDistReader, "megatron-torch": megatron_torch.MegatronTorchReader,
            "deepspeed": deepspeed_moe.DeepSpeedReader}


def detect_format(src: Path) -> str:
    """``megatron-dist``, ``megatron-torch`` or ``deepspeed``; GraceInputError when none fits."""
    src = Path(src)
    if not src.is_dir():
        raise GraceInputError("not found or not a directory (expected a checkpoint directory)", src)
    for name, mod in (("megatron-dist", megatron_dist), ("deepspeed", deepspeed_moe), ("megatron-torch", megatron_torch)):
        if mod.looks_like(src):
            return name
    raise GraceInputError("cannot tell the checkpoint format (no torch_dist metadata.json, DeepSpeed mp_rank_00_model_states.pt "
                          "with expert files, or Megatron mp_rank_XX/model_optim_rng.pt); pass --format", src)


def open_source(src: Path, fmt: str = "auto") -> SourceReader:
    """A reader for ``src`` (format detected when ``fmt`` is ``auto``)."""
    src = Path(src)
    if not src.is_dir():
        raise GraceInputError("not found or not a directory (expected a checkpoint directory)", src)
    if fmt == "auto":
        fmt = detect_format(src)
    if fmt not in _READERS:
        raise GraceInputError(f"unknown checkpoint format {fmt!r}; known: auto, {', '.join(FORMATS)}")
    return _READERS[fmt](src)
