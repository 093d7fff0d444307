"""Per-rank loading: one rank reads only its own slots of one MoE layer.

:func:`load_rank_slots` returns a :class:`RankSlots`, a mapping ``expert id -> GRACE expert
state`` (names and shapes of :mod:`megatron_grace.experts.mlp`) covering exactly the experts
``plan.gpu_experts[layer][rank]`` places on that rank, so it can be passed as ``weights`` to
``GraceMoELayer.from_full_weights(plan, layer, weights, hidden_size=..., ffn_size=...,
activation=...)``. It reads the manifest, the rank file's header and the byte ranges of that
layer's slots (``pread``), nothing of other ranks' files; ``bytes_read`` counts them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from megatron_grace.checkpoint import manifest as mf
from megatron_grace.checkpoint.convert import expert_geometry, grace_state
from megatron_grace.checkpoint.slots import SlotFiles
from megatron_grace.errors import GraceInputError
from megatron_grace.plan.placement import PlacementPlan


class RankSlots(Mapping[int, Mapping[str, torch.Tensor]]):
    """This rank's experts of one layer as GRACE states.

    Attributes:
        expert_ids: the slots' experts, in slot order.
        activation, hidden_size, ffn_size, dtype: the experts' kind and storage.
        bytes_read: bytes read from the rank's expert file (header + these slots' tensors).
        manifest_bytes: bytes of the manifest read to find and hash-check them.
    """

    def __init__(self, states: dict[int, dict[str, torch.Tensor]], expert_ids: list[int], activation: str, hidden_size: int,
                 ffn_size: int, dtype: torch.dtype, bytes_read: int, manifest_bytes: int) -> None:
        self._states = states
        self.expert_ids = expert_ids
        self.activation, self.hidden_size, self.ffn_size, self.dtype = activation, hidden_size, ffn_size, dtype
        self.bytes_read, self.manifest_bytes = bytes_read, manifest_bytes

    def __getitem__(self, expert: int) -> Mapping[str, torch.Tensor]:
        return self._states[int(expert)]

    def __iter__(self) -> Iterator[int]:
        return iter(self._states)

    def __len__(self) -> int:
        return len(self._states)


def load_rank_slots(patched: str | os.PathLike[str], layer: int, rank: int, plan: PlacementPlan | None = None,
                    activation: str | None = None, verify: bool = True) -> RankSlots:
    """Read rank ``rank``'s slots of MoE layer ``layer`` from a patched checkpoint.

    Args:
        patched: the patched checkpoint directory.
        layer, rank: MoE layer (plan numbering) and GPU / expert-parallel rank.
        plan: the plan the caller serves with; it must place the same experts on this rank.
        activation: the GRACE activation the caller runs (checked against the tensors).
        verify: check each tensor's sha256 against the manifest.
    """
    patched = Path(patched)
    m = mf.read_manifest(patched)
    manifest_bytes = (patched / mf.MANIFEST).stat().st_size
    p = m["plan"]
    if not 0 <= layer < p["num_layers"] or not 0 <= rank < p["num_gpus"]:
        raise GraceInputError(f"layer {layer} / rank {rank} out of range (the patched plan has {p['num_layers']} layers, "
                              f"{p['num_gpus']} GPUs)", patched)
    rows = sorted((r for r in m["slots"] if r["layer"] == layer and r["rank"] == rank), key=lambda r: r["slot"])
    ids = [int(r["expert"]) for r in rows]
    if plan is not None and list(plan.gpu_experts[layer][rank]) != ids:
        raise GraceInputError(f"the patched checkpoint places experts {ids} on rank {rank} at layer {layer}; the plan given "
                              f"places {list(plan.gpu_experts[layer][rank])} (patch again for this plan)", patched)
    info = mf.manifest_layers(m)[layer]
    act, h, f = expert_geometry({k: v.shape for k, v in info.tensors.items()})
    if activation is not None and activation != act:
        raise GraceInputError(f"the checkpoint's experts are {act} (h={h}, f={f}), not {activation}", patched)
    files = SlotFiles(patched, m)
    states = {}
    try:
        for r in rows:
            sha = m["expert_sha256"][layer][r["expert"]] if verify else {}
            raw = {name: files.read(r["file"], d["key"], sha.get(name)) for name, d in r["tensors"].items()}
            states[int(r["expert"])] = grace_state(raw, act)
    finally:
        files.close()
    dtype = next(iter(info.tensors.values())).dtype
    return RankSlots(states, ids, act, h, f, dtype, files.bytes_read, manifest_bytes)
