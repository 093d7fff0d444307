"""RoutingTrace and ExpertStats: round trips, brute-force counts, validation of bad input."""

from __future__ import annotations

import itertools
import zipfile

import numpy as np
import pytest
from conftest import random_ids, shared_trace

from megatron_grace import ExpertStats, GraceInputError, RoutingTrace
from megatron_grace.statistics.summary import interlayer_mutual_information, load_skew, mutual_information_bits, summarize


def make_trace(rng: np.random.Generator, tokens=60, layers=3, experts=12, k=3, missing=0.1, gates=True) -> RoutingTrace:
    ids = random_ids(rng, tokens, layers, experts, k, missing)
    gw = rng.random(ids.shape).astype(np.float32) if gates else None
    return RoutingTrace(ids, experts, gate_weights=gw, request_ids=np.arange(tokens) // 10,
                        phase=(np.arange(tokens) % 3 != 0).astype(np.int8), model="toy",
                        request_names=tuple(f"r{i}" for i in range(tokens // 10 + 1)))


def brute_force_stats(trace: RoutingTrace):
    L, E = trace.num_layers, trace.num_experts
    load = np.zeros((L, E))
    co = np.zeros((L, E, E))
    tr = np.zeros((L - 1, E, E))
    for t in range(trace.num_tokens):
        for l in range(L):
            chosen = [int(e) for e in trace.expert_ids[t, l] if e >= 0]
            for e in chosen:
                load[l, e] += 1
            for a, b in itertools.permutations(chosen, 2):
                co[l, a, b] += 1
            if l + 1 < L:
                nxt = [int(e) for e in trace.expert_ids[t, l + 1] if e >= 0]
                for a in chosen:
                    for b in nxt:
                        tr[l, a, b] += 1
    return load, co, tr


def test_trace_round_trip(tmp_path, rng):
    trace = make_trace(rng)
    path = tmp_path / "t.npz"
    trace.save(path)
    back = RoutingTrace.read(path)
    np.testing.assert_array_equal(back.expert_ids, trace.expert_ids)
    np.testing.assert_array_equal(back.gate_weights, trace.gate_weights)
    np.testing.assert_array_equal(back.request_ids, trace.request_ids)
    np.testing.assert_array_equal(back.phase, trace.phase)
    assert (back.model, back.num_experts, back.top_k, back.request_names) == ("toy", 12, 3, trace.request_names)
    # missing records carry zero gate weight
    assert (back.gate_weights[back.expert_ids < 0] == 0).all()


@pytest.mark.parametrize("block", [None, 3 * 3 * 5])  # the default block (one for these traces), 5 tokens per block
def test_stats_match_brute_force_and_round_trip(tmp_path, rng, block, monkeypatch):
    from megatron_grace.statistics import expert_stats

    if block is not None:
        monkeypatch.setattr(expert_stats, "_COUNT_BLOCK", block)
    for seed in range(3):
        trace = make_trace(np.random.default_rng(seed), tokens=40 + seed * 7, k=1 + seed)
        stats = ExpertStats.from_trace(trace)
        load, co, tr = brute_force_stats(trace)
        np.testing.assert_array_equal(stats.load, load)
        np.testing.assert_array_equal(stats.coactivation, co)
        np.testing.assert_array_equal(stats.transitions, tr)
        np.testing.assert_array_equal(stats.tokens, trace.valid.sum(axis=0))
        assert stats.missing == []
    path = tmp_path / "s.npz"
    stats.save(path)
    back = ExpertStats.read(path)
    for name in ("load", "tokens", "coactivation", "transitions"):
        np.testing.assert_array_equal(getattr(back, name), getattr(stats, name))
    assert back.coactivation_observed is None and back.top_k == stats.top_k


def test_stats_only_source_marks_missing_fields(tmp_path):
    stats = ExpertStats(load=np.array([[3.0, 1.0, 0.0]]), tokens=np.array([4.0]), top_k=1)
    assert stats.missing == ["coactivation", "transitions"]
    stats.save(tmp_path / "s.npz")
    back = ExpertStats.read(tmp_path / "s.npz")
    assert back.coactivation is None and back.transitions is None
    with pytest.raises(GraceInputError, match="no co-activation"):
        back.lift()


def test_summary_metrics_on_known_values():
    load = np.array([[4.0, 2.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    np.testing.assert_allclose(load_skew(load), [2.0, 1.0])
    stats = ExpertStats(load=load, tokens=np.array([8.0, 4.0]), top_k=1)
    summary = summarize(stats)
    np.testing.assert_array_equal(summary.zero_load, [1, 0])
    # independent variables have zero mutual information; a deterministic map has log2(n)
    assert mutual_information_bits(np.outer([1.0, 3.0], [2.0, 2.0])) == pytest.approx(0.0, abs=1e-12)
    assert mutual_information_bits(np.eye(4) * 5) == pytest.approx(2.0)


def test_interlayer_mi_from_trace_uses_top1_by_gate():
    # Token's top-1 (by gate weight) at layer 1 equals its top-1 at layer 0: MI = log2(4) with 4 equiprobable experts.
    tokens = 400
    first = np.arange(tokens) % 4
    second = (first + 1) % 4
    ids = np.stack([np.stack([second, first], axis=1), np.stack([second, first], axis=1)], axis=1).astype(np.int32)
    gw = np.zeros(ids.shape, np.float32)
    gw[:, :, 1] = 0.9  # the second listed expert is the top-1
    gw[:, :, 0] = 0.1
    trace = RoutingTrace(ids, 4, gate_weights=gw)
    mi = interlayer_mutual_information(trace)
    assert mi[0] == pytest.approx(2.0) and np.isnan(mi[1])


def test_mixtral_interlayer_mi_matches_published_range():
    data = np.load(shared_trace("mixtral-8x7b/mixtral8x7b_fp8_decode_routing.npz"), allow_pickle=False)
    trace = RoutingTrace(data["expert_ids"], 8, gate_weights=data["gate_probs"])
    mi = interlayer_mutual_information(trace)[:-1]
    # ../shared/traces/README.md: 0.13-0.60 bits between the top-1 expert of layer l and l+1
    assert 0.13 <= mi.min() < 0.14 and 0.60 <= mi.max() < 0.61
    skew = load_skew(ExpertStats.from_trace(trace).load)
    assert 1.05 < skew.min() < 1.15 and 1.75 < skew.max() < 1.85  # "busiest expert 1.1x to 1.8x the mean"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"expert_ids": np.zeros((4, 2), np.int32)}, "3-D array"),
        ({"expert_ids": np.zeros((4, 2, 2), np.float32)}, "integers"),
        ({"expert_ids": np.full((4, 2, 2), 7, np.int32)}, "out of range"),
        ({"expert_ids": np.full((4, 2, 2), -3, np.int32)}, "negative expert id -3 at token 0, layer 0"),
        ({"expert_ids": np.array([[[0, 0]]], np.int32)}, "same expert twice"),
        ({"expert_ids": np.array([[[0, -1]]], np.int32)}, "inconsistent k"),
        ({"expert_ids": np.array([[[0, 1]]], np.int32), "gate_weights": np.array([[[np.nan, 1]]], np.float32)}, "NaN"),
        ({"expert_ids": np.array([[[0, 1]]], np.int32), "gate_weights": np.array([[[-1.0, 1]]], np.float32)}, "negative"),
        ({"expert_ids": np.array([[[0, 1]]], np.int32), "phase": np.array([2])}, "phase"),
    ],
)
def test_trace_rejects_bad_arrays(kwargs, message):
    with pytest.raises(GraceInputError, match=message):
        RoutingTrace(num_experts=kwargs.pop("num_experts", 4), **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"load": np.array([[1.0, np.nan]])}, "NaN"),
        ({"load": np.array([[1.0, -2.0]])}, "negative"),
        ({"load": np.array([1.0, 2.0])}, "2-D"),
        ({"load": np.array([[5.0, 5.0]]), "tokens": np.array([3.0])}, "inconsistent k"),
        ({"load": np.array([[1.0, 1.0]]), "tokens": np.array([3.0, 3.0])}, "one entry per layer"),
        ({"load": np.array([[1.0, 1.0]]), "top_k": 3}, "top_k"),
        ({"load": np.array([[1.0, 1.0]]), "coactivation": np.array([[[0, 1.0], [2.0, 0]]])}, "symmetric"),
        ({"load": np.array([[1.0, 1.0]]), "coactivation": np.zeros((1, 3, 3))}, "shape"),
        ({"load": np.array([[1.0, 1.0]]), "transitions": np.zeros((1, 2, 2))}, "transitions"),
    ],
)
def test_stats_reject_bad_arrays(kwargs, message):
    base = {"tokens": np.array([10.0]), "top_k": 1}
    base.update(kwargs)
    with pytest.raises(GraceInputError, match=message):
        ExpertStats(**base)


def test_corrupt_and_truncated_files_name_the_file(tmp_path, rng):
    trace = make_trace(rng)
    good = tmp_path / "good.npz"
    trace.save(good)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x00not a zip file at all" * 10)
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    for path in (truncated, garbage, empty, tmp_path / "missing.npz"):
        with pytest.raises(GraceInputError) as info:
            RoutingTrace.read(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    # a stats file is not a trace, and vice versa
    stats_path = tmp_path / "stats.npz"
    ExpertStats.from_trace(trace).save(stats_path)
    with pytest.raises(GraceInputError, match="not a routing trace"):
        RoutingTrace.read(stats_path)
    with pytest.raises(GraceInputError, match="not an expert-statistics file"):
        ExpertStats.read(good)


def test_inconsistent_k_in_file_and_out_of_range_ids_in_file(tmp_path):
    ids = np.array([[[0, 1]], [[1, 2]]], np.int16)
    meta = '{"format": "grace-trace/1", "num_experts": 3, "top_k": 3}'
    path = tmp_path / "k.npz"
    np.savez(path, format=np.array("grace-trace/1"), metadata=np.array(meta), expert_ids=ids,
             request_ids=np.zeros(2, np.int64), phase=np.ones(2, np.int8))
    with pytest.raises(GraceInputError, match="inconsistent k"):
        RoutingTrace.read(path)
    meta = '{"format": "grace-trace/1", "num_experts": 2, "top_k": 2}'
    np.savez(path, format=np.array("grace-trace/1"), metadata=np.array(meta), expert_ids=ids,
             request_ids=np.zeros(2, np.int64), phase=np.ones(2, np.int8))
    with pytest.raises(GraceInputError, match=f"{path}: expert id 2 out of range"):
        RoutingTrace.read(path)


def test_object_arrays_are_refused_without_unpickling(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, format=np.array("grace-trace/1"), metadata=np.array([{"a": 1}], dtype=object))
    with pytest.raises(GraceInputError, match="pickle"):
        RoutingTrace.read(path)


def test_save_is_atomic_on_failure(tmp_path, rng):
    trace = make_trace(rng)
    path = tmp_path / "t.npz"
    trace.save(path)
    before = path.read_bytes()
    from megatron_grace._files import save_npz_atomic

    def reject(_):
        raise GraceInputError("verification failed")

    with pytest.raises(GraceInputError):
        save_npz_atomic(path, {"x": np.zeros(3)}, verify=reject)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.npz"]  # no temporary left behind
    assert zipfile.is_zipfile(path)


def test_split_and_select(rng):
    trace = make_trace(rng, tokens=50)
    a, b = trace.split(0.4)
    assert (a.num_tokens, b.num_tokens) == (20, 30)
    np.testing.assert_array_equal(np.concatenate([a.expert_ids, b.expert_ids]), trace.expert_ids)
    complete = trace.complete_tokens()
    assert complete.valid.all()


def test_big_write_is_streamed_and_verified_structurally(rng, tmp_path, monkeypatch):
    """Above FULL_VERIFY_BYTES a save is verified by headers and CRCs; the file reads back equal, and
    members written in several chunks (int32 ids cast to int8 chunk by chunk) are byte-exact."""
    from megatron_grace import _files

    trace = make_trace(rng, tokens=500)
    monkeypatch.setattr(_files, "FULL_VERIFY_BYTES", 0)
    monkeypatch.setattr(_files, "_CHUNK_BYTES", 64)  # many chunks per member
    calls = []
    monkeypatch.setattr(RoutingTrace, "read", staticmethod(lambda p, _read=RoutingTrace.read: calls.append(p) or _read(p)))
    trace.save(tmp_path / "t.npz")
    assert calls == []  # not read back in full
    monkeypatch.undo()
    back = RoutingTrace.read(tmp_path / "t.npz")
    np.testing.assert_array_equal(back.expert_ids, trace.expert_ids)
    np.testing.assert_array_equal(back.gate_weights, trace.gate_weights)
    assert np.load(tmp_path / "t.npz")["expert_ids"].dtype == np.int8  # 12 experts: ids fit one byte


def test_validation_in_blocks_names_the_global_token(rng, monkeypatch):
    from megatron_grace.trace import routing_trace

    monkeypatch.setattr(routing_trace, "_VALIDATE_BLOCK", 3 * 3 * 7)  # 7 tokens per block
    ids = make_trace(rng, tokens=50, missing=0.0).expert_ids.astype(np.int64)
    same = RoutingTrace(ids, 12)
    np.testing.assert_array_equal(same.expert_ids, ids)
    assert same.expert_ids.dtype == np.int32
    for bad, words in ((2**32 + 5, "expert id 4294967301 out of range [0, 12) at token 33, layer 1"),
                       (None, "token 33, layer 1 chooses the same expert twice")):
        broken = ids.copy()
        broken[33, 1, 0] = bad if bad is not None else broken[33, 1, 1]
        with pytest.raises(GraceInputError, match=words.replace("[", r"\[").replace(")", r"\)").replace("(", r"\(")):
            RoutingTrace(broken, 12)
    gw = np.full(ids.shape, 0.5, np.float32)
    gw[40, 2, 1] = np.nan
    with pytest.raises(GraceInputError, match="gate_weights contain NaN"):
        RoutingTrace(ids, 12, gate_weights=gw)


def test_token_fingerprints_in_blocks_equal_one_block(rng, monkeypatch):
    from megatron_grace.cli import _provenance

    trace = make_trace(rng, tokens=50)
    whole = _provenance.token_fingerprints(trace)
    monkeypatch.setattr(_provenance, "_BLOCK", 3 * 3 * 7)  # 7 tokens per block
    np.testing.assert_array_equal(_provenance.token_fingerprints(trace), whole)
    assert len(set(whole.tolist())) == 50
    record = _provenance.planning_record(trace, "x")
    assert record["token_fingerprints"] == [f"{int(h):016x}" for h in whole[np.unique(np.linspace(0, 49, 50).astype(np.int64))]]


def test_auto_detection_parses_a_file_once(tmp_path, monkeypatch):
    """import_any with format auto: the parse detection made serves the importer (JSON, plain arrays)."""
    import json as _json

    from megatron_grace.trace import importers

    calls = []
    for name in ("load_json", "_read_plain_array_uncached"):
        real = getattr(importers, name)
        monkeypatch.setattr(importers, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    doc = tmp_path / "q.json"
    doc.write_text(_json.dumps({"model": "tiny", "k": 2, "n_decode_tokens": 10,
                                "layers": [{"layer": 0, "heat": [6, 4, 6, 4], "pairs": [[0, 2, 3, 1.6]]}]}))
    assert importers.import_any(doc).num_experts == 4
    np.save(tmp_path / "m.npy", np.array([[3.5, 1, 2, 2], [1, 1, 4, 2]]))
    assert importers.import_any(tmp_path / "m.npy", top_k=2).num_layers == 2
    assert calls == ["load_json", "_read_plain_array_uncached"]
    importers.import_any(doc)  # a new call parses again (the file may have changed)
    assert calls[-1] == "load_json" and len(calls) == 3
