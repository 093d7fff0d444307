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
import re
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
    def parse(spec: str, links: str | None = None) -> Topology:
        """``NxG`` or a preset name, with an optional link profile; see :func:`parse_topology`."""
        return parse_topology(spec, links)

    @staticmethod
    def preset(name: str) -> Topology:
        """A named cluster; see :data:`TOPOLOGY_PRESETS`. Unknown names raise GraceInputError listing the known ones."""
        if name in TOPOLOGY_PRESETS:
            return TOPOLOGY_PRESETS[name]
        raise GraceInputError(f"unknown topology preset {name!r}; known: {', '.join(sorted(TOPOLOGY_PRESETS))}")


_GB = 1e9


@dataclass(frozen=True)
class LinkProfile:
    """Named hardware for ``NxG`` topologies: links, per-node or per-GPU NIC, and GPU speed.

    Attributes:
        name: profile name (``--links NAME``).
        intra_node: NVLink model per GPU and direction.
        inter_bandwidth_bytes_per_s: inter-node bandwidth per direction, per GPU or per node.
        inter_latency_s: latency of one inter-node phase.
        inter_per_node: True when ``inter_bandwidth_bytes_per_s`` is one NIC shared by all GPUs
            of a node (each GPU then gets it divided by ``gpus_per_node``).
        gpu_flops: sustained dense bf16 FLOP/s of one GPU for expert MLPs.
        description: one line for ``--help`` and the docs.
    """

    name: str
    intra_node: LinkModel
    inter_bandwidth_bytes_per_s: float
    inter_latency_s: float
    inter_per_node: bool
    gpu_flops: float
    description: str = ""

    def topology(self, num_nodes: int, gpus_per_node: int, name: str | None = None) -> Topology:
        """``num_nodes x gpus_per_node`` GPUs with these links (no expert budget yet)."""
        inter = self.inter_bandwidth_bytes_per_s / (gpus_per_node if self.inter_per_node else 1)
        return Topology(name=name or f"{num_nodes}x{gpus_per_node}/{self.name}", num_nodes=num_nodes,
                        gpus_per_node=gpus_per_node, intra_node=self.intra_node,
                        inter_node=LinkModel(inter, self.inter_latency_s), gpu_flops=self.gpu_flops)


LINK_PROFILES: dict[str, LinkProfile] = {
    # The GRACE-MoE paper's cluster: A100-80GB nodes, NVLink (~300 GB/s per direction per GPU),
    # one 25 Gbit/s Ethernet NIC per node shared by its GPUs; A100 bf16 dense ~312 TFLOP/s peak,
    # modelled at 50% for small expert GEMMs.
    "a100-25g": LinkProfile("a100-25g", LinkModel(300 * _GB, 5e-6), 25e9 / 8, 20e-6, True, 156e12,
                            "A100, NVLink 300 GB/s, one 25 Gbit/s Ethernet NIC per node (the GRACE-MoE paper's cluster)"),
    # A DGX-A100-like node: one 200 Gbit/s HDR InfiniBand NIC per GPU.
    "a100-ib": LinkProfile("a100-ib", LinkModel(300 * _GB, 5e-6), 200e9 / 8, 5e-6, False, 156e12,
                           "A100, NVLink 300 GB/s, one 200 Gbit/s InfiniBand NIC per GPU"),
    # A modern cluster: H200, NVLink 4 (~450 GB/s per direction per GPU), one 400 Gbit/s
    # InfiniBand NIC per GPU; H200 bf16 dense ~989 TFLOP/s peak, modelled at 50%.
    "h200-ib": LinkProfile("h200-ib", LinkModel(450 * _GB, 3e-6), 400e9 / 8, 5e-6, False, 495e12,
                           "H200, NVLink 450 GB/s, one 400 Gbit/s InfiniBand NIC per GPU"),
}
DEFAULT_LINKS = "a100-25g"

# Presets: shorthands for NxG with a link profile (the names are kept for plans and scripts).
_PRESET_SHAPES: dict[str, tuple[int, int, str]] = {
    "a100-2x4": (2, 4, "a100-25g"),   # the GRACE-MoE paper's cluster
    "h200-4x8": (4, 8, "h200-ib"),
    "h200-32x8": (32, 8, "h200-ib"),  # DeepSeek-V3-sized deployment for planning-time benchmarks
}
TOPOLOGY_PRESETS: dict[str, Topology] = {
    name: LINK_PROFILES[links].topology(nodes, gpus, name=name) for name, (nodes, gpus, links) in _PRESET_SHAPES.items()
}

_PREFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15}
_TIME_UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}
_QUANTITY = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z/]*)\s*$", re.IGNORECASE)
LINK_KEYS = ("intra", "inter", "intra-latency", "inter-latency", "flops")
TOPOLOGY_HELP = (
    "cluster: NxG (N nodes x G GPUs per node, e.g. 1x4, 2x8) or a preset "
    + ", ".join(f"{name} (= {n}x{g} --links {links})" for name, (n, g, links) in _PRESET_SHAPES.items())
)
LINKS_HELP = (
    "link and GPU model: a profile name (" + ", ".join(LINK_PROFILES) + f"; default {DEFAULT_LINKS}, or the preset's own), "
    "and/or KEY=VALUE overrides separated by commas: intra=450GB/s, inter=400Gbit/s (per GPU; add /node for a NIC "
    "shared by the node's GPUs: inter=25Gbit/s/node), intra-latency=3us, inter-latency=5us, flops=495T; "
    "e.g. h200-ib,inter=200Gbit/s or intra=400GB/s,inter=25GB/s"
)


def _quantity(key: str, text: str) -> float:
    """The value of one ``--links`` item in SI units: bytes/s, seconds or FLOP/s.

    Bandwidth: a number with ``B/s`` (bytes) or ``b/s`` / ``bit/s`` (bits) and an optional
    k/M/G/T prefix (``400GB/s``, ``25Gbit/s``); latency: ``ns``, ``us``, ``ms`` or ``s``; flops: a
    number with an optional k/M/G/T/P prefix and an optional ``FLOP/s`` (``495T``).
    """
    match = _QUANTITY.match(text)
    unit = match.group(2) if match else ""
    value = float(match.group(1)) if match else float("nan")
    if key in ("intra", "inter"):
        bandwidth = re.fullmatch(r"([kKmMgGtT]?)(B|b|bit)/s", unit)
        if bandwidth is None:
            raise GraceInputError(f"--links {key}={text!r}: expected a bandwidth such as 400GB/s (bytes) or 25Gbit/s (bits)")
        value *= _PREFIX[bandwidth.group(1).lower()] / (1 if bandwidth.group(2) == "B" else 8)
    elif key.endswith("latency"):
        if unit.lower() not in _TIME_UNITS:
            raise GraceInputError(f"--links {key}={text!r}: expected a time such as 5us ({', '.join(_TIME_UNITS)})")
        value *= _TIME_UNITS[unit.lower()]
    else:
        flops = re.fullmatch(r"([kmgtp]?)(flop/s|flops)?", unit.lower())
        if flops is None:
            raise GraceInputError(f"--links {key}={text!r}: expected FLOP/s such as 495T or 4.95e14")
        value *= _PREFIX[flops.group(1)]
    if not math.isfinite(value) or value < 0 or (value == 0 and not key.endswith("latency")):
        raise GraceInputError(f"--links {key}={text!r}: must be a {'non-negative' if key.endswith('latency') else 'positive'}, finite number")
    return value


def parse_links(text: str | None, base: LinkProfile | None = None) -> LinkProfile:
    """A link profile from ``--links`` text: ``NAME``, ``KEY=VALUE,...`` or ``NAME,KEY=VALUE,...``.

    Keys (see :data:`LINKS_HELP`): ``intra`` and ``inter`` bandwidths per GPU and direction
    (``inter=25Gbit/s/node``: one NIC shared by the node's GPUs), ``intra-latency``,
    ``inter-latency``, ``flops``. Keys not given keep the value of the named profile, else of
    ``base``, else of :data:`DEFAULT_LINKS`. Bad text raises GraceInputError naming the problem.
    """
    profile = base or LINK_PROFILES[DEFAULT_LINKS]
    items = [item.strip() for item in (text or "").split(",") if item.strip()]
    if items and "=" not in items[0]:
        name = items.pop(0)
        if name not in LINK_PROFILES:
            raise GraceInputError(f"unknown link profile {name!r}; known: {', '.join(LINK_PROFILES)} (or KEY=VALUE: {', '.join(LINK_KEYS)})")
        profile = LINK_PROFILES[name]
    if not items:
        return profile
    intra, fields = profile.intra_node, {}
    for item in items:
        if "=" not in item:
            raise GraceInputError(f"--links: expected KEY=VALUE after the profile name, got {item!r}")
        key, value = (part.strip() for part in item.split("=", 1))
        if key == "intra":
            intra = LinkModel(_quantity(key, value), intra.latency_s)
        elif key == "intra-latency":
            intra = LinkModel(intra.bandwidth_bytes_per_s, _quantity(key, value))
        elif key == "inter":
            low = value.lower()
            per_node = low.endswith("/node")
            value = value[: len(value) - 5] if per_node else value[: len(value) - 4] if low.endswith("/gpu") else value
            fields["inter_bandwidth_bytes_per_s"] = _quantity(key, value)
            fields["inter_per_node"] = per_node
        elif key == "inter-latency":
            fields["inter_latency_s"] = _quantity(key, value)
        elif key == "flops":
            fields["gpu_flops"] = _quantity(key, value)
        else:
            raise GraceInputError(f"--links: unknown key {key!r}; known: {', '.join(LINK_KEYS)}")
    return replace(profile, name=",".join([profile.name, *items]), intra_node=intra, **fields)


def parse_topology(spec: str, links: str | None = None) -> Topology:
    """A cluster from ``--topology`` and ``--links`` text (no expert budget yet).

    ``spec`` is ``NxG`` (``num_nodes x gpus_per_node``, e.g. ``"1x4"``) or a preset name of
    :data:`TOPOLOGY_PRESETS`. Without ``links``, ``NxG`` uses :data:`DEFAULT_LINKS` and a preset
    its own profile; with ``links``, the profile (and overrides) of :func:`parse_links`, on top of
    the preset's own profile for a preset. Bad text raises GraceInputError naming the problem.
    """
    text = spec.strip().lower()
    if text in _PRESET_SHAPES:
        nodes, gpus, own = _PRESET_SHAPES[text]
        if not links:
            return TOPOLOGY_PRESETS[text]
        profile = parse_links(links, LINK_PROFILES[own])
        return profile.topology(nodes, gpus)
    parts = text.split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise GraceInputError(f"unknown topology {spec!r}: give NxG (nodes x GPUs per node, e.g. 1x4, 2x8) or a preset "
                              f"({', '.join(_PRESET_SHAPES)})")
    nodes, gpus = (int(p) for p in parts)
    if nodes < 1 or gpus < 1:
        raise GraceInputError(f"topology {spec!r}: needs at least 1 node and 1 GPU per node")
    return parse_links(links).topology(nodes, gpus)
