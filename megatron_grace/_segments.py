"""Segment helpers shared by routing, dispatch and trace synthesis (the one home of "rank within group").

Every function is a fixed sequence of device ops on its input: no host synchronisation, no
data-dependent output shape, so it runs unchanged inside a CUDA graph or ``torch.compile``.
"""

from __future__ import annotations

import torch


def run_starts(sorted_key: torch.Tensor) -> torch.Tensor:
    """bool ``[n]``: True where a run of equal values starts in ``sorted_key [n]`` (any 1-D tensor)."""
    n = sorted_key.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=sorted_key.device)
    first = torch.ones(1, dtype=torch.bool, device=sorted_key.device)
    return torch.cat([first, sorted_key[1:] != sorted_key[:-1]])


def position_in_run(sorted_key: torch.Tensor) -> torch.Tensor:
    """int64 ``[n]``: index of each entry inside its run of equal consecutive values of ``sorted_key [n]``."""
    n = sorted_key.numel()
    idx = torch.arange(n, device=sorted_key.device)
    if n == 0:
        return idx
    start = torch.where(run_starts(sorted_key), idx, torch.zeros_like(idx))
    return idx - torch.cummax(start, dim=0).values


def rank_in_group(keys: torch.Tensor) -> torch.Tensor:
    """int64 ``[n]``: rank of each entry among the entries with the same key, in array order.

    Example: keys ``[5, 3, 5, 5, 3]`` -> ``[0, 0, 1, 2, 1]``. One stable sort; works for any
    integer keys (negative ones included).
    """
    n = keys.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=keys.device)
    sorted_keys, order = torch.sort(keys.reshape(-1), stable=True)
    rank = torch.empty(n, dtype=torch.int64, device=keys.device)
    rank.scatter_(0, order, position_in_run(sorted_keys))
    return rank.reshape(keys.shape)
