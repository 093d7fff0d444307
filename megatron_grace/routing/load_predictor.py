"""`LoadPredictor`: per-rank prediction of the next step's per-GPU expert load.

Each rank keeps one predictor. After every forward pass it observes how many token-expert
pairs each GPU received at each layer (from this rank's own decisions, or merged across ranks),
and predicts the next step's per-GPU load, which the ``grace`` policy turns into spare capacity.

Estimator (``mode``):

- ``ema`` (default): ``pred <- (1 - alpha) * pred + alpha * observed`` per step, alpha 0.25;
- ``window``: mean of the last ``window`` observations;
- ``static``: never updates: the plan's statistics (the GRACE paper's static prediction).

Start-up values come from the plan's statistics (:func:`static_gpu_load`: each copy takes an
equal share of its expert's profiled load). Predictions are normalised to the per-step pair
count so that the EMA mixes like with like.

Merging across ranks: with ``sync_every = N > 0`` and a process group, every N steps the
ranks all-reduce (sum) the counts they observed since the last merge (one small tensor of
``[L, G]`` floats) and update the prediction from those global counts; between merges the
prediction stays at its last value. Every rank must call :meth:`observe` and :meth:`end_step`
each step (the merge is a collective).

Robustness: observed counts with NaN, infinite or negative values raise GraceInputError (they
are a bug upstream). A predictor not updated for ``stale_after`` steps warns once and falls
back to the plan's statistics, which is the safe choice.
"""

from __future__ import annotations

import warnings
from collections import deque

import numpy as np
import torch

from megatron_grace.errors import GraceInputError
from megatron_grace.plan.placement import PlacementPlan

PREDICTOR_MODES = ("ema", "window", "static")


def predicted_gpu_load(layer_hosts: np.ndarray, num_gpus: int, expert_load: np.ndarray | None = None) -> np.ndarray:
    """float64 ``[G]``: one layer's GPU loads if every copy takes an equal share of its expert's load.

    Args:
        layer_hosts: int ``[E, R]`` hosting GPUs, -1 padded (``PlacementPlan.expert_gpus[layer]``).
        num_gpus: G.
        expert_load: float ``[E]`` or None (= 1 per expert).
    """
    hosts = np.asarray(layer_hosts)
    E = hosts.shape[0]
    load = np.ones(E) if expert_load is None else np.asarray(expert_load, dtype=np.float64).reshape(-1)
    if load.shape != (E,):
        raise GraceInputError(f"expert_load has {load.shape[0]} entries, the plan has {E} experts")
    present = hosts >= 0
    copies = np.maximum(present.sum(axis=1), 1)
    share = np.broadcast_to((load / copies)[:, None], hosts.shape)
    return np.bincount(hosts[present], weights=share[present], minlength=num_gpus).astype(np.float64)


def static_gpu_load(plan: PlacementPlan, expert_load: np.ndarray | None = None) -> np.ndarray:
    """float64 ``[L, G]``: :func:`predicted_gpu_load` of every layer (the GRACE paper's static prediction).

    Args:
        plan: the placement.
        expert_load: float ``[L, E]`` profiled expert load; default: ``plan.metadata
            ["expert_load"]`` when the planner recorded it, else 1 per expert.
    """
    L, E, G = plan.num_layers, plan.num_experts, plan.num_gpus
    if expert_load is None:
        recorded = plan.metadata.get("expert_load") if isinstance(plan.metadata, dict) else None
        expert_load = np.asarray(recorded, dtype=np.float64) if recorded is not None else np.ones((L, E))
    load = np.asarray(expert_load, dtype=np.float64)
    if load.shape != (L, E):
        raise GraceInputError(f"expert load has shape {load.shape}, the plan needs {(L, E)}")
    return np.stack([predicted_gpu_load(plan.expert_gpus[layer], G, load[layer]) for layer in range(L)])


class LoadPredictor:
    """Per-GPU load prediction for one rank (see the module docstring).

    Args:
        plan: the placement plan (fixes L and G).
        expert_load: float ``[L, E]`` profiled load for the start-up values (default: the plan's).
        mode: ``ema``, ``window`` or ``static``.
        alpha: EMA weight of the newest observation (0 < alpha <= 1).
        window: observations kept in ``window`` mode.
        sync_every: merge counts across ranks every N steps (0 = never).
        group: torch.distributed process group for merging (None = default group).
        stale_after: steps without an observation after which the plan's statistics are used.
    """

    def __init__(self, plan: PlacementPlan, expert_load: np.ndarray | None = None, mode: str = "ema", alpha: float = 0.25,
                 window: int = 8, sync_every: int = 0, group=None, stale_after: int = 1000) -> None:
        if mode not in PREDICTOR_MODES:
            raise GraceInputError(f"unknown load-predictor mode {mode!r}; known: {', '.join(PREDICTOR_MODES)}")
        if not 0 < alpha <= 1:
            raise GraceInputError(f"alpha must be in (0, 1], got {alpha}")
        if window < 1 or sync_every < 0 or stale_after < 1:
            raise GraceInputError("window and stale_after must be >= 1 and sync_every >= 0")
        self.plan = plan
        self.num_layers, self.num_gpus = plan.num_layers, plan.num_gpus
        self.mode, self.alpha, self.window, self.sync_every, self.group = mode, alpha, window, sync_every, group
        self.stale_after = stale_after
        static = static_gpu_load(plan, expert_load)
        self._static_share = static / np.maximum(static.sum(axis=1, keepdims=True), 1e-12)  # [L, G], rows sum to 1
        self._share = self._static_share.copy()
        self._history: deque[np.ndarray] = deque(maxlen=window)
        self._pending = np.zeros((self.num_layers, self.num_gpus))
        self._steps_since_update = 0
        self._warned_stale = False
        self.step = 0

    # ------------------------------------------------------------------ observe
    def observe(self, counts: torch.Tensor | np.ndarray, layer: int | None = None) -> None:
        """Record observed pairs per GPU: ``[L, G]`` for all layers, or ``[G]`` with ``layer``.

        Counting a step's layers one by one (``layer=l``) is allowed; call :meth:`end_step`
        after the last layer of a forward pass.
        """
        arr = counts.detach().double().cpu().numpy() if isinstance(counts, torch.Tensor) else np.asarray(counts, dtype=np.float64)
        if not np.isfinite(arr).all() or (arr < 0).any():
            raise GraceInputError("load predictor was fed NaN, infinite or negative counts")
        if layer is None:
            if arr.shape != (self.num_layers, self.num_gpus):
                raise GraceInputError(f"counts must be [layers, GPUs] = {(self.num_layers, self.num_gpus)}, got {arr.shape} (a plan for another topology?)")
            self._pending += arr
        else:
            if arr.shape != (self.num_gpus,) or not 0 <= layer < self.num_layers:
                raise GraceInputError(f"counts must be [GPUs] = ({self.num_gpus},) for a layer in [0, {self.num_layers}), got {arr.shape} at layer {layer}")
            self._pending[layer] += arr
        self._observed_this_step = True

    def end_step(self) -> None:
        """Close a forward pass: merge across ranks when due, then update the prediction.

        With ``sync_every`` the merge is a collective: it runs on every N-th step whether or not
        this rank observed anything, so that no rank waits for another.
        """
        self.step += 1
        observed = getattr(self, "_observed_this_step", False)
        self._observed_this_step = False
        if self.sync_every:
            if self.step % self.sync_every != 0:
                if not observed:
                    self._steps_since_update += 1
                return
            counts = self._all_reduce(self._pending)
        elif observed:
            counts = self._pending
        else:
            self._steps_since_update += 1
            return
        self._pending = np.zeros_like(self._pending)
        if counts.sum() > 0:
            self._update(counts)
        else:
            self._steps_since_update += 1

    def _all_reduce(self, counts: np.ndarray) -> np.ndarray:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return counts
        t = torch.from_numpy(counts.copy())
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t.numpy()

    def _update(self, counts: np.ndarray) -> None:
        self._steps_since_update = 0
        self._warned_stale = False
        if self.mode == "static":
            return
        totals = counts.sum(axis=1, keepdims=True)
        share = np.where(totals > 0, counts / np.maximum(totals, 1e-12), self._share)  # layers without traffic keep theirs
        if self.mode == "ema":
            self._share = (1 - self.alpha) * self._share + self.alpha * share
        else:
            self._history.append(share)
            self._share = np.mean(np.stack(self._history), axis=0)

    # ------------------------------------------------------------------ predict
    def predict_share(self, layer: int) -> np.ndarray:
        """float64 ``[G]``: predicted share of the layer's pairs that each GPU will receive."""
        if not 0 <= layer < self.num_layers:
            raise GraceInputError(f"layer {layer} outside [0, {self.num_layers})")
        if self.mode != "static" and self._steps_since_update >= self.stale_after:
            if not self._warned_stale:
                warnings.warn(f"load predictor has had no observation for {self._steps_since_update} steps; "
                              "falling back to the plan's statistics", RuntimeWarning, stacklevel=2)
                self._warned_stale = True
            return self._static_share[layer].copy()
        return self._share[layer].copy()

    def predict(self, layer: int, pairs: float = 1.0) -> torch.Tensor:
        """float64 ``[G]`` predicted pairs per GPU for a step routing ``pairs`` pairs at ``layer``."""
        return torch.from_numpy(self.predict_share(layer) * pairs)
