"""Replay a routing trace through a placement plan and a replica-choice policy.

For every MoE layer the simulator

1. asks the replica-choice policy which GPU processes each (token, expert) pair:
   ``gpu[T, k]``, checked to host that expert. Named policies run the routing module's
   :func:`~megatron_grace.routing.choose_copies`, the code of the distributed layer
   (:mod:`megatron_grace.simulation.policies`);
2. counts, vectorized over tokens, where the pairs go and which messages that takes;
3. turns the counts into bytes per link type and a modelled MoE-layer time for each
   dispatch mode.

Tokens start on GPUs by ``token_placement``: ``"round-robin"`` puts token ``i`` on GPU
``i mod G``; ``"request"`` puts all tokens of a request on one GPU, requests dealt round-robin
in order of first appearance. A token with no record at a layer (ids -1) sends nothing there.

**Counts** (per layer): token-expert *pairs* processed on the token's own GPU / on another GPU
of its node / on another node; *deduplicated messages*: token-to-GPU (one per token and
distinct destination GPU other than its own, split into intra-node and inter-node) and
token-to-node (one per token and distinct remote node); per-GPU expert load (pairs processed).

**Dispatch modes**:

- ``flat``: one copy of the token per (token, expert) pair processed on another GPU (what
  Megatron-Core's alltoall dispatcher and DeepSpeed do; the layer's ``flat`` dispatch).
  ``per-pair`` is accepted as a deprecated name of it. Bytes = crossing pairs x token bytes,
  on the NVLink or the inter-node link. One all-to-all phase.
- ``hierarchical``: phase 1 (inter-node): a token crosses once to each remote node it needs,
  to the *peer* GPU with the same local index as its own GPU; phase 2 (intra-node, NVLink): the
  token goes once to each GPU it needs inside its own node, and each peer forwards it once to
  every other GPU it is needed on inside the peer's node (the peer keeps it without a send if
  it is needed there). A token needing only its own GPU sends nothing.

**Combine** mirrors the dispatch: results return along the same paths with senders and
receivers swapped. In hierarchical mode each GPU first sums its experts' weighted outputs for
a token and each peer sums the partial results of its node before crossing back, so one
message returns per token-GPU and per token-node: the combine moves exactly the bytes of the
dispatch (flat returns one result per pair, as Megatron-Core's alltoall combine does).
Since the time model takes max(sent, received) per GPU, combine time = dispatch time.

**Time model** (per layer)::

    layer_s = dispatch_s + compute_s + combine_s
    phase_s = max over GPUs of max(intra bytes sent or received / intra bandwidth,
                                   inter bytes sent or received / inter bandwidth)
              + latency of the phase (the largest latency among the link types carrying bytes
                in it; 0 if nothing moves)
    dispatch_s = sum of phase_s (flat: one phase with both links; hierarchical: an
                 inter-node phase, then an intra-node phase)
    compute_s = max GPU load (pairs) x expert_flops_per_token / gpu_flops

With ``simulate(..., shared_nic=True)`` the inter-node bytes of a phase are counted per node and
divided by the GPUs per node (one NIC per node, shared), instead of taken from the busiest GPU.

Bandwidths and latencies are the topology's per-GPU, per-direction link models. The whole
trace is treated as one batch per layer.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from megatron_grace._files import PathLike, load_npz, save_json_atomic, save_npz_atomic
from megatron_grace.errors import ContradictionWarning, GraceInputError, GraceInputWarning
from megatron_grace.plan.placement import PlacementPlan
from megatron_grace.plan.topology import MODEL_PRESETS, ModelShape, Topology
from megatron_grace.routing import RoutingOptions
from megatron_grace.simulation.policies import DEFAULT_POLICY, CustomPolicy, PolicyContext, check_policy, choose_gpus
from megatron_grace.trace.routing_trace import RoutingTrace

from megatron_grace.names import DISPATCH_ALIASES, DISPATCH_MODES, TOKEN_PLACEMENTS  # noqa: E402
DECISIONS_FORMAT = "grace-decisions/1"


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def token_start_gpus(num_tokens: int, num_gpus: int, placement: str = "round-robin",
                     request_ids: np.ndarray | None = None) -> np.ndarray:
    """int32 ``[T]``: the GPU each token starts on.

    Args:
        num_tokens: T.
        num_gpus: G.
        placement: ``"round-robin"`` (token i on GPU i mod G) or ``"request"`` (every token of a
            request on one GPU; requests in order of first appearance go to GPUs 0, 1, ...,
            G-1, 0, ...).
        request_ids: int ``[T]``, needed for ``"request"``.
    """
    if placement == "round-robin":
        return (np.arange(num_tokens, dtype=np.int64) % num_gpus).astype(np.int32)
    if placement == "request":
        if request_ids is None:
            raise GraceInputError("token placement 'request' needs the trace's request ids")
        req = np.asarray(request_ids).reshape(-1)
        if req.shape[0] != num_tokens:
            raise GraceInputError(f"request_ids has {req.shape[0]} entries for {num_tokens} tokens")
        _, first, inverse = np.unique(req, return_index=True, return_inverse=True)
        order = np.empty(first.size, dtype=np.int64)
        order[np.argsort(first, kind="stable")] = np.arange(first.size)  # rank by first appearance
        return (order[inverse] % num_gpus).astype(np.int32)
    raise GraceInputError(f"unknown token placement {placement!r}; known: {', '.join(TOKEN_PLACEMENTS)}")


def resolve_model_shape(model_shape: ModelShape | str | None, model_name: str = "", trace: Any = None) -> ModelShape:
    """The model shape to use: the given one, a preset by name, or the preset the trace's model
    name contains (``"Qwen/Qwen3-30B-A3B"`` -> ``qwen3-30b-a3b``; the longest match wins).
    ``trace`` is anything with ``num_experts`` and ``top_k`` (a trace or statistics). A preset
    named here whose experts per layer or k differ from ``trace``'s gives a
    ContradictionWarning (the CLI refuses it); one taken from the model name a GraceInputWarning."""
    shape = _pick_model_shape(model_shape, model_name)
    if trace is not None and (shape.num_experts, shape.top_k) != (trace.num_experts, trace.top_k):
        problem = (f"model shape {shape.name} has {shape.num_experts} experts per layer, top-{shape.top_k}; the trace "
                   f"{trace.num_experts}, top-{trace.top_k}")
        if isinstance(model_shape, str) and model_shape:  # asked for by name (--model-shape): the CLI refuses it
            warnings.warn(ContradictionWarning(f"{problem} (give the matching --model-shape)"), stacklevel=3)
        elif model_shape is None:  # a ModelShape object was chosen by the caller, who has been told
            warnings.warn(GraceInputWarning(f"{problem}: the shape was taken from the model name {model_name!r}; bytes and FLOPs "
                                            "use its sizes (give --model-shape to choose)"), stacklevel=3)
    return shape


def _pick_model_shape(model_shape: ModelShape | str | None, model_name: str) -> ModelShape:
    if isinstance(model_shape, ModelShape):
        return model_shape
    if isinstance(model_shape, str) and model_shape:
        return ModelShape.preset(model_shape)
    name = (model_name or "").lower().replace("_", "-")
    matches = [preset for preset in MODEL_PRESETS if preset in name]
    if not matches:
        raise GraceInputError(
            f"cannot tell the model shape from the trace's model name {model_name!r}; "
            f"give one (--model-shape): {', '.join(sorted(MODEL_PRESETS))}"
        )
    return MODEL_PRESETS[max(matches, key=len)]


def parse_dispatch(dispatch: str | Sequence[str]) -> tuple[str, ...]:
    """``"both"``, one mode name, or a sequence of them -> a tuple of mode names (deprecated names
    of :data:`DISPATCH_ALIASES` are translated, with a DeprecationWarning)."""
    modes = DISPATCH_MODES if dispatch == "both" else (dispatch,) if isinstance(dispatch, str) else tuple(dispatch)
    if any(m in DISPATCH_ALIASES for m in modes):
        warnings.warn(f"dispatch mode names {', '.join(DISPATCH_ALIASES)} are deprecated; use "
                      f"{', '.join(DISPATCH_ALIASES.values())}", DeprecationWarning, stacklevel=3)
        modes = tuple(DISPATCH_ALIASES.get(m, m) for m in modes)
    bad = [m for m in modes if m not in DISPATCH_MODES]
    if bad or not modes:
        raise GraceInputError(f"unknown dispatch mode {bad[0] if bad else ''!r}; known: {', '.join(DISPATCH_MODES)}, both")
    return tuple(modes)


def check_compatible(plan: PlacementPlan, trace: RoutingTrace) -> None:
    """Raise GraceInputError if the plan and the trace disagree on layers or experts."""
    if plan.num_experts != trace.num_experts:
        top = int(trace.expert_ids.max()) if trace.expert_ids.size else -1
        detail = f" (trace ids go up to {top})" if top >= plan.num_experts else ""
        raise GraceInputError(
            f"the plan is for {plan.num_experts} experts per layer but the trace has {trace.num_experts}{detail}", plan.source
        )
    if plan.num_layers != trace.num_layers:
        raise GraceInputError(f"the plan has {plan.num_layers} MoE layers but the trace has {trace.num_layers}", plan.source)
    if trace.expert_ids.size and int(trace.expert_ids.max()) >= plan.num_experts:  # pragma: no cover - trace validates
        raise GraceInputError(f"trace has expert id {int(trace.expert_ids.max())}, beyond the plan's {plan.num_experts} experts")


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class DispatchCost:
    """Bytes and modelled time of one dispatch mode, per layer.

    Attributes:
        mode: ``"flat"`` or ``"hierarchical"``.
        intra_bytes: int64 ``[L]`` NVLink bytes of the dispatch (the combine moves the same).
        inter_bytes: int64 ``[L]`` inter-node bytes of the dispatch (the combine moves the same).
        max_gpu_intra_bytes: int64 ``[L]`` max over GPUs and phases of NVLink bytes one GPU
            sends or receives in a phase.
        max_gpu_inter_bytes: int64 ``[L]`` the same for the inter-node link.
        dispatch_s: float64 ``[L]`` modelled dispatch time.
        combine_s: float64 ``[L]`` modelled combine time (equal to ``dispatch_s``).
        layer_s: float64 ``[L]`` dispatch + expert compute on the slowest GPU + combine.
    """

    mode: str
    intra_bytes: np.ndarray
    inter_bytes: np.ndarray
    max_gpu_intra_bytes: np.ndarray
    max_gpu_inter_bytes: np.ndarray
    dispatch_s: np.ndarray
    combine_s: np.ndarray
    layer_s: np.ndarray

    def totals(self) -> dict[str, float]:
        """Sums over layers."""
        return {
            "intra_bytes": int(self.intra_bytes.sum()),
            "inter_bytes": int(self.inter_bytes.sum()),
            "dispatch_s": float(self.dispatch_s.sum()),
            "combine_s": float(self.combine_s.sum()),
            "layer_s": float(self.layer_s.sum()),
            "mean_layer_s": float(self.layer_s.mean()) if self.layer_s.size else 0.0,
        }


@dataclass(frozen=True, eq=False)
class SimulationResult:
    """Counts, bytes and modelled times of one trace replayed through one plan.

    Per-layer arrays have shape ``[L]`` unless noted.

    Attributes:
        topology: the cluster.
        model_shape: sizes used for bytes and FLOPs.
        planner: the plan's planner name.
        policy: replica-choice policy name.
        token_placement: how tokens were put on GPUs.
        num_tokens: T.
        top_k: k.
        pairs_total: token-expert pairs (records present).
        pairs_local: pairs processed on the token's own GPU.
        pairs_intra_node: pairs processed on another GPU of the token's node.
        pairs_inter_node: pairs processed on another node.
        msgs_gpu_intra_node: deduplicated token-to-GPU messages inside the node.
        msgs_gpu_inter_node: deduplicated token-to-GPU messages to GPUs of other nodes.
        msgs_node: deduplicated token-to-node messages (cross-node).
        gpu_load: int64 ``[L, G]`` pairs processed per GPU.
        compute_s: float64 expert compute time on the most loaded GPU.
        modes: dispatch mode -> :class:`DispatchCost`.
        src_gpu: int32 ``[T]`` start GPU of each token.
        decisions: int32 ``[T, L, k]`` chosen GPU per pair (-1 none), kept on request.
    """

    topology: Topology
    model_shape: ModelShape
    planner: str
    policy: str
    token_placement: str
    num_tokens: int
    top_k: int
    pairs_total: np.ndarray
    pairs_local: np.ndarray
    pairs_intra_node: np.ndarray
    pairs_inter_node: np.ndarray
    msgs_gpu_intra_node: np.ndarray
    msgs_gpu_inter_node: np.ndarray
    msgs_node: np.ndarray
    gpu_load: np.ndarray
    compute_s: np.ndarray
    modes: dict[str, DispatchCost]
    src_gpu: np.ndarray
    decisions: np.ndarray | None = field(default=None, repr=False)

    @property
    def num_layers(self) -> int:
        return int(self.pairs_total.shape[0])

    @property
    def msgs_gpu(self) -> np.ndarray:
        """int64 ``[L]``: deduplicated cross-GPU messages (intra + inter node)."""
        return self.msgs_gpu_intra_node + self.msgs_gpu_inter_node

    @property
    def load_imbalance(self) -> np.ndarray:
        """float64 ``[L]``: max / mean pairs per GPU (mean over all GPUs; 1 for an empty layer)."""
        mean = self.gpu_load.mean(axis=1)
        mx = self.gpu_load.max(axis=1).astype(np.float64)
        return np.divide(mx, mean, out=np.ones_like(mx), where=mean > 0)

    def summary(self) -> dict[str, Any]:
        """Totals over layers (and load imbalance mean/max over layers) as plain JSON types."""
        pairs = int(self.pairs_total.sum())

        def share(x: np.ndarray) -> float:
            return float(x.sum() / pairs) if pairs else 0.0

        out: dict[str, Any] = {
            "planner": self.planner,
            "policy": self.policy,
            "topology": self.topology.name,
            "model_shape": self.model_shape.name,
            "token_placement": self.token_placement,
            "tokens": self.num_tokens,
            "layers": self.num_layers,
            "top_k": self.top_k,
            "pairs": pairs,
            "pairs_local": int(self.pairs_local.sum()),
            "pairs_intra_node": int(self.pairs_intra_node.sum()),
            "pairs_inter_node": int(self.pairs_inter_node.sum()),
            "share_local": share(self.pairs_local),
            "share_intra_node": share(self.pairs_intra_node),
            "share_inter_node": share(self.pairs_inter_node),
            "msgs_node": int(self.msgs_node.sum()),
            "msgs_gpu": int(self.msgs_gpu.sum()),
            "msgs_gpu_intra_node": int(self.msgs_gpu_intra_node.sum()),
            "msgs_gpu_inter_node": int(self.msgs_gpu_inter_node.sum()),
            "load_max_over_mean": float(self.load_imbalance.mean()),
            "load_max_over_mean_worst_layer": float(self.load_imbalance.max()),
            "compute_s": float(self.compute_s.sum()),
            "dispatch": {mode: cost.totals() for mode, cost in self.modes.items()},
        }
        return out

    def to_dict(self) -> dict[str, Any]:
        """Summary, topology, model shape and every per-layer array as JSON types."""
        per_layer: dict[str, Any] = {
            name: getattr(self, name).tolist()
            for name in ("pairs_total", "pairs_local", "pairs_intra_node", "pairs_inter_node", "msgs_gpu_intra_node",
                         "msgs_gpu_inter_node", "msgs_node", "compute_s", "gpu_load")
        }
        per_layer["load_max_over_mean"] = self.load_imbalance.tolist()
        per_layer["dispatch"] = {
            mode: {name: getattr(cost, name).tolist() for name in
                   ("intra_bytes", "inter_bytes", "max_gpu_intra_bytes", "max_gpu_inter_bytes", "dispatch_s", "combine_s", "layer_s")}
            for mode, cost in self.modes.items()
        }
        return {
            "format": "grace-simulation/1",
            "summary": self.summary(),
            "topology": self.topology.to_dict(),
            "model_shape": _shape_dict(self.model_shape),
            "per_layer": per_layer,
        }

    def to_json(self) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict())

    def save_json(self, path: PathLike) -> None:
        """Write :meth:`to_dict` as JSON atomically."""
        save_json_atomic(path, self.to_dict())

    def dump_decisions(self, path: PathLike) -> None:
        """Write the decisions (the GPU of every token-expert pair) as a pickle-free ``.npz`` (atomic).

        Arrays: ``gpu`` int16 (int32 beyond 32767 GPUs) ``[T, L, k]`` chosen GPU (-1 none),
        ``src_gpu`` int32 ``[T]``, ``format`` and ``metadata`` (JSON: topology, model shape,
        planner, policy, token placement) so that :func:`recount_decisions` (or any script)
        can recount every figure.
        """
        if self.decisions is None:
            raise ValueError("this result kept no decisions; simulate with keep_decisions=True")
        dtype = np.int16 if self.topology.num_gpus <= np.iinfo(np.int16).max else np.int32
        meta = {
            "format": DECISIONS_FORMAT,
            "topology": self.topology.to_dict(),
            "model_shape": _shape_dict(self.model_shape),
            "planner": self.planner,
            "policy": self.policy,
            "token_placement": self.token_placement,
        }
        arrays = {
            "format": np.array(DECISIONS_FORMAT),
            "metadata": np.array(json.dumps(meta)),
            "gpu": self.decisions.astype(dtype),
            "src_gpu": self.src_gpu.astype(np.int32),
        }
        save_npz_atomic(path, arrays, verify=load_decisions)

    def format_table(self, modes: Sequence[str] | None = None) -> str:
        """Human-readable summary: pair shares, messages, and one row per dispatch mode."""
        s = self.summary()
        lines = [
            f"{s['planner'] or 'plan'} on {s['topology']} ({self.topology.num_nodes} nodes x {self.topology.gpus_per_node} GPUs), "
            f"{s['model_shape']}, {s['tokens']} tokens x {s['layers']} layers x top-{s['top_k']}, policy {s['policy']}, "
            f"tokens placed {s['token_placement']}",
            f"pairs: {s['pairs']}  on own GPU {s['share_local']:.1%}  other GPU same node {s['share_intra_node']:.1%}  "
            f"other node {s['share_inter_node']:.1%}",
            f"messages (deduplicated): token->node cross-node {s['msgs_node']}  token->GPU {s['msgs_gpu']} "
            f"(intra-node {s['msgs_gpu_intra_node']}, inter-node {s['msgs_gpu_inter_node']})",
            f"load max/mean: {s['load_max_over_mean']:.3f} mean over layers, {s['load_max_over_mean_worst_layer']:.3f} worst layer",
        ]
        header = f"{'dispatch':<13}{'NVLink MB':>12}{'inter MB':>12}{'dispatch ms':>13}{'compute ms':>12}{'combine ms':>12}{'ms/layer':>12}"
        lines += ["", header, "-" * len(header)]
        per_layer = 1e3 / max(self.num_layers, 1)  # seconds summed over layers -> ms per layer
        for mode in (modes or list(self.modes)):
            t = self.modes[mode].totals()
            lines.append(f"{mode:<13}{t['intra_bytes'] / 1e6:>12.2f}{t['inter_bytes'] / 1e6:>12.2f}{t['dispatch_s'] * per_layer:>13.3f}"
                         f"{s['compute_s'] * per_layer:>12.3f}{t['combine_s'] * per_layer:>12.3f}{t['layer_s'] * per_layer:>12.3f}")
        lines.append("(bytes per direction of the dispatch, summed over layers; the combine moves the same; times: modelled "
                     "ms of one MoE layer with all tokens in one batch, mean over layers)")
        return "\n".join(lines)


def _shape_dict(shape: ModelShape) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(shape)


# ---------------------------------------------------------------------------------------------
# counting
# ---------------------------------------------------------------------------------------------
@dataclass
class _Accumulator:
    """Per-layer figures filled one layer at a time."""

    L: int
    G: int
    modes: tuple[str, ...]
    topology: Topology
    shape: ModelShape
    shared_nic: bool = False
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    mode_arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("pairs_total", "pairs_local", "pairs_intra_node", "pairs_inter_node", "msgs_gpu_intra_node",
                     "msgs_gpu_inter_node", "msgs_node"):
            self.counts[name] = np.zeros(self.L, dtype=np.int64)
        self.counts["gpu_load"] = np.zeros((self.L, self.G), dtype=np.int64)
        for mode in self.modes:
            self.mode_arrays[mode] = {
                "intra_bytes": np.zeros(self.L, dtype=np.int64), "inter_bytes": np.zeros(self.L, dtype=np.int64),
                "max_gpu_intra_bytes": np.zeros(self.L, dtype=np.int64), "max_gpu_inter_bytes": np.zeros(self.L, dtype=np.int64),
                "dispatch_s": np.zeros(self.L),
            }

    def add_layer(self, layer: int, gpu: np.ndarray, src: np.ndarray) -> None:
        """Count one layer's decisions ``gpu`` int ``[T, k]`` (-1 none) for tokens on ``src`` int ``[T]``.

        Works on the transposed ``[k, T]`` layout (contiguous rows per top-k slot); duplicates
        within a token are found by comparing each slot with the earlier ones (k(k-1)/2 row
        comparisons), histograms are single ``bincount`` calls on category-coded GPU ids.
        """
        topo, G, tb = self.topology, self.G, self.shape.token_bytes
        gpn = topo.gpus_per_node
        g = np.ascontiguousarray(np.asarray(gpu).T, dtype=np.int64)  # [k, T]
        k, T = g.shape
        src = np.asarray(src).astype(np.int64, copy=False)
        src_row = src[None, :]
        src_node = (src // gpn)[None, :]
        valid = g >= 0
        node = g // gpn  # -1 // gpn == -1: never a node
        same_gpu = g == src_row
        same_node = node == src_node
        # pair category: 0 own GPU, 1 other GPU of the node, 2 other node, 3 missing
        cat = np.where(valid, 2 - same_node.astype(np.int64) - same_gpu, 3)
        recv = np.bincount((cat * G + np.maximum(g, 0)).reshape(-1), minlength=4 * G)[: 3 * G].reshape(3, G)
        send = np.bincount((cat * G + src_row).reshape(-1), minlength=4 * G)[: 3 * G].reshape(3, G)
        c = self.counts
        c["gpu_load"][layer] = recv.sum(axis=0)
        c["pairs_local"][layer], c["pairs_intra_node"][layer], c["pairs_inter_node"][layer] = recv.sum(axis=1)
        c["pairs_total"][layer] = recv.sum()

        # first occurrence of each destination GPU / node within a token
        new_gpu = np.ones((k, T), dtype=bool)
        new_node = np.ones((k, T), dtype=bool)
        for j in range(1, k):
            new_gpu[j] = ~(g[:j] == g[j]).any(axis=0)
            new_node[j] = ~(node[:j] == node[j]).any(axis=0)
        uniq = new_gpu & valid & ~same_gpu  # distinct remote GPUs
        u_intra = uniq & same_node
        u_inter = uniq & ~same_node
        u_node = new_node & valid & ~same_node  # distinct remote nodes
        c["msgs_gpu_intra_node"][layer] = np.count_nonzero(u_intra)
        c["msgs_gpu_inter_node"][layer] = np.count_nonzero(u_inter)
        c["msgs_node"][layer] = np.count_nonzero(u_node)

        def hist(mask: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
            """int64 ``[G]``: entries of ``mask`` ``[k, T]`` counted at GPU ``where`` ``[k, T]`` (None: the token's own GPU)."""
            if where is None:  # count per token, then per start GPU
                return np.bincount(src, weights=mask.sum(axis=0), minlength=G).astype(np.int64)
            return np.bincount(np.where(mask, where, G).reshape(-1), minlength=G + 1)[:G]

        intra_l, inter_l = topo.intra_node, topo.inter_node

        def inter_load(sent: np.ndarray, recv: np.ndarray) -> int:
            """Inter-node rows that set the phase time: the busiest GPU's, or with a shared NIC its node's share per GPU."""
            if self.shared_nic:
                sent, recv = (v.reshape(-1, gpn).sum(axis=1) / gpn for v in (sent, recv))
            return int(np.ceil(np.maximum(sent, recv).max(initial=0)))

        for mode in self.modes:
            arrays = self.mode_arrays[mode]
            if mode == "flat":
                n_intra, n_inter = int(c["pairs_intra_node"][layer]), int(c["pairs_inter_node"][layer])
                intra_io = int(np.maximum(send[1], recv[1]).max(initial=0)) * tb
                inter_io = inter_load(send[2], recv[2]) * tb
                latency = max(intra_l.latency_s if n_intra else 0.0, inter_l.latency_s if n_inter else 0.0)
                dispatch = max(intra_io / intra_l.bandwidth_bytes_per_s, inter_io / inter_l.bandwidth_bytes_per_s) + latency
            else:  # hierarchical: inter-node phase to the peer GPUs, then intra-node phase
                peer = node * gpn + (src % gpn)[None, :]
                fwd = u_inter & (g != peer)  # the peer forwards over NVLink
                n_inter = int(c["msgs_node"][layer])
                n_intra = int(c["msgs_gpu_intra_node"][layer]) + int(np.count_nonzero(fwd))
                inter_io = inter_load(hist(u_node), hist(u_node, peer)) * tb
                intra_send = hist(u_intra) + hist(fwd, peer)
                intra_recv = hist(u_intra | fwd, g)
                intra_io = int(np.maximum(intra_send, intra_recv).max(initial=0)) * tb
                dispatch = (inter_io / inter_l.bandwidth_bytes_per_s + (inter_l.latency_s if n_inter else 0.0)
                            + intra_io / intra_l.bandwidth_bytes_per_s + (intra_l.latency_s if n_intra else 0.0))
            arrays["intra_bytes"][layer] = n_intra * tb
            arrays["inter_bytes"][layer] = n_inter * tb
            arrays["max_gpu_intra_bytes"][layer] = intra_io
            arrays["max_gpu_inter_bytes"][layer] = inter_io
            arrays["dispatch_s"][layer] = dispatch

    def result(self, *, planner: str, policy: str, token_placement: str, src: np.ndarray, top_k: int,
               decisions: np.ndarray | None) -> SimulationResult:
        c = self.counts
        compute = c["gpu_load"].max(axis=1, initial=0) * float(self.shape.expert_flops_per_token) / self.topology.gpu_flops
        modes = {}
        for mode in self.modes:
            a = self.mode_arrays[mode]
            modes[mode] = DispatchCost(mode=mode, intra_bytes=a["intra_bytes"], inter_bytes=a["inter_bytes"],
                                       max_gpu_intra_bytes=a["max_gpu_intra_bytes"], max_gpu_inter_bytes=a["max_gpu_inter_bytes"],
                                       dispatch_s=a["dispatch_s"], combine_s=a["dispatch_s"].copy(),
                                       layer_s=2 * a["dispatch_s"] + compute)
        return SimulationResult(
            topology=self.topology, model_shape=self.shape, planner=planner, policy=policy, token_placement=token_placement,
            num_tokens=int(src.shape[0]), top_k=top_k, pairs_total=c["pairs_total"], pairs_local=c["pairs_local"],
            pairs_intra_node=c["pairs_intra_node"], pairs_inter_node=c["pairs_inter_node"],
            msgs_gpu_intra_node=c["msgs_gpu_intra_node"], msgs_gpu_inter_node=c["msgs_gpu_inter_node"],
            msgs_node=c["msgs_node"], gpu_load=c["gpu_load"], compute_s=compute, modes=modes,
            src_gpu=src.astype(np.int32), decisions=decisions,
        )


def _check_decisions(gpu: np.ndarray, ids: np.ndarray, hosted: np.ndarray, layer: int, policy: str) -> np.ndarray:
    """Check a policy's output ``gpu`` ``[T, k]`` against ``ids`` ``[T, k]`` and ``hosted`` bool ``[E, G]``."""
    gpu = np.asarray(gpu)
    if gpu.shape != ids.shape:
        raise ValueError(f"policy {policy!r} returned shape {gpu.shape} at layer {layer}, expected {ids.shape}")
    valid = ids >= 0
    if ((gpu >= 0) != valid).any():
        t, j = np.argwhere((gpu >= 0) != valid)[0]
        raise ValueError(f"policy {policy!r}, layer {layer}: token {t} slot {j} has expert {ids[t, j]} but GPU {gpu[t, j]} "
                         "(-1 must mark exactly the missing records)")
    G = hosted.shape[1]
    if gpu.size and int(gpu.max()) >= G:
        raise ValueError(f"policy {policy!r}, layer {layer}: GPU {int(gpu.max())} out of range [0, {G})")
    ok = ~valid | hosted.reshape(-1)[np.where(valid, ids, 0).astype(np.int64) * G + np.maximum(gpu, 0)]
    if not ok.all():
        t, j = np.argwhere(~ok)[0]
        raise ValueError(f"policy {policy!r}, layer {layer}: token {t} sent to GPU {gpu[t, j]}, which does not host expert {ids[t, j]}")
    return gpu.astype(np.int32, copy=False)


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------
def simulate(
    plan: PlacementPlan,
    trace: RoutingTrace,
    model_shape: ModelShape | str | None = None,
    *,
    policy: str | CustomPolicy = DEFAULT_POLICY,
    dispatch: str | Sequence[str] = "both",
    token_placement: str = "round-robin",
    expert_load: np.ndarray | None = None,
    seed: int = 0,
    options: RoutingOptions | None = None,
    keep_decisions: bool = False,
    progress: bool = False,
    shared_nic: bool = False,
) -> SimulationResult:
    """Replay ``trace`` through ``plan`` with a replica-choice ``policy``.

    Args:
        plan: placement for the trace's layers and experts.
        trace: per-token expert ids ``[T, L, k]``.
        model_shape: a :class:`ModelShape` or preset name; None = the preset named in
            ``trace.model`` (else GraceInputError).
        policy: a routing policy name (:data:`~megatron_grace.routing.POLICY_NAMES`; default
            ``grace``) or a custom policy function (:data:`~megatron_grace.simulation.policies.CustomPolicy`).
        dispatch: ``"flat"``, ``"hierarchical"``, ``"both"`` or a sequence of modes.
        token_placement: ``"round-robin"`` or ``"request"`` (see :func:`token_start_gpus`).
        expert_load: float ``[L, E]`` expert load behind the policy's load prediction (e.g. the
            planning statistics' ``load``); None = equal.
        seed: seed handed to randomized policies.
        options: :class:`~megatron_grace.routing.RoutingOptions` of the ``grace`` policy (None = defaults).
        keep_decisions: keep the ``[T, L, k]`` decisions (needed for ``dump_decisions``).
        progress: show a progress bar over layers.
        shared_nic: the inter-node link of a node is one NIC shared by its GPUs: an inter-node
            phase takes (the node's bytes / GPUs per node) / the per-GPU bandwidth, however the
            node's GPUs split them (default: the busiest GPU's bytes / the per-GPU bandwidth).
            ``max_gpu_inter_bytes`` then holds that per-GPU share.

    Returns:
        :class:`SimulationResult`.
    """
    check_compatible(plan, trace)
    shape = resolve_model_shape(model_shape, trace.model, trace)
    modes = parse_dispatch(dispatch)
    policy_name = check_policy(policy)
    topo = plan.topology
    T, L, k = trace.expert_ids.shape
    G, E = topo.num_gpus, plan.num_experts
    if expert_load is not None:
        expert_load = np.asarray(expert_load, dtype=np.float64)
        if expert_load.shape != (L, E):
            raise GraceInputError(f"expert_load must have shape {(L, E)} (layers, experts), got {expert_load.shape}")
    src = token_start_gpus(T, G, token_placement, trace.request_ids)
    token_index = np.arange(T, dtype=np.int64)
    src_t, positions = torch.from_numpy(src.astype(np.int64)), torch.from_numpy(token_index)
    hosts_all = plan.expert_gpus
    acc = _Accumulator(L=L, G=G, modes=modes, topology=topo, shape=shape, shared_nic=shared_nic)
    decisions = np.full((T, L, k), -1, dtype=np.int32) if keep_decisions else None
    from megatron_grace._progress import progress as _progress

    for layer in _progress(range(L), desc=f"simulate {plan.planner or 'plan'}", total=L, enabled=progress):
        ids = trace.expert_ids[:, layer, :]
        hosts = hosts_all[layer]
        hosted = np.zeros((E, G), dtype=bool)
        e_idx, r_idx = np.nonzero(hosts >= 0)
        hosted[e_idx, hosts[e_idx, r_idx]] = True
        layer_load = None if expert_load is None else expert_load[layer]
        if callable(policy):
            ctx = PolicyContext(layer=layer, expert_load=layer_load, token_index=token_index, seed=seed, plan=plan)
            gpu = policy(ids, src, hosts, topo, ctx)
        else:
            gpu = choose_gpus(policy, ids, src_t, plan, layer, expert_load=layer_load, seed=seed, positions=positions,
                              options=options)
        gpu = _check_decisions(gpu, ids, hosted, layer, policy_name)
        acc.add_layer(layer, gpu, src)
        if decisions is not None:
            decisions[:, layer, :] = gpu
    return acc.result(planner=plan.planner, policy=policy_name, token_placement=token_placement, src=src, top_k=k,
                      decisions=decisions)


def count_decisions(
    decisions: np.ndarray,
    src_gpu: np.ndarray,
    topology: Topology,
    model_shape: ModelShape,
    *,
    dispatch: str | Sequence[str] = "both",
    planner: str = "",
    policy: str = "",
    token_placement: str = "",
) -> SimulationResult:
    """Recount every figure from decisions alone.

    Args:
        decisions: int ``[T, L, k]`` GPU processing each pair, -1 for none.
        src_gpu: int ``[T]`` start GPU of each token.
        topology, model_shape: the cluster and sizes.
        dispatch, planner, policy, token_placement: as in :func:`simulate` (labels only, except
            ``dispatch``).
    """
    gpu = np.asarray(decisions)
    src = np.asarray(src_gpu).reshape(-1)
    if gpu.ndim != 3 or gpu.shape[0] != src.shape[0]:
        raise GraceInputError(f"decisions must be [tokens, layers, k] with one start GPU per token, got {gpu.shape} and {src.shape}")
    G = topology.num_gpus
    if gpu.size and (int(gpu.min()) < -1 or int(gpu.max()) >= G):
        raise GraceInputError(f"decision GPU ids must be in [-1, {G}), got {int(gpu.min())}..{int(gpu.max())}")
    if src.size and (int(src.min()) < 0 or int(src.max()) >= G):
        raise GraceInputError(f"start GPU ids must be in [0, {G})")
    T, L, k = gpu.shape
    acc = _Accumulator(L=L, G=G, modes=parse_dispatch(dispatch), topology=topology, shape=model_shape)
    for layer in range(L):
        acc.add_layer(layer, gpu[:, layer, :].astype(np.int32), src)
    return acc.result(planner=planner, policy=policy, token_placement=token_placement, src=src, top_k=k, decisions=None)


def load_decisions(path: PathLike) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read a decisions dump: ``(gpu int [T, L, k], src_gpu int32 [T], metadata dict)``."""
    data = load_npz(path)
    fmt = str(data["format"]) if "format" in data else None
    if fmt != DECISIONS_FORMAT:
        raise GraceInputError(f"not a decisions dump (format {fmt!r}, expected {DECISIONS_FORMAT!r})", path)
    for key in ("metadata", "gpu", "src_gpu"):
        if key not in data:
            raise GraceInputError(f"decisions dump lacks the array {key!r}", path)
    try:
        meta = json.loads(str(data["metadata"]))
    except ValueError as exc:
        raise GraceInputError(f"decisions dump has unreadable metadata ({exc})", path) from None
    gpu, src = data["gpu"], data["src_gpu"]
    if gpu.ndim != 3 or src.shape != (gpu.shape[0],):
        raise GraceInputError(f"decisions dump has gpu {gpu.shape} and src_gpu {src.shape}; expected [T, L, k] and [T]", path)
    return gpu, src, meta


def recount_decisions(path: PathLike, dispatch: str | Sequence[str] = "both") -> SimulationResult:
    """:func:`count_decisions` on a dump written by :meth:`SimulationResult.dump_decisions`."""
    gpu, src, meta = load_decisions(path)
    try:
        topology = Topology.from_dict(meta["topology"])
        shape = ModelShape(**meta["model_shape"])
    except (KeyError, TypeError) as exc:
        raise GraceInputError(f"decisions dump metadata lacks topology or model shape ({exc})", path) from None
    return count_decisions(gpu, src, topology, shape, dispatch=dispatch, planner=str(meta.get("planner", "")),
                           policy=str(meta.get("policy", "")), token_placement=str(meta.get("token_placement", "")))
