"""Framework expert tensors -> GRACE expert state (pure tensor functions, no framework import).

A source expert's tensors keep the names the framework gives them (relative to the expert).
Known namings (``nn.Linear`` weights are ``[out, in]``; GRACE's are ``[in, out]``, see
:mod:`megatron_grace.experts.mlp`):

==========================  ==========================================  ==========
naming                      tensors                                     activation
==========================  ==========================================  ==========
Megatron-Core ``MLP``       ``linear_fc1.weight [2f, h]`` (gate rows     swiglu
                            ``[0, f)``, up rows ``[f, 2f)``),
                            ``linear_fc2.weight [h, f]``
Megatron-Core ``MLP``       ``linear_fc1.weight [f, h]``,               gelu
                            ``linear_fc2.weight [h, f]``
HF / Qwen / DeepSeek        ``gate_proj``, ``up_proj`` ``[f, h]``,      swiglu
                            ``down_proj [h, f]`` (``.weight``)
Mixtral                     ``w1`` (gate), ``w3`` (up) ``[f, h]``,      swiglu
                            ``w2 [h, f]`` (``.weight``)
plain two-layer MLP         ``fc1.weight [f, h]``, ``fc2.weight [h, f]``  gelu
==========================  ==========================================  ==========

The Megatron rows are the facts :mod:`megatron_grace.adapters.megatron.weights` documents
(``MLP.forward`` splits ``linear_fc1``'s output gate first); this module restates them on
plain tensors so the checkpoint package does not import the adapters.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from megatron_grace.errors import GraceInputError

_NAMINGS = {
    "megatron": ("linear_fc1.weight", "linear_fc2.weight"),
    "hf": ("gate_proj.weight", "up_proj.weight", "down_proj.weight"),
    "mixtral": ("w1.weight", "w3.weight", "w2.weight"),
    "fc": ("fc1.weight", "fc2.weight"),
}
KNOWN = "Megatron linear_fc1/linear_fc2, gate_proj/up_proj/down_proj, w1/w3/w2 or fc1/fc2 (.weight, no biases)"


def naming(names: set[str] | list[str]) -> str:
    """Which known naming ``names`` (an expert's tensor names) follow; GraceInputError if none."""
    got = set(names)
    for key, want in _NAMINGS.items():
        if got == set(want):
            return key
    raise GraceInputError(f"expert tensors {sorted(got)} match no known naming ({KNOWN})")


def expert_geometry(shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, int, int]:
    """``(activation, hidden_size h, ffn_size f)`` of an expert from its tensor shapes."""
    kind = naming(list(shapes))
    if kind == "megatron":
        (rows, h), (h2, f) = shapes["linear_fc1.weight"], shapes["linear_fc2.weight"]
        act = "swiglu" if rows == 2 * f else "gelu" if rows == f else None
        if act is None or h2 != h:
            raise GraceInputError(f"Megatron expert shapes linear_fc1 {tuple(shapes['linear_fc1.weight'])}, linear_fc2 "
                                  f"{tuple(shapes['linear_fc2.weight'])} are neither gated [2f, h]/[h, f] nor plain [f, h]/[h, f]")
        return act, int(h), int(f)
    if kind == "fc":
        (f, h), (h2, f2) = shapes["fc1.weight"], shapes["fc2.weight"]
        if (h2, f2) != (h, f):
            raise GraceInputError(f"fc1 {tuple(shapes['fc1.weight'])} and fc2 {tuple(shapes['fc2.weight'])} do not chain")
        return "gelu", int(h), int(f)
    g, u, d = _NAMINGS[kind]
    (f, h) = shapes[g]
    if tuple(shapes[u]) != (f, h) or tuple(shapes[d]) != (h, f):
        raise GraceInputError(f"gate {tuple(shapes[g])}, up {tuple(shapes[u])}, down {tuple(shapes[d])} do not chain")
    return "swiglu", int(h), int(f)


def grace_state(tensors: Mapping[str, torch.Tensor], activation: str | None = None) -> dict[str, torch.Tensor]:
    """One expert's framework tensors as a GRACE expert state (transposed views, no copy).

    Args:
        tensors: name -> tensor in one of the namings of the module docstring.
        activation: the GRACE activation the caller runs (``swiglu``/``gelu``); checked against
            the tensors when given.

    Returns:
        ``{"gate": [h, f], "up": [h, f], "down": [f, h]}`` (swiglu) or ``{"fc1": [h, f], "fc2": [f, h]}`` (gelu).
    """
    kind = naming(list(tensors))
    act, h, f = expert_geometry({k: tuple(v.shape) for k, v in tensors.items()})
    if activation is not None and activation != act:
        raise GraceInputError(f"the checkpoint's experts are {act} ({kind} naming, h={h}, f={f}), not {activation}")
    if kind == "megatron":
        w1, w2 = tensors["linear_fc1.weight"], tensors["linear_fc2.weight"]
        if act == "swiglu":
            return {"gate": w1[:f].t(), "up": w1[f:].t(), "down": w2.t()}
        return {"fc1": w1.t(), "fc2": w2.t()}
    if kind == "fc":
        return {"fc1": tensors["fc1.weight"].t(), "fc2": tensors["fc2.weight"].t()}
    g, u, d = _NAMINGS[kind]
    return {"gate": tensors[g].t(), "up": tensors[u].t(), "down": tensors[d].t()}
