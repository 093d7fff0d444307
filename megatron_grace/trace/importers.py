"""Importers for real expert-routing data dumped by other tools.

Per-token traces (-> :class:`RoutingTrace`):

* ``vllm-records-jsonl``: one JSON record per (token, layer) as written by a vLLM
  ``select_experts`` hook: ``{dataset, problem_id, layer, token_idx, experts[k], gating_probs[k]}``.
* ``mixtral-npz``: the same data as arrays: ``expert_ids [T, L, k]`` (-1 = missing),
  ``gate_probs [T, L, k]``, ``request [T]``, ``token_idx [T]``.
* ``sglang-jsonl``: simllm "preplay" traces (schema ``simllm-preplay-trace-v1`` / ``-v2``) captured
  under SGLang or HF transformers: a header row (provenance), request rows, routing rows
  ``{request_id, phase, token_index, routing: [{layer_index, expert_ids[k], gate_weights[k]?}]}``
  and a footer row with counts.

Statistics only (-> :class:`ExpertStats`):

* ``qwen-coactivation``: per-layer load ``heat [L, E]`` and thresholded within-layer pairs
  ``[i, j, count, lift]`` (JSON, or the ``.npz`` with ``heat`` and ``pairs_layer_i_j_count_lift``).
* ``switch-load``: ``expert_usage_by_layer[layer][expert] = count`` (top-1).
* ``load-matrix``: a plain ``[layers, experts]`` (or ``[steps, layers, experts]``) expert-load
  matrix as DeepSeek EPLB / SGLang / vLLM dump it (``.npy``, ``.npz``, ``.json``, ``.csv``,
  ``.txt``, ``.pt``).
* ``topk-ids``: a plain integer array of chosen experts, ``[tokens, layers]`` (top-1) or
  ``[tokens, layers, k]``, in the same containers (-> :class:`RoutingTrace`).

Plus our own files (``grace-trace``, ``grace-stats``). :func:`detect_format` finds the format of
a file, refusing files that two formats could read, and :func:`import_any` dispatches on it.
Every size a file claims is checked against :mod:`megatron_grace.limits` before it is allocated.

Every problem with the input raises :class:`GraceInputError` with a one-line message naming the
file (and, for JSONL, the line) and what is wrong.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from megatron_grace import limits
from megatron_grace._files import PathLike, check_input_file, check_npz_members, load_json, load_npy, load_npz, parse_json_text
from megatron_grace._progress import progress as _progress
from megatron_grace.errors import GraceInputError, GraceInputWarning
from megatron_grace.statistics.expert_stats import STATS_FORMAT, ExpertStats
from megatron_grace.trace.routing_trace import PHASE_DECODE, PHASE_PREFILL, TRACE_FORMAT, RoutingTrace

__all__ = [
    "IMPORT_FORMATS",
    "detect_format",
    "import_any",
    "import_load_matrix",
    "import_mixtral_npz",
    "import_qwen_coactivation",
    "import_sglang_jsonl",
    "import_switch_load",
    "import_topk_ids",
    "import_vllm_records_jsonl",
]

_PHASES = {"prefill": PHASE_PREFILL, "decode": PHASE_DECODE}
_QWEN_PAIRS_KEY = "pairs_layer_i_j_count_lift"
# Exceptions numpy / zipfile / zlib / torch raise on truncated or corrupt binary files.
_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile, zlib.error, NotImplementedError,
                RuntimeError, UnicodeDecodeError)


# ====================================================================== small helpers
def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool | np.bool_)


def _isfinite(value: Any) -> bool:
    """``math.isfinite`` that calls an integer too large for a float (10**400) not finite instead of raising."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _check_file(path: PathLike) -> Path:
    """The path as a :class:`Path`; a missing, non-regular (FIFO, device), unreadable or empty file raises."""
    return check_input_file(path)


def _require_zip(path: Path) -> None:
    """An ``.npz`` is a zip archive: anything else is corrupt (or another format under that name)."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head not in (b"PK\x03\x04", b"PK\x05\x06"):
        raise GraceInputError("not an .npz file (no zip signature; corrupt, or another format under this name)", path)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of a pickle-free ``.npz``; any kind of corruption raises GraceInputError."""
    return _read_own(load_npz, ".npz file", path)


_PARSED: dict[tuple[Any, ...], Any] | None = None
"""Files parsed during the current :func:`import_any` call (detection, then the importer), or None outside one."""


@contextmanager
def _parse_once() -> Iterator[None]:
    """Within the block, a file that detection parsed is not parsed again by its importer (:func:`_once`)."""
    global _PARSED
    outer = _PARSED
    _PARSED = {} if outer is None else outer
    try:
        yield
    finally:
        _PARSED = outer


def _once(kind: str, path: Path, parse: Callable[[], Any]) -> Any:
    """``parse()``, or its result from earlier in the same :func:`_parse_once` block for the same unchanged file."""
    if _PARSED is None:
        return parse()
    try:
        st = os.stat(path)
    except OSError:
        return parse()  # it reports the problem
    key = (kind, str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _PARSED:
        _PARSED[key] = parse()
    return _PARSED[key]


def _read_json(path: Path) -> Any:
    return _once("json", path, lambda: load_json(path))


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, parsed_object)`` for each non-blank line of a JSONL file."""
    seen = False
    with open(path, "rb") as fh:
        for lineno, raw in _progress(enumerate(fh, 1), desc=f"reading {path.name}"):  # a bar only after 1 s
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise GraceInputError(f"line {lineno}: not UTF-8 text (corrupt or binary file?)", path) from None
            text = text.strip()
            if not text:
                continue
            try:
                obj = parse_json_text(text)
            except GraceInputError as exc:
                cut = "" if raw.endswith(b"\n") else "; the file ends mid-line (truncated?)"
                raise GraceInputError(f"line {lineno}: {exc.problem}{cut}", path) from None
            seen = True
            yield lineno, obj
    if not seen:
        raise GraceInputError("file holds no JSON records (only blank lines)", path)


def _int_list(value: Any, what: str, where: str, path: Path) -> list[int]:
    if not isinstance(value, list) or not value or not all(_is_int(v) for v in value):
        raise GraceInputError(f"{where}: {what} must be a non-empty list of integers, got {_short(value)}", path)
    return value


def _weight_list(value: Any, k: int, where: str, path: Path) -> list[float]:
    if not isinstance(value, list) or not all(_is_number(v) for v in value):
        raise GraceInputError(f"{where}: gate weights must be a list of numbers, got {_short(value)}", path)
    if len(value) != k:
        raise GraceInputError(f"{where}: {len(value)} gate weights for {k} experts", path)
    if not all(_isfinite(v) and v >= 0 for v in value):
        raise GraceInputError(f"{where}: gate weights must be finite and non-negative, got {value}", path)
    return value


def _check_expert_ids(ids: list[int], k: int, num_experts: int | None, where: str, path: Path) -> None:
    if len(ids) != k:
        raise GraceInputError(f"{where}: inconsistent k: {len(ids)} experts, expected {k}", path)
    for e in ids:
        if e < 0:
            raise GraceInputError(f"{where}: negative expert id {e}", path)
        if num_experts is not None and e >= num_experts:
            raise GraceInputError(f"{where}: expert id {e} out of range [0, {num_experts})", path)
        limits.check_count("experts", e + 1, f"{where}: expert id {e} ({e + 1} experts per layer)", path)
    if len(set(ids)) != len(ids):
        raise GraceInputError(f"{where}: the same expert is chosen twice: {ids}", path)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _source_label(paths: Sequence[Path]) -> str:
    return ", ".join(str(p) for p in paths)


def _first_duplicate(flat: np.ndarray) -> tuple[int, int] | None:
    """Indices (earlier, later) of the first repeated value of ``flat`` in sorted order, or None."""
    if flat.size < 2:
        return None
    order = np.argsort(flat, kind="stable")
    s = flat[order]
    dup = np.flatnonzero(s[1:] == s[:-1])
    if not dup.size:
        return None
    return int(order[dup[0]]), int(order[dup[0] + 1])


def _check_matrix_values(name: str, values: np.ndarray, path: Path, axes: tuple[str, ...] = ("layer", "expert")) -> None:
    """Finite, non-negative numbers; the first bad entry is named by its index."""
    bad = ~np.isfinite(values)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        where = ", ".join(f"{a} {i}" for a, i in zip(axes, idx, strict=False))
        raise GraceInputError(f"{name} contains NaN or infinite values ({where}: {values[idx]})", path)
    neg = values < 0
    if neg.any():
        idx = tuple(int(i) for i in np.argwhere(neg)[0])
        where = ", ".join(f"{a} {i}" for a, i in zip(axes, idx, strict=False))
        raise GraceInputError(f"{name} contains a negative count ({where}: {values[idx]:g})", path)


def _resolve_num_experts(max_id: int, num_experts: int | None, path: PathLike) -> int:
    if num_experts is None:
        return limits.check_count("experts", max_id + 1, f"expert id {max_id} ({max_id + 1} experts per layer)", path)
    if not _is_int(num_experts) or num_experts < 1:
        raise GraceInputError(f"num_experts must be a positive integer, got {num_experts!r}", path)
    limits.check_count("experts", int(num_experts), f"num_experts {num_experts}", path)
    if max_id >= num_experts:
        raise GraceInputError(f"expert id {max_id} out of range [0, {num_experts})", path)
    return int(num_experts)


def _resolve_top_k(top_k: Any, what: str, path: PathLike) -> int:
    if not _is_int(top_k) or int(top_k) < 1:
        raise GraceInputError(f"{what} must be a positive integer, got {top_k!r}", path)
    return limits.check_count("top_k", int(top_k), f"{what} {top_k}", path)


def _check_layer(layer: int, where: str, path: PathLike) -> None:
    """A layer index read from a file must leave the layer count under the limit."""
    limits.check_count("layers", layer + 1, f"{where}: layer {layer} ({layer + 1} layers)", path)


def _check_token_index(tok: int, where: str, path: PathLike) -> None:
    limits.check_count("tokens", tok + 1, f"{where}: token index {tok}", path)


# ====================================================================== vLLM per-record JSONL
def import_vllm_records_jsonl(
    paths: PathLike | Sequence[PathLike],
    num_experts: int | None = None,
    num_layers: int | None = None,
    model: str = "unknown",
) -> RoutingTrace:
    """Import per-(token, layer) routing records from one or more JSONL files.

    Each line is ``{"dataset", "problem_id", "layer", "token_idx", "experts": [k ids],
    "gating_probs": [k floats]}`` (``gating_probs`` optional, but then absent everywhere). A
    request is a ``(dataset, problem_id)`` pair, named ``f"{dataset}_{problem_id}"``; requests
    are ordered by dataset then problem id, tokens within a request by ``token_idx``. Every
    ``(request, token_idx)`` seen at any layer becomes one token row; layers it was not seen at
    hold ``-1``. All tokens are decode tokens.

    Args:
        paths: a file or a sequence of files (a request may span files).
        num_experts: experts per layer; default ``max id + 1`` (give it: Mixtral has 8).
        num_layers: MoE layers; default ``max layer + 1``.
        model: model name to record.

    Returns:
        A trace with ``expert_ids`` int32 ``[tokens, layers, k]`` and ``gate_weights`` float32
        ``[tokens, layers, k]`` (0 where missing) when the records carry gating probabilities.
    """
    if isinstance(paths, str | Path) or not isinstance(paths, Sequence):
        paths = [paths]
    files = [_check_file(p) for p in paths]
    if not files:
        raise GraceInputError("no input files given")
    if num_experts is not None:
        _resolve_num_experts(-1, num_experts, files[0])
    if num_layers is not None and (not _is_int(num_layers) or num_layers < 1):
        raise GraceInputError(f"num_layers must be a positive integer, got {num_layers!r}", files[0])
    if num_layers is not None:
        limits.check_count("layers", int(num_layers), f"num_layers {num_layers}", files[0])

    req_index: dict[tuple[str, Any], int] = {}
    rec_req: list[int] = []
    rec_layer: list[int] = []
    rec_tok: list[int] = []
    rec_ids: list[list[int]] = []
    rec_gw: list[list[float]] = []
    rec_file: list[int] = []
    rec_line: list[int] = []
    k: int | None = None
    k_where = ""
    has_gw: bool | None = None
    for fi, path in enumerate(files):
        for lineno, rec in _iter_jsonl(path):
            where = f"line {lineno}"
            if not isinstance(rec, dict):
                raise GraceInputError(f"{where}: expected a JSON object, got {type(rec).__name__}", path)
            missing = [key for key in ("dataset", "problem_id", "layer", "token_idx", "experts") if key not in rec]
            if missing:
                raise GraceInputError(f"{where}: record lacks {', '.join(map(repr, missing))}", path)
            dataset, pid, layer, tok = rec["dataset"], rec["problem_id"], rec["layer"], rec["token_idx"]
            if not isinstance(dataset, str):
                raise GraceInputError(f"{where}: dataset must be a string, got {_short(dataset)}", path)
            if not (_is_int(pid) or isinstance(pid, str)):
                raise GraceInputError(f"{where}: problem_id must be an integer or a string, got {_short(pid)}", path)
            if not _is_int(layer) or layer < 0:
                raise GraceInputError(f"{where}: layer must be a non-negative integer, got {_short(layer)}", path)
            if num_layers is not None and layer >= num_layers:
                raise GraceInputError(f"{where}: layer {layer} out of range [0, {num_layers})", path)
            _check_layer(layer, where, path)
            if not _is_int(tok) or tok < 0:
                raise GraceInputError(f"{where}: token_idx must be a non-negative integer, got {_short(tok)}", path)
            _check_token_index(tok, where, path)
            ids = _int_list(rec["experts"], "experts", where, path)
            if k is None:
                k, k_where = len(ids), f"{path}:{lineno}"
            elif len(ids) != k:
                raise GraceInputError(f"{where}: inconsistent k: {len(ids)} experts, expected {k} (as at {k_where})", path)
            _check_expert_ids(ids, k, num_experts, where, path)
            gw_here = "gating_probs" in rec
            if has_gw is None:
                has_gw = gw_here
            elif gw_here != has_gw:
                raise GraceInputError(f"{where}: gating_probs {'present' if gw_here else 'missing'} here but not in the records before", path)
            if gw_here:
                rec_gw.append(_weight_list(rec["gating_probs"], k, where, path))
            key = (dataset, pid)
            rec_req.append(req_index.setdefault(key, len(req_index)))
            rec_layer.append(layer)
            rec_tok.append(tok)
            rec_ids.append(ids)
            rec_file.append(fi)
            rec_line.append(lineno)
    assert k is not None

    # requests sorted by (dataset, problem_id); integer problem ids numerically
    keys = list(req_index)
    ordered = sorted(range(len(keys)), key=lambda i: (keys[i][0], (0, keys[i][1], "") if _is_int(keys[i][1]) else (1, 0, keys[i][1])))
    rank = np.empty(len(keys), dtype=np.int64)
    rank[ordered] = np.arange(len(keys))
    names = tuple(f"{keys[i][0]}_{keys[i][1]}" for i in ordered)

    req = rank[np.asarray(rec_req, dtype=np.int64)]
    layer_a = np.asarray(rec_layer, dtype=np.int64)
    tok_a = np.asarray(rec_tok, dtype=np.int64)
    ids_a = np.asarray(rec_ids, dtype=np.int64)  # [N, k]
    L = int(num_layers) if num_layers is not None else int(layer_a.max()) + 1
    E = _resolve_num_experts(int(ids_a.max()), num_experts, files[0])

    tok_key = req * (int(tok_a.max()) + 1) + tok_a
    uniq, row = np.unique(tok_key, return_inverse=True)  # token rows sorted by (request, token_idx)
    dup = _first_duplicate(row * L + layer_a)
    if dup is not None:
        a, b = dup
        first, second = min(a, b), max(a, b)
        other = f"line {rec_line[first]}" if rec_file[first] == rec_file[second] else f"{files[rec_file[first]]} line {rec_line[first]}"
        raise GraceInputError(
            f"line {rec_line[second]}: duplicate record for request {names[req[second]]}, token {tok_a[second]}, "
            f"layer {layer_a[second]} (also at {other})",
            files[rec_file[second]],
        )
    T = uniq.size
    limits.check_shape((T, L, k), np.int32, f"a trace of {T} tokens x {L} layers x top-{k}", label := _source_label(files))
    expert_ids = np.full((T, L, k), -1, dtype=np.int32)
    expert_ids[row, layer_a] = ids_a
    gate = None
    if has_gw:
        gate = np.zeros((T, L, k), dtype=np.float32)
        gate[row, layer_a] = np.asarray(rec_gw, dtype=np.float64)
    request_ids = np.empty(T, dtype=np.int64)
    request_ids[row] = req
    if E < k:
        raise GraceInputError(f"k={k} experts per token but only {E} distinct expert ids; pass num_experts", label)
    return RoutingTrace(
        expert_ids=expert_ids,
        num_experts=E,
        gate_weights=gate,
        request_ids=request_ids,
        phase=np.full(T, PHASE_DECODE, dtype=np.int8),
        model=model,
        request_names=names,
        source=label,
        extra={"importer": "vllm-records-jsonl"},
    )


# ====================================================================== Mixtral npz
def import_mixtral_npz(path: PathLike, num_experts: int | None = None, model: str = "mixtral-8x7b") -> RoutingTrace:
    """Import the array form of per-token routing (e.g. ``mixtral8x7b_fp8_decode_routing.npz``).

    Arrays: ``expert_ids`` int ``[T, L, k]`` (-1 = missing), optional ``gate_probs`` float
    ``[T, L, k]`` (NaN where missing; stored as 0), optional ``request`` ``[T]`` (names or
    integer ids; requests numbered in order of first appearance), optional ``token_idx`` and
    ``complete`` (ignored). All tokens are decode tokens.

    Args:
        path: the ``.npz`` file.
        num_experts: experts per layer; default ``max id + 1``.
        model: model name to record.
    """
    path = _check_file(path)
    data = _read_npz(path)
    if "expert_ids" not in data:
        raise GraceInputError(f"no 'expert_ids' array (arrays: {', '.join(sorted(data)) or 'none'})", path)
    ids = data["expert_ids"]
    E = _checked_ids(ids, "expert_ids", num_experts, path)
    T = ids.shape[0]
    missing = ids < 0
    gate = None
    if "gate_probs" in data:
        g = data["gate_probs"]
        if g.shape != ids.shape or not np.issubdtype(g.dtype, np.floating):
            raise GraceInputError(f"gate_probs must be floats of shape {ids.shape}, got {g.dtype} {g.shape}", path)
        present = g[~missing]
        if not np.isfinite(present).all() or (present < 0).any():
            raise GraceInputError("gate_probs has NaN, infinite or negative values where an expert is recorded", path)
        gate = np.where(missing, 0.0, g).astype(np.float32)
    names: tuple[str, ...] = ()
    request_ids = np.zeros(T, dtype=np.int64)
    if "request" in data:
        req = data["request"]
        if req.shape != (T,):
            raise GraceInputError(f"request must have one entry per token ({T}), got shape {req.shape}", path)
        if req.dtype.kind in "US":
            uniq, first, inv = np.unique(req, return_index=True, return_inverse=True)
            order = np.argsort(first, kind="stable")  # number requests by first appearance
            rank = np.empty(uniq.size, dtype=np.int64)
            rank[order] = np.arange(uniq.size)
            request_ids = rank[inv.reshape(-1)]
            names = tuple(str(uniq[i]) for i in order)
        elif np.issubdtype(req.dtype, np.integer):
            if req.size and req.min() < 0:
                raise GraceInputError("request ids must be non-negative", path)
            request_ids = req.astype(np.int64)
        else:
            raise GraceInputError(f"request must hold names or integer ids, got dtype {req.dtype}", path)
    return RoutingTrace(
        expert_ids=ids,
        num_experts=E,
        gate_weights=gate,
        request_ids=request_ids,
        phase=np.full(T, PHASE_DECODE, dtype=np.int8),
        model=model,
        request_names=names,
        source=str(path),
        extra={"importer": "mixtral-npz"},
    )


def _checked_ids(ids: np.ndarray, what: str, num_experts: int | None, path: Path) -> int:
    """The number of experts, after the shape, dtype and size checks of ``ids``; defaults to ``max id + 1``.

    ``ids`` is an integer array ``[tokens, layers, k]`` with ``-1`` for a missing record. The ids'
    range and the int32 cast are left to :meth:`RoutingTrace.validate` (checked in the source
    dtype, block by block: an id of 2**32 + 5 does not wrap to 5).
    """
    if ids.ndim != 3 or not np.issubdtype(ids.dtype, np.integer):
        raise GraceInputError(f"{what} must be an integer array [tokens, layers, k], got {ids.dtype} {ids.shape}", path)
    if ids.size == 0:
        raise GraceInputError(f"{what} is empty, shape {ids.shape}", path)
    T, L, k = ids.shape
    limits.check_count("tokens", T, f"{what} with {T} tokens", path)
    limits.check_count("layers", L, f"{what} with {L} layers", path)
    limits.check_count("top_k", k, f"{what} with k = {k}", path)
    return _resolve_num_experts(int(ids.max()) if num_experts is None else -1, num_experts, path)


# ====================================================================== plain top-k id arrays
def import_topk_ids(path: PathLike, num_experts: int | None = None, model: str = "unknown") -> RoutingTrace:
    """Import a plain integer array of chosen experts: ``[tokens, layers]`` (top-1) or ``[tokens, layers, k]``.

    The same containers as :func:`import_load_matrix` (``.npy``, ``.npz`` with one array,
    ``.json`` list of lists, ``.csv`` / ``.txt``, ``.pt``); ``-1`` marks a missing record. Auto
    detection never picks this format for a 2-D array (it could equally be a load matrix):
    pass ``--format topk-ids``.

    Args:
        path: the file.
        num_experts: experts per layer; default ``max id + 1``.
        model: model name to record.

    Returns:
        A trace with int32 ``expert_ids`` ``[tokens, layers, k]``, every token in request 0, decode.
    """
    path = _check_file(path)
    arr, _file_k, _named = _read_plain_array(path, "expert ids")
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            raise GraceInputError(f"expert ids must be integers, got {arr[idx]!r} at index {idx}", path)
        if arr.size and (arr.max() >= 2**31 or arr.min() < -1):
            raise GraceInputError(f"expert id {arr.max() if arr.max() >= 2**31 else arr.min():g} out of range", path)
        arr = arr.astype(np.int64)
    elif arr.dtype.kind not in "iu":
        raise GraceInputError(f"expert ids must be integers, got dtype {arr.dtype}", path)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    E = _checked_ids(arr, "expert ids", num_experts, path)
    try:
        return RoutingTrace(expert_ids=arr, num_experts=E, model=model, source=str(path), extra={"importer": "topk-ids"})
    except GraceInputError as exc:
        raise GraceInputError(exc.problem, path) from None


# ====================================================================== simllm / SGLang JSONL
def import_sglang_jsonl(path: PathLike, num_experts: int | None = None, model: str | None = None) -> RoutingTrace:
    """Import a simllm preplay trace (SGLang ``observed-dispatch`` or transformers ``forward-token`` rows).

    Supported: schema ``simllm-preplay-trace-v1`` (rows ``forward-token``, with ``gate_weights``)
    and ``-v2`` (rows ``observed-dispatch``, ids only, plus ``kv-event`` rows, which are ignored).
    The header's provenance gives ``expert_count``, ``top_k``, ``model_id`` and
    ``moe_layer_indices`` (layer ``moe_layer_indices[i]`` becomes trace layer ``i``). A routing
    row is one token (``token_index`` int, ``routing[].expert_ids`` ``[k]``) or several
    (``token_index`` a list of n ints or the first index, ``routing[].expert_ids`` ``[n][k]``).
    ``token_index`` counts within (request, phase). Tokens are ordered by request (first
    appearance), prefill before decode, then token index. The footer's per-phase counts are
    checked against the rows (a file without its footer is reported as truncated).

    Args:
        path: the ``.jsonl`` file.
        num_experts: experts per layer, if the header lacks ``expert_count``.
        model: model name; default the header's ``model_id``.

    Returns:
        A trace ``[tokens, len(moe_layer_indices), top_k]``; ``gate_weights`` only when every
        record carries them.
    """
    path = _check_file(path)
    footer: dict[str, Any] | None = None
    footer_line = 0
    schema = ""
    k: int | None = None
    layer_pos: dict[int, int] | None = None
    requests: dict[str, int] = {}
    request_rows = 0
    # one entry per (token, layer) record
    r_req: list[int] = []
    r_phase: list[int] = []
    r_tok: list[int] = []
    r_layer: list[int] = []
    r_line: list[int] = []
    r_ids: list[list[int]] = []
    r_gw: list[list[float]] = []
    has_gw: bool | None = None
    counters: dict[tuple[int, int], int] = {}  # next token index per (request, phase) when rows omit it
    first = True
    for lineno, row in _iter_jsonl(path):
        where = f"line {lineno}"
        if not isinstance(row, dict):
            raise GraceInputError(f"{where}: expected a JSON object, got {type(row).__name__}", path)
        row_type = row.get("row_type")
        if row_type == "header":
            if not first:
                raise GraceInputError(f"{where}: header row after the first row", path)
            schema = str(row.get("schema", ""))
            prov = row.get("provenance", {})
            if not isinstance(prov, dict):
                raise GraceInputError(f"{where}: header provenance must be an object", path)
            if "expert_count" in prov:
                ec = prov["expert_count"]
                if not _is_int(ec) or ec < 1:
                    raise GraceInputError(f"{where}: expert_count must be a positive integer, got {_short(ec)}", path)
                if num_experts is not None and num_experts != ec:
                    raise GraceInputError(f"num_experts={num_experts} contradicts the header's expert_count={ec}", path)
                num_experts = limits.check_count("experts", int(ec), f"{where}: expert_count {ec}", path)
            if "top_k" in prov:
                tk = prov["top_k"]
                if not _is_int(tk) or tk < 1:
                    raise GraceInputError(f"{where}: top_k must be a positive integer, got {_short(tk)}", path)
                k = limits.check_count("top_k", int(tk), f"{where}: top_k {tk}", path)
            if "moe_layer_indices" in prov:
                mli = prov["moe_layer_indices"]
                if not isinstance(mli, list) or not mli or not all(_is_int(x) and x >= 0 for x in mli) or len(set(mli)) != len(mli):
                    raise GraceInputError(f"{where}: moe_layer_indices must be distinct non-negative integers, got {_short(mli)}", path)
                _check_layer(max(mli), f"{where}: moe_layer_indices", path)
                layer_pos = {int(x): i for i, x in enumerate(mli)}
            if model is None and isinstance(prov.get("model_id"), str):
                model = prov["model_id"]
            first = False
            continue
        first = False
        if footer is not None:
            raise GraceInputError(f"{where}: rows after the footer row (line {footer_line})", path)
        if row_type == "footer":
            footer, footer_line = row, lineno
            continue
        if row_type == "request":
            rid = row.get("request_id")
            if not (isinstance(rid, str) or _is_int(rid)):
                raise GraceInputError(f"{where}: request row lacks a string request_id", path)
            requests.setdefault(str(rid), len(requests))
            request_rows += 1
            continue
        if "routing" not in row:
            continue  # kv-event and other row types carry no routing
        # ------------------------------------------------------------ a routing row
        rid = row.get("request_id")
        if not (isinstance(rid, str) or _is_int(rid)):
            raise GraceInputError(f"{where}: routing row lacks a request_id", path)
        req = requests.setdefault(str(rid), len(requests))
        phase_name = row.get("phase")
        if phase_name not in _PHASES:
            raise GraceInputError(f"{where}: phase must be 'prefill' or 'decode', got {_short(phase_name)}", path)
        phase = _PHASES[phase_name]
        routing = row["routing"]
        if not isinstance(routing, list) or not routing or not all(isinstance(e, dict) for e in routing):
            raise GraceInputError(f"{where}: routing must be a non-empty list of objects", path)
        first_ids = routing[0].get("expert_ids")
        multi = isinstance(first_ids, list) and bool(first_ids) and isinstance(first_ids[0], list)
        n = len(first_ids) if multi else 1
        tix = row.get("token_index")
        if tix is None:
            start = counters.get((req, phase), 0)
            tokens = list(range(start, start + n))
        elif _is_int(tix):
            tokens = list(range(tix, tix + n))
        elif isinstance(tix, list) and len(tix) == n and all(_is_int(t) for t in tix):
            tokens = list(tix)
        else:
            raise GraceInputError(f"{where}: token_index must be an integer or a list of {n} integers, got {_short(tix)}", path)
        if min(tokens) < 0:
            raise GraceInputError(f"{where}: negative token_index {min(tokens)}", path)
        _check_token_index(max(tokens), where, path)
        counters[(req, phase)] = max(tokens) + 1
        for entry in routing:
            li = entry.get("layer_index")
            if not _is_int(li) or li < 0:
                raise GraceInputError(f"{where}: layer_index must be a non-negative integer, got {_short(li)}", path)
            if layer_pos is not None and li not in layer_pos:
                raise GraceInputError(f"{where}: layer_index {li} is not one of the header's moe_layer_indices", path)
            _check_layer(li, where, path)
            if "expert_ids" not in entry:
                raise GraceInputError(f"{where}: layer {li} lacks expert_ids", path)
            per_tok = entry["expert_ids"] if multi else [entry["expert_ids"]]
            gw_here = "gate_weights" in entry
            if has_gw is None:
                has_gw = gw_here
            elif gw_here != has_gw:
                raise GraceInputError(f"{where}: gate_weights {'present' if gw_here else 'missing'} at layer {li}, unlike the records before", path)
            per_gw = (entry["gate_weights"] if multi else [entry["gate_weights"]]) if gw_here else None
            if not isinstance(per_tok, list) or len(per_tok) != n or (per_gw is not None and (not isinstance(per_gw, list) or len(per_gw) != n)):
                raise GraceInputError(f"{where}: layer {li} must give expert ids (and gate weights) for {n} tokens", path)
            for j, t in enumerate(tokens):
                ids = _int_list(per_tok[j], "expert_ids", f"{where}: layer {li}", path)
                if k is None:
                    k = len(ids)
                _check_expert_ids(ids, k, num_experts, f"{where}: layer {li}", path)
                if per_gw is not None:
                    r_gw.append(_weight_list(per_gw[j], k, f"{where}: layer {li}", path))
                r_req.append(req)
                r_phase.append(phase)
                r_tok.append(t)
                r_layer.append(li)
                r_line.append(lineno)
                r_ids.append(ids)
    if not r_ids:
        raise GraceInputError("no routing rows (rows with a 'routing' list)", path)
    assert k is not None
    if schema.startswith("simllm-preplay-trace") and footer is None:
        raise GraceInputError(f"no footer row after line {r_line[-1]}: the file is truncated", path)

    req_a = np.asarray(r_req, dtype=np.int64)
    phase_a = np.asarray(r_phase, dtype=np.int64)
    tok_a = np.asarray(r_tok, dtype=np.int64)
    raw_layer = np.asarray(r_layer, dtype=np.int64)
    if layer_pos is None:
        uniq_layers = np.unique(raw_layer)
        layer_pos = {int(x): i for i, x in enumerate(uniq_layers)}
        layer_a = np.searchsorted(uniq_layers, raw_layer)
    else:
        lut = np.full(max(layer_pos) + 1, -1, dtype=np.int64)
        lut[list(layer_pos)] = list(layer_pos.values())
        layer_a = lut[raw_layer]
    L = len(layer_pos)
    ids_a = np.asarray(r_ids, dtype=np.int64)
    E = _resolve_num_experts(int(ids_a.max()), num_experts, path)

    tok_key = (req_a * 2 + phase_a) * (int(tok_a.max()) + 1) + tok_a  # (request, phase, token_index)
    uniq, row_of = np.unique(tok_key, return_inverse=True)
    dup = _first_duplicate(row_of * L + layer_a)
    if dup is not None:
        a, b = sorted(dup)
        raise GraceInputError(
            f"line {r_line[b]}: duplicate routing for request {list(requests)[req_a[b]]}, {('prefill', 'decode')[phase_a[b]]} "
            f"token {tok_a[b]}, layer {raw_layer[b]} (also at line {r_line[a]})", path)
    T = uniq.size
    limits.check_shape((T, L, k), np.int32, f"a trace of {T} tokens x {L} layers x top-{k}", path)
    expert_ids = np.full((T, L, k), -1, dtype=np.int32)
    expert_ids[row_of, layer_a] = ids_a
    gate = None
    if has_gw:
        gate = np.zeros((T, L, k), dtype=np.float32)
        gate[row_of, layer_a] = np.asarray(r_gw, dtype=np.float64)
    request_ids = np.empty(T, dtype=np.int64)
    request_ids[row_of] = req_a
    phase_t = np.empty(T, dtype=np.int8)
    phase_t[row_of] = phase_a

    if footer is not None:
        _check_sglang_footer(footer, footer_line, phase_t, request_rows, path)
    if E < k:
        raise GraceInputError(f"k={k} experts per token but only {E} distinct expert ids; pass num_experts", path)
    return RoutingTrace(
        expert_ids=expert_ids,
        num_experts=E,
        gate_weights=gate,
        request_ids=request_ids,
        phase=phase_t,
        model=model or "unknown",
        request_names=tuple(requests),
        source=str(path),
        extra={"importer": "sglang-jsonl", "schema": schema, "moe_layer_indices": sorted(layer_pos, key=layer_pos.get)},
    )


def _check_sglang_footer(footer: dict[str, Any], lineno: int, phase: np.ndarray, request_rows: int, path: Path) -> None:
    """Compare the footer's counts with what the rows hold (catches truncated or edited files)."""
    for key, value in footer.items():
        if not key.endswith("_count") or not _is_int(value):
            continue
        if key.startswith("prefill_") and ("dispatch" in key or "token" in key):
            have, what = int((phase == PHASE_PREFILL).sum()), "prefill tokens"
        elif key.startswith("decode_") and ("dispatch" in key or "token" in key):
            have, what = int((phase == PHASE_DECODE).sum()), "decode tokens"
        elif key == "request_count" and request_rows:
            have, what = request_rows, "request rows"
        else:
            continue
        if have != value:
            raise GraceInputError(f"line {lineno}: footer says {key}={value} but the file holds {have} {what} (truncated or edited?)", path)


# ====================================================================== Qwen co-activation
def import_qwen_coactivation(path: PathLike, top_k: int | None = None, model: str | None = None) -> ExpertStats:
    """Import per-layer load and thresholded co-activation pairs (mbolt / colibri format).

    Two layouts of the same data:

    * JSON: ``{model, k, n_decode_tokens, layers: [{layer, heat[E], pairs: [[i, j, count, lift]]}]}``;
      tokens per layer = ``n_decode_tokens``.
    * ``.npz``: ``heat`` int ``[L, E]`` and ``pairs_layer_i_j_count_lift`` float ``[N, 5]``;
      it does not record k: ``top_k`` defaults to 8 only for the Qwen3-30B-A3B shape
      ``[48, 128]``, and tokens per layer = ``heat.sum(1) / top_k``.

    Returns:
        ExpertStats with ``load = heat`` ``[L, E]``; ``coactivation`` ``[L, E, E]`` holding each
        listed pair's count at (i, j) and (j, i); ``coactivation_observed`` True exactly there
        (the pairs are thresholded: count >= 5, lift >= 1.5, top 2000 per layer); no transitions.
    """
    path = _check_file(path)
    if _sniff(path) == "npz":
        data = _read_npz(path)
        lacking = [key for key in ("heat", _QWEN_PAIRS_KEY) if key not in data]
        if lacking:
            raise GraceInputError(f"lacks the arrays {', '.join(map(repr, lacking))} (arrays: {', '.join(sorted(data))})", path)
        heat, pairs = data["heat"], data[_QWEN_PAIRS_KEY]
        _check_qwen_arrays(heat, pairs, path)
        if top_k is None:
            if heat.shape != (48, 128):
                raise GraceInputError(f"this .npz does not record top_k and its shape {heat.shape} is not Qwen3-30B-A3B's; pass top_k", path)
            top_k = 8
        k = _resolve_top_k(top_k, "top_k", path)
        tokens = _tokens_from_load(heat, k, path)
        return _qwen_stats(heat, pairs, tokens, k, model or "qwen3-30b-a3b", path,
                           notes=(f"tokens per layer derived as heat.sum(1) / top_k ({k})",))

    doc = _read_json(path)
    if not isinstance(doc, dict):
        raise GraceInputError(f"expected a JSON object with 'layers', got {type(doc).__name__}", path)
    lacking = [key for key in ("layers",) if key not in doc]
    if "k" not in doc and top_k is None:
        lacking.append("k")
    if lacking:
        raise GraceInputError(f"lacks the keys {', '.join(map(repr, lacking))}" + (" (or pass top_k)" if "k" in lacking else ""), path)
    k = _resolve_top_k(doc["k"], "k", path) if "k" in doc else _resolve_top_k(top_k, "top_k", path)
    if top_k is not None and _resolve_top_k(top_k, "top_k", path) != k:
        raise GraceInputError(f"top_k={top_k} contradicts the file's k={k}", path)
    n_tok = doc.get("n_decode_tokens")
    if n_tok is not None and (not _is_number(n_tok) or not _isfinite(n_tok) or n_tok < 0):
        raise GraceInputError(f"n_decode_tokens must be a non-negative number, got {_short(n_tok)}", path)
    layers = doc["layers"]
    if not isinstance(layers, list) or not layers:
        raise GraceInputError("'layers' must be a non-empty list", path)
    L = len(layers)
    if "n_layers" in doc and doc["n_layers"] != L:
        raise GraceInputError(f"n_layers={doc['n_layers']} but 'layers' holds {L} entries", path)
    heat_rows: list[Any] = [None] * L
    pair_blocks: list[np.ndarray] = []
    for pos, entry in enumerate(layers):
        if not isinstance(entry, dict) or "heat" not in entry or "pairs" not in entry:
            raise GraceInputError(f"layers[{pos}] must be an object with 'heat' and 'pairs'", path)
        lid = entry.get("layer", pos)
        if not _is_int(lid) or not 0 <= lid < L:
            raise GraceInputError(f"layers[{pos}]: layer {_short(lid)} out of range [0, {L})", path)
        if heat_rows[lid] is not None:
            raise GraceInputError(f"layers[{pos}]: layer {lid} listed twice", path)
        heat_rows[lid] = entry["heat"]
        pr = entry["pairs"]
        if not isinstance(pr, list):
            raise GraceInputError(f"layer {lid}: pairs must be a list of [i, j, count, lift]", path)
        if pr:
            arr = _numeric_array(pr, f"layer {lid}: pairs", path)
            if arr.ndim != 2 or arr.shape[1] < 3:
                raise GraceInputError(f"layer {lid}: pairs must be rows [i, j, count, lift], got shape {arr.shape}", path)
            block = np.zeros((arr.shape[0], 5))
            block[:, 0] = lid
            block[:, 1:1 + min(arr.shape[1], 4)] = arr[:, :4]
            pair_blocks.append(block)
    widths = {len(h) if isinstance(h, list) else -1 for h in heat_rows}
    if len(widths) != 1 or -1 in widths:
        raise GraceInputError(f"every layer's heat must be a list of the same length, got lengths {sorted(widths)}", path)
    heat = _numeric_array(heat_rows, "heat", path)
    if "n_expert_per_layer" in doc and doc["n_expert_per_layer"] != heat.shape[1]:
        raise GraceInputError(f"n_expert_per_layer={doc['n_expert_per_layer']} but heat has {heat.shape[1]} experts", path)
    pairs = np.concatenate(pair_blocks) if pair_blocks else np.zeros((0, 5))
    _check_qwen_arrays(heat, pairs, path)
    notes: tuple[str, ...] = ()
    if n_tok is not None:
        tokens = np.full(L, float(n_tok))
    else:
        tokens = _tokens_from_load(heat, k, path)
        notes = (f"n_decode_tokens absent: tokens per layer derived as heat.sum(1) / k ({k})",)
    if "k" not in doc:
        notes += (f"k absent: top_k={k} as given",)
    name = model or (doc["model"] if isinstance(doc.get("model"), str) else "qwen3-30b-a3b")
    return _qwen_stats(heat, pairs, tokens, k, name, path, notes=notes)


def _tokens_from_load(load: np.ndarray, k: int, path: Path) -> np.ndarray:
    """float64 ``[L]`` tokens per layer = ``load.sum(1) / k``; a sum that is not a multiple of k raises."""
    sums = load.sum(axis=1).astype(np.float64)
    tokens = sums / k
    bad = np.flatnonzero(np.abs(tokens - np.round(tokens)) > 1e-6)
    if bad.size:
        raise GraceInputError(f"layer {bad[0]}: load sums to {sums[bad[0]]:g}, not a multiple of top_k={k} (wrong top_k?)", path)
    return tokens


def _numeric_array(value: Any, what: str, path: Path) -> np.ndarray:
    """A float64 array from nested lists of numbers (no strings, booleans or ragged rows)."""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError):
        raise GraceInputError(f"{what} must be a rectangular array of numbers (ragged rows?)", path) from None
    if arr.dtype == object:
        raise GraceInputError(f"{what} must hold numbers only (an integer too large for 64 bits, or a non-number?)", path)
    if arr.dtype.kind not in "iuf":
        raise GraceInputError(f"{what} must hold numbers only, got {arr.dtype.name} values", path)
    return arr.astype(np.float64)


def _check_qwen_arrays(heat: np.ndarray, pairs: np.ndarray, path: Path) -> None:
    if heat.ndim != 2 or heat.shape[0] < 1 or heat.shape[1] < 1 or heat.dtype.kind not in "iuf":
        raise GraceInputError(f"heat must be a numeric [layers, experts] array, got {heat.dtype} {heat.shape}", path)
    limits.check_count("layers", heat.shape[0], f"heat with {heat.shape[0]} layers", path)
    limits.check_count("experts", heat.shape[1], f"heat with {heat.shape[1]} experts", path)
    limits.check_shape((2, *heat.shape, heat.shape[1]), np.float64, f"co-activation of {heat.shape[0]} layers x {heat.shape[1]} experts", path)
    _check_matrix_values("heat", heat.astype(np.float64), path)
    if pairs.dtype.kind not in "iuf" or pairs.ndim != 2 or (pairs.size and pairs.shape[1] < 4):
        raise GraceInputError(f"pairs must be a numeric [N, 5] array (layer, i, j, count, lift), got {pairs.dtype} {pairs.shape}", path)


def _qwen_stats(heat: np.ndarray, pairs: np.ndarray, tokens: np.ndarray, k: int, model: str, path: Path,
                notes: tuple[str, ...] = ()) -> ExpertStats:
    """Validate the pair list against ``heat`` and build the (partially observed) ExpertStats."""
    heat = heat.astype(np.float64)
    L, E = heat.shape
    pairs = pairs.astype(np.float64)
    if pairs.size:
        if not np.isfinite(pairs[:, :4]).all():
            n = int(np.argwhere(~np.isfinite(pairs[:, :4]))[0, 0])
            raise GraceInputError(f"pair {n} (layer {pairs[n, 0]:g}) holds NaN or infinite values", path)
        lay, i, j, cnt = pairs[:, 0], pairs[:, 1], pairs[:, 2], pairs[:, 3]
        idx = pairs[:, :3]
        if (idx != np.round(idx)).any():
            n = int(np.argwhere(idx != np.round(idx))[0, 0])
            raise GraceInputError(f"pair {n}: layer and expert ids must be integers, got {pairs[n, :3].tolist()}", path)
        for name, col, hi in (("layer", lay, L), ("expert", i, E), ("expert", j, E)):
            bad = (col < 0) | (col >= hi)
            if bad.any():
                n = int(np.argmax(bad))
                raise GraceInputError(f"pair {n} (layer {lay[n]:g}): {name} {col[n]:g} out of range [0, {hi})", path)
        if (i == j).any():
            n = int(np.argmax(i == j))
            raise GraceInputError(f"pair {n} (layer {lay[n]:g}) pairs expert {i[n]:g} with itself", path)
        if (cnt < 0).any():
            n = int(np.argmax(cnt < 0))
            raise GraceInputError(f"pair {n} (layer {lay[n]:g}): negative count {cnt[n]:g}", path)
        li, ii, jj = lay.astype(np.int64), i.astype(np.int64), j.astype(np.int64)
        lo, hi_ = np.minimum(ii, jj), np.maximum(ii, jj)
        dup = _first_duplicate((li * E + lo) * E + hi_)
        if dup is not None:
            n = max(dup)
            raise GraceInputError(f"pair {n}: layer {li[n]} pair ({ii[n]}, {jj[n]}) listed twice (also pair {min(dup)})", path)
        cap = np.minimum(heat[li, ii], heat[li, jj])
        over = cnt > cap + 1e-9
        if over.any():
            n = int(np.argmax(over))
            raise GraceInputError(
                f"pair {n}: layer {li[n]} pair ({ii[n]}, {jj[n]}) count {cnt[n]:g} exceeds the experts' loads "
                f"({heat[li[n], ii[n]]:g}, {heat[li[n], jj[n]]:g})", path)
        co = np.zeros((L, E, E))
        obs = np.zeros((L, E, E), dtype=bool)
        co[li, ii, jj] = cnt
        co[li, jj, ii] = cnt
        obs[li, ii, jj] = True
        obs[li, jj, ii] = True
    else:
        co = np.zeros((L, E, E))
        obs = np.zeros((L, E, E), dtype=bool)
    try:
        return ExpertStats(load=heat, tokens=tokens, top_k=k, coactivation=co, coactivation_observed=obs,
                           transitions=None, model=model, source=str(path), notes=notes)
    except GraceInputError as exc:
        raise GraceInputError(exc.problem, path) from None


# ====================================================================== Switch load
def import_switch_load(path: PathLike, top_k: int = 1, model: str = "switch-base-128") -> ExpertStats:
    """Import per-layer expert usage counts (specMoE ``expert_statistics_3d.json``).

    Layout: ``{"num_experts": E, "layers": [1, 3, ...], "expert_usage_by_layer":
    {"<layer>": {"<expert>": count}}}``; experts absent from a layer's dict count 0. Layers are
    taken in the order of ``layers`` (or of their numbers) and renumbered 0..L-1.
    ``comprehensive_expert_statistics.json`` only holds per-layer summaries (mean, entropy, ...)
    and is refused with a clear error.

    Returns:
        ExpertStats with ``load`` ``[L, E]``, ``tokens = load.sum(1) / top_k`` (Switch routes
        top-1), no co-activation, no transitions.
    """
    path = _check_file(path)
    doc = _read_json(path)
    if not isinstance(doc, dict):
        raise GraceInputError(f"expected a JSON object with 'expert_usage_by_layer', got {type(doc).__name__}", path)
    if "expert_usage_by_layer" not in doc:
        if "layer_statistics" in doc or doc.get("analysis_type") == "comprehensive_expert_statistics":
            raise GraceInputError(
                "holds only per-layer summary statistics (mean, std, entropy, top experts), not per-expert counts, "
                "so it cannot give a load matrix; import expert_statistics_3d.json instead", path)
        raise GraceInputError("lacks 'expert_usage_by_layer' (per-layer dict expert -> count)", path)
    k = _resolve_top_k(top_k, "top_k", path)
    usage = doc["expert_usage_by_layer"]
    if not isinstance(usage, dict) or not usage:
        raise GraceInputError("'expert_usage_by_layer' must be a non-empty object", path)
    try:
        layer_keys = {int(key): key for key in usage}
    except ValueError:
        raise GraceInputError(f"layer names must be integers, got {sorted(usage)[:5]}", path) from None
    limits.check_count("layers", len(layer_keys), f"expert_usage_by_layer with {len(layer_keys)} layers", path)
    order = sorted(layer_keys)
    if "layers" in doc:
        listed = doc["layers"]
        if not isinstance(listed, list) or sorted(listed) != order or not all(_is_int(x) for x in listed):
            raise GraceInputError(f"'layers' {_short(listed)} does not match the layers of expert_usage_by_layer {order}", path)
        order = list(listed)
    E = doc.get("num_experts")
    if E is not None and (not _is_int(E) or E < 1):
        raise GraceInputError(f"num_experts must be a positive integer, got {_short(E)}", path)
    if E is not None:
        limits.check_count("experts", E, f"num_experts {E}", path)
    rows: list[dict[int, float]] = []
    max_id = -1
    for lid in order:
        counts = usage[layer_keys[lid]]
        if not isinstance(counts, dict):
            raise GraceInputError(f"layer {lid}: expected an object expert -> count, got {type(counts).__name__}", path)
        row: dict[int, float] = {}
        for ekey, value in counts.items():
            try:
                e = int(ekey)
            except ValueError:
                raise GraceInputError(f"layer {lid}: expert id {_short(ekey)} is not an integer", path) from None
            if e < 0 or (E is not None and e >= E):
                raise GraceInputError(f"layer {lid}: expert id {e} out of range [0, {E})", path)
            limits.check_count("experts", e + 1, f"layer {lid}: expert id {e} ({e + 1} experts per layer)", path)
            if not _is_number(value) or not _isfinite(value) or value < 0:
                raise GraceInputError(f"layer {lid}, expert {e}: count must be a non-negative finite number, got {_short(value)}", path)
            row[e] = float(value)
            max_id = max(max_id, e)
        rows.append(row)
    if max_id < 0:
        raise GraceInputError("no expert counts", path)
    E = int(E) if E is not None else max_id + 1
    load = np.zeros((len(order), E))
    for l, row in enumerate(rows):
        load[l, list(row)] = list(row.values())
    try:
        return ExpertStats(load=load, tokens=load.sum(axis=1) / k, top_k=k, model=model, source=str(path))
    except GraceInputError as exc:
        raise GraceInputError(exc.problem, path) from None


# ====================================================================== plain load matrix
def _read_plain_array(path: Path, what: str) -> tuple[np.ndarray, Any, bool]:
    """:func:`_read_plain_array_uncached`, parsed once per :func:`import_any` call."""
    return _once("plain-array", path, lambda: _read_plain_array_uncached(path, what))


def _read_plain_array_uncached(path: Path, what: str) -> tuple[np.ndarray, Any, bool]:
    """(array, the file's top_k or None, whether the file names it ``logical_count``) of a plain-array file.

    Containers: ``.npy``; ``.npz`` (array ``logical_count``, else its only array; optional scalar
    ``top_k``); ``.json`` (a list of lists, or ``{"logical_count": ..., "top_k": k}``); ``.csv`` /
    ``.tsv`` / ``.txt``; ``.pt`` (a tensor or a dict with ``logical_count``). Sizes are checked
    before anything is allocated.
    """
    kind = _sniff(path)
    file_k: Any = None
    named = False
    if kind == "npz":
        data = _read_npz(path)
        if "logical_count" in data:
            matrix, named = data["logical_count"], True
        else:
            arrays = [key for key in data if key != "top_k"]
            if len(arrays) != 1:
                raise GraceInputError(f"expected an array 'logical_count' or a single array, got {', '.join(sorted(data)) or 'none'}", path)
            matrix = data[arrays[0]]
        if "top_k" in data:
            file_k = data["top_k"].item() if data["top_k"].size == 1 else data["top_k"]
    elif kind == "npy":
        matrix = load_npy(path)
    elif kind == "pt":
        matrix, file_k, named = _load_torch_matrix(path)
    elif kind == "json":
        doc = _read_json(path)
        if isinstance(doc, dict):
            if "logical_count" not in doc:
                raise GraceInputError(f"JSON object lacks 'logical_count' (keys: {', '.join(sorted(doc)[:8])})", path)
            matrix, file_k, named = doc["logical_count"], doc.get("top_k"), True
        elif isinstance(doc, list):
            matrix = doc
        else:
            raise GraceInputError(f"expected a list of lists or an object with 'logical_count', got {type(doc).__name__}", path)
        matrix = _numeric_array(matrix, what, path)
    elif kind == "text":
        matrix = _read_text_matrix(path)
    else:
        raise GraceInputError(f"unrecognized {what} file (expected .npy, .npz, .json, .csv, .txt or .pt)", path)
    matrix = np.asarray(matrix)
    if matrix.dtype.kind not in "iuf":  # bool is not a count; a complex part would be dropped
        raise GraceInputError(f"{what} must be real numbers, got dtype {matrix.dtype}", path)
    return matrix, file_k, named


def import_load_matrix(path: PathLike, top_k: int | None = None, model: str = "unknown") -> ExpertStats:
    """Import a ``[layers, experts]`` expert-load matrix (DeepSeek EPLB / SGLang / vLLM dumps).

    Accepted files: ``.npy``; ``.npz`` (array ``logical_count``, else its only array; optional
    scalar ``top_k``); ``.json`` (a list of lists, or ``{"logical_count": ..., "top_k": k}``);
    ``.csv`` / ``.tsv`` / ``.txt`` (numeric rows, comma or whitespace separated, ``#`` comments, one
    optional header line); ``.pt`` (``torch.load(weights_only=True)``: a tensor or a dict with
    ``logical_count`` and optional ``top_k``). A 3-D ``[steps, layers, experts]`` count is summed
    over steps. Boolean and complex arrays are refused. A matrix implausible as load counts
    (more layers than tokens per layer) raises a :class:`GraceInputWarning` (top-1 ids read as
    a load matrix look like that).

    Args:
        path: the file.
        top_k: experts per token. Required unless the file records it: a load matrix counts
            expert choices, and ``tokens = load.sum(1) / top_k``.
        model: model name to record.

    Returns:
        ExpertStats with ``load`` float64 ``[L, E]``, no co-activation, no transitions; its
        ``notes`` say that tokens per layer were derived.
    """
    path = _check_file(path)
    matrix, file_k, _named = _read_plain_array(path, "load matrix")
    if matrix.ndim == 3:
        matrix = matrix.astype(np.float64).sum(axis=0)
    if matrix.ndim != 2 or 0 in matrix.shape:
        raise GraceInputError(f"expected a [layers, experts] (or [steps, layers, experts]) matrix, got shape {matrix.shape}", path)
    limits.check_count("layers", matrix.shape[0], f"a load matrix of {matrix.shape[0]} layers", path)
    limits.check_count("experts", matrix.shape[1], f"a load matrix of {matrix.shape[1]} experts", path)
    load = matrix.astype(np.float64)
    _check_matrix_values("load", load, path)
    if file_k is not None:
        file_k = _resolve_top_k(file_k, "the file's top_k", path)
        if top_k is not None and _resolve_top_k(top_k, "top_k", path) != file_k:
            raise GraceInputError(f"top_k={top_k} contradicts the file's top_k={file_k}", path)
        top_k = file_k
    if top_k is None:
        raise GraceInputError("top_k is unknown: a load matrix counts expert choices, so tokens per layer need k; "
                              "convert the file first with `grace import FILE --top-k K --out stats.npz`", path)
    k = _resolve_top_k(top_k, "top_k", path)
    if k > load.shape[1]:
        raise GraceInputError(f"top_k={k} exceeds the {load.shape[1]} experts per layer", path)
    tokens = load.sum(axis=1) / k
    L = load.shape[0]
    if L > 1 and float(tokens.max()) < L:
        warnings.warn(GraceInputWarning(
            f"{path}: implausible load matrix: {L} layers but at most {tokens.max():g} tokens per layer (load.sum(1) / top_k); "
            "is it per-token expert ids? then import it with --format topk-ids"), stacklevel=2)
    try:
        return ExpertStats(load=load, tokens=tokens, top_k=k, model=model, source=str(path),
                           notes=(f"tokens per layer derived as load.sum(1) / top_k ({k})",))
    except GraceInputError as exc:
        raise GraceInputError(exc.problem, path) from None


def _load_torch_matrix(path: Path) -> tuple[np.ndarray, Any, bool]:
    """(matrix, top_k or None, named) from a ``.pt`` file, loaded with ``weights_only=True`` after size checks."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is optional
        raise GraceInputError("reading .pt files needs PyTorch, which is not installed", path) from None
    if zipfile.is_zipfile(path):  # the torch zip format: refuse zip bombs before torch expands anything
        try:
            with zipfile.ZipFile(path) as zf:
                total = 0
                for info in zf.infolist():
                    limits.check_zip_member(info.filename, info.file_size, info.compress_size, path)
                    total += info.file_size
            limits.check_bytes(total, "the tensors of this file together", path)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
            raise GraceInputError(f"not a readable .pt file (truncated or corrupt: {type(exc).__name__}: {exc})", path) from None
    else:
        limits.check_bytes(path.stat().st_size, "this .pt file", path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds on corrupt input
        raise GraceInputError(f"not a readable .pt file (truncated, corrupt or not weights-only: {type(exc).__name__}: {_short(str(exc), 120)})", path) from None
    file_k = None
    named = False
    if isinstance(obj, dict):
        if "logical_count" not in obj:
            raise GraceInputError(f"dict lacks 'logical_count' (keys: {', '.join(map(str, list(obj)[:8]))})", path)
        file_k = obj.get("top_k")
        if isinstance(file_k, torch.Tensor):
            file_k = file_k.item() if file_k.numel() == 1 else None
        obj, named = obj["logical_count"], True
    if isinstance(obj, torch.Tensor):
        if obj.is_complex() or obj.dtype == torch.bool:
            raise GraceInputError(f"logical_count must be real numbers, got dtype {obj.dtype}", path)
        if obj.dtype.is_floating_point:
            return obj.detach().to(torch.float64).numpy(), file_k, named
        return obj.detach().to(torch.int64).numpy(), file_k, named
    if isinstance(obj, list):
        return _numeric_array(obj, "logical_count", path), file_k, named
    raise GraceInputError(f"expected a tensor or a dict with 'logical_count', got {type(obj).__name__}", path)


def _read_text_matrix(path: Path) -> np.ndarray:
    """Numeric rows of a CSV / whitespace-separated text file (``#`` comments, one header line allowed)."""
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise GraceInputError("not UTF-8 text (corrupt or binary file?)", path) from None
    rows: list[list[float]] = []
    header_seen = False
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        cells = [c.strip() for c in line.split(",")] if "," in line else line.split()
        try:
            values = [float(c) for c in cells]
        except ValueError:
            if not rows and not header_seen:  # one header line is allowed
                header_seen = True
                continue
            raise GraceInputError(f"line {lineno}: not a row of numbers: {_short(line)}", path) from None
        if rows and len(values) != len(rows[0]):
            raise GraceInputError(f"line {lineno}: {len(values)} values, expected {len(rows[0])} like the rows before", path)
        rows.append(values)
    if not rows:
        raise GraceInputError("no numeric rows", path)
    return np.asarray(rows, dtype=np.float64)


# ====================================================================== detection and dispatch
def _sniff(path: Path) -> str:
    """Container kind from the first bytes and the suffix: npz, npy, pt, json, jsonl, text or unknown."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    suffix = path.suffix.lower()
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith(b"PK"):
        return "pt" if suffix in (".pt", ".pth", ".bin") else "npz"
    if suffix in (".pt", ".pth"):
        return "pt"
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".json":
        return "json"
    if suffix in (".csv", ".tsv", ".txt"):
        return "text"
    if suffix == ".npz":
        return "npz"
    if suffix == ".npy":
        return "npy"
    stripped = head.lstrip()
    if stripped.startswith((b"{", b"[")):
        return "json"
    return "unknown"


def detect_format(path: PathLike) -> str:
    """The import format of a file (a name of :data:`IMPORT_FORMATS`); it never guesses.

    ``.npz`` files are told apart by their arrays (our own by their ``format`` array; a file
    whose metadata says it is ours but that lacks ``format`` is refused, not read as another
    format), JSON and JSONL files by their keys. A plain array (``.npy``, ``.csv``, ``.txt``,
    ``.pt``, a JSON list, an ``.npz`` of one array) is a load matrix when its values can only be
    counts (fractional) or the file names it ``logical_count``; an integer array that could as
    well be per-token expert ids is refused with both readings and the ``--format`` of each.
    Raises GraceInputError when the file is missing, empty, unreadable or of no known kind.
    """
    path = _check_file(path)
    kind = _sniff(path)
    if kind == "npz":
        _require_zip(path)
        names = set(check_npz_members(path))
        try:
            with np.load(path, allow_pickle=False) as data:
                fmt = str(data["format"]) if "format" in names else ""
                meta = str(data["metadata"]) if "format" not in names and "metadata" in names and data["metadata"].ndim == 0 else ""
        except _READ_ERRORS as exc:
            raise GraceInputError(f"not a readable .npz file (truncated or corrupt: {type(exc).__name__}: {exc})", path) from None
        if fmt == TRACE_FORMAT or fmt.startswith("grace-trace"):
            return "grace-trace"
        if fmt == STATS_FORMAT or fmt.startswith("grace-stats"):
            return "grace-stats"
        _refuse_headless_own_file(names, meta, path)
        if {"heat", _QWEN_PAIRS_KEY} <= names:
            return "qwen-coactivation"
        if "expert_ids" in names:
            return "mixtral-npz"
        if "logical_count" in names:
            return "load-matrix"
        if len(names - {"top_k"}) == 1:
            return _plain_array_format(path)
        raise GraceInputError(f"unrecognized .npz layout (arrays: {', '.join(sorted(names)) or 'none'})", path)
    if kind in ("npy", "pt", "text"):
        return _plain_array_format(path)
    if kind == "jsonl":
        return _detect_jsonl(path)
    if kind == "json":
        try:
            doc = _read_json(path)
        except GraceInputError:
            try:  # JSON Lines under a .json name?
                return _detect_jsonl(path)
            except GraceInputError:
                pass
            raise
        if isinstance(doc, list):
            return _plain_array_format(path)
        if isinstance(doc, dict):
            if "expert_usage_by_layer" in doc or "layer_statistics" in doc:
                return "switch-load"
            if isinstance(doc.get("layers"), list) and doc["layers"] and isinstance(doc["layers"][0], dict) and "heat" in doc["layers"][0]:
                return "qwen-coactivation"
            if "logical_count" in doc:
                return "load-matrix"
            if "routing" in doc or "row_type" in doc or {"experts", "layer"} <= set(doc):
                return _detect_jsonl(path)
        raise GraceInputError("unrecognized JSON layout (no expert_usage_by_layer, layers[].heat or logical_count)", path)
    raise GraceInputError("unrecognized file format (pass the format name explicitly)", path)


def _refuse_headless_own_file(names: set[str], meta: str, path: Path) -> None:
    """An ``.npz`` whose metadata (or arrays) say it is a grace trace or statistics but that lacks ``format``."""
    claimed = ""
    try:
        doc = json.loads(meta) if meta else None
    except (ValueError, RecursionError):
        doc = None
    if isinstance(doc, dict) and str(doc.get("format", "")).startswith(("grace-trace", "grace-stats")):
        claimed = str(doc["format"])
    elif {"metadata", "expert_ids", "request_ids", "phase"} <= names:
        claimed = TRACE_FORMAT
    elif {"metadata", "load", "tokens"} <= names:
        claimed = STATS_FORMAT
    if claimed:
        raise GraceInputError(f"looks like a {claimed.split('/')[0]} file (metadata and arrays) but lacks its 'format' array: "
                              "damaged or edited; refused rather than read as another format", path)


def _plain_array_format(path: Path) -> str:
    """``load-matrix`` or ``topk-ids`` for a plain array file, or a refusal naming both readings."""
    arr, _file_k, named = _read_plain_array(path, "array")
    if named or arr.ndim not in (2, 3) or arr.size == 0:
        return "load-matrix"  # the importer reports anything wrong with it
    if arr.dtype.kind == "f" and not (np.isfinite(arr).all() and (arr == np.round(arr)).all()):
        return "load-matrix"  # fractional values are counts (averaged), never ids
    lo = float(arr.min())
    if lo < 0:
        return "topk-ids" if lo == -1 else "load-matrix"  # -1 marks a missing id; other negatives fail the import
    if arr.ndim == 3 and arr.shape[2] > 1:
        srt = np.sort(arr, axis=2)
        if (srt[:, :, 1:] == srt[:, :, :-1]).any():
            return "load-matrix"  # a token never picks one expert twice: these are not top-k ids
    shape = "x".join(map(str, arr.shape))
    if arr.ndim == 2:
        r, c = arr.shape
        readings = (f"a load matrix ({r} layers x {c} experts: --format load-matrix) or top-1 expert ids "
                    f"({r} tokens x {c} layers: --format topk-ids)")
    else:
        st, r, c = arr.shape
        readings = (f"load counts ({st} steps x {r} layers x {c} experts: --format load-matrix) or top-{c} expert ids "
                    f"({st} tokens x {r} layers x {c}: --format topk-ids)")
    raise GraceInputError(f"ambiguous: this {shape} array of integers could be {readings}; pass the --format that is meant", path)


def _detect_jsonl(path: Path) -> str:
    for _lineno, row in _iter_jsonl(path):
        if isinstance(row, dict):
            if "routing" in row or row.get("row_type") == "header" or str(row.get("schema", "")).startswith("simllm"):
                return "sglang-jsonl"
            if {"experts", "layer", "token_idx"} <= set(row):
                return "vllm-records-jsonl"
        break
    raise GraceInputError("unrecognized JSONL layout (neither per-(token, layer) records nor a simllm/SGLang trace)", path)


def _read_own(reader: Callable[[PathLike], Any], what: str, path: PathLike) -> Any:
    """Read an ``.npz`` file with ``reader``; any kind of corruption is reported as GraceInputError."""
    path = _check_file(path)
    _require_zip(path)
    try:
        return reader(path)
    except GraceInputError:
        raise
    except _READ_ERRORS as exc:
        raise GraceInputError(f"not a readable {what} (truncated or corrupt: {type(exc).__name__}: {exc})", path) from None


def _read_grace_trace(path: PathLike) -> RoutingTrace:
    """Load our own trace file (:meth:`RoutingTrace.read`)."""
    return _read_own(RoutingTrace.read, "routing trace", path)


def _read_grace_stats(path: PathLike) -> ExpertStats:
    """Load our own statistics file (:meth:`ExpertStats.read`)."""
    return _read_own(ExpertStats.read, "statistics file", path)


IMPORT_FORMATS: dict[str, Callable[..., RoutingTrace | ExpertStats]] = {
    "vllm-records-jsonl": import_vllm_records_jsonl,
    "mixtral-npz": import_mixtral_npz,
    "sglang-jsonl": import_sglang_jsonl,
    "qwen-coactivation": import_qwen_coactivation,
    "switch-load": import_switch_load,
    "load-matrix": import_load_matrix,
    "topk-ids": import_topk_ids,
    "grace-trace": _read_grace_trace,
    "grace-stats": _read_grace_stats,
}
"""Format name -> importer. Trace formats return :class:`RoutingTrace`, the others :class:`ExpertStats`."""

TRACE_FORMATS = frozenset({"vllm-records-jsonl", "mixtral-npz", "sglang-jsonl", "topk-ids", "grace-trace"})
"""The formats that import to a :class:`RoutingTrace`."""


def import_any(path: PathLike | Sequence[PathLike], fmt: str = "auto", **kwargs: Any) -> RoutingTrace | ExpertStats:
    """Import a file (or, for ``vllm-records-jsonl``, several) in the given or detected format.

    Args:
        path: the file, or a sequence of files of the same format.
        fmt: a name of :data:`IMPORT_FORMATS`, or ``"auto"`` to use :func:`detect_format`.
        **kwargs: options of the importer (``num_experts``, ``top_k``, ``model``, ...). Options
            set to None are dropped; one the importer does not take raises GraceInputError.

    Returns:
        A :class:`RoutingTrace` for per-token formats, an :class:`ExpertStats` for the others.
    """
    many = not isinstance(path, str | Path) and isinstance(path, Sequence)
    paths = list(path) if many else [path]
    if not paths:
        raise GraceInputError("no input files given")
    label = _source_label([Path(p) for p in paths])
    if fmt != "auto" and fmt not in IMPORT_FORMATS:
        raise GraceInputError(f"unknown import format {fmt!r} (known: auto, {', '.join(IMPORT_FORMATS)})", label)
    with _parse_once():  # detection's parse of a JSON or plain-array file serves its importer too
        return _import_any(paths, fmt, label, many, kwargs)


def _import_any(paths: list[PathLike], fmt: str, label: Any, many: bool, kwargs: dict[str, Any]) -> RoutingTrace | ExpertStats:
    if fmt == "auto":
        found = {detect_format(p) for p in paths}
        if len(found) != 1:
            raise GraceInputError(f"the files are of different formats ({', '.join(sorted(found))})", label)
        fmt = found.pop()
    func = IMPORT_FORMATS[fmt]
    if many and len(paths) > 1 and fmt != "vllm-records-jsonl":
        raise GraceInputError(f"format {fmt} takes one file, got {len(paths)}", label)
    options = {key: value for key, value in kwargs.items() if value is not None}
    accepted = set(inspect.signature(func).parameters) - {"path", "paths"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise GraceInputError(f"option {', '.join(unknown)} does not apply to format {fmt} (it takes: {', '.join(sorted(accepted)) or 'none'})", label)
    target = paths if fmt == "vllm-records-jsonl" else paths[0]
    return func(target, **options)
