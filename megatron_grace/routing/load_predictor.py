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
are a bug upstream; device tensors are checked in debug mode only, host arrays always). A predictor not updated for ``stale_after`` steps warns once and falls
back to the plan's statistics, which is the safe choice.
"""

from __future__ import annotations

import warnings
import numpy as np
import torch

from megatron_grace._debug import debug_enabled
from megatron_grace.errors import GraceInputError
from megatron_grace.plan.placement import PlacementPlan
from megatron_grace.plan.replication import predicted_gpu_load

PREDICTOR_MODES = ("ema", "window", "static")


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

    The state lives in float64 torch tensors on ``device`` (the layer's device), so observing,
    updating and predicting never leave the GPU; the merge across ranks is an all-reduce of a
    device tensor over ``group`` (NCCL or gloo, whichever backs the group).

    Args:
        plan: the placement plan (fixes L and G).
        expert_load: float ``[L, E]`` profiled load for the start-up values (default: the plan's).
        mode: ``ema``, ``window`` or ``static``.
        alpha: EMA weight of the newest observation (0 < alpha <= 1).
        window: observations kept in ``window`` mode.
        sync_every: merge counts across ranks every N steps (0 = never).
        group: torch.distributed process group for merging (None = default group).
        stale_after: steps without an observation after which the plan's statistics are used.
        device: where the state lives (default CPU; :meth:`to` moves it).
    """

    def __init__(self, plan: PlacementPlan, expert_load: np.ndarray | None = None, mode: str = "ema", alpha: float = 0.25,
                 window: int = 8, sync_every: int = 0, group=None, stale_after: int = 1000,
                 device: torch.device | str | None = None) -> None:
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
        share = static / np.maximum(static.sum(axis=1, keepdims=True), 1e-12)  # [L, G], rows sum to 1
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self._static_share = torch.from_numpy(share).to(dev)
        self._share = self._static_share.clone()
        self._pending = torch.zeros_like(self._share)
        self._history = torch.zeros((window,) + tuple(self._share.shape), dtype=torch.float64, device=dev)
        self._history_len = 0
        self._history_pos = 0
        self._observed_this_step = False
        self._steps_since_update = 0
        self._warned_stale = False
        self.step = 0

    @property
    def device(self) -> torch.device:
        return self._share.device

    @property
    def graph_capturable(self) -> bool:
        """Whether a CUDA graph can replay this predictor's updates: not with ``window`` mode or ``sync_every``,
        whose host-side counters (history position, steps since a merge) a capture would freeze."""
        return self.mode != "window" and not self.sync_every

    def to(self, device: torch.device | str) -> LoadPredictor:
        """Move the state to ``device`` (in place); returns self."""
        for name in ("_static_share", "_share", "_pending", "_history"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    # ------------------------------------------------------------------ observe
    def observe(self, counts: torch.Tensor | np.ndarray, layer: int | None = None) -> None:
        """Record observed pairs per GPU: ``[L, G]`` for all layers, or ``[G]`` with ``layer``.

        A device tensor is added on the device (no host synchronisation; its values are checked
        only in debug mode); host data (numpy, lists) is checked always. Counting a step's layers
        one by one (``layer=l``) is allowed; call :meth:`end_step` after the last layer.
        """
        on_host = not isinstance(counts, torch.Tensor)
        arr = torch.as_tensor(np.asarray(counts, dtype=np.float64)) if on_host else counts.detach()
        want = (self.num_layers, self.num_gpus) if layer is None else (self.num_gpus,)
        if tuple(arr.shape) != want or (layer is not None and not 0 <= layer < self.num_layers):
            where = "" if layer is None else f" for a layer in [0, {self.num_layers}), got layer {layer}"
            raise GraceInputError(f"counts must be {'[layers, GPUs]' if layer is None else '[GPUs]'} = {want}{where}, got shape "
                                  f"{tuple(arr.shape)} (a plan for another topology?)")
        if on_host or debug_enabled():
            if not bool(torch.isfinite(arr).all()) or bool((arr < 0).any()):
                raise GraceInputError("load predictor was fed NaN, infinite or negative counts")
        arr = arr.to(device=self.device, dtype=torch.float64)
        if layer is None:
            self._pending.add_(arr)
        else:
            self._pending[layer].add_(arr)
        self._observed_this_step = True

    def end_step(self) -> None:
        """Close a forward pass: merge across ranks when due, then update the prediction.

        With ``sync_every`` the merge is a collective: it runs on every N-th step whether or not
        this rank observed anything, so that no rank waits for another. The update itself is a
        few in-place device ops (a layer with no traffic keeps its prediction).
        """
        self.step += 1
        observed = self._observed_this_step
        self._observed_this_step = False
        if self.sync_every:
            if self.step % self.sync_every != 0:
                if not observed:
                    self._steps_since_update += 1
                return
            self._all_reduce(self._pending)
        elif not observed:
            self._steps_since_update += 1
            return
        self._update(self._pending)
        self._pending.zero_()

    def _all_reduce(self, counts: torch.Tensor) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=self.group)

    def _update(self, counts: torch.Tensor) -> None:
        self._steps_since_update = 0
        self._warned_stale = False
        if self.mode == "static":
            return
        totals = counts.sum(dim=1, keepdim=True)
        share = torch.where(totals > 0, counts / totals.clamp(min=1e-12), self._share)  # layers without traffic keep theirs
        if self.mode == "ema":
            self._share.mul_(1 - self.alpha).add_(share, alpha=self.alpha)
        else:
            self._history[self._history_pos].copy_(share)
            self._history_pos = (self._history_pos + 1) % self.window
            self._history_len = min(self._history_len + 1, self.window)
            self._share.copy_(self._history[: self._history_len].mean(dim=0))

    # ------------------------------------------------------------------ predict
    def predict_share(self, layer: int) -> torch.Tensor:
        """float64 ``[G]`` on the predictor's device: predicted share of the layer's pairs that each GPU will receive."""
        if not 0 <= layer < self.num_layers:
            raise GraceInputError(f"layer {layer} outside [0, {self.num_layers})")
        if self.mode != "static" and self._steps_since_update >= self.stale_after:
            if not self._warned_stale:
                warnings.warn(f"load predictor has had no observation for {self._steps_since_update} steps; "
                              "falling back to the plan's statistics", RuntimeWarning, stacklevel=2)
                self._warned_stale = True
            return self._static_share[layer].clone()
        return self._share[layer].clone()

    def predict(self, layer: int, pairs: float | torch.Tensor = 1.0) -> torch.Tensor:
        """float64 ``[G]`` predicted pairs per GPU for a step routing ``pairs`` pairs at ``layer`` (a float or a 0-d
        device tensor, e.g. the count of valid router choices, so that no host read is needed)."""
        share = self.predict_share(layer)
        if isinstance(pairs, torch.Tensor):
            return share * pairs.to(device=share.device, dtype=torch.float64)
        return share * float(pairs)
