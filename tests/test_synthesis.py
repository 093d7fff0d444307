"""Trace synthesis from statistics: determinism, validity, fidelity (planted and real), bad input."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_grace.errors import GraceInputError
from megatron_grace.statistics.expert_stats import ExpertStats
from megatron_grace.trace.routing_trace import RoutingTrace
from megatron_grace.trace.synthesis import SynthesisConfig, synthesis_fidelity, synthesize_trace
from megatron_grace.data import bundled_stats_path


def planted_trace(rng: np.random.Generator, tokens: int, layers: int, experts: int, k: int,
                  cliques: int = 4, clique_size: int = 5, p_clique: float = 0.7) -> RoutingTrace:
    """Ground truth with planted co-activation: Gumbel top-k of a skewed popularity, where a token
    that belongs to a clique (probability ``p_clique``) strongly prefers that clique's members.
    The last expert of every layer is never chosen (zero load)."""
    ids = np.empty((tokens, layers, k), dtype=np.int32)
    for layer in range(layers):
        pop = rng.dirichlet(np.full(experts - 1, 1.0))
        logits = np.log(np.append(pop, 0.0) + 1e-300)
        groups = rng.permutation(experts - 1)[: cliques * clique_size].reshape(cliques, clique_size)
        keys = logits[None, :] + rng.gumbel(size=(tokens, experts))
        member = rng.integers(0, cliques, tokens)
        in_clique = rng.random(tokens) < p_clique
        rows = np.flatnonzero(in_clique)
        keys[rows[:, None], groups[member[rows]]] += 4.0
        ids[:, layer] = np.argsort(-keys, axis=1)[:, :k]
    return RoutingTrace(ids, experts, model="planted", source="planted")


def thresholded(stats: ExpertStats, min_count: float = 5, min_lift: float = 1.5) -> ExpertStats:
    """The same statistics with only the pairs a Qwen-style source would list (count and lift thresholds)."""
    lift = stats.lift()
    keep = (stats.coactivation >= min_count) & (np.nan_to_num(lift) >= min_lift)
    return ExpertStats(load=stats.load, tokens=stats.tokens, top_k=stats.top_k,
                       coactivation=np.where(keep, stats.coactivation, 0.0), coactivation_observed=keep,
                       model=stats.model, source="planted, thresholded")


@pytest.fixture(scope="module")
def planted() -> tuple[RoutingTrace, ExpertStats]:
    truth = planted_trace(np.random.default_rng(7), tokens=20_000, layers=2, experts=24, k=4)
    return truth, ExpertStats.from_trace(truth)


# ------------------------------------------------------------------ determinism and validity
def test_same_seed_identical_different_seed_differs(planted):
    _, stats = planted
    a = synthesize_trace(stats, 3000, seed=3)
    b = synthesize_trace(stats, 3000, seed=3, workers=1)
    c = synthesize_trace(stats, 3000, seed=4)
    assert np.array_equal(a.expert_ids, b.expert_ids)  # also independent of the thread count
    assert not np.array_equal(a.expert_ids, c.expert_ids)


def test_trace_is_valid(planted):
    _, stats = planted
    trace = synthesize_trace(stats, 2500, seed=0)
    ids = trace.expert_ids
    assert ids.shape == (2500, 2, 4) and ids.dtype == np.int32
    assert ids.min() >= 0 and ids.max() < 24
    srt = np.sort(ids, axis=2)
    assert not (srt[:, :, 1:] == srt[:, :, :-1]).any()
    assert trace.gate_weights is None and trace.model == "planted"
    assert trace.source.startswith("synthesized from")
    assert trace.extra["synthesis"]["ignored"] == ["transitions"]  # from_trace stats carry transitions
    assert not (ids == 23).any()  # the never-chosen expert stays unchosen


# ------------------------------------------------------------------ fidelity
def test_fidelity_of_the_truth_itself_is_perfect(planted):
    truth, stats = planted
    fid = synthesis_fidelity(stats, truth).overall
    assert fid["load_max_rel_err"] == pytest.approx(0, abs=1e-12)
    assert fid["load_max_abs_err_over_mean"] == pytest.approx(0, abs=1e-12)
    assert fid["pair_weighted_rel_err"] == 0 and fid["pair_within_10pct_big"] == 1


def test_fidelity_on_planted_full_coactivation(planted):
    _, stats = planted
    trace = synthesize_trace(stats, 20_000, seed=1)
    fid = synthesis_fidelity(stats, trace)
    o = fid.overall
    assert o["load_max_rel_err"] <= 0.02  # exact quotas: only rounding is left
    assert o["load_max_abs_err_over_mean"] <= 0.01
    assert o["load_zero_target_chosen"] == 0
    assert o["pair_weighted_rel_err"] <= 0.06
    assert o["pair_within_10pct_big"] >= 0.9
    assert len(fid.layers) == 2 and set(fid.definitions) >= {"pair_weighted_rel_err", "load_max_rel_err"}


def test_fidelity_on_planted_thresholded_pairs(planted):
    _, full = planted
    stats = thresholded(full)
    assert 0 < stats.coactivation_observed.mean() < 0.5  # a real mix of listed and unlisted pairs
    trace = synthesize_trace(stats, 20_000, seed=2)
    o = synthesis_fidelity(stats, trace).overall
    assert o["load_max_rel_err"] <= 0.02
    assert o["pair_weighted_rel_err"] <= 0.06
    assert o["unlisted_listable_share"] <= 0.05  # unlisted pairs stay (mostly) below the threshold
    # the planted truth's unlisted pairs are also reproduced in aggregate (none were given)
    got = ExpertStats.from_trace(trace, transitions=False)
    unlisted = ~stats.coactivation_observed & (full.load[:, :, None] > 0) & (full.load[:, None, :] > 0)
    for layer in range(2):
        eye = np.eye(24, dtype=bool)
        sel = unlisted[layer] & ~eye
        assert got.coactivation[layer][sel].sum() == pytest.approx(full.coactivation[layer][sel].sum(), rel=0.1)


def test_load_only_statistics_and_top1():
    load = np.array([[50.0, 30, 10, 10, 0, 0], [20, 20, 20, 20, 10, 10]])
    for k in (1, 2):
        stats = ExpertStats(load=load * k, tokens=np.array([100.0, 100.0]), top_k=k, model="load-only")
        trace = synthesize_trace(stats, 1000, seed=0)
        got = ExpertStats.from_trace(trace, transitions=False)
        assert np.array_equal(got.load, load * 10 * k)  # shares are exact multiples here
        assert "pair_weighted_rel_err" not in synthesis_fidelity(stats, trace).overall


def test_real_qwen3_subset_of_layers():
    from megatron_grace.trace.importers import import_qwen_coactivation

    stats = import_qwen_coactivation(bundled_stats_path())  # the same file as the shared one, shipped with the package
    sub = stats.select_layers([0, 16, 31, 47])
    trace = synthesize_trace(sub, 100_000, seed=0)
    o = synthesis_fidelity(sub, trace).overall
    assert o["load_max_rel_err"] <= 0.02  # the target: load within 2% per expert
    assert o["load_max_abs_err_over_mean"] <= 0.001
    assert o["pair_weighted_rel_err"] <= 0.10  # the target: listed co-activation within 10%
    assert o["pair_within_10pct_big"] >= 0.85
    assert o["unlisted_listable_share"] <= 0.01


def test_progress_bar(planted, capsys, monkeypatch):
    _, stats = planted
    monkeypatch.setattr("megatron_grace._progress.DELAY_S", 0.0)  # show it at once (normally after 1 s of work)
    monkeypatch.delenv("GRACE_NO_PROGRESS", raising=False)
    synthesize_trace(stats, 500, seed=0, progress=True, config=SynthesisConfig(sweeps=2))
    assert "synthesizing layers" in capsys.readouterr().err
    monkeypatch.setenv("GRACE_NO_PROGRESS", "1")  # the package-wide switch silences it
    synthesize_trace(stats, 500, seed=0, progress=True, config=SynthesisConfig(sweeps=2))
    assert "synthesizing layers" not in capsys.readouterr().err


# ------------------------------------------------------------------ bad input
def test_too_few_experts_with_load_names_the_layer():
    load = np.array([[4.0, 4, 4, 4, 4, 0], [4, 4, 0, 0, 0, 0]])
    stats = ExpertStats(load=load, tokens=np.array([7.0, 4.0]), top_k=3)
    with pytest.raises(GraceInputError, match="layer 1.*fewer than top_k=3"):
        synthesize_trace(stats, 100)


def test_expert_above_one_over_k_names_the_layer():
    stats = ExpertStats(load=np.array([[10.0, 1, 1, 1, 1, 0]]), tokens=np.array([7.0]), top_k=2)
    with pytest.raises(GraceInputError, match="layer 0: expert 0"):
        synthesize_trace(stats, 100)


def test_layer_without_tokens():
    stats = ExpertStats(load=np.array([[3.0, 3, 3], [0, 0, 0]]), tokens=np.array([3.0, 0.0]), top_k=3)
    with pytest.raises(GraceInputError, match="layer 1 has no routed tokens"):
        synthesize_trace(stats, 10)


@pytest.mark.parametrize("bad", [0, -5, 2.5, True, "100"])
def test_bad_token_count(planted, bad):
    _, stats = planted
    with pytest.raises(GraceInputError, match="num_tokens"):
        synthesize_trace(stats, bad)


@pytest.mark.parametrize("bad", [{"sweeps": -1}, {"candidates": 0}, {"global_share": 1.5}, {"tolerance": float("nan")}])
def test_bad_config(bad):
    with pytest.raises(GraceInputError, match="SynthesisConfig"):
        SynthesisConfig(**bad)


def test_bad_seed_and_mismatched_fidelity(planted):
    truth, stats = planted
    with pytest.raises(GraceInputError, match="seed"):
        synthesize_trace(stats, 10, seed=-1)
    with pytest.raises(GraceInputError, match="does not match"):
        synthesis_fidelity(stats.select_layers([0]), truth)


# ------------------------------------------------------------------ chunks of tokens
def test_one_chunk_is_the_unchunked_synthesis_and_chunks_are_deterministic(planted):
    _, stats = planted
    whole = synthesize_trace(stats, 3000, seed=3)
    same = synthesize_trace(stats, 3000, seed=3, chunk_tokens=3000)
    np.testing.assert_array_equal(whole.expert_ids, same.expert_ids)
    a = synthesize_trace(stats, 3000, seed=3, chunk_tokens=700)
    b = synthesize_trace(stats, 3000, seed=3, chunk_tokens=700, workers=1)
    np.testing.assert_array_equal(a.expert_ids, b.expert_ids)  # independent of the thread count
    assert not np.array_equal(a.expert_ids, whole.expert_ids)  # each chunk is its own fitted population
    assert a.extra["synthesis"]["chunk_tokens"] == 700


def test_chunk_quotas_split_the_exact_quotas():
    from megatron_grace.trace.synthesis import _chunk_quota, _quotas, chunk_sizes

    assert chunk_sizes(10, 3) == [3, 3, 2, 2] and chunk_sizes(5, 5) == [5] and sum(chunk_sizes(999_999, 100_000)) == 999_999
    rng = np.random.default_rng(0)
    for _ in range(200):
        E, k = int(rng.integers(3, 12)), int(rng.integers(1, 3))
        T = int(rng.integers(k, 300))
        share = rng.dirichlet(np.full(E, 0.3))
        while share.max() * k > 1:  # a valid layer: no expert in more than every token
            share = 0.5 * share + 0.5 / E
        if rng.random() < 0.3 and k > 1:  # an expert in every token (quota == tokens)
            share = np.append(np.full(1, 1 / k), share[1:] / share[1:].sum() * (1 - 1 / k))
        q = _quotas(share, T * k, T)
        rem, left = q.copy(), T
        for size in chunk_sizes(T, int(rng.integers(1, T + 1)))[:-1]:
            part = _chunk_quota(rem, left, size)
            assert part.sum() == size * k and (part >= 0).all() and (part <= size).all()
            rem, left = rem - part, left - size
            assert (rem <= left).all() and (rem >= 0).all()  # the rest stays feasible
        assert rem.sum() == left * k


def test_chunked_statistics_match_the_targets(planted):
    """Several independently fitted chunks: exact global load quotas and pair fidelity as good as one population."""
    from megatron_grace.trace.synthesis import TraceSynthesis, _quotas

    _, stats = planted
    one = synthesis_fidelity(stats, synthesize_trace(stats, 12_000, seed=1)).overall
    run = TraceSynthesis(stats, 12_000, seed=1, chunk_tokens=3000)
    trace = RoutingTrace(np.concatenate(list(run)), stats.num_experts)
    got = ExpertStats.from_trace(trace, transitions=False)
    for layer in range(stats.num_layers):
        share = stats.load[layer] / stats.load[layer].sum()
        np.testing.assert_array_equal(got.load[layer], _quotas(share, 12_000 * stats.top_k, 12_000))
    counted = run.counts()  # counted while fitting = counted from the trace
    np.testing.assert_array_equal(counted.load, got.load)
    np.testing.assert_array_equal(counted.coactivation, got.coactivation)
    chunked = synthesis_fidelity(stats, counted).overall
    assert chunked == synthesis_fidelity(stats, trace).overall
    assert chunked["pair_weighted_rel_err"] <= max(0.06, 1.5 * one["pair_weighted_rel_err"])
    assert chunked["pair_within_10pct_big"] >= 0.85


def test_synthesize_to_file_streams_the_same_trace(planted, tmp_path, monkeypatch):
    from megatron_grace import _files
    from megatron_grace.trace.synthesis import synthesize_to_file

    _, stats = planted
    monkeypatch.setattr(_files, "_CHUNK_BYTES", 1000)  # read back in many blocks
    counts = synthesize_to_file(stats, 2000, tmp_path / "s.npz", seed=4, chunk_tokens=600)
    back = RoutingTrace.read(tmp_path / "s.npz")
    mem = synthesize_trace(stats, 2000, seed=4, chunk_tokens=600)
    np.testing.assert_array_equal(back.expert_ids, mem.expert_ids)
    assert back.extra == mem.extra and back.model == mem.model  # (read() sets the source to the path)
    assert np.load(tmp_path / "s.npz")["expert_ids"].dtype == np.int8
    np.testing.assert_array_equal(counts.coactivation, ExpertStats.from_trace(back, transitions=False).coactivation)


def test_whole_trace_in_memory_is_checked_against_the_memory_limit(planted):
    _, stats = planted
    with pytest.raises(GraceInputError, match="memory limit"):
        synthesize_trace(stats, 10**9)
