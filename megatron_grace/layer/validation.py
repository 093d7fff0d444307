"""Set-up validation that fails on every rank instead of hanging.

A rank that finds a problem locally (plan for another world size, weights that do not fit its
slots, ...) must not simply raise: the other ranks would then wait forever in the next
collective. Instead every rank runs its cheap local checks, then all ranks exchange one small
fingerprint (``all_gather_single`` / ``all_gather_into_tensor`` of a fixed-size int64 vector holding an ok flag, the
plan hash, the world size, model sizes and the local error text), and every rank raises the same
GraceInputError when any rank failed or when the ranks disagree.

A rank that never arrives (stopped, crashed inside other code, running another program) would
still leave the others waiting in that exchange. So, before it, every rank checks in through the
job's key-value store (the watchdog): a rank that waits longer than ``GRACE_SETUP_TIMEOUT``
seconds (default 300; 0 turns the watchdog off) for the others raises GraceInputError naming the
global ranks that did not check in.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import torch
import torch.distributed as dist

from megatron_grace.dispatch import DISPATCH_MODES
from megatron_grace.errors import GraceInputError
from megatron_grace.experts.mlp import ACTIVATIONS
from megatron_grace.plan.placement import PlacementPlan

FINGERPRINT_FIELDS = ("world_size", "plan_gpus", "gpus_per_node", "plan_hash", "num_experts", "num_layers", "layer",
                      "hidden_size", "ffn_size", "activation", "dispatch", "dtype", "expert_bias")
_MSG_BYTES = 400
_UNKNOWN = -1
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# torch >= 2.12 renames all_gather_into_tensor (now deprecated) to all_gather_single.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def plan_hash(plan: PlacementPlan) -> int:
    """A 62-bit hash of the plan's placement (experts, topology shape, every layer's GPU lists)."""
    text = repr((plan.num_experts, plan.topology.num_nodes, plan.topology.gpus_per_node, plan.gpu_experts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 2


def code(value: str | torch.dtype | None, choices: tuple[Any, ...]) -> int:
    """Index of ``value`` in ``choices``; -1 when absent or None."""
    return choices.index(value) if value in choices else _UNKNOWN


def comm_device(group: Any, preferred: torch.device | str | None = None) -> torch.device:
    """Device for small collective tensors: ``preferred`` if given, the current CUDA device for NCCL, else CPU."""
    if preferred is not None:
        return torch.device(preferred)
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


SETUP_TIMEOUT_ENV = "GRACE_SETUP_TIMEOUT"
DEFAULT_SETUP_TIMEOUT_S = 300.0
_CHECK_INS: dict[tuple[int, ...], int] = {}  # group members -> check-ins so far (same order on every member)


def setup_timeout_s() -> float:
    """The set-up watchdog's timeout from ``GRACE_SETUP_TIMEOUT`` (seconds; 0 = off; default 300)."""
    text = os.environ.get(SETUP_TIMEOUT_ENV, "").strip()
    try:
        value = float(text) if text else DEFAULT_SETUP_TIMEOUT_S
    except ValueError:
        raise GraceInputError(f"{SETUP_TIMEOUT_ENV}={text!r} is not a number of seconds") from None
    if not value >= 0:
        raise GraceInputError(f"{SETUP_TIMEOUT_ENV} must be >= 0 seconds, got {text}")
    return value


def check_in(group: Any, timeout_s: float | None = None) -> None:
    """Watchdog: wait until every rank of ``group`` has reached this point, at most ``timeout_s`` seconds.

    Each rank writes a key into the default group's store and polls for the others' keys (no
    collective, so a missing rank cannot block it). Raises GraceInputError naming the global
    ranks that did not arrive in time. A no-op when the timeout is 0 or the job has no store.
    """
    timeout_s = setup_timeout_s() if timeout_s is None else timeout_s
    if timeout_s <= 0:
        return
    try:
        store = dist.distributed_c10d._get_default_store()
    except (RuntimeError, AttributeError, ValueError):  # no store (e.g. a custom init): nothing to watch with
        return
    members = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(dist.get_world_size()))
    n = _CHECK_INS.get(members, 0)
    _CHECK_INS[members] = n + 1
    prefix = f"grace/check-in/{hashlib.sha256(repr(members).encode()).hexdigest()[:12]}/{n}/"
    store.set(prefix + str(dist.get_rank()), "1")
    deadline = time.monotonic() + timeout_s
    pause = 0.001
    while True:
        missing = [r for r in members if not store.check([prefix + str(r)])]
        if not missing:
            return
        if time.monotonic() >= deadline:
            raise GraceInputError(f"GRACE set-up: global rank(s) {missing} of {list(members)} did not reach set-up within "
                                  f"{timeout_s:g} s (stopped, crashed or running other code); set {SETUP_TIMEOUT_ENV} to "
                                  "wait longer (0 = wait forever)")
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


def agree_across_ranks(group: Any, fingerprint: dict[str, int], local_error: str | None, device: torch.device) -> None:
    """Exchange set-up fingerprints; raise GraceInputError on every rank if any rank failed or they differ.

    Args:
        group: the process group (None = default).
        fingerprint: field -> int for :data:`FINGERPRINT_FIELDS` (missing fields = unknown).
        local_error: this rank's problem, or None.
        device: device of the exchanged tensor (CUDA for NCCL).
    """
    check_in(group)
    world = dist.get_world_size(group)
    me = dist.get_rank(group)
    F = len(FINGERPRINT_FIELDS)
    msg = (local_error or "").encode("utf-8", errors="replace")[:_MSG_BYTES]
    vec = torch.zeros(2 + F + _MSG_BYTES, dtype=torch.int64)
    vec[0] = 0 if local_error is not None else 1
    vec[1:1 + F] = torch.tensor([int(fingerprint.get(name, _UNKNOWN)) for name in FINGERPRINT_FIELDS], dtype=torch.int64)
    vec[1 + F] = len(msg)
    if msg:
        vec[2 + F: 2 + F + len(msg)] = torch.tensor(list(msg), dtype=torch.int64)
    out = torch.empty(world * vec.numel(), dtype=torch.int64, device=device)
    _all_gather_single(out, vec.to(device), group=group)
    table = out.view(world, -1).cpu()
    failed = [r for r in range(world) if int(table[r, 0]) == 0]
    if failed:
        def text(r: int) -> str:
            n = int(table[r, 1 + F])
            return bytes(table[r, 2 + F: 2 + F + n].tolist()).decode("utf-8", errors="replace")

        by_text: dict[str, list[int]] = {}
        for r in failed:
            by_text.setdefault(text(r), []).append(r)
        if local_error is not None:
            mine = local_error.encode("utf-8", errors="replace")[:_MSG_BYTES].decode("utf-8", errors="replace")
            others = {t: [r for r in rs if r != me] for t, rs in by_text.items()}
            extra = [f"ranks {rs} too" if t == mine else f"rank(s) {rs}: {t}" for t, rs in others.items() if rs]
            raise GraceInputError(local_error + (f" (also failing: {'; '.join(extra)})" if extra else ""))
        detail = "; ".join(f"rank(s) {', '.join(map(str, rs))}: {t}" for t, rs in by_text.items())
        raise GraceInputError(f"GRACE MoE set-up failed on rank(s) {', '.join(map(str, failed))}: {detail}")
    for i, name in enumerate(FINGERPRINT_FIELDS):
        values = table[:, 1 + i].tolist()
        if len(set(values)) > 1:
            groups: dict[int, list[int]] = {}
            for r, v in enumerate(values):
                groups.setdefault(v, []).append(r)
            decode = _DECODERS.get(name, lambda v: v)
            detail = "; ".join(f"ranks {rs}: {decode(v)}" for v, rs in groups.items())
            what = "different placement plans (plan hashes" if name == "plan_hash" else f"different {name} ("
            raise GraceInputError(f"the ranks were given {what}{' ' if name == 'plan_hash' else ''}{detail}); "
                                  "every rank must use the same plan, model sizes and dispatch mode")


def _decoder(choices: tuple[Any, ...]):
    return lambda v: str(choices[v]).replace("torch.", "") if 0 <= v < len(choices) else "unknown"


_DECODERS = {"activation": _decoder(ACTIVATIONS), "dispatch": _decoder(DISPATCH_MODES), "dtype": _decoder(_DTYPES)}
