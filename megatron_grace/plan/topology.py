"""Cluster topology, link and compute models, and model shapes.

A :class:`Topology` is ``num_nodes x gpus_per_node`` GPUs, numbered node-major (GPU ``g`` is
on node ``g // gpus_per_node``), with a per-GPU expert budget given either as a number of
expert slots or as a memory budget in bytes (then the number of slots is
``memory_per_gpu_bytes // expert_bytes``, so replicas cost what they really cost), and a link
and compute model used by the simulator to turn bytes and tokens into a modelled layer time.

A :class:`ModelShape` gives the sizes that turn token counts into bytes and FLOPs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from megatron_grace.errors import GraceInputError


@dataclass(frozen=True)
class LinkModel:
    """One link type: time(bytes) = latency_s + bytes / bandwidth_bytes_per_s.

    Attributes:
        bandwidth_bytes_per_s: bandwidth per direction available to one GPU.
        latency_s: fixed cost of one message phase (one all-to-all step) over this link.
    """

    bandwidth_bytes_per_s: float
    latency_s: float

    def time(self, nbytes: float) -> float:
        """Seconds to move ``nbytes`` over this link (0 bytes -> 0 s)."""
        return 0.0 if nbytes <= 0 else self.latency_s + nbytes / self.bandwidth_bytes_per_s


@dataclass(frozen=True)
class ModelShape:
    """Sizes of an MoE model's experts.

    Attributes:
        name: model name.
        num_layers: MoE layers.
        num_experts: routed experts per layer.
        top_k: experts per token.
        hidden_size: model width h (a token's activation is h values).
        expert_ffn_size: expert MLP inner width f (SwiGLU: 3 matrices of h x f).
        dtype_bytes: bytes per activation / weight value (2 for bf16).
    """

    name: str
    num_layers: int
    num_experts: int
    top_k: int
    hidden_size: int
    expert_ffn_size: int
    dtype_bytes: int = 2

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's hidden state on the wire."""
        return self.hidden_size * self.dtype_bytes

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert's weights (SwiGLU: gate, up and down projections)."""
        return 3 * self.hidden_size * self.expert_ffn_size * self.dtype_bytes

    @property
    def expert_flops_per_token(self) -> int:
        """FLOPs one expert spends on one token (3 matmuls of h x f, 2 FLOPs per MAC)."""
        return 6 * self.hidden_size * self.expert_ffn_size

    @staticmethod
    def preset(name: str) -> ModelShape:
        """A named model shape; see :data:`MODEL_PRESETS`."""
        if name not in MODEL_PRESETS:
            raise GraceInputError(f"unknown model shape {name!r}; known: {', '.join(sorted(MODEL_PRESETS))}")
        return MODEL_PRESETS[name]


MODEL_PRESETS: dict[str, ModelShape] = {
    # Qwen3-30B-A3B: hidden 2048, moe_intermediate_size 768, 128 experts, top-8, 48 layers.
    "qwen3-30b-a3b": ModelShape("qwen3-30b-a3b", 48, 128, 8, 2048, 768),
    # Mixtral-8x7B: hidden 4096, intermediate 14336, 8 experts, top-2, 32 layers.
    "mixtral-8x7b": ModelShape("mixtral-8x7b", 32, 8, 2, 4096, 14336),
    # DeepSeek-V3: hidden 7168, moe_intermediate_size 2048, 256 routed experts, top-8, 58 MoE layers.
    "deepseek-v3": ModelShape("deepseek-v3", 58, 256, 8, 7168, 2048),
    # Switch-base-128: d_model 768, d_ff 3072, 128 experts, top-1, 6 encoder MoE layers (ReLU MLP,
    # modelled here with the SwiGLU byte count, which overstates its weights by 1.5x).
    "switch-base-128": ModelShape("switch-base-128", 6, 128, 1, 768, 3072, 4),
    # Granite-3.0-1B-A400M: hidden 1024, intermediate 512, 32 experts, top-8, 24 layers.
    "granite-3.0-1b-a400m": ModelShape("granite-3.0-1b-a400m", 24, 32, 8, 1024, 512),
}


@dataclass(frozen=True)
class Topology:
    """GPUs, their expert budget, and the link/compute model.

    Attributes:
        name: preset name or free text.
        num_nodes: nodes.
        gpus_per_node: GPUs per node.
        intra_node: link between two GPUs of one node (NVLink), per GPU and direction.
        inter_node: link between GPUs of different nodes, per GPU and direction (a NIC shared
            by the GPUs of a node is given as its bandwidth divided by ``gpus_per_node``).
        gpu_flops: sustained dense bf16 FLOP/s of one GPU for expert MLPs.
        slots_per_gpu: expert slots per GPU, or None when given by memory.
        memory_per_gpu_bytes: memory budget for expert weights per GPU, or None.
        expert_bytes: bytes of one expert (needed with ``memory_per_gpu_bytes``).
    """

    name: str
    num_nodes: int
    gpus_per_node: int
    intra_node: LinkModel
    inter_node: LinkModel
    gpu_flops: float
    slots_per_gpu: int | None = None
    memory_per_gpu_bytes: float | None = None
    expert_bytes: float | None = None

    def __post_init__(self) -> None:
        if self.num_nodes < 1 or self.gpus_per_node < 1:
            raise GraceInputError(f"topology {self.name!r}: needs at least 1 node and 1 GPU per node, got {self.num_nodes} x {self.gpus_per_node}")
        for link_name, link in (("intra_node", self.intra_node), ("inter_node", self.inter_node)):
            if not (link.bandwidth_bytes_per_s > 0 and link.latency_s >= 0 and math.isfinite(link.bandwidth_bytes_per_s)):
                raise GraceInputError(f"topology {self.name!r}: {link_name} link needs positive bandwidth and non-negative latency")
        for name in ("gpu_flops", "memory_per_gpu_bytes", "expert_bytes"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise GraceInputError(f"topology {self.name!r}: {name} must be a finite number, got {value!r}")
        for link_name, link in (("intra_node", self.intra_node), ("inter_node", self.inter_node)):
            if not math.isfinite(link.latency_s):
                raise GraceInputError(f"topology {self.name!r}: {link_name} latency must be finite")
        if not self.gpu_flops > 0:
            raise GraceInputError(f"topology {self.name!r}: gpu_flops must be positive")
        if self.slots_per_gpu is not None and self.slots_per_gpu < 1:
            raise GraceInputError(f"topology {self.name!r}: slots_per_gpu must be >= 1, got {self.slots_per_gpu}")
        if self.memory_per_gpu_bytes is not None:
            if self.expert_bytes is None or not self.expert_bytes > 0:
                raise GraceInputError(f"topology {self.name!r}: a memory budget needs expert_bytes > 0")
            if self.memory_per_gpu_bytes / self.expert_bytes > 1e6:
                raise GraceInputError(
                    f"topology {self.name!r}: memory budget / expert bytes = {self.memory_per_gpu_bytes / self.expert_bytes:.3g} slots per GPU; "
                    "check the units (bytes)"
                )
            if self.memory_per_gpu_bytes < self.expert_bytes:
                raise GraceInputError(
                    f"topology {self.name!r}: memory budget {self.memory_per_gpu_bytes:.3g} B per GPU cannot hold one expert of {self.expert_bytes:.3g} B"
                )

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node

    def node_of(self, gpu: int) -> int:
        """Node index of a (node-major) GPU index."""
        return gpu // self.gpus_per_node

    def capacity(self) -> int | None:
        """Expert slots per GPU from the slot count or the memory budget; None if unbounded."""
        if self.slots_per_gpu is not None:
            return self.slots_per_gpu
        if self.memory_per_gpu_bytes is not None and self.expert_bytes:
            return int(self.memory_per_gpu_bytes // self.expert_bytes)
        return None

    def with_slots(self, slots_per_gpu: int) -> Topology:
        """Same cluster with a fixed number of expert slots per GPU."""
        return replace(self, slots_per_gpu=slots_per_gpu, memory_per_gpu_bytes=None)

    def with_extra_slots(self, num_experts: int, extra: int) -> Topology:
        """Slots for an even split of ``num_experts`` (rounded up) plus ``extra`` per GPU."""
        if extra < 0:
            raise GraceInputError(f"extra slots must be >= 0, got {extra}")
        return self.with_slots(math.ceil(num_experts / self.num_gpus) + extra)

    def with_memory(self, memory_per_gpu_bytes: float, expert_bytes: float) -> Topology:
        """Same cluster with a memory budget for expert weights per GPU."""
        return replace(self, slots_per_gpu=None, memory_per_gpu_bytes=float(memory_per_gpu_bytes), expert_bytes=float(expert_bytes))

    def check_fits(self, num_experts: int) -> None:
        """Raise if the budget cannot hold one copy of every expert."""
        cap = self.capacity()
        if cap is not None and cap * self.num_gpus < num_experts:
            raise GraceInputError(
                f"topology {self.name!r}: budget too small: {self.num_gpus} GPUs x {cap} slots = {cap * self.num_gpus} < {num_experts} experts"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Topology:
        """Inverse of :meth:`to_dict`; a wrong schema raises GraceInputError."""
        try:
            fields = dict(data)
            fields["intra_node"] = LinkModel(**fields["intra_node"])
            fields["inter_node"] = LinkModel(**fields["inter_node"])
            return Topology(**fields)
        except (TypeError, KeyError) as exc:
            raise GraceInputError(f"invalid topology description ({exc})") from None

    @staticmethod
    def preset(name: str) -> Topology:
        """A named cluster; see :data:`TOPOLOGY_PRESETS`. Unknown names raise GraceInputError listing the known ones."""
        if name in TOPOLOGY_PRESETS:
            return TOPOLOGY_PRESETS[name]
        raise GraceInputError(f"unknown topology preset {name!r}; known: {', '.join(sorted(TOPOLOGY_PRESETS))}")


_GB = 1e9
TOPOLOGY_PRESETS: dict[str, Topology] = {
    # The GRACE-MoE paper's cluster: 2 nodes x 4 A100-80GB, NVLink (~300 GB/s per direction per
    # GPU), 25 Gbit/s Ethernet per node shared by its 4 GPUs; A100 bf16 dense ~312 TFLOP/s peak,
    # modelled at 50% for small expert GEMMs.
    "a100-2x4": Topology(
        name="a100-2x4", num_nodes=2, gpus_per_node=4,
        intra_node=LinkModel(300 * _GB, 5e-6),
        inter_node=LinkModel(25e9 / 8 / 4, 20e-6),
        gpu_flops=156e12,
    ),
    # A modern cluster: 4 nodes x 8 H200, NVLink 4 (~450 GB/s per direction per GPU), one
    # 400 Gbit/s InfiniBand NIC per GPU; H200 bf16 dense ~989 TFLOP/s peak, modelled at 50%.
    "h200-4x8": Topology(
        name="h200-4x8", num_nodes=4, gpus_per_node=8,
        intra_node=LinkModel(450 * _GB, 3e-6),
        inter_node=LinkModel(400e9 / 8, 5e-6),
        gpu_flops=495e12,
    ),
    # DeepSeek-V3-sized deployment used for planning-time benchmarks: 32 nodes x 8 H200.
    "h200-32x8": Topology(
        name="h200-32x8", num_nodes=32, gpus_per_node=8,
        intra_node=LinkModel(450 * _GB, 3e-6),
        inter_node=LinkModel(400e9 / 8, 5e-6),
        gpu_flops=495e12,
    ),
}
