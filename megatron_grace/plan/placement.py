"""`PlacementPlan`: which logical experts every GPU hosts, per MoE layer.

Each GPU holds a list of expert ids, one per occupied slot; an expert may have copies on
several GPUs (replicas) but never two on one GPU, and GPUs may hold unequal numbers of
experts. GPUs are numbered node-major (GPU ``g`` sits on node ``g // gpus_per_node``).

Saved as JSON::

    {"format": "grace-plan/1", "topology": {...}, "num_experts": E, "num_layers": L,
     "planner": "grace", "metadata": {...},
     "layers": [{"gpu_experts": [[e, ...], ... one list per GPU]}, ...]}

and exportable as the DeepSeek-EPLB / SGLang arrays (``physical_to_logical_map``,
``logical_to_all_physical_map``, ``logical_count``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from megatron_grace import limits
from megatron_grace._files import PathLike, load_json, save_json_atomic
from megatron_grace._files import strict_int as _strict_int
from megatron_grace.errors import GraceInputError
from megatron_grace.plan.topology import Topology

PLAN_FORMAT = "grace-plan/1"


@dataclass(frozen=True, eq=False)
class PlacementPlan:
    """Expert placement for every MoE layer.

    Attributes:
        topology: the cluster the plan is for (GPU count, budget).
        num_experts: logical experts per layer.
        gpu_experts: ``[layer][gpu] -> list of expert ids`` hosted, one per slot.
        planner: name of the planner that made it.
        metadata: free-form JSON-able details (knobs, statistics source).
        source: the file the plan was read from, or None; errors about the plan name it.
    """

    topology: Topology
    num_experts: int
    gpu_experts: tuple[tuple[tuple[int, ...], ...], ...]
    planner: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str | None = field(default=None, repr=False)  # the file it was read from (named in errors); not saved

    def __post_init__(self) -> None:
        layers = tuple(tuple(tuple(int(e) for e in gpu) for gpu in layer) for layer in self.gpu_experts)
        object.__setattr__(self, "gpu_experts", layers)
        self.validate()

    @property
    def num_layers(self) -> int:
        return len(self.gpu_experts)

    @property
    def num_gpus(self) -> int:
        return self.topology.num_gpus

    # ------------------------------------------------------------------ validation
    def validate(self, source: PathLike | None = None, num_layers: int | None = None) -> None:
        """Check the plan against its topology and model; raise GraceInputError naming what is wrong."""
        E, G = self.num_experts, self.topology.num_gpus
        if E < 1:
            raise GraceInputError(f"plan needs num_experts >= 1, got {E}", source)
        if self.num_layers < 1:
            raise GraceInputError("plan has no layers", source)
        if num_layers is not None and num_layers != self.num_layers:
            raise GraceInputError(f"plan has {self.num_layers} layers but the model has {num_layers}", source)
        cap = self.topology.capacity()
        for layer, gpus in enumerate(self.gpu_experts):
            if len(gpus) != G:
                raise GraceInputError(f"layer {layer}: plan lists {len(gpus)} GPUs, topology {self.topology.name!r} has {G}", source)
            seen = np.zeros(E, dtype=bool)
            for gpu, experts in enumerate(gpus):
                arr = np.asarray(experts, dtype=np.int64)
                if arr.size and (arr.min() < 0 or arr.max() >= E):
                    raise GraceInputError(f"layer {layer}, GPU {gpu}: expert id {int(arr[(arr < 0) | (arr >= E)][0])} out of range [0, {E})", source)
                if np.unique(arr).size != arr.size:
                    dup = int(arr[np.argmax(np.bincount(arr))]) if arr.size else -1
                    raise GraceInputError(f"layer {layer}, GPU {gpu}: two copies of expert {dup} on one GPU", source)
                if cap is not None and arr.size > cap:
                    raise GraceInputError(f"layer {layer}, GPU {gpu}: {arr.size} experts exceed the budget of {cap} slots", source)
                seen[arr] = True
            if not seen.all():
                raise GraceInputError(f"layer {layer}: expert {int(np.argmin(seen))} has no copy on any GPU", source)

    # ------------------------------------------------------------------ tables
    @cached_property
    def copy_count(self) -> np.ndarray:
        """int64 ``[L, E]``: number of copies of each expert."""
        out = np.zeros((self.num_layers, self.num_experts), dtype=np.int64)
        for layer, gpus in enumerate(self.gpu_experts):
            for experts in gpus:
                out[layer, list(experts)] += 1
        return out

    @cached_property
    def max_copies(self) -> int:
        return int(self.copy_count.max())

    @cached_property
    def expert_gpus(self) -> np.ndarray:
        """int64 ``[L, E, R]``: GPUs hosting each expert (ascending), padded with -1; R = max copies."""
        L, E, R = self.num_layers, self.num_experts, self.max_copies
        out = np.full((L, E, R), -1, dtype=np.int64)
        fill = np.zeros((L, E), dtype=np.int64)
        for layer, gpus in enumerate(self.gpu_experts):
            for gpu, experts in enumerate(gpus):
                for e in experts:
                    out[layer, e, fill[layer, e]] = gpu
                    fill[layer, e] += 1
        return out

    @cached_property
    def expert_slots(self) -> np.ndarray:
        """int64 ``[L, E, R]``: slot index (position in its GPU's list) of each copy in ``expert_gpus``; -1 pad."""
        L, E, R = self.num_layers, self.num_experts, self.max_copies
        out = np.full((L, E, R), -1, dtype=np.int64)
        fill = np.zeros((L, E), dtype=np.int64)
        for layer, gpus in enumerate(self.gpu_experts):
            for gpu, experts in enumerate(gpus):
                for slot, e in enumerate(experts):
                    out[layer, e, fill[layer, e]] = slot
                    fill[layer, e] += 1
        return out

    @cached_property
    def slots_used(self) -> np.ndarray:
        """int64 ``[L, G]``: experts hosted per GPU."""
        return np.array([[len(g) for g in layer] for layer in self.gpu_experts], dtype=np.int64)

    def hosts(self, layer: int, expert: int) -> list[int]:
        """GPUs hosting ``expert`` at ``layer``."""
        row = self.expert_gpus[layer, expert]
        return [int(g) for g in row[row >= 0]]

    # ------------------------------------------------------------------ export
    def to_eplb_arrays(self) -> dict[str, np.ndarray]:
        """DeepSeek-EPLB / SGLang arrays.

        Returns:
            ``physical_to_logical_map`` int64 ``[L, G * S]`` (S = max slots per GPU; physical
            expert p lives on GPU ``p // S``; a GPU with fewer experts pads its unused slots
            with -1), ``logical_to_all_physical_map`` int64 ``[L, E, R]`` (-1 padded) and
            ``logical_count`` int64 ``[L, E]`` (copies per expert).

        SGLang's loader expects every physical slot to hold an expert; for plans with unequal
        counts use these arrays with care (see :meth:`to_sglang_json`).
        """
        L, G = self.num_layers, self.num_gpus
        S = int(self.slots_used.max())
        phy = np.full((L, G * S), -1, dtype=np.int64)
        for layer, gpus in enumerate(self.gpu_experts):
            for gpu, experts in enumerate(gpus):
                phy[layer, gpu * S: gpu * S + len(experts)] = experts
        log2phy = np.where(self.expert_gpus >= 0, self.expert_gpus * S + self.expert_slots, -1)
        return {
            "physical_to_logical_map": phy,
            "logical_to_all_physical_map": log2phy,
            "logical_count": self.copy_count.copy(),
        }

    def to_sglang_json(self) -> dict[str, Any]:
        """The JSON that SGLang's ``--init-expert-location`` reads (``physical_to_logical_map``).

        SGLang requires the same number of physical slots on every GPU; a plan with unequal
        counts raises GraceInputError instead of writing a map SGLang would misread.
        """
        used = self.slots_used
        if (used != used.max()).any():
            raise GraceInputError(
                f"SGLang needs the same number of experts on every GPU; this plan holds {int(used.min())} to {int(used.max())} "
                "(plan with equal slots, e.g. the eplb planner, or fill every slot)"
            )
        return {"physical_to_logical_map": self.to_eplb_arrays()["physical_to_logical_map"].tolist()}

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "topology": self.topology.to_dict(),
            "num_experts": self.num_experts,
            "num_layers": self.num_layers,
            "planner": self.planner,
            "metadata": self.metadata,
            "layers": [{"gpu_experts": [list(g) for g in layer]} for layer in self.gpu_experts],
        }

    @staticmethod
    def from_dict(data: Any, source: PathLike | None = None) -> PlacementPlan:
        """Parse and validate a plan dictionary (as written by :meth:`to_dict`)."""
        if not isinstance(data, dict):
            raise GraceInputError("plan must be a JSON object", source)
        if data.get("format") != PLAN_FORMAT:
            raise GraceInputError(f"not a placement plan (format {data.get('format')!r}, expected {PLAN_FORMAT!r})", source)
        try:
            topology = Topology.from_dict(data["topology"])
            limits.check_count("gpus", topology.num_gpus, f"topology {topology.name!r} with {topology.num_gpus} GPUs")
            num_experts = limits.check_count("experts", _strict_int(data["num_experts"], "num_experts"), f"num_experts {data['num_experts']}")
            layers = data["layers"]
            limits.check_count("layers", len(layers), f"a plan of {len(layers)} layers")
            gpu_experts = [[[_strict_int(e, "expert id") for e in gpu] for gpu in layer["gpu_experts"]] for layer in layers]
            num_layers = _strict_int(data.get("num_layers", len(layers)), "num_layers")
            metadata = dict(data.get("metadata", {}))
        except GraceInputError as exc:
            raise GraceInputError(exc.problem, source) from None
        except (KeyError, TypeError, ValueError) as exc:
            raise GraceInputError(f"plan has a wrong schema ({type(exc).__name__}: {exc})", source) from None
        if num_layers != len(gpu_experts):
            raise GraceInputError(f"plan says num_layers={num_layers} but lists {len(gpu_experts)} layers", source)
        try:
            return PlacementPlan(topology=topology, num_experts=num_experts, gpu_experts=gpu_experts,
                                 planner=str(data.get("planner", "")), metadata=metadata,
                                 source=None if source is None else str(source))
        except GraceInputError as exc:
            raise GraceInputError(exc.problem, source) from None

    def save(self, path: PathLike) -> None:
        """Write the plan as JSON atomically (temp file, parse back, rename)."""
        save_json_atomic(path, self.to_dict())

    @staticmethod
    def read(path: PathLike) -> PlacementPlan:
        """Load and validate a plan file."""
        return PlacementPlan.from_dict(load_json(path), source=path)
