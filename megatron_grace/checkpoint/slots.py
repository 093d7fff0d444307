"""Reading slot tensors back from a patched checkpoint (exact byte ranges, hashes checked)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from megatron_grace.checkpoint import manifest as mf
from megatron_grace.checkpoint.safetensors_io import Entry, read_header, read_tensor
from megatron_grace.errors import GraceInputError


class SlotFiles:
    """Open rank files of a patched checkpoint lazily; read tensors by key, counting bytes."""

    def __init__(self, dst: Path, manifest: dict[str, Any]) -> None:
        self.dst = Path(dst)
        self.m = manifest
        self._open: dict[str, tuple[int, dict[str, Entry]]] = {}
        self.bytes_read = 0
        self.primary: dict[tuple[int, int], dict[str, Any]] = {}
        for row in manifest["slots"]:
            self.primary.setdefault((row["layer"], row["expert"]), row)

    def _file(self, rel: str) -> tuple[int, dict[str, Entry]]:
        if rel not in self._open:
            path = self.dst / rel
            entries, _, start = read_header(path)
            self.bytes_read += start
            self._open[rel] = (os.open(path, os.O_RDONLY), entries)
        return self._open[rel]

    def entries(self, rel: str) -> dict[str, Entry]:
        """The tensors of one file (its header, read once)."""
        return self._file(rel)[1]

    def read(self, rel: str, key: str, sha256: str | None = None) -> torch.Tensor:
        """One tensor; with ``sha256``, its bytes must hash to it (else GraceInputError)."""
        fd, entries = self._file(rel)
        if key not in entries:
            raise GraceInputError(f"tensor {key} is missing", self.dst / rel)
        t = read_tensor(fd, entries[key])
        self.bytes_read += entries[key].end - entries[key].begin
        if sha256 is not None:
            got = hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"").hexdigest()
            if got != sha256:
                raise GraceInputError(f"tensor {key} does not match the manifest (sha256 differs; corrupt file?)", self.dst / rel)
        return t

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """Every tensor of one expert, from its first slot, hash-checked."""
        row = self.primary.get((layer, expert))
        if row is None:
            raise GraceInputError(f"no slot holds expert {expert} of MoE layer {layer}", self.dst / mf.MANIFEST)
        sha = self.m["expert_sha256"][layer][expert]
        return {name: self.read(row["file"], d["key"], sha[name]) for name, d in row["tensors"].items()}

    def close(self) -> None:
        for fd, _ in self._open.values():
            os.close(fd)
        self._open.clear()
