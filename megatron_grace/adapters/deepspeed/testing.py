"""Small models with real DeepSpeed MoE layers, for tests, demos and ``scripts/deepspeed_infer.py``.

DeepSpeed deep-copies one ``expert`` module into every local expert, so a freshly built ``MoE``
has identical experts everywhere (a comparison would not notice an expert sent to the wrong
slot); :func:`randomize_experts` gives every expert of every layer its own weights, a function
of (seed, layer, global expert id) only, so the same expert has the same weights whatever its
rank. :func:`release_cpu_allreduce_buffer` removes the shared memory DeepSpeed's CPU accelerator
leaves behind after a job.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from torch import nn

from .convert import expert_parallel_group, moe_modules


class SwiGLUExpert(nn.Module):
    """LLaMA-style SwiGLU expert: ``down_proj(silu(gate_proj(x)) * up_proj(x))`` (no biases unless ``bias``)."""

    def __init__(self, hidden_size: int, ffn_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, ffn_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, ffn_size, bias=bias)
        self.down_proj = nn.Linear(ffn_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def gelu_expert(hidden_size: int, ffn_size: int, bias: bool = False, activation: nn.Module | None = None) -> nn.Sequential:
    """``Linear(h, f) -> GELU -> Linear(f, h)`` (biases, when asked for, start at zero)."""
    m = nn.Sequential(nn.Linear(hidden_size, ffn_size, bias=bias), activation or nn.GELU(), nn.Linear(ffn_size, hidden_size, bias=bias))
    for lin in (m[0], m[2]):
        if lin.bias is not None:
            nn.init.zeros_(lin.bias)
    return m


class TinyMoEModel(nn.Module):
    """``h = proj(x)``, then ``h = h + MoE_i(LayerNorm_i(h))`` per layer (pre-norm residual blocks);
    returns ``(h [..., hidden], sum of l_aux)``.

    Args:
        hidden_size: h.
        layers: keyword arguments of each ``deepspeed.moe.layer.MoE`` (``expert``, ``num_experts``,
            ``ep_size``, ``k``, ``drop_tokens``, ``use_residual``, ...).
    """

    def __init__(self, hidden_size: int, layers: list[dict[str, Any]]) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden_size) for _ in layers)
        self.moes = nn.ModuleList(MoE(hidden_size, **spec) for spec in layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, aux = self.proj(x), x.new_zeros(())
        for norm, moe in zip(self.norms, self.moes):
            out, l_aux, _counts = moe(norm(h))
            h, aux = h + out, aux + l_aux
        return h, aux


@torch.no_grad()
def randomize_experts(model: nn.Module, seed: int) -> None:
    """Give every expert its own weights (normal, std ``1/sqrt(fan_in)``; biases std 0.1), a function of
    (seed, layer, global expert id).

    Needs DeepSpeed's expert-parallel groups (the global id of a local expert depends on the EP rank).
    """
    for layer, (_, moe) in enumerate(moe_modules(model)):
        base = dist.get_rank(expert_parallel_group(moe)) * moe.num_local_experts
        for i, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + layer * 10_007 + base + i)
            for name, p in expert.named_parameters():
                scale = 0.1 if name.endswith("bias") else p.shape[-1] ** -0.5
                w = torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale
                p.copy_(w.to(p.dtype))


def build_model(hidden_size: int, layers: list[dict[str, Any]], seed: int = 0) -> TinyMoEModel:
    """A :class:`TinyMoEModel` in eval mode, its expert-parallel groups created, every expert distinct.

    Collective (DeepSpeed creates its groups on first use); the non-expert weights are the same on
    every rank (seeded), as DeepSpeed's data parallelism expects.
    """
    torch.manual_seed(seed)
    model = TinyMoEModel(hidden_size, [dict(spec) for spec in layers]).eval()
    for _, moe in moe_modules(model):
        moe.set_deepspeed_parallelism()
    randomize_experts(model, seed)
    return model


def init_deepspeed_without_optional_ops(backend: str = "gloo") -> None:
    """``deepspeed.init_distributed`` on an initialized ``torch.distributed``, without probing or building DeepSpeed's
    optional ops (on CPU its shared-memory all-reduce takes ~29 s to compile; only ``inference_all_reduce`` uses it,
    not the MoE path). For tests; jobs under the ``deepspeed`` launcher call ``deepspeed.init_distributed()``."""
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = {}
    deepspeed.init_distributed(dist_backend=backend)


def release_cpu_allreduce_buffer() -> bool:
    """Unlink this rank's DeepSpeed CPU shared-memory all-reduce buffer; call at the end of a CPU job.

    With DeepSpeed's CPU accelerator, ``deepspeed.init_distributed`` (its shared-memory comm op
    built) creates one ~69 MB segment per rank,
    ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``, and never unlinks
    it: every CPU job leaves them behind (a test suite leaves gigabytes of shared memory). The peers
    mapped the segment at initialisation and keep their mappings, so each rank removes its own
    name once its last collective is done. Returns whether there was one. A no-op with CUDA.
    """
    if torch.cuda.is_available() or not dist.is_initialized():
        return False
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}_"
            f"{dist.get_rank()}")
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:
        return False
    return True
