"""The DeepSpeed adapter's single-process parts on real DeepSpeed objects: expert recognition and the gate.

- :func:`identify_expert` maps the expert MLPs DeepSpeed users write (``nn.Sequential`` GELU MLPs,
  LLaMA- and Mixtral-style SwiGLU modules, even with ``h == f`` where only the probe can tell the
  Linear layers apart) onto the core's MLP, and refuses what the core cannot run with a message
  naming it;
- the gate (:mod:`megatron_grace.adapters.deepspeed.gate`) gives exactly the combine weights of
  DeepSpeed's own dense gating path (``TopKGate(..., sparse_routes=False)``) for top-1 (with and
  without random token selection), top-2 (with and without second-expert sampling) and top-3,
  without dropping and with DeepSpeed's capacity drops.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

if importlib.util.find_spec("deepspeed") is None:
    pytest.skip("deepspeed is not installed", allow_module_level=True)

from megatron_grace.errors import GraceInputError  # noqa: E402

H, F, E = 16, 24, 8


@pytest.fixture(scope="module")
def ds():
    import megatron_grace.adapters.deepspeed as ds

    return ds


class HFSwiGLU(nn.Module):
    """LLaMA-style expert."""

    def __init__(self, h: int, f: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(h, f, bias=bias), nn.Linear(h, f, bias=bias)
        self.down_proj = nn.Linear(f, h, bias=bias)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class MixtralSwiGLU(nn.Module):
    """Mixtral-style expert: w2 is the down projection, registered between w1 and w3."""

    def __init__(self, h: int, f: int) -> None:
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(h, f, bias=False), nn.Linear(f, h, bias=False), nn.Linear(h, f, bias=False)

    def forward(self, x):
        return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))


class WithNorm(nn.Module):
    def __init__(self, h: int, f: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(h)
        self.fc1, self.fc2 = nn.Linear(h, f, bias=False), nn.Linear(f, h, bias=False)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


def _gelu_mlp(h: int = H, f: int = F, act: nn.Module | None = None, bias: bool = False) -> nn.Sequential:
    return nn.Sequential(nn.Linear(h, f, bias=bias), act if act is not None else nn.GELU(), nn.Linear(f, h, bias=bias))


def _core_out(ds, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The core's MLP on the weights the adapter reads."""
    from megatron_grace.experts.mlp import SlotExperts

    mlp = ds.identify_expert(module, x.shape[1])
    slots = SlotExperts([0], mlp.hidden_size, mlp.ffn_size, mlp.activation, mlp.dtype, bias=mlp.bias)
    slots.load_slot(0, mlp.state(module))
    return slots(x, [x.shape[0]])


# ---------------------------------------------------------------------------------------------- experts
@pytest.mark.parametrize("make, activation, names", [
    (lambda: _gelu_mlp(), "gelu", {"fc1": "0", "fc2": "2"}),
    (lambda: HFSwiGLU(H, F), "swiglu", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
    (lambda: MixtralSwiGLU(H, F), "swiglu", {"gate": "w1", "up": "w3", "down": "w2"}),
    (lambda: MixtralSwiGLU(H, H), "swiglu", {"gate": "w1", "up": "w3", "down": "w2"}),  # h == f: shapes cannot tell
    (lambda: _gelu_mlp(H, H), "gelu", {"fc1": "0", "fc2": "2"}),
])
def test_identify_supported_experts(ds, make, activation, names):
    torch.manual_seed(0)
    module = make()
    mlp = ds.identify_expert(module, H)
    assert (mlp.activation, mlp.linears, mlp.hidden_size) == (activation, names, H)
    x = torch.randn(12, H)
    torch.testing.assert_close(_core_out(ds, module, x), module(x), rtol=1e-5, atol=1e-6)


class PartlyBiased(nn.Module):
    """SwiGLU whose down projection alone has a bias (the others get zero biases in the core)."""

    def __init__(self, h: int, f: int) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(h, f, bias=False), nn.Linear(h, f, bias=False), nn.Linear(f, h)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


@pytest.mark.parametrize("make, activation", [
    (lambda: HFSwiGLU(H, F, bias=True), "swiglu"),
    (lambda: _gelu_mlp(bias=True), "gelu"),
    (lambda: PartlyBiased(H, F), "swiglu"),
])
def test_biased_experts_carried(ds, make, activation):
    """Experts built with ``nn.Linear``'s default bias (random, non-zero) compute the same function in the core."""
    torch.manual_seed(1)
    module = make()
    for m in module.modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.normal_(m.bias, std=0.5)
    mlp = ds.identify_expert(module, H)
    assert (mlp.activation, mlp.bias) == (activation, True)
    state = mlp.state(module)
    assert {n for n in state if n.endswith("_bias")} == {f"{n}_bias" for n in mlp.linears}
    x = torch.randn(12, H)
    torch.testing.assert_close(_core_out(ds, module, x), module(x), rtol=1e-5, atol=1e-6)


def test_bf16_read_as_views(ds):
    bf = _gelu_mlp().to(torch.bfloat16)
    mlp = ds.identify_expert(bf, H)
    assert mlp.dtype == torch.bfloat16 and mlp.state(bf)["fc1"].shape == (H, F)
    assert mlp.state(bf)["fc1"].data_ptr() == bf[0].weight.data_ptr()  # a view, not a copy


@pytest.mark.parametrize("make, message", [
    (lambda: nn.Linear(H, H), "single Linear"),
    (lambda: _gelu_mlp(act=nn.ReLU()), "does not compute an MLP GRACE supports"),
    (lambda: _gelu_mlp(act=nn.GELU(approximate="tanh")), "does not compute an MLP GRACE supports"),
    (lambda: WithNorm(H, F), "parameters outside its Linear layers (norm.weight, norm.bias)"),
    (lambda: nn.Sequential(*_gelu_mlp(), nn.Linear(H, H, bias=False), nn.Linear(H, H, bias=False)), "has 4 Linear layers"),
    (lambda: _gelu_mlp(H + 1, F), "does not map hidden size 16"),
])
def test_identify_refuses(ds, make, message):
    torch.manual_seed(2)
    with pytest.raises(GraceInputError) as info:
        ds.identify_expert(make(), H)
    assert message in str(info.value), str(info.value)


# ---------------------------------------------------------------------------------------------- gate
def _dense_weights(gate, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSpeed's own dense gating path: ``(combine weights [T, E] summed over capacity, l_aux, exp_counts)``."""
    torch.manual_seed(seed)
    l_aux, combine, _mask, counts = gate(x)
    return combine.sum(-1), l_aux, counts


def _sparse_weights(ds, gate, x: torch.Tensor, seed: int, drop_tokens: bool):
    g = ds.inference_gate(ds.gate_args(gate, E), gate.wg, drop_tokens)
    torch.manual_seed(seed)
    l_aux, ids, w, counts = ds.route(g, x)
    dense = torch.zeros(x.shape[0], E)
    keep = ids >= 0
    dense.index_put_((torch.nonzero(keep)[:, 0], ids[keep]), w[keep], accumulate=True)
    return dense, l_aux, counts, ids


@pytest.mark.parametrize("k, options", [
    (1, {"use_rts": True}), (1, {"use_rts": False}), (2, {"top2_2nd_expert_sampling": True}),
    (2, {"top2_2nd_expert_sampling": False}), (3, {}),
])
def test_gate_equals_deepspeed_combine_weights(ds, k, options):
    from deepspeed.moe.sharded_moe import TopKGate

    torch.manual_seed(3)
    gate = TopKGate(H, E, k=k, drop_tokens=False, **options).eval()
    x = torch.randn(40, H)
    want, l_aux, counts = _dense_weights(gate, x, seed=7)
    got, l_aux2, counts2, ids = _sparse_weights(ds, gate, x, seed=7, drop_tokens=False)
    assert ids.shape == (40, k) and bool((ids >= 0).all())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    torch.testing.assert_close(l_aux2, l_aux)
    assert torch.equal(counts2, counts)
    if k > 1:
        torch.testing.assert_close(got.sum(1), torch.ones(40), rtol=0, atol=1e-6)  # renormalised over the k


@pytest.mark.parametrize("k", [1, 2, 3])
def test_gate_drops_what_deepspeed_drops(ds, k):
    from deepspeed.moe.sharded_moe import TopKGate

    torch.manual_seed(4)
    gate = TopKGate(H, E, k=k, eval_capacity_factor=0.5, min_capacity=1, drop_tokens=True).eval()
    x = torch.randn(64, H)
    want, _, _ = _dense_weights(gate, x, seed=9)
    got, _, _, ids = _sparse_weights(ds, gate, x, seed=9, drop_tokens=True)
    assert int((ids < 0).sum()) > 0  # the capacity binds: routes were dropped
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    kept, _, _, ids_all = _sparse_weights(ds, gate, x, seed=9, drop_tokens=False)
    assert bool((ids_all >= 0).all()) and not torch.allclose(kept, want)


def test_gate_refuses_other_gates_and_shares_router(ds):
    from deepspeed.moe.sharded_moe import TopKGate

    class MyGate(TopKGate):
        pass

    with pytest.raises(GraceInputError, match="TopKGate only"):
        ds.gate_args(MyGate(H, E), E)
    gate = TopKGate(H, E, k=2)
    with pytest.raises(GraceInputError, match="k=2 must be between 1"):
        ds.gate_args(gate, 1)
    new = ds.inference_gate(ds.gate_args(gate, E), gate.wg, drop_tokens=False)
    assert new.wg is gate.wg and not new.drop_tokens and new.ep_group is None and new.k == 2 and not new.training
