"""Which tokens a plan was made on, so that ``grace simulate`` can warn about in-sample runs.

``grace plan --trace X`` records a sample of per-token fingerprints of ``X`` in the plan's
metadata (``planned_on``); ``grace simulate --trace Y`` looks for them among ``Y``'s tokens.
A token's fingerprint is a 64-bit hash of its expert ids at every layer ``[L, k]``, so a token
is found again whatever file, format or order it comes in.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from megatron_grace.trace.routing_trace import RoutingTrace

SAMPLE = 256  # fingerprints kept in a plan (about 5 KB of JSON)
IN_SAMPLE_SHARE = 0.5  # warn when at least this share of the sample is in the measured trace
_BLOCK = 1 << 22  # ids per block of tokens when fingerprinting a whole trace


def token_fingerprints(trace: RoutingTrace) -> np.ndarray:
    """uint64 ``[T]``: a hash of each token's expert ids ``[L, k]`` (missing records included); in blocks of tokens."""
    ids = trace.expert_ids
    step = max(1, _BLOCK // max(1, ids[0].size if len(ids) else 1))
    coeffs = _coefficients(int(np.prod(ids.shape[1:])))
    return np.concatenate([_fingerprints(ids[start:start + step], coeffs) for start in range(0, len(ids), step)]
                          or [np.zeros(0, np.uint64)])


def _coefficients(n: int) -> np.ndarray:
    """uint64 ``[n]`` fixed odd multipliers of a token's ``n`` = L * k expert ids."""
    return np.random.default_rng(0x67726163).integers(1, 2**63, size=n, dtype=np.uint64) | np.uint64(1)


def _fingerprints(ids: np.ndarray, coeffs: np.ndarray | None = None) -> np.ndarray:
    """uint64 ``[n]`` fingerprints of the tokens ``ids`` ``[n, L, k]`` (``coeffs``: :func:`_coefficients`, made here if None)."""
    flat = ids.reshape(ids.shape[0], int(np.prod(ids.shape[1:]))).astype(np.int64) + 2  # -1 (missing) -> 1, never 0
    coeffs = _coefficients(flat.shape[1]) if coeffs is None else coeffs
    h = (flat.astype(np.uint64) * coeffs).sum(axis=1, dtype=np.uint64)
    h ^= h >> np.uint64(31)
    h *= np.uint64(0x9E3779B97F4A7C15)
    return h ^ (h >> np.uint64(29))


def planning_record(trace: RoutingTrace, source: str) -> dict[str, Any]:
    """What a plan records about the trace it was made on (JSON types)."""
    pick = np.unique(np.linspace(0, trace.num_tokens - 1, min(SAMPLE, trace.num_tokens)).astype(np.int64))
    hashes = _fingerprints(trace.expert_ids[pick])
    return {"source": source, "tokens": trace.num_tokens, "token_fingerprints": [f"{int(h):016x}" for h in hashes]}


def in_sample_share(metadata: dict[str, Any], trace: RoutingTrace) -> float | None:
    """Share of the plan's sampled planning tokens found in ``trace`` (None if the plan records none)."""
    record = metadata.get("planned_on") or {}
    sample = record.get("token_fingerprints") or []
    try:
        wanted = np.array([int(h, 16) for h in sample], dtype=np.uint64)
    except (TypeError, ValueError):
        return None
    if wanted.size == 0 or trace.num_tokens == 0:
        return None
    return float(np.isin(wanted, token_fingerprints(trace)).mean())
