"""`RoutingTrace`: which experts every token chose, at every MoE layer.

A trace is the raw material of everything downstream (statistics, planning, simulation).
It is stored as a pickle-free ``.npz`` (``format = "grace-trace/1"``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megatron_grace import limits
from megatron_grace._files import PathLike, StreamedArray, load_npz, save_npz_atomic, strict_int
from megatron_grace.errors import GraceInputError

TRACE_FORMAT = "grace-trace/1"
PHASE_PREFILL = 0
PHASE_DECODE = 1
PHASE_NAMES = {PHASE_PREFILL: "prefill", PHASE_DECODE: "decode"}
_VALIDATE_BLOCK = 1 << 22  # ids per validation block (16 MB as int32)


@dataclass(frozen=True, eq=False)
class RoutingTrace:
    """Per-token top-k expert choices of an MoE model.

    Attributes:
        expert_ids: int32 ``[tokens, layers, k]``; expert id chosen in each top-k slot, ``-1``
            where the record is missing (a token not seen at that layer). Within one
            (token, layer) the valid ids are distinct.
        num_experts: experts per MoE layer (ids are in ``[0, num_experts)``).
        gate_weights: optional float32 ``[tokens, layers, k]`` router weights (0 where missing).
        request_ids: int64 ``[tokens]``; which request each token belongs to.
        phase: int8 ``[tokens]``; ``0`` prefill, ``1`` decode.
        model: model name.
        request_names: optional names of the requests, indexed by ``request_ids``.
        source: where the trace came from (file, importer), free text.
    """

    expert_ids: np.ndarray
    num_experts: int
    gate_weights: np.ndarray | None = None
    request_ids: np.ndarray | None = None
    phase: np.ndarray | None = None
    model: str = "unknown"
    request_names: tuple[str, ...] = ()
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ids = np.asarray(self.expert_ids)
        tokens = ids.shape[0] if ids.ndim == 3 else 0
        if self.request_ids is None:
            object.__setattr__(self, "request_ids", np.zeros(tokens, dtype=np.int64))
        if self.phase is None:
            object.__setattr__(self, "phase", np.full(tokens, PHASE_DECODE, dtype=np.int8))
        self.validate()

    # ------------------------------------------------------------------ properties
    @property
    def num_tokens(self) -> int:
        return int(self.expert_ids.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.expert_ids.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.expert_ids.shape[2])

    @property
    def valid(self) -> np.ndarray:
        """bool ``[tokens, layers]``: the (token, layer) records that are present."""
        return (self.expert_ids >= 0).any(axis=2)

    # ------------------------------------------------------------------ validation
    def validate(self, source: PathLike | None = None) -> None:
        """Check shapes, dtypes and ranges; raise GraceInputError naming the problem."""
        src = source if source is not None else (self.source or None)
        ids = self.expert_ids
        if not isinstance(ids, np.ndarray) or ids.ndim != 3:
            raise GraceInputError(f"expert_ids must be a 3-D array [tokens, layers, k], got shape {np.shape(ids)}", src)
        if not np.issubdtype(ids.dtype, np.integer):
            raise GraceInputError(f"expert_ids must be integers, got dtype {ids.dtype}", src)
        if ids.shape[1] < 1 or ids.shape[2] < 1:
            raise GraceInputError(f"expert_ids needs at least one layer and k >= 1, got shape {ids.shape}", src)
        if isinstance(self.num_experts, bool) or not isinstance(self.num_experts, int | np.integer) or int(self.num_experts) < 1:
            raise GraceInputError(f"num_experts must be an integer >= 1, got {self.num_experts!r}", src)
        limits.check_count("experts", int(self.num_experts), f"num_experts {self.num_experts}", src)
        limits.check_count("layers", ids.shape[1], f"expert_ids with {ids.shape[1]} layers", src)
        n = ids.shape[0]
        gw = None
        if self.gate_weights is not None:
            gw = np.asarray(self.gate_weights)
            if gw.shape != ids.shape:
                raise GraceInputError(f"gate_weights shape {gw.shape} does not match expert_ids shape {ids.shape}", src)
            if not np.issubdtype(gw.dtype, np.floating):
                raise GraceInputError(f"gate_weights must be floats, got dtype {gw.dtype}", src)
            gw = np.array(gw, dtype=np.float32)  # our own copy: missing records are zeroed in it below
        out = ids if ids.dtype == np.int32 else np.empty(ids.shape, dtype=np.int32)
        step = max(1, _VALIDATE_BLOCK // (ids.shape[1] * ids.shape[2]))
        for start in range(0, n, step):  # in blocks of tokens: no temporaries of the whole trace's size
            self._validate_block(ids[start:start + step], start, out, gw, src)
        if ids.shape[2] > self.num_experts:  # after the ids' own checks, which name a bad id first
            raise GraceInputError(f"k={ids.shape[2]} is larger than num_experts={self.num_experts}", src)
        object.__setattr__(self, "expert_ids", out)
        if gw is not None:
            object.__setattr__(self, "gate_weights", gw)
        req = np.asarray(self.request_ids)
        if req.shape != (n,) or not np.issubdtype(req.dtype, np.integer):
            raise GraceInputError(f"request_ids must be integers of shape ({n},), got {req.dtype} {req.shape}", src)
        object.__setattr__(self, "request_ids", req.astype(np.int64, copy=False))
        ph = np.asarray(self.phase)
        if ph.shape != (n,) or not np.issubdtype(ph.dtype, np.integer) or (ph.size and not np.isin(ph, (0, 1)).all()):
            raise GraceInputError(f"phase must be 0 (prefill) or 1 (decode) per token, shape ({n},)", src)
        object.__setattr__(self, "phase", ph.astype(np.int8, copy=False))
        if self.request_names and req.size and int(req.max()) >= len(self.request_names):
            raise GraceInputError(f"request id {int(req.max())} has no name ({len(self.request_names)} names)", src)

    def _validate_block(self, ids: np.ndarray, start: int, out: np.ndarray, gw: np.ndarray | None, src: PathLike | None) -> None:
        """Check the tokens ``start:start + len(ids)``, copy them into ``out`` as int32 and zero
        ``gw`` where records are missing. Ids are range-checked in their source dtype before the
        cast (a cast first would wrap 2**32 + 5 to 5)."""
        E, k = self.num_experts, ids.shape[2]
        lo, hi = int(ids.min()), int(ids.max())
        if lo < -1:
            bad = np.argwhere(ids < -1)[0]
            raise GraceInputError(f"negative expert id {int(ids[tuple(bad)])} at token {start + bad[0]}, layer {bad[1]} "
                                  "(-1 is the only missing marker)", src)
        if hi >= E:
            bad = np.argwhere(ids >= E)[0]
            raise GraceInputError(f"expert id {int(ids[tuple(bad)])} out of range [0, {E}) at token {start + bad[0]}, layer {bad[1]}", src)
        block = ids if ids.dtype == np.int32 else ids.astype(np.int32)
        present = block >= 0
        partial = present.any(axis=2) & ~present.all(axis=2)
        if partial.any():
            t, l = np.argwhere(partial)[0]
            raise GraceInputError(f"inconsistent k: token {start + t}, layer {l} has {int(present[t, l].sum())} experts, expected {k}", src)
        if k > 1:
            srt = np.sort(block, axis=2)
            dup = ((srt[:, :, 1:] == srt[:, :, :-1]) & (srt[:, :, 1:] >= 0)).any(axis=2)
            if dup.any():
                t, l = np.argwhere(dup)[0]
                raise GraceInputError(f"token {start + t}, layer {l} chooses the same expert twice: {block[t, l].tolist()}", src)
        if out is not ids:
            out[start:start + len(block)] = block
        if gw is not None:
            g = gw[start:start + len(block)]
            chosen = g[present]
            if not np.isfinite(chosen).all() or (chosen < 0).any():
                raise GraceInputError("gate_weights contain NaN, infinite or negative values for chosen experts", src)
            g[~present] = 0  # missing records carry no weight, whatever the source wrote

    # ------------------------------------------------------------------ slicing
    def select_tokens(self, index: np.ndarray | slice) -> RoutingTrace:
        """A new trace holding only the given tokens (boolean mask, index array or slice)."""
        return RoutingTrace(
            expert_ids=self.expert_ids[index],
            num_experts=self.num_experts,
            gate_weights=None if self.gate_weights is None else self.gate_weights[index],
            request_ids=self.request_ids[index],
            phase=self.phase[index],
            model=self.model,
            request_names=self.request_names,
            source=self.source,
            extra=dict(self.extra),
        )

    def select_layers(self, layers: np.ndarray | slice) -> RoutingTrace:
        """A new trace holding only the given MoE layers (index array or slice), every token kept."""
        return dataclasses.replace(self, expert_ids=self.expert_ids[:, layers],
                                   gate_weights=None if self.gate_weights is None else self.gate_weights[:, layers],
                                   extra=dict(self.extra))

    def split(self, fraction: float = 0.5) -> tuple[RoutingTrace, RoutingTrace]:
        """Split into a first part (``fraction`` of the tokens) and the rest, in token order."""
        cut = int(round(self.num_tokens * fraction))
        return self.select_tokens(slice(0, cut)), self.select_tokens(slice(cut, None))

    def complete_tokens(self) -> RoutingTrace:
        """Only the tokens that have a record at every layer."""
        return self.select_tokens(self.valid.all(axis=1))

    # ------------------------------------------------------------------ I/O
    def save(self, path: PathLike) -> None:
        """Save as a pickle-free ``.npz`` atomically (temp file, verify, rename)."""
        write_trace(path, self.expert_ids, self.num_experts, model=self.model, source=self.source, extra=self.extra,
                    request_names=self.request_names, request_ids=self.request_ids, phase=self.phase,
                    gate_weights=self.gate_weights)

    @staticmethod
    def read(path: PathLike) -> RoutingTrace:
        """Load and validate a trace saved by :meth:`save` (narrow ids on disk are widened block by block)."""
        data = load_npz(path, widen={"expert_ids": np.int32, "gate_weights": np.float32})
        fmt = str(data["format"]) if "format" in data else None
        if fmt != TRACE_FORMAT:
            raise GraceInputError(f"not a routing trace (format {fmt!r}, expected {TRACE_FORMAT!r})", path)
        for key in ("metadata", "expert_ids", "request_ids", "phase"):
            if key not in data:
                raise GraceInputError(f"routing trace lacks the array {key!r}", path)
        try:
            meta = json.loads(str(data["metadata"]))
            num_experts = strict_int(meta["num_experts"], "num_experts")
            top_k = strict_int(meta["top_k"], "top_k")
            extra = dict(meta.get("extra", {}))
            request_names = tuple(str(n) for n in meta.get("request_names", []))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise GraceInputError(f"routing trace has unreadable metadata ({type(exc).__name__}: {str(exc)[:120]})", path) from None
        ids = data["expert_ids"]
        if ids.ndim == 3 and ids.shape[2] != top_k:
            raise GraceInputError(f"inconsistent k: metadata says top_k={top_k}, expert_ids has k={ids.shape[2]}", path)
        try:
            trace = RoutingTrace(
                expert_ids=ids,
                num_experts=num_experts,
                gate_weights=data.get("gate_weights"),
                request_ids=data["request_ids"],
                phase=data["phase"],
                model=str(meta.get("model", "unknown")),
                request_names=request_names,
                source=str(Path(path)),
                extra=extra,
            )
        except GraceInputError as exc:
            raise GraceInputError(exc.problem, path) from None
        return trace

    def __repr__(self) -> str:
        return (
            f"RoutingTrace(model={self.model!r}, tokens={self.num_tokens}, layers={self.num_layers}, "
            f"experts={self.num_experts}, k={self.top_k}, gate_weights={self.gate_weights is not None})"
        )


def ids_disk_dtype(num_experts: int) -> np.dtype:
    """The narrowest signed integer type holding the ids ``-1 .. num_experts - 1`` (int8 up to 128 experts)."""
    for dtype in (np.int8, np.int16):
        if num_experts - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int32)


def write_trace(path: PathLike, expert_ids: np.ndarray | StreamedArray, num_experts: int, *, model: str = "unknown",
                source: str = "", extra: dict[str, Any] | None = None, request_names: tuple[str, ...] = (),
                request_ids: np.ndarray | None = None, phase: np.ndarray | None = None,
                gate_weights: np.ndarray | None = None) -> None:
    """Write a ``grace-trace/1`` file atomically; the one writer of the format.

    ``expert_ids`` is a validated int ``[T, L, k]`` array or a :class:`~megatron_grace._files.StreamedArray`
    of that shape whose blocks (token chunks) hold valid ids (the writer does not check them);
    ids go to disk as :func:`ids_disk_dtype`, cast block by block. ``request_ids`` (int64 ``[T]``)
    and ``phase`` (int8 ``[T]``) default to request 0 and decode. Files below
    :data:`~megatron_grace._files.FULL_VERIFY_BYTES` are read back in full before the rename.
    """
    T, _, k = expert_ids.shape
    meta = {"format": TRACE_FORMAT, "model": model, "num_experts": int(num_experts), "top_k": int(k),
            "request_names": list(request_names), "source": source, "extra": extra or {}}
    small = ids_disk_dtype(int(num_experts))
    arrays: dict[str, np.ndarray | StreamedArray] = {
        "format": np.array(TRACE_FORMAT),
        "metadata": np.array(json.dumps(meta)),
        "expert_ids": expert_ids,
        "request_ids": np.zeros(T, dtype=np.int64) if request_ids is None else request_ids,
        "phase": np.full(T, PHASE_DECODE, dtype=np.int8) if phase is None else phase,
    }
    if gate_weights is not None:
        arrays["gate_weights"] = gate_weights
    save_npz_atomic(path, arrays, verify=RoutingTrace.read, dtypes={"expert_ids": small})
