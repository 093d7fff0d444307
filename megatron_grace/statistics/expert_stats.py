"""`ExpertStats`: per-layer expert load, co-activation and between-layer transitions.

Counts are computed from a :class:`RoutingTrace` (vectorized with ``np.bincount``) or taken
from a statistics-only source. What a source does not provide is ``None`` (missing), never
zeros; a partially known co-activation matrix (e.g. thresholded pair lists) carries a mask of
the entries that were measured.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from megatron_grace import limits
from megatron_grace._files import PathLike, load_npz, save_npz_atomic, strict_int
from megatron_grace.errors import GraceInputError
from megatron_grace.trace.routing_trace import RoutingTrace

STATS_FORMAT = "grace-stats/1"
_COUNT_BLOCK = 1 << 23  # ids per block of tokens in from_trace (32 MB as int32)


@dataclass(frozen=True, eq=False)
class ExpertStats:
    """Routing statistics of one MoE model.

    Attributes:
        load: float64 ``[L, E]``; tokens that chose expert e at layer l.
        tokens: float64 ``[L]``; tokens routed at layer l (each chooses ``top_k`` experts).
        top_k: experts per token.
        coactivation: float64 ``[L, E, E]`` or None; symmetric, entry (i, j), i != j, is the
            number of tokens that chose both i and j at layer l; the diagonal is zero.
        coactivation_observed: bool ``[L, E, E]`` or None; which co-activation entries were
            measured. None means all of them (when ``coactivation`` is present). Unobserved
            entries hold 0 in ``coactivation`` but mean "below the source's threshold".
        transitions: float64 ``[L-1, E, E]`` or None; entry (l, i, j) counts tokens that chose i
            at layer l and j at layer l+1.
        model: model name.
        source: provenance, free text.
        notes: what the importer derived rather than read (e.g. tokens per layer from the
            load and k), one sentence each; reports print them.
    """

    load: np.ndarray
    tokens: np.ndarray
    top_k: int
    coactivation: np.ndarray | None = None
    coactivation_observed: np.ndarray | None = None
    transitions: np.ndarray | None = None
    model: str = "unknown"
    source: str = ""
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "notes", tuple(str(n) for n in self.notes))
        self.validate()

    @property
    def num_layers(self) -> int:
        return int(self.load.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.load.shape[1])

    @property
    def missing(self) -> list[str]:
        """Names of the statistics this source does not provide."""
        out = []
        if self.coactivation is None:
            out.append("coactivation")
        elif self.coactivation_observed is not None:
            out.append("coactivation (partial: thresholded pairs only)")
        if self.transitions is None:
            out.append("transitions")
        return out

    def validate(self, source: PathLike | None = None) -> None:
        """Check shapes and values; raise GraceInputError naming the problem."""
        src = source if source is not None else (self.source or None)
        load = np.asarray(self.load)
        if load.ndim != 2 or load.shape[0] < 1 or load.shape[1] < 1:
            raise GraceInputError(f"load must be a 2-D array [layers, experts], got shape {load.shape}", src)
        if load.dtype.kind not in "iuf":  # booleans are not counts; a complex part would be dropped
            raise GraceInputError(f"load must be real numbers, got dtype {load.dtype}", src)
        limits.check_count("layers", load.shape[0], f"load of {load.shape[0]} layers", src)
        limits.check_count("experts", load.shape[1], f"load of {load.shape[1]} experts", src)
        load = load.astype(np.float64)
        _check_counts("load", load, src)
        object.__setattr__(self, "load", load)
        L, E = load.shape
        tokens = np.asarray(self.tokens)
        if tokens.dtype.kind not in "iuf":
            raise GraceInputError(f"tokens must be real numbers, got dtype {tokens.dtype}", src)
        tokens = tokens.astype(np.float64).reshape(-1)
        if tokens.shape != (L,):
            raise GraceInputError(f"tokens must have one entry per layer ({L}), got shape {tokens.shape}", src)
        _check_counts("tokens", tokens, src)
        object.__setattr__(self, "tokens", tokens)
        if not (1 <= int(self.top_k) <= E):
            raise GraceInputError(f"top_k={self.top_k} must be in [1, {E}]", src)
        over = load.sum(axis=1) > tokens * self.top_k * (1 + 1e-9) + 1e-6
        if over.any():
            l = int(np.argmax(over))
            raise GraceInputError(
                f"inconsistent k: layer {l} has {load[l].sum():.0f} expert choices, more than tokens x k = {tokens[l]:.0f} x {self.top_k}", src
            )
        for name in ("coactivation", "transitions"):
            value = getattr(self, name)
            if value is not None and np.asarray(value).dtype.kind not in "iuf":
                raise GraceInputError(f"{name} must be real numbers, got dtype {np.asarray(value).dtype}", src)
        if self.coactivation is not None:
            co = np.asarray(self.coactivation, dtype=np.float64)
            if co.shape != (L, E, E):
                raise GraceInputError(f"coactivation must have shape {(L, E, E)}, got {co.shape}", src)
            _check_counts("coactivation", co, src)
            if not np.allclose(co, co.transpose(0, 2, 1)):
                raise GraceInputError("coactivation is not symmetric", src)
            object.__setattr__(self, "coactivation", co)
            if self.coactivation_observed is not None:
                obs = np.asarray(self.coactivation_observed)
                if obs.shape != (L, E, E) or obs.dtype != np.bool_:
                    raise GraceInputError(f"coactivation_observed must be bool {(L, E, E)}, got {obs.dtype} {obs.shape}", src)
        elif self.coactivation_observed is not None:
            raise GraceInputError("coactivation_observed given without coactivation", src)
        if self.transitions is not None:
            tr = np.asarray(self.transitions, dtype=np.float64)
            if tr.shape != (max(L - 1, 0), E, E):
                raise GraceInputError(f"transitions must have shape {(L - 1, E, E)}, got {tr.shape}", src)
            _check_counts("transitions", tr, src)
            object.__setattr__(self, "transitions", tr)

    # ------------------------------------------------------------------ derived
    def load_share(self) -> np.ndarray:
        """float64 ``[L, E]``: fraction of the layer's expert choices that go to each expert."""
        total = self.load.sum(axis=1, keepdims=True)
        return np.divide(self.load, total, out=np.zeros_like(self.load), where=total > 0)

    def lift(self) -> np.ndarray:
        """float64 ``[L, E, E]``: P(i and j) / (P(i) P(j)) per layer; NaN where undefined or unobserved."""
        if self.coactivation is None:
            raise GraceInputError("these statistics have no co-activation data", self.source or None)
        p = self.load / np.maximum(self.tokens[:, None], 1)
        denom = p[:, :, None] * p[:, None, :] * self.tokens[:, None, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            lift = np.where(denom > 0, self.coactivation / denom, np.nan)
        if self.coactivation_observed is not None:
            lift = np.where(self.coactivation_observed, lift, np.nan)
        idx = np.arange(self.num_experts)
        lift[:, idx, idx] = np.nan
        return lift

    def affinity(self, fill_unobserved: bool = True) -> np.ndarray:
        """float64 ``[L, E, E]`` co-activation counts usable as a grouping affinity.

        Unobserved entries (thresholded sources) are filled with the independence estimate
        ``tokens * P(i) * P(j)`` when ``fill_unobserved`` (they are known to be below the
        source's lift threshold, so "no preference" is the honest guess); else left at 0.
        """
        if self.coactivation is None:
            raise GraceInputError("these statistics have no co-activation data", self.source or None)
        co = self.coactivation.copy()
        if self.coactivation_observed is not None and fill_unobserved:
            p = self.load / np.maximum(self.tokens[:, None], 1)
            indep = p[:, :, None] * p[:, None, :] * self.tokens[:, None, None]
            co = np.where(self.coactivation_observed, co, indep)
            idx = np.arange(self.num_experts)
            co[:, idx, idx] = 0.0
        return co

    def select_layers(self, layers: np.ndarray | list[int] | slice) -> ExpertStats:
        """Statistics restricted to some layers (transitions kept only for consecutive picks)."""
        idx = np.arange(self.num_layers)[layers]
        tr = None
        if self.transitions is not None and len(idx) > 1 and np.all(np.diff(idx) == 1):
            tr = self.transitions[idx[:-1]]
        return ExpertStats(
            load=self.load[idx],
            tokens=self.tokens[idx],
            top_k=self.top_k,
            coactivation=None if self.coactivation is None else self.coactivation[idx],
            coactivation_observed=None if self.coactivation_observed is None else self.coactivation_observed[idx],
            transitions=tr if len(idx) > 1 else np.zeros((0, self.num_experts, self.num_experts)) if self.transitions is not None else None,
            model=self.model,
            source=self.source,
            notes=self.notes,
        )

    # ------------------------------------------------------------------ construction
    @staticmethod
    def from_trace(trace: RoutingTrace, transitions: bool = True) -> ExpertStats:
        """Count load, co-activation and (optionally) transitions of a trace.

        Vectorized: per block of tokens (about ``_COUNT_BLOCK`` ids, so temporaries stay small
        whatever the trace's length) one ``np.bincount`` per layer over all (token, slot) or
        (token, slot pair) indices; no Python loop over tokens. Missing records (-1) are ignored.
        """
        ids = trace.expert_ids  # [T, L, k]
        T, L, k = ids.shape
        E = trace.num_experts
        dense = 2 * L if transitions else L
        limits.check_shape((dense, E, E), np.float64, f"statistics of {L} layers x {E} experts (dense co-activation"
                           f"{' and transitions' if transitions else ''})", trace.source or None)
        load = np.zeros((L, E))
        co = np.zeros((L, E, E))
        tr = np.zeros((max(L - 1, 0), E, E)) if transitions else None
        tokens = np.zeros(L)
        iu, ju = np.triu_indices(k, 1)
        step = max(1, _COUNT_BLOCK // (L * k))
        for start in range(0, T, step):
            block = ids[start:start + step]  # [t, L, k] view
            valid = (block >= 0).any(axis=2)  # [t, L]
            tokens += valid.sum(axis=0)
            for layer in range(L):
                x = block[:, layer][valid[:, layer]].astype(np.int64)  # [t, k]
                load[layer] += np.bincount(x.reshape(-1), minlength=E)
                if k > 1 and x.shape[0]:
                    pair = np.bincount((x[:, iu] * E + x[:, ju]).reshape(-1), minlength=E * E).reshape(E, E)
                    co[layer] += pair + pair.T
                if tr is not None and layer + 1 < L:
                    both = valid[:, layer] & valid[:, layer + 1]
                    src, dst = block[both, layer].astype(np.int64), block[both, layer + 1]  # [t, k] each
                    tr[layer] += np.bincount((src[:, :, None] * E + dst[:, None, :]).reshape(-1), minlength=E * E).reshape(E, E)
        return ExpertStats(load=load, tokens=tokens, top_k=k, coactivation=co, transitions=tr, model=trace.model,
                           source=f"trace {trace.source}".strip())

    # ------------------------------------------------------------------ I/O
    def save(self, path: PathLike) -> None:
        """Save as a pickle-free ``.npz`` atomically. Missing fields are simply absent."""
        meta = {"format": STATS_FORMAT, "model": self.model, "top_k": int(self.top_k), "source": self.source,
                "notes": list(self.notes)}
        arrays: dict[str, np.ndarray] = {
            "format": np.array(STATS_FORMAT),
            "metadata": np.array(json.dumps(meta)),
            "load": self.load,
            "tokens": self.tokens,
        }
        for name in ("coactivation", "coactivation_observed", "transitions"):
            value = getattr(self, name)
            if value is not None:
                arrays[name] = value
        save_npz_atomic(path, arrays, verify=ExpertStats.read)

    @staticmethod
    def read(path: PathLike) -> ExpertStats:
        """Load and validate statistics saved by :meth:`save`."""
        data = load_npz(path)
        fmt = str(data["format"]) if "format" in data else None
        if fmt != STATS_FORMAT:
            raise GraceInputError(f"not an expert-statistics file (format {fmt!r}, expected {STATS_FORMAT!r})", path)
        for key in ("metadata", "load", "tokens"):
            if key not in data:
                raise GraceInputError(f"statistics file lacks the array {key!r}", path)
        try:
            meta = json.loads(str(data["metadata"]))
            top_k = strict_int(meta["top_k"], "top_k")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise GraceInputError(f"statistics file has unreadable metadata ({type(exc).__name__}: {str(exc)[:120]})", path) from None
        try:
            return ExpertStats(
                load=data["load"], tokens=data["tokens"], top_k=top_k,
                coactivation=data.get("coactivation"), coactivation_observed=data.get("coactivation_observed"),
                transitions=data.get("transitions"), model=str(meta.get("model", "unknown")),
                source=str(meta.get("source", path)), notes=tuple(str(n) for n in meta.get("notes") or () if isinstance(meta.get("notes"), list)),
            )
        except GraceInputError as exc:
            raise GraceInputError(exc.problem, path) from None

    def __repr__(self) -> str:
        return (f"ExpertStats(model={self.model!r}, layers={self.num_layers}, experts={self.num_experts}, "
                f"k={self.top_k}, tokens={self.tokens.max():.0f}, missing={self.missing}"
                + (f", derived: {'; '.join(self.notes)})" if self.notes else ")"))


def _check_counts(name: str, values: np.ndarray, source: PathLike | None) -> None:
    if not np.isfinite(values).all():
        raise GraceInputError(f"{name} contains NaN or infinite values", source)
    if (values < 0).any():
        idx = tuple(int(i) for i in np.argwhere(values < 0)[0])
        raise GraceInputError(f"{name} contains a negative count ({values[idx]:g} at index {idx})", source)
