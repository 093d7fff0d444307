"""Ceilings on the sizes an input may claim, checked before anything is allocated.

Every dimension that comes from a file or a flag (experts per layer, layers, k, tokens, slots,
GPUs) is compared with a ceiling here before an array of that size is made, and every array
whose size follows from such numbers is compared with a memory ceiling. A refused input raises
:class:`GraceInputError` with one line naming the number, the ceiling, and how to raise it.

Defaults (documented in the README, "Limits"):

============  ==========================================  ===============================
name          what                                        default
============  ==========================================  ===============================
experts       experts per MoE layer                       16384
layers        MoE layers                                  1024
top_k         experts per token                           256
tokens        tokens of a trace or a synthesis            1e9
slots         expert slots per GPU                        16384
gpus          GPUs of a topology                          65536
memory_gb     one array, or one file's arrays together    half the machine's memory
zip_ratio     expansion of an ``.npz`` member (zip bombs)  200 (members over 64 MiB only)
============  ==========================================  ===============================

Raise one for a run with ``grace --limit experts=100000 COMMAND ...`` (repeatable), or with
the environment variable ``GRACE_LIMITS="experts=100000,memory_gb=64"`` (library use too).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace

import numpy as np

from megatron_grace.errors import GraceInputError

__all__ = ["Limits", "check_bytes", "check_count", "check_shape", "current", "override", "parse_limits", "set_limits"]

_ZIP_RATIO_MIN_BYTES = 64 << 20


def _half_memory_gb() -> float:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2 / 1e9
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8.0


@dataclass(frozen=True)
class Limits:
    """The ceilings in force (see the module docstring for their meaning)."""

    experts: int = 16384
    layers: int = 1024
    top_k: int = 256
    tokens: int = 1_000_000_000
    slots: int = 16384
    gpus: int = 65536
    memory_gb: float = 0.0  # 0: half the machine's memory
    zip_ratio: float = 200.0

    @property
    def memory_bytes(self) -> int:
        return int((self.memory_gb or _half_memory_gb()) * 1e9)


_WHAT = {
    "experts": "experts per layer",
    "layers": "MoE layers",
    "top_k": "experts per token",
    "tokens": "tokens",
    "slots": "expert slots per GPU",
    "gpus": "GPUs",
}


def parse_limits(items: Sequence[str] | str) -> dict[str, float]:
    """``["experts=100000", ...]`` or ``"experts=100000,tokens=1e10"`` -> ``{name: value}``; bad items raise."""
    if isinstance(items, str):
        items = [part for part in items.split(",") if part.strip()]
    known = {f.name: f.type for f in fields(Limits)}
    out: dict[str, float] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or name not in known:
            raise GraceInputError(f"bad limit {item!r}: expected NAME=VALUE with NAME one of {', '.join(known)}")
        try:
            value = float(text)
        except ValueError:
            raise GraceInputError(f"bad limit {item!r}: {text!r} is not a number") from None
        if not value > 0 or value == float("inf"):
            raise GraceInputError(f"bad limit {item!r}: the value must be positive and finite")
        out[name] = value if name in ("memory_gb", "zip_ratio") else int(value)
    return out


def _from_env() -> Limits:
    text = os.environ.get("GRACE_LIMITS", "")
    try:
        return replace(Limits(), **parse_limits(text)) if text.strip() else Limits()
    except GraceInputError as exc:
        raise GraceInputError(f"GRACE_LIMITS: {exc.problem}") from None


_current: Limits | None = None


def current() -> Limits:
    """The limits in force: defaults, then ``GRACE_LIMITS``, then :func:`set_limits`."""
    global _current
    if _current is None:
        _current = _from_env()
    return _current


def set_limits(**values: float) -> Limits:
    """Replace some ceilings for the rest of the process; returns the new limits."""
    global _current
    _current = replace(current(), **values)
    return _current


@contextmanager
def override(**values: float) -> Iterator[Limits]:
    """Temporarily replace some ceilings (tests, library callers)."""
    global _current
    before = current()
    _current = replace(before, **values)
    try:
        yield _current
    finally:
        _current = before


def _hint(name: str) -> str:
    return f"if this is real, raise it with `grace --limit {name}=N` or GRACE_LIMITS={name}=N"


def check_count(name: str, value: int, what: str | None = None, source: object = None) -> int:
    """Refuse ``value`` above the ceiling ``name`` (one of :class:`Limits`' integer fields).

    ``what`` says where the number comes from, value included (``"line 3: layer 100000"``);
    default ``"{name} = {value}"``.
    """
    limit = getattr(current(), name)
    if value > limit:
        label = what or f"{_WHAT.get(name, name)} = {value}"
        raise GraceInputError(f"{label} is implausible: above the limit of {limit} {_WHAT.get(name, name)} ({_hint(name)})",
                              None if source is None else str(source))
    return int(value)


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.3g} GB"


def check_bytes(nbytes: int, what: str, source: object = None) -> int:
    """Refuse an allocation of ``nbytes`` above the memory ceiling."""
    limit = current().memory_bytes
    if nbytes > limit:
        raise GraceInputError(f"{what} would need {_gb(nbytes)}, above the memory limit of {_gb(limit)} ({_hint('memory_gb')})",
                              None if source is None else str(source))
    return int(nbytes)


def check_shape(shape: Sequence[int], dtype: np.dtype | type | str, what: str, source: object = None) -> int:
    """Refuse an array of ``shape`` x ``dtype`` above the memory ceiling (exact Python integers, no overflow)."""
    n = 1
    for d in shape:
        n *= int(d)
    return check_bytes(n * np.dtype(dtype).itemsize, what, source)


def check_zip_member(name: str, expanded: int, compressed: int, source: object = None, kind: str = "array") -> None:
    """Refuse an archive member that expands implausibly (a zip bomb) or beyond the memory ceiling.

    ``kind`` names what the member is in the message (``"array"`` of an ``.npz``, ``"torch storage record"``, ...).
    """
    check_bytes(expanded, f"{kind} {name!r} (expanded)", source)
    ratio = current().zip_ratio
    if expanded > _ZIP_RATIO_MIN_BYTES and expanded > ratio * max(compressed, 1):
        raise GraceInputError(
            f"{kind} {name!r} expands {expanded / max(compressed, 1):.0f}x ({_gb(compressed)} -> {_gb(expanded)}), "
            f"above the limit of {ratio:g}x (a zip bomb?; {_hint('zip_ratio')})", None if source is None else str(source))
