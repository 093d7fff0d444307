"""DeepSpeed MoE checkpoints (``engine.save_checkpoint``): read and write.

Layout: ``ROOT/latest`` (the tag), ``ROOT/TAG/mp_rank_00_model_states.pt`` (``{"module": dense
state dict, "optimizer", "ds_config", "num_experts", ...}``), one file per expert
``ROOT/TAG/layer_{l}_expert_{e}_mp_rank_00_model_states.pt`` holding
``{"<prefix>deepspeed_experts.{e}.<name>": tensor}`` (``l`` counts MoE layers in module order,
``e`` is the global expert id), and optimizer states ``expp_rank_{r}_mp_rank_00_optim_states.pt``
(one per expert-parallel rank; not carried over). Expert files do not depend on the EP size.
Tensor-parallel size 1 only (``mp_rank_00``). Files are read with ``weights_only=True`` only.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_grace.checkpoint.safe_load import SpanLocator, load_torch_file_located
from megatron_grace.checkpoint.source import FileSpan, MoELayerInfo, SourceInfo, TensorSpec, check_expert, jsonable
from megatron_grace.errors import GraceInputError

MAIN = "mp_rank_00_model_states.pt"
_EXPERT_FILE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_OPTIM_FILE = re.compile(r"^expp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_EXPERT_KEY = re.compile(r"^(?P<prefix>.*deepspeed_experts\.)(?P<e>\d+)\.(?P<name>.+)$")


def find_tag_dir(src: Path) -> Path:
    """The tag directory: ``src`` itself, or the one ``src/latest`` names."""
    if (src / MAIN).is_file():
        return src
    latest = src / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if (src / tag / MAIN).is_file():
            return src / tag
        raise GraceInputError(f"names tag {tag!r}, which has no {MAIN}", latest)
    raise GraceInputError(f"no {MAIN} and no 'latest' file (not a DeepSpeed checkpoint?)", src)


def looks_like(src: Path) -> bool:
    try:
        d = find_tag_dir(src)
    except (GraceInputError, OSError):
        return False
    return any(_EXPERT_FILE.match(p.name) for p in d.iterdir())


class DeepSpeedReader:
    """Reader for DeepSpeed MoE checkpoints (see the module docstring)."""

    format = "deepspeed"

    def __init__(self, src: Path) -> None:
        self.src = Path(src)
        self.tag_dir = find_tag_dir(self.src)
        expert_files: dict[int, dict[int, Path]] = {}
        ep_ranks = set()
        for p in self.tag_dir.iterdir():
            m = _EXPERT_FILE.match(p.name)
            if m:
                if int(m.group(3)) != 0:
                    raise GraceInputError(f"{p.name}: tensor-parallel DeepSpeed checkpoints (mp_rank > 0) are not supported", self.tag_dir)
                expert_files.setdefault(int(m.group(1)), {})[int(m.group(2))] = p
            m = _OPTIM_FILE.match(p.name)
            if m:
                ep_ranks.add(int(m.group(1)))
        if not expert_files:
            raise GraceInputError("no layer_*_expert_*_mp_rank_00_model_states.pt files (not a MoE checkpoint)", self.tag_dir)
        main, main_locator = self._load_main()
        declared = main.get("num_experts")
        self.layer_ids = sorted(expert_files)
        if self.layer_ids != list(range(len(self.layer_ids))):
            raise GraceInputError(f"MoE layer files {self.layer_ids} are not 0..{len(self.layer_ids) - 1}", self.tag_dir)
        self.expert_files = expert_files
        layers = []
        self.prefixes = []
        for li in self.layer_ids:
            files = expert_files[li]
            E = len(files)
            if sorted(files) != list(range(E)):
                missing = sorted(set(range(max(files) + 1)) - set(files))
                raise GraceInputError(f"MoE layer {li}: expert file(s) {missing} missing", self.tag_dir)
            if isinstance(declared, list) and li < len(declared) and int(declared[li]) != E:
                raise GraceInputError(f"MoE layer {li}: {E} expert files but the checkpoint declares {declared[li]} experts", self.tag_dir)
            prefix, tensors, _ = self._load_expert(li, 0)
            self.prefixes.append(prefix)
            layers.append(MoELayerInfo(prefix, E, {k: TensorSpec.of(t) for k, t in tensors.items()}))
        kept = {k: v for k, v in main.items() if k not in ("module", "optimizer") and jsonable(v)}
        dropped = [k for k in main if k not in kept and k != "module"]
        dropped += [f"expp_rank_{r}_mp_rank_00_optim_states.pt" for r in sorted(ep_ranks)]
        extra = {"tag": self.tag_dir.name, "top_level": kept, "dense_keys": list(main["module"])}
        rel = [str(p.relative_to(self.src)) for p in sorted(self.tag_dir.iterdir()) if p.is_file()]
        if (self.src / "latest").is_file():
            rel.append("latest")
        order = [(li, e) for li in self.layer_ids for e in range(layers[li].num_experts)]
        self.info = SourceInfo(self.format, self.src, max(1, len(ep_ranks)), layers, rel, extra, dropped,
                               [(k, TensorSpec.of(t)) for k, t in main["module"].items()], order)
        # parsed once: iter_dense uses it and releases it
        self._main: tuple[dict[str, torch.Tensor], SpanLocator] | None = (main["module"], main_locator)

    def _load_expert(self, li: int, e: int) -> tuple[str, dict[str, torch.Tensor], SpanLocator]:
        path = self.expert_files[li][e]
        sd, locator = load_torch_file_located(path)
        if not isinstance(sd, dict) or not sd:
            raise GraceInputError("expert file holds no state dict", path)
        prefix, out = None, {}
        for key, t in sd.items():
            m = _EXPERT_KEY.match(key)
            if not m or int(m.group("e")) != e or not isinstance(t, torch.Tensor):
                raise GraceInputError(f"unexpected entry {key!r} in the file of expert {e}", path)
            if prefix not in (None, m.group("prefix")):
                raise GraceInputError(f"mixed key prefixes {prefix!r} and {m.group('prefix')!r}", path)
            prefix = m.group("prefix")
            out[m.group("name")] = t
        assert prefix is not None
        return prefix, out, locator

    def iter_experts(self, spans: bool = False) -> Iterator[tuple[int, int, dict[str, torch.Tensor | FileSpan]]]:
        for li, e in self.info.expert_order:
            prefix, tensors, locator = self._load_expert(li, e)
            if prefix != self.prefixes[li]:
                raise GraceInputError(f"key prefix {prefix!r} differs from expert 0's {self.prefixes[li]!r}", self.expert_files[li][e])
            check_expert(self.info, li, e, tensors, str(self.expert_files[li][e]))
            yield li, e, {k: locator.data(t) for k, t in tensors.items()} if spans else tensors

    def _load_main(self) -> tuple[dict[str, Any], SpanLocator]:
        """The main file (``mp_rank_00_model_states.pt``) and its span locator; its ``module`` a dict of tensors."""
        main, locator = load_torch_file_located(self.tag_dir / MAIN)
        if not isinstance(main, dict) or not isinstance(main.get("module"), dict):
            raise GraceInputError("no 'module' state dict", self.tag_dir / MAIN)
        for key, t in main["module"].items():
            if not isinstance(t, torch.Tensor):
                raise GraceInputError(f"module entry {key!r} is a {type(t).__name__}, not a tensor", self.tag_dir / MAIN)
        return main, locator

    def iter_dense(self, spans: bool = False) -> Iterator[tuple[str, torch.Tensor | FileSpan]]:
        if self._main is not None:
            module, locator = self._main
            self._main = None
        else:
            main, locator = self._load_main()
            module = main["module"]
        for key, _spec in self.info.dense:
            t = module.get(key)
            if not isinstance(t, torch.Tensor):
                raise GraceInputError(f"module entry {key!r} is gone or not a tensor (the file changed while reading)", self.tag_dir / MAIN)
            yield key, locator.data(t) if spans else t

    def iter_blobs(self) -> Iterator[tuple[str, bytes]]:
        return iter(())


def write_deepspeed(out: Path, extra: dict[str, Any], layers: list[MoELayerInfo], ep_size: int,
                    dense: dict[str, torch.Tensor], expert: Any) -> list[Path]:
    """Write the DeepSpeed layout (model states only; expert files do not depend on ``ep_size``)."""
    tag = out / extra.get("tag", "global_step0")
    tag.mkdir(parents=True, exist_ok=True)
    written = []
    main = {"module": {k: dense[k] for k in extra["dense_keys"]}, **extra.get("top_level", {})}
    main["optimizer"] = None
    torch.save(main, tag / MAIN)
    written.append(tag / MAIN)
    for li, layer in enumerate(layers):
        for e in range(layer.num_experts):
            sd = {f"{layer.source_layer}{e}.{name}": t for name, t in expert(li, e).items()}
            path = tag / f"layer_{li}_expert_{e}_mp_rank_00_model_states.pt"
            torch.save(sd, path)
            written.append(path)
    (out / "latest").write_text(tag.name)
    written.append(out / "latest")
    return written
