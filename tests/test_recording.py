"""The core routing recorder (:class:`megatron_grace.trace.recording.RouterCallLog`), single process.

The framework recorders (Megatron's router hooks, DeepSpeed's gate hooks) are tested on real
models in test_megatron_adapter.py and test_deepspeed_adapter.py; here the bookkeeping they share:
pass grouping, the ``[seq, batch]`` token order, phases, request ids, dropped routes, concatenation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_grace.errors import GraceInputError
from megatron_grace.trace.recording import RouterCallLog, concat_traces


def _call(log: RouterCallLog, layer: int, ids: list[list[int]], seq: int, batch: int) -> None:
    t = torch.tensor(ids)
    log.add(layer, t, t.float() / 10, seq, batch)


def test_passes_tokens_phases_and_requests():
    log = RouterCallLog(num_experts=8, top_k=2, num_layers=3, active=False)
    _call(log, 0, [[0, 1]] * 4, 2, 2)  # inactive: ignored
    with log.recording(request_ids=[7, 9]):
        _call(log, 0, [[0, 1], [2, 3], [4, 5], [6, 7]], 2, 2)  # prefill pass: seq 2 x batch 2
        _call(log, 2, [[1, 0], [3, 2], [5, 4], [7, 6]], 2, 2)  # layer 1 skipped in this pass
        _call(log, 0, [[0, 2], [1, 3]], 1, 2)  # layer 0 again, 2 tokens: a new (decode) pass
        _call(log, 1, [[4, 6], [5, 7]], 1, 2)
    trace = log.trace("m")
    assert trace.expert_ids.shape == (6, 3, 2) and trace.extra["passes"] == 2
    assert (trace.expert_ids[:4, 1] == -1).all() and (trace.expert_ids[4:, 2] == -1).all()
    assert trace.expert_ids[3, 2].tolist() == [7, 6] and trace.expert_ids[5, 1].tolist() == [5, 7]
    assert np.allclose(trace.gate_weights[3, 2], [0.7, 0.6]) and (trace.gate_weights[:4, 1] == 0).all()
    assert trace.request_ids.tolist() == [7, 9, 7, 9, 7, 9]  # token i = s * batch + b
    assert trace.phase.tolist() == [0, 0, 0, 0, 1, 1]  # prefill when seq > 1, else decode


def test_partly_dropped_records_become_missing_and_are_counted():
    log = RouterCallLog(num_experts=4, top_k=2, num_layers=1)
    _call(log, 0, [[0, -1], [1, 2], [-1, -1]], 3, 1)
    trace = log.trace()
    assert trace.expert_ids[:, 0].tolist() == [[-1, -1], [1, 2], [-1, -1]]
    assert trace.extra["dropped_records"] == 1 and (trace.gate_weights[0] == 0).all()


def test_new_pass_when_the_token_count_changes_and_wide_calls_are_cut():
    log = RouterCallLog(num_experts=4, top_k=1, num_layers=2, record_weights=False)
    with log.recording(phase="decode"):
        _call(log, 0, [[0, 3], [1, 3]], 2, 1)  # k' = 2 > top_k: the first column is kept
        _call(log, 1, [[2, 3]], 1, 1)  # one token: not the same pass
    trace = log.trace()
    assert trace.extra["passes"] == 2 and trace.gate_weights is None
    assert trace.expert_ids[:, :, 0].tolist() == [[0, -1], [1, -1], [-1, 2]] and set(trace.phase.tolist()) == {1}


def test_bad_use_is_named():
    log = RouterCallLog(num_experts=4, top_k=1, num_layers=1)
    with pytest.raises(GraceInputError, match="phase must be 'prefill' or 'decode'"):
        with log.recording(phase="warmup"):
            pass
    with pytest.raises(GraceInputError, match="request_ids has 3 entries but the batch has 2 columns"):
        with log.recording(request_ids=[1, 2, 3]):
            _call(log, 0, [[0], [1]], 1, 2)
    with pytest.raises(GraceInputError, match="num_experts >= 1"):
        RouterCallLog(num_experts=0, top_k=1, num_layers=1)


def test_concat_keeps_requests_distinct():
    ids = np.zeros((2, 1, 1), dtype=np.int32)
    part = (ids, None, np.array([0, 1]), np.zeros(2, dtype=np.int8))
    trace = concat_traces([part, part, part], 4, "m", weights=False)
    assert trace.request_ids.tolist() == [0, 1, 2, 3, 4, 5] and trace.num_tokens == 6
