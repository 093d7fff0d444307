"""`DecodeGraph`: replay a whole decode step of GRACE MoE layers as one CUDA graph, never dropping a token.

A decode step is a function of static-shaped tensors (``step_fn(*inputs) -> output``) that calls
:class:`~megatron_grace.layer.GraceMoELayer` forwards on their static path (layers built with
``decode=DecodeOptions(...)``, batches of at most ``max_tokens``). On a GPU, :class:`DecodeGraph`
warms the step up on a side stream, captures it once in a ``torch.cuda.CUDAGraph`` and then, per
call, copies the inputs into the captured buffers and replays it: no host synchronisation and one
launch for everything. On a CPU it simply calls ``step_fn`` (same results).

Overflow: a pair beyond its destination's capacity is left out of the static step and counted
on the device. :meth:`DecodeGraph.__call__` ends with **one** read of the layers' overflow
counters (the only host synchronisation of the step; an engine that samples tokens synchronises
there anyway) and, if any pair overflowed, runs ``step_fn`` again eagerly with every layer on its
dynamic path, which has no capacity, and returns that result. :attr:`DecodeGraph.fallbacks`
counts those steps. The re-run repeats the step's side effects on the layers (the load
predictor observes that step twice; the step counters advance twice), which only shifts the
routing's pseudo-random offsets. ``check_overflow=False`` skips the read, for a caller that
checks :meth:`GraceMoELayer.overflowed` itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from megatron_grace.errors import GraceInputError
from megatron_grace.layer.grace_moe import GraceMoELayer


class DecodeGraph:
    """A decode step captured once and replayed (see the module docstring).

    Args:
        step_fn: the decode step: tensors in, one tensor out; must call its GRACE layers with
            static shapes only.
        example_inputs: tensors with the shapes (and device) of every later call.
        layers: the GRACE layers ``step_fn`` runs (their overflow counters are checked).
        use_graph: capture a CUDA graph (default: when the inputs are on a CUDA device).
        warmup: eager runs before capture (on a side stream, as torch's graph docs require).
    """

    def __init__(self, step_fn: Callable[..., torch.Tensor], example_inputs: Sequence[torch.Tensor], layers: Sequence[GraceMoELayer],
                 use_graph: bool | None = None, warmup: int = 2) -> None:
        if not layers:
            raise GraceInputError("DecodeGraph needs the GRACE layers that the step runs (to check their overflow)")
        device = example_inputs[0].device
        self.use_graph = device.type == "cuda" if use_graph is None else use_graph
        for layer in layers:
            if layer.decode is None:
                raise GraceInputError(f"layer {layer.layer_index} has no decode options: build it with decode=DecodeOptions(...)")
            p = layer.predictor
            if self.use_graph and not p.graph_capturable:
                raise GraceInputError(
                    f"layer {layer.layer_index}: its load predictor (mode={p.mode!r}, sync_every={p.sync_every}) keeps "
                    "host-side counters that a CUDA graph would freeze at capture; use mode='ema' and sync_every=0 for "
                    "a captured decode step")
        self.step_fn, self.layers = step_fn, list(layers)
        self.fallbacks = 0
        self.steps = 0
        if self.use_graph and device.type != "cuda":
            raise GraceInputError("CUDA-graph capture needs inputs on a CUDA device")
        self._inputs = [t.clone() for t in example_inputs]
        self._output: torch.Tensor | None = None
        self._graph = None
        if self.use_graph:
            self._capture(warmup)

    def _capture(self, warmup: int) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self.step_fn(*self._inputs)
        torch.cuda.current_stream().wait_stream(side)
        for layer in self.layers:
            layer.overflow_pairs.zero_()
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._output = self.step_fn(*self._inputs)

    def replay(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Run the static step on ``inputs`` (graph replay on CUDA, a call on CPU) without checking overflow.

        Returns the captured output buffer on CUDA: copy it before the next replay if you keep it.
        """
        if len(inputs) != len(self._inputs):
            raise GraceInputError(f"the decode step takes {len(self._inputs)} tensors, got {len(inputs)}")
        if self._graph is None:
            return self.step_fn(*inputs)
        for buf, t in zip(self._inputs, inputs):
            if t.shape != buf.shape or t.dtype != buf.dtype:
                raise GraceInputError(f"decode-step input of shape {tuple(t.shape)} {t.dtype} does not match the captured "
                                      f"{tuple(buf.shape)} {buf.dtype}")
            buf.copy_(t)
        self._graph.replay()
        assert self._output is not None
        return self._output

    def __call__(self, *inputs: torch.Tensor, check_overflow: bool = True) -> torch.Tensor:
        """One decode step: replay, then (one host read) fall back to the dynamic path if any pair overflowed."""
        out = self.replay(*inputs)
        self.steps += 1
        if not check_overflow:
            return out
        flags = torch.stack([layer.overflow_pairs for layer in self.layers])
        if bool((flags > 0).any()):
            for layer in self.layers:
                layer.overflow_pairs.zero_()
            self.fallbacks += 1
            return self._run_dynamic(inputs)
        return out

    def _run_dynamic(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        saved = [layer.decode for layer in self.layers]
        try:
            for layer in self.layers:
                layer.decode = None  # every forward takes the dynamic (capacity-free) path
            return self.step_fn(*inputs)
        finally:
            for layer, decode in zip(self.layers, saved):
                layer.decode = decode
