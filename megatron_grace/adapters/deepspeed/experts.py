"""Recognise a DeepSpeed expert module as one of the core's expert MLPs and read its weights.

DeepSpeed deep-copies the user's ``expert`` module once per local expert
(``MoE.deepspeed_moe.experts.deepspeed_experts``), so any ``nn.Module`` can be an expert. The
core runs two MLP shapes (:mod:`megatron_grace.experts.mlp`):

- ``gelu``: two ``nn.Linear`` (h -> f, f -> h) around an exact (erf) GELU, e.g.
  ``nn.Sequential(nn.Linear(h, f), nn.GELU(), nn.Linear(f, h))``;
- ``swiglu``: three ``nn.Linear`` (gate and up h -> f, down f -> h) computing
  ``down(silu(gate(x)) * up(x))``, e.g. a LLaMA/Mixtral-style MLP (``gate_proj``/``up_proj``/
  ``down_proj`` or ``w1``/``w3``/``w2``).

The module's Linear layers give the candidate weights; which Linear plays which role is decided
by a numerical probe: the module's own forward on a few random rows must equal the core's MLP on
those weights (the first assignment that matches wins). So an expert that merely looks like an MLP
(another activation, a tanh-approximate GELU, a norm, a residual) is refused, never converted
into a different function. Linear biases are carried (the core's experts then add a bias per
projection; a Linear without one gets zeros); parameters outside the Linear layers are refused.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from megatron_grace.errors import GraceInputError
from megatron_grace.experts.mlp import SlotExperts

# relative max error between the module and the core MLP that still counts as "the same function"
_PROBE_TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}
_PROBE_ROWS = 16


@dataclass(frozen=True)
class ExpertMLP:
    """How one expert module maps onto the core's MLP.

    Attributes:
        activation: ``gelu`` or ``swiglu``.
        hidden_size, ffn_size: h and f.
        linears: core weight name -> name of the ``nn.Linear`` inside the expert module
            (``fc1``, ``fc2`` for gelu; ``gate``, ``up``, ``down`` for swiglu).
        dtype: of the expert's weights.
        bias: some of its Linear layers have a bias (the core's experts then hold one per projection).
    """

    activation: str
    hidden_size: int
    ffn_size: int
    linears: dict[str, str]
    dtype: torch.dtype
    bias: bool = False

    def state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """One expert's weights in the core's dict layout (``{"fc1": [h, f], "fc2": [f, h]}`` or
        ``{"gate": [h, f], "up": [h, f], "down": [f, h]}``): transposed views of the Linear weights;
        with ``bias`` also ``{name}_bias [out]`` (zeros for a Linear without a bias)."""
        mods = dict(module.named_modules())
        out = {name: mods[path].weight.detach().t() for name, path in self.linears.items()}
        if self.bias:
            for name, path in self.linears.items():
                b = mods[path].bias
                out[f"{name}_bias"] = b.detach() if b is not None else mods[path].weight.new_zeros(mods[path].out_features)
        return out


def _describe(module: nn.Module) -> str:
    """``Sequential(Linear(16->32, bias), ReLU, Linear(32->16))``-style summary of an expert module."""
    def one(m: nn.Module) -> str:
        if isinstance(m, nn.Linear):
            return f"Linear({m.in_features}->{m.out_features}{', bias' if m.bias is not None else ''})"
        return type(m).__name__
    children = [one(c) for c in module.children()]
    return f"{type(module).__name__}({', '.join(children)})" if children else one(module)


def _linears(module: nn.Module, hidden_size: int) -> list[tuple[str, nn.Linear]]:
    """The module's Linear layers; raise on anything the core's MLP cannot hold."""
    if isinstance(module, nn.Linear):
        raise GraceInputError(f"the expert is a single {_describe(module)}, not an MLP; GRACE supports Linear -> GELU -> Linear "
                              "and SwiGLU (gate, up, down) experts")
    linears = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    covered = {id(p) for _, m in linears for p in m.parameters()}
    stray = [name for name, p in module.named_parameters() if id(p) not in covered]
    if stray:
        raise GraceInputError(f"the expert {_describe(module)} has parameters outside its Linear layers ({', '.join(stray)}); "
                              "GRACE supports Linear -> GELU -> Linear and SwiGLU (gate, up, down) experts without other weights")
    if len(linears) not in (2, 3):
        raise GraceInputError(f"the expert {_describe(module)} has {len(linears)} Linear layers; GRACE supports Linear -> GELU -> "
                              "Linear (2) and SwiGLU gate/up/down (3) experts")
    return linears


def _candidates(linears: list[tuple[str, nn.Linear]], h: int):
    """Every assignment of the Linears to the core's roles that fits their shapes: ``(activation, f, {role: name})``."""
    roles = ("fc1", "fc2") if len(linears) == 2 else ("gate", "up", "down")
    for perm in itertools.permutations(linears):
        f = perm[0][1].out_features
        into = [m for _, m in perm[:-1]]
        down = perm[-1][1]
        if all(m.in_features == h and m.out_features == f for m in into) and down.in_features == f and down.out_features == h:
            yield ("gelu" if len(linears) == 2 else "swiglu"), f, dict(zip(roles, (name for name, _ in perm)))


@torch.no_grad()
def _probe_error(module: nn.Module, mlp: ExpertMLP, device: torch.device) -> float:
    """Relative max error between ``module(x)`` and the core MLP on the module's weights, for random ``x [16, h]``.

    The input is scaled so that the first projection's outputs have a standard deviation of about 2,
    where GELU variants (erf vs tanh) and other activations differ measurably.
    """
    ref = SlotExperts([0], mlp.hidden_size, mlp.ffn_size, mlp.activation, mlp.dtype, device, mlp.bias)
    ref.load_slot(0, mlp.state(module))
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(_PROBE_ROWS, mlp.hidden_size, generator=gen, dtype=torch.float64)
    first = ref.w_first[0, : mlp.ffn_size].double().cpu()
    scale = 2.0 / max(float((x @ first.t()).std()), 1e-12)
    x = (x * scale).to(device=device, dtype=mlp.dtype)
    was_training = module.training
    module.eval()  # inference semantics (dropout off), as the converted layer runs
    try:
        out = module(x)
    finally:
        module.train(was_training)
    out = out[0] if isinstance(out, tuple) else out  # DeepSpeed's Experts keeps only the first output too
    want = ref(x, [_PROBE_ROWS])
    if not isinstance(out, torch.Tensor) or out.shape != want.shape:
        return float("inf")
    den = float(want.double().abs().max())
    return float((out.double() - want.double()).abs().max()) / (den if den > 0 else 1.0)


def identify_expert(module: nn.Module, hidden_size: int) -> ExpertMLP:
    """Map a DeepSpeed expert module onto the core's MLP (see the module docstring).

    Args:
        module: one expert (an element of ``deepspeed_experts``).
        hidden_size: the MoE's hidden size h.

    Raises:
        GraceInputError: naming what does not fit (a single Linear, other parameters,
            shapes, or an activation the probe does not recognise).
    """
    linears = _linears(module, hidden_size)
    weight = linears[0][1].weight
    dtype, device = weight.dtype, weight.device
    bias = any(m.bias is not None for _, m in linears)  # structural, so every rank decides the same
    if dtype not in _PROBE_TOL:
        raise GraceInputError(f"the expert's weights are {dtype}; GRACE supports float32, bfloat16, float16 and float64")
    tried = []
    for activation, f, names in _candidates(linears, hidden_size):
        mlp = ExpertMLP(activation, hidden_size, f, names, dtype, bias)
        err = _probe_error(module, mlp, device)
        if err <= _PROBE_TOL[dtype]:
            return mlp
        tried.append(f"{activation} {names}: relative error {err:.2g}")
    if not tried:
        raise GraceInputError(f"the expert {_describe(module)} does not map hidden size {hidden_size} -> f -> {hidden_size} "
                              "through its Linear layers")
    raise GraceInputError(f"the expert {_describe(module)} does not compute an MLP GRACE supports (Linear -> exact GELU -> Linear, "
                          f"or SwiGLU down(silu(gate(x)) * up(x))); its output differs on random inputs ({'; '.join(tried)})")
