"""Run Megatron-Core's MoE path on a CPU-only machine (gloo), for tests and demo scripts.

Megatron-Core calls a few CUDA-only functions even when every tensor is on the CPU. On a machine
without CUDA, :func:`install_cpu_stubs` replaces, in this process only:

- ``torch.cuda.Stream`` / ``Event`` / ``current_stream`` / ``stream``: inert stand-ins (the
  alltoall dispatcher's device-to-host side stream);
- ``torch.cuda.current_device``: returns ``"cpu"`` (router, mappings and experts move tensors
  there); ``torch.cuda.synchronize``: a no-op (``dist_checkpointing.save`` calls it);
- ``megatron.core.tensor_parallel.random``: ``model_parallel_cuda_manual_seed`` seeds the CPU
  generator, and the CUDA RNG tracker's ``fork`` is a no-op context (dropout is 0 in inference);
- the alltoall dispatcher's ``maybe_move_tensor_to_cpu``: returns numpy split sizes for CPU
  tensors too (gloo's ``all_to_all_single`` needs sequences, not tensors);
- ``moe_utils.te_general_gemm`` (undefined on 0.16.1 without Transformer Engine): None, so the
  router uses ``torch.mm``.

It does nothing when CUDA is available, and is never needed on a GPU machine.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

_INSTALLED = False


class _Stream:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any) -> None:
        pass

    def record_event(self, *args: Any) -> _Event:
        return _Event()

    def synchronize(self) -> None:
        pass

    def wait_event(self, *args: Any) -> None:
        pass


class _Event(_Stream):
    def record(self, *args: Any) -> None:
        pass

    def wait(self, *args: Any) -> None:
        pass

    def query(self) -> bool:
        return True


def _move_to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    if torch.is_tensor(tensor):
        tensor = tensor.cpu()
        if as_numpy:
            return tensor.numpy()
    return tensor


def install_cpu_stubs(force: bool = False) -> bool:
    """Install the stand-ins listed in the module docstring (idempotent).

    Args:
        force: install even if CUDA is available (tests only).

    Returns:
        True when the stubs are (now) installed, False when CUDA is available and nothing changed.
    """
    global _INSTALLED
    if _INSTALLED:
        return True
    if torch.cuda.is_available() and not force:
        return False
    torch.cuda.Stream = _Stream  # type: ignore[misc,assignment]
    torch.cuda.Event = _Event  # type: ignore[misc,assignment]
    torch.cuda.current_stream = lambda *a, **k: _Stream()  # type: ignore[assignment]
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment]
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment,return-value]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]

    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    mrandom.model_parallel_cuda_manual_seed = lambda seed, *a, **k: torch.manual_seed(seed)
    mrandom.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()  # type: ignore[method-assign]
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    token_dispatcher.maybe_move_tensor_to_cpu = _move_to_cpu
    _INSTALLED = True
    return True
