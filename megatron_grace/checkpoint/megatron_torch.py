"""Megatron legacy per-rank ``torch`` checkpoints: read and write.

Layout (Megatron-LM ``get_checkpoint_name``): ``ROOT/latest_checkpointed_iteration.txt``,
``ROOT/iter_XXXXXXX/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt``; each file holds
``{"model": state_dict, "iteration", "checkpoint_version", "args", "optimizer", "rng_state", ...}``.
Expert-parallel rank ``r`` of ``W`` holds experts ``r * n .. r * n + n - 1`` (``n = E / W``) as
``decoder.layers.{i}.mlp.experts.local_experts.{j}.{name}``; every other tensor is the same on
every expert-parallel rank. Supported: tensor- and pipeline-parallel size 1 (a single
``_EEE`` suffix, or none for EP 1). Files are read with ``weights_only=True`` only.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_grace.checkpoint.safe_load import SpanLocator, load_torch_file_located
from megatron_grace.checkpoint.source import FileSpan, MoELayerInfo, SourceInfo, TensorSpec, check_expert, jsonable
from megatron_grace.errors import GraceInputError

FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
_EXPERT_KEY = re.compile(r"^(?P<layer>.*\.mlp\.experts\.)local_experts\.(?P<j>\d+)\.(?P<name>.+)$")


def find_iteration_dir(src: Path) -> Path:
    """The ``iter_XXXXXXX`` directory of ``src`` (``src`` itself, or the one ``latest_checkpointed_iteration.txt`` names)."""
    if any(_RANK_DIR.match(p.name) for p in src.iterdir() if p.is_dir()):
        return src
    tracker = src / "latest_checkpointed_iteration.txt"
    if tracker.is_file():
        text = tracker.read_text().strip()
        name = "release" if text == "release" else f"iter_{int(text):07d}" if text.isdigit() else None
        if name is None or not (src / name).is_dir():
            raise GraceInputError(f"names iteration {text!r}, which has no directory", tracker)
        return src / name
    iters = sorted(p for p in src.iterdir() if p.is_dir() and p.name.startswith("iter_"))
    if len(iters) == 1:
        return iters[0]
    raise GraceInputError("no mp_rank_XX directories, no latest_checkpointed_iteration.txt and not exactly one iter_* directory", src)


def looks_like(src: Path) -> bool:
    try:
        d = find_iteration_dir(src)
    except (GraceInputError, OSError):
        return False
    return any((p / FILE).is_file() for p in d.iterdir() if _RANK_DIR.match(p.name))


def _rank_files(it_dir: Path) -> list[Path]:
    """``model_optim_rng.pt`` of each expert-parallel rank, in rank order (TP = PP = 1 only)."""
    dirs = {}
    for p in it_dir.iterdir():
        m = _RANK_DIR.match(p.name)
        if not m or not p.is_dir():
            continue
        tp, a, b = m.group(1), m.group(2), m.group(3)
        if int(tp) != 0:
            raise GraceInputError(f"{p.name}: tensor-parallel checkpoints (TP > 1) are not supported; convert to TP 1 first", it_dir)
        if b is not None:
            raise GraceInputError(f"{p.name}: pipeline-parallel checkpoints (PP > 1) are not supported; convert to PP 1 first", it_dir)
        dirs[int(a) if a is not None else 0] = p / FILE
    if not dirs:
        raise GraceInputError("no mp_rank_XX directories", it_dir)
    if sorted(dirs) != list(range(len(dirs))):
        raise GraceInputError(f"expert-parallel ranks {sorted(dirs)} are not 0..{len(dirs) - 1} (a rank directory is missing)", it_dir)
    for r, f in sorted(dirs.items()):
        if not f.is_file():
            raise GraceInputError(f"missing {FILE} of expert-parallel rank {r}", f.parent)
    return [dirs[r] for r in range(len(dirs))]


def _model(state: Any, path: Path) -> dict[str, Any]:
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        keys = sorted(state)[:6] if isinstance(state, dict) else type(state).__name__
        raise GraceInputError(f"not a Megatron checkpoint (no 'model' state dict; has {keys}; virtual pipeline 'model0' is not supported)", path)
    return state["model"]


def _split(model: dict[str, Any], path: Path) -> tuple[dict[str, dict[int, dict[str, torch.Tensor]]], dict[str, torch.Tensor], dict[str, Any]]:
    """(layer prefix -> local expert -> name -> tensor, dense tensors, non-tensor entries)."""
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    dense: dict[str, torch.Tensor] = {}
    other: dict[str, Any] = {}
    for key, value in model.items():
        if not isinstance(value, torch.Tensor):
            other[key] = value
            continue
        m = _EXPERT_KEY.match(key)
        if m:
            experts.setdefault(m.group("layer"), {}).setdefault(int(m.group("j")), {})[m.group("name")] = value
        else:
            dense[key] = value
    for key, value in other.items():
        if value is not None and not jsonable(value):
            raise GraceInputError(f"model entry {key!r} is a {type(value).__name__} (only tensors and plain values are supported)", path)
    return experts, dense, other


_Rank = tuple[dict[str, dict[int, dict[str, torch.Tensor]]], dict[str, torch.Tensor], SpanLocator]
"""One rank file split: (layer prefix -> local expert -> name -> tensor, dense tensors, its span locator)."""


def _layer_number(prefix: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\.(\d+)\.", "." + prefix))


class MegatronTorchReader:
    """Reader for Megatron legacy ``torch`` checkpoints (see the module docstring)."""

    format = "megatron-torch"

    def __init__(self, src: Path) -> None:
        self.src = Path(src)
        self.it_dir = find_iteration_dir(self.src)
        self.files = _rank_files(self.it_dir)
        W = len(self.files)
        state, locator = load_torch_file_located(self.files[0])
        experts, dense, other = _split(_model(state, self.files[0]), self.files[0])
        if not experts:
            raise GraceInputError("no MoE experts (no '...mlp.experts.local_experts.N...' keys)", self.files[0])
        self.prefixes = sorted(experts, key=_layer_number)
        layers = []
        for prefix in self.prefixes:
            local = experts[prefix]
            n = len(local)
            if sorted(local) != list(range(n)):
                raise GraceInputError(f"{prefix}: local experts {sorted(local)} are not 0..{n - 1}", self.files[0])
            layers.append(MoELayerInfo(prefix, n * W, {k: TensorSpec.of(t) for k, t in local[0].items()}))
        self.num_local = [len(experts[p]) for p in self.prefixes]
        extra: dict[str, Any] = {"iteration_dir": self.it_dir.name,
                                 "dense_keys": list(dense), "model_other": {k: v for k, v in other.items()}}
        kept, dropped = {}, []
        for key, value in state.items():
            if key == "model":
                continue
            if key == "args" and isinstance(value, argparse.Namespace):
                args = {k: v for k, v in vars(value).items() if jsonable(v)}
                dropped += [f"args.{k}" for k in vars(value) if k not in args]
                kept["args"] = {"__namespace__": args}
            elif jsonable(value):
                kept[key] = value
            else:
                dropped.append(key)
        extra["top_level"] = kept
        files = [os.path.relpath(f, self.src) for f in self.files]
        tracker = self.src / "latest_checkpointed_iteration.txt"
        if tracker.is_file():
            files.append(tracker.name)
        order = [(li, r * n + j) for r in range(W) for li, n in enumerate(self.num_local) for j in range(n)]
        self.info = SourceInfo(self.format, self.src, W, layers, files, extra, dropped,
                               [(k, TensorSpec.of(t)) for k, t in dense.items()], order)
        # rank 0's split stays (memory-mapped; with spans its pages are never touched) for iter_experts and
        # iter_dense, so a patch parses and splits that file once; iter_dense, and iter_experts without spans,
        # release it (tensor mode: its touched pages would stay resident while the next files are read, so
        # iter_dense after iter_experts loads it again)
        self._first: _Rank | None = (experts, dense, locator)
        del state

    def _load(self, r: int) -> _Rank:
        """Rank ``r``'s file split into (layer prefix -> local expert -> tensors, dense tensors, locator)."""
        if r == 0 and self._first is not None:
            return self._first
        state, locator = load_torch_file_located(self.files[r])
        experts, dense, _ = _split(_model(state, self.files[r]), self.files[r])
        return experts, dense, locator

    def iter_experts(self, spans: bool = False) -> Iterator[tuple[int, int, dict[str, torch.Tensor | FileSpan]]]:
        for r, path in enumerate(self.files):
            experts, _, locator = self._load(r)
            for li, prefix in enumerate(self.prefixes):
                local = experts.get(prefix, {})
                n = self.num_local[li]
                if sorted(local) != list(range(n)):
                    raise GraceInputError(f"{prefix}: local experts {sorted(local)}, expected 0..{n - 1} as on rank 0", path)
                for j in range(n):
                    check_expert(self.info, li, r * n + j, local[j], str(path))
                    yield li, r * n + j, {k: locator.data(t) for k, t in local[j].items()} if spans else local[j]
            if r == 0 and not spans:
                self._first = None  # its touched pages would stay resident while the next files are read
            experts = local = locator = None  # unmap this file before the next one is mapped

    def iter_dense(self, spans: bool = False) -> Iterator[tuple[str, torch.Tensor | FileSpan]]:
        _, dense, locator = self._load(0)
        self._first = None
        for key, _spec in self.info.dense:
            if key not in dense:
                raise GraceInputError(f"dense tensor {key} is gone (the file changed while reading)", self.files[0])
            yield key, locator.data(dense[key]) if spans else dense[key]

    def iter_blobs(self) -> Iterator[tuple[str, bytes]]:
        return iter(())


def write_megatron_torch(out: Path, extra: dict[str, Any], layers: list[MoELayerInfo], ep_size: int,
                         dense: dict[str, torch.Tensor], expert: Any) -> list[Path]:
    """Write the standard layout for ``ep_size`` ranks into ``out`` (a fresh directory).

    Args:
        extra, layers: the source description saved at patch time.
        dense: every non-expert tensor (the same on every rank).
        expert: ``(moe_layer, expert) -> {name: tensor}``.

    Returns the files written. Each rank's file holds ``model`` (dense + its contiguous experts)
    and the plain top-level entries kept at patch time (``args`` as an ``argparse.Namespace``).
    """
    for li, layer in enumerate(layers):
        if layer.num_experts % ep_size:
            raise GraceInputError(f"MoE layer {li} has {layer.num_experts} experts, not divisible by EP size {ep_size}")
    it_dir = out / extra.get("iteration_dir", "iter_0000001")
    top = {}
    for key, value in extra.get("top_level", {}).items():
        top[key] = argparse.Namespace(**value["__namespace__"]) if isinstance(value, dict) and "__namespace__" in value else value
    written = []
    for r in range(ep_size):
        model: dict[str, Any] = {}
        for key in extra["dense_keys"]:
            model[key] = dense[key]
        for li, layer in enumerate(layers):
            n = layer.num_experts // ep_size
            for j in range(n):
                for name, t in expert(li, r * n + j).items():
                    model[f"{layer.source_layer}local_experts.{j}.{name}"] = t
        model.update(extra.get("model_other", {}))
        d = it_dir / ("mp_rank_00" if ep_size == 1 else f"mp_rank_00_{r:03d}")
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model, **top}, d / FILE)
        written.append(d / FILE)
    name = it_dir.name
    (out / "latest_checkpointed_iteration.txt").write_text(name.removeprefix("iter_").lstrip("0") or "0"
                                                           if name.startswith("iter_") else name)
    written.append(out / "latest_checkpointed_iteration.txt")
    return written
