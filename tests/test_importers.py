"""Importers of real expert-routing data (megatron_grace.trace.importers).

The real files live in ``../shared/traces`` (next to the repository); tests on them skip when
that folder is absent. Bad-input tests write small files into ``tmp_path``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from megatron_grace.errors import GraceInputError
from megatron_grace.statistics.expert_stats import ExpertStats
from megatron_grace.trace.importers import (
    IMPORT_FORMATS,
    detect_format,
    import_any,
    import_load_matrix,
    import_mixtral_npz,
    import_qwen_coactivation,
    import_sglang_jsonl,
    import_switch_load,
    import_vllm_records_jsonl,
)
from megatron_grace.trace.routing_trace import PHASE_DECODE, PHASE_PREFILL, RoutingTrace

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
MIXTRAL = TRACES / "mixtral-8x7b"
GRANITE = TRACES / "granite-3.0-1b-a400m"
QWEN = TRACES / "qwen3-30b-a3b"
SWITCH = TRACES / "switch-base-128"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real trace data not available: {path}")
    return path


def _mixtral_jsonl() -> list[Path]:
    files = sorted(_need(MIXTRAL).glob("*_routing.jsonl"))
    if not files:
        pytest.skip("Mixtral routing JSONL files not available")
    return files


def _one_line(exc: pytest.ExceptionInfo[GraceInputError], path: Path | None = None, *words: str) -> str:
    """The error message: one line, naming the file, containing every word."""
    msg = str(exc.value)
    assert "\n" not in msg
    if path is not None:
        assert str(path) in msg, msg
    for w in words:
        assert w.lower() in msg.lower(), msg
    return msg


# ====================================================================== module-scope real imports
@pytest.fixture(scope="module")
def mixtral_records() -> RoutingTrace:
    return import_vllm_records_jsonl(_mixtral_jsonl(), num_experts=8, model="mixtral-8x7b")


@pytest.fixture(scope="module")
def mixtral_arrays() -> dict[str, np.ndarray]:
    with np.load(_need(MIXTRAL / "mixtral8x7b_fp8_decode_routing.npz")) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def qwen_json() -> ExpertStats:
    return import_qwen_coactivation(_need(QWEN / "coactivation_qwen3-30b-a3b.json"))


@pytest.fixture(scope="module")
def qwen_npz() -> ExpertStats:
    from megatron_grace.data import bundled_stats_path

    return import_qwen_coactivation(bundled_stats_path())  # the same file as the shared one, shipped with the package


# ====================================================================== Mixtral (vLLM records, npz)
def test_vllm_records_match_the_npz_exactly(mixtral_records: RoutingTrace, mixtral_arrays: dict[str, np.ndarray]) -> None:
    tr, ref = mixtral_records, mixtral_arrays
    assert tr.expert_ids.shape == (585, 32, 2) == ref["expert_ids"].shape
    assert tr.num_experts == 8 and tr.top_k == 2 and tr.model == "mixtral-8x7b"
    np.testing.assert_array_equal(tr.expert_ids, ref["expert_ids"])
    present = ref["expert_ids"] >= 0
    np.testing.assert_array_equal(tr.gate_weights[present], ref["gate_probs"][present])
    assert (tr.gate_weights[~present] == 0).all()  # NaN in the npz, 0 in a trace
    np.testing.assert_array_equal(np.asarray(tr.request_names)[tr.request_ids], ref["request"])
    np.testing.assert_array_equal(tr.valid.all(axis=1), ref["complete"])
    assert tr.request_names == ("gsm8k_0", "gsm8k_1", "humaneval_0", "humaneval_1")
    assert np.bincount(tr.request_ids).tolist() == [168, 79, 83, 255]
    assert (tr.phase == PHASE_DECODE).all()


def test_vllm_records_counts(mixtral_records: RoutingTrace) -> None:
    n_lines = sum(1 for f in _mixtral_jsonl() for line in f.open() if line.strip())
    assert n_lines == 18668
    assert int(mixtral_records.valid.sum()) == n_lines  # every record lands in exactly one cell
    assert int((~mixtral_records.valid.all(axis=1)).sum()) == 8  # tokens missing some layers
    # the two gating probabilities of a top-2 token are renormalized softmax weights
    valid = mixtral_records.valid
    np.testing.assert_allclose(mixtral_records.gate_weights.sum(axis=2)[valid], 1.0, atol=1e-5)
    # file order does not matter
    rev = import_vllm_records_jsonl(list(reversed(_mixtral_jsonl())), num_experts=8)
    np.testing.assert_array_equal(rev.expert_ids, mixtral_records.expert_ids)


def test_mixtral_npz_equals_records(mixtral_records: RoutingTrace) -> None:
    tr = import_mixtral_npz(_need(MIXTRAL / "mixtral8x7b_fp8_decode_routing.npz"))
    assert tr.num_experts == 8 and tr.model == "mixtral-8x7b"
    np.testing.assert_array_equal(tr.expert_ids, mixtral_records.expert_ids)
    np.testing.assert_array_equal(tr.gate_weights, mixtral_records.gate_weights)
    np.testing.assert_array_equal(tr.request_ids, mixtral_records.request_ids)
    assert tr.request_names == mixtral_records.request_names


def test_trace_round_trip(mixtral_records: RoutingTrace, tmp_path: Path) -> None:
    out = tmp_path / "mixtral.npz"
    mixtral_records.save(out)
    assert detect_format(out) == "grace-trace"
    back = import_any(out)
    assert isinstance(back, RoutingTrace)
    for name in ("expert_ids", "gate_weights", "request_ids", "phase"):
        np.testing.assert_array_equal(getattr(back, name), getattr(mixtral_records, name))
    assert back.request_names == mixtral_records.request_names
    assert back.num_experts == 8 and back.model == "mixtral-8x7b"


# ====================================================================== Granite (simllm / SGLang)
def test_sglang_v2_trace() -> None:
    path = _need(GRANITE / "routing-trace_sglang.jsonl")
    tr = import_sglang_jsonl(path)
    assert tr.expert_ids.shape == (216, 24, 8)
    assert tr.num_experts == 32 and tr.model == "ibm-granite/granite-3.0-1b-a400m-instruct"
    assert tr.gate_weights is None  # v2 rows carry ids only
    assert tr.request_names == tuple(f"p{i}" for i in range(8))
    assert int((tr.phase == PHASE_PREFILL).sum()) == 64 and int((tr.phase == PHASE_DECODE).sum()) == 152
    assert tr.valid.all()
    # first token of p0, layer 0, in slot order; prefill precedes decode in every request
    assert tr.expert_ids[0, 0].tolist() == [13, 14, 29, 28, 12, 18, 1, 23]
    for r in range(8):
        ph = tr.phase[tr.request_ids == r]
        assert ph.tolist() == [0] * 8 + [1] * 19
    assert tr.extra["schema"] == "simllm-preplay-trace-v2"


def test_sglang_v1_trace_with_gate_weights(tmp_path: Path) -> None:
    path = _need(GRANITE / "granite_length_cap_transformers.jsonl")
    tr = import_sglang_jsonl(path)
    assert tr.expert_ids.shape == (22, 24, 8) and tr.num_experts == 32
    assert (tr.phase == PHASE_PREFILL).all() and tr.request_names == ("length-cap",)
    assert tr.expert_ids[0, 0].tolist() == [18, 13, 11, 14, 29, 23, 12, 22]
    np.testing.assert_allclose(tr.gate_weights.sum(axis=2), 1.0, atol=1e-5)
    assert (np.diff(tr.gate_weights, axis=2) <= 0).all()  # sorted by weight, as in the file
    out = tmp_path / "granite.npz"
    tr.save(out)
    back = RoutingTrace.read(out)
    np.testing.assert_array_equal(back.expert_ids, tr.expert_ids)
    np.testing.assert_array_equal(back.gate_weights, tr.gate_weights)
    np.testing.assert_array_equal(back.phase, tr.phase)


def _sglang_rows(tokens_per_row: int = 1) -> list[dict]:
    """A tiny valid simllm-v1-like trace: 2 MoE layers (model layers 1 and 3), 4 experts, k=2."""
    header = {"row_type": "header", "schema": "simllm-preplay-trace-v1",
              "provenance": {"expert_count": 4, "top_k": 2, "model_id": "tiny", "moe_layer_indices": [1, 3]}}
    rows: list[dict] = [header, {"row_type": "request", "request_id": "r0"}]
    ids = [[0, 1], [2, 3], [1, 2], [3, 0]]
    n_tok = 4
    for start in range(0, n_tok, tokens_per_row):
        toks = list(range(start, start + tokens_per_row))
        if tokens_per_row == 1:
            routing = [{"layer_index": li, "expert_ids": ids[(start + li) % 4], "gate_weights": [0.6, 0.4]} for li in (1, 3)]
            tix: int | list[int] = start
        else:
            routing = [{"layer_index": li, "expert_ids": [ids[(t + li) % 4] for t in toks],
                        "gate_weights": [[0.6, 0.4] for _ in toks]} for li in (1, 3)]
            tix = toks
        rows.append({"row_type": "forward-token", "request_id": "r0", "phase": "prefill" if start < 2 else "decode",
                     "token_index": tix if start < 2 else (tix - 2 if isinstance(tix, int) else [t - 2 for t in tix]),
                     "routing": routing})
    rows.append({"row_type": "footer", "prefill_forward_token_count": 2, "decode_forward_token_count": 2, "request_count": 1})
    return rows


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sglang_multi_token_rows_equal_single_token_rows(tmp_path: Path) -> None:
    one = import_sglang_jsonl(_write_jsonl(tmp_path / "one.jsonl", _sglang_rows(1)))
    two = import_sglang_jsonl(_write_jsonl(tmp_path / "two.jsonl", _sglang_rows(2)))
    assert one.expert_ids.shape == (4, 2, 2) and one.extra["moe_layer_indices"] == [1, 3]
    np.testing.assert_array_equal(one.expert_ids, two.expert_ids)
    np.testing.assert_array_equal(one.gate_weights, two.gate_weights)
    assert one.phase.tolist() == [0, 0, 1, 1] == two.phase.tolist()
    assert detect_format(tmp_path / "two.jsonl") == "sglang-jsonl"


# ====================================================================== Qwen3-30B-A3B
def test_qwen_json_known_values(qwen_json: ExpertStats) -> None:
    st = qwen_json
    assert st.load.shape == (48, 128) and st.top_k == 8 and st.model == "qwen3-30b-a3b"
    assert (st.tokens == 75773).all()
    assert (st.load.sum(axis=1) == 606184).all()  # = 75773 tokens x 8 experts, every layer
    skew = st.load.max(axis=1) / st.load.mean(axis=1)
    assert round(skew.min(), 2) == 3.07 and round(skew.max(), 2) == 7.71 and round(float(np.median(skew)), 2) == 5.69
    assert int((st.load == 0).sum(axis=1).max()) == 8
    assert int(st.coactivation_observed.sum()) == 2 * 83065
    assert st.coactivation[0, 65, 73] == st.coactivation[0, 73, 65] == 7806  # first listed pair
    np.testing.assert_array_equal(st.coactivation > 0, st.coactivation_observed)
    assert st.transitions is None
    assert st.missing == ["coactivation (partial: thresholded pairs only)", "transitions"]
    lift = st.lift()
    assert abs(lift[0, 65, 73] - 6.54) < 0.01  # recomputed lift agrees with the listed one


def test_qwen_json_and_npz_identical(qwen_json: ExpertStats, qwen_npz: ExpertStats) -> None:
    for name in ("load", "tokens", "coactivation", "coactivation_observed"):
        np.testing.assert_array_equal(getattr(qwen_json, name), getattr(qwen_npz, name))
    assert qwen_json.top_k == qwen_npz.top_k == 8
    assert qwen_npz.model == "qwen3-30b-a3b" and qwen_npz.transitions is None


def test_stats_round_trip(qwen_npz: ExpertStats, tmp_path: Path) -> None:
    out = tmp_path / "qwen_stats.npz"
    qwen_npz.save(out)
    assert detect_format(out) == "grace-stats"
    back = import_any(out)
    assert isinstance(back, ExpertStats)
    for name in ("load", "tokens", "coactivation", "coactivation_observed"):
        np.testing.assert_array_equal(getattr(back, name), getattr(qwen_npz, name))
    assert back.transitions is None and back.top_k == 8


# ====================================================================== Switch-base-128
def test_switch_load() -> None:
    st = import_switch_load(_need(SWITCH / "expert_statistics_3d.json"))
    assert st.load.shape == (6, 128) and st.top_k == 1
    assert (st.tokens == 206866).all()
    skew = st.load.max(axis=1) / st.load.mean(axis=1)
    assert 6.0 < skew.min() < 6.3 and 30.9 < skew.max() < 31.1
    assert st.load[0, 3] == 7673 and st.load[0, 47] == 10027  # layer 1 in the file
    assert st.coactivation is None and st.transitions is None
    assert detect_format(SWITCH / "expert_statistics_3d.json") == "switch-load"


def test_switch_summary_file_is_refused() -> None:
    path = _need(SWITCH / "comprehensive_expert_statistics.json")
    with pytest.raises(GraceInputError) as exc:
        import_any(path)
    _one_line(exc, path, "summary", "cannot give a load matrix")


# ====================================================================== load matrices
@pytest.fixture()
def load_matrix() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 1000, size=(3, 16)).astype(np.int64)


def test_load_matrix_all_containers_agree(load_matrix: np.ndarray, tmp_path: Path) -> None:
    import torch

    m = load_matrix
    files = {
        "a.npy": lambda p: np.save(p, m),
        "b.npz": lambda p: np.savez(p, logical_count=m),
        "c.npz": lambda p: np.savez(p, whatever=m),
        "d.json": lambda p: p.write_text(json.dumps(m.tolist())),
        "e.json": lambda p: p.write_text(json.dumps({"logical_count": m.tolist(), "top_k": 4})),
        "f.csv": lambda p: p.write_text("# layer loads\n" + ",".join(f"e{i}" for i in range(16)) + "\n"
                                        + "\n".join(",".join(map(str, r)) for r in m) + "\n"),
        "g.txt": lambda p: p.write_text("\n".join(" ".join(map(str, r)) for r in m)),
        "h.pt": lambda p: torch.save(torch.tensor(m), p),
        "i.pt": lambda p: torch.save({"logical_count": torch.tensor(np.stack([m - m // 2, m // 2])), "top_k": 4}, p),
    }
    named = {"b.npz", "e.json", "i.pt"}  # the file calls it logical_count; the rest could as well be top-1 ids
    for name, write in files.items():
        path = tmp_path / name
        write(path)
        if name in named:
            assert detect_format(path) == "load-matrix", name
        else:
            with pytest.raises(GraceInputError) as exc:
                detect_format(path)
            _one_line(exc, path, "ambiguous", "3 layers x 16 experts", "--format load-matrix", "3 tokens x 16 layers", "--format topk-ids")
        st = import_any(path, "auto" if name in named else "load-matrix", top_k=4)
        np.testing.assert_array_equal(st.load, m, err_msg=name)  # 3-D [steps, L, E] summed over steps
        np.testing.assert_allclose(st.tokens, m.sum(axis=1) / 4)
        assert st.coactivation is None and st.transitions is None
    steps = tmp_path / "steps.npz"
    np.savez(steps, logical_count=np.stack([m, 2 * m]))
    np.testing.assert_array_equal(import_load_matrix(steps, top_k=4).load, 3 * m)


def test_load_matrix_needs_top_k(load_matrix: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "m.npy"
    np.save(path, load_matrix)
    with pytest.raises(GraceInputError) as exc:
        import_load_matrix(path)
    _one_line(exc, path, "top_k")
    both = tmp_path / "k.json"
    both.write_text(json.dumps({"logical_count": load_matrix.tolist(), "top_k": 2}))
    assert import_load_matrix(both).top_k == 2
    with pytest.raises(GraceInputError) as exc:
        import_load_matrix(both, top_k=4)
    _one_line(exc, both, "contradicts")


# ====================================================================== bad input
def _mixtral_record(layer: int = 0, tok: int = 0, experts: list | None = None, **over: object) -> dict:
    rec = {"dataset": "d", "problem_id": 0, "layer": layer, "token_idx": tok,
           "experts": [0, 1] if experts is None else experts, "gating_probs": [0.7, 0.3]}
    rec.update(over)
    return rec


def _good_records() -> list[dict]:
    return [_mixtral_record(layer=l, tok=t, experts=[(t + l) % 4, (t + l + 1) % 4]) for t in range(3) for l in range(2)]


def test_vllm_small_good_file(tmp_path: Path) -> None:
    tr = import_vllm_records_jsonl(_write_jsonl(tmp_path / "ok.jsonl", _good_records()), num_experts=4)
    assert tr.expert_ids.shape == (3, 2, 2) and tr.valid.all()
    assert tr.request_names == ("d_0",)
    # a missing (token, layer) record becomes -1
    rows = _good_records()[:-1]
    tr = import_vllm_records_jsonl(_write_jsonl(tmp_path / "gap.jsonl", rows))
    assert tr.expert_ids[2, 1].tolist() == [-1, -1] and tr.gate_weights[2, 1].tolist() == [0, 0]
    assert tr.num_experts == 4  # inferred: max id + 1


@pytest.mark.parametrize("importer", [import_vllm_records_jsonl, import_mixtral_npz, import_sglang_jsonl, import_qwen_coactivation,
                                      import_switch_load, import_load_matrix, import_any, detect_format])
def test_missing_and_empty_files(importer, tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(GraceInputError) as exc:
        importer(missing)
    _one_line(exc, missing, "not found")
    for name in ("empty.jsonl", "empty.json", "empty.npz", "empty.csv"):
        empty = tmp_path / name
        empty.write_bytes(b"")
        with pytest.raises(GraceInputError) as exc:
            importer(empty)
        _one_line(exc, empty, "empty")


def test_blank_lines_only(tmp_path: Path) -> None:
    path = tmp_path / "blank.jsonl"
    path.write_text("\n\n  \n")
    with pytest.raises(GraceInputError) as exc:
        import_vllm_records_jsonl(path)
    _one_line(exc, path, "no JSON records")


def test_truncated_jsonl(tmp_path: Path) -> None:
    text = "".join(json.dumps(r) + "\n" for r in _good_records())
    path = tmp_path / "cut.jsonl"
    path.write_text(text[: len(text) - 25])  # cut mid-line
    for importer in (import_vllm_records_jsonl, import_any):
        with pytest.raises(GraceInputError) as exc:
            importer(path)
        _one_line(exc, path, "line 6", "invalid JSON", "truncated")


def test_truncated_sglang(tmp_path: Path) -> None:
    rows = _sglang_rows()
    text = "".join(json.dumps(r) + "\n" for r in rows)
    mid = tmp_path / "mid.jsonl"
    mid.write_text(text[: len(text) // 2])
    with pytest.raises(GraceInputError) as exc:
        import_sglang_jsonl(mid)
    _one_line(exc, mid, "invalid JSON", "truncated")
    no_footer = _write_jsonl(tmp_path / "nofoot.jsonl", rows[:-1])  # cut at a line boundary
    with pytest.raises(GraceInputError) as exc:
        import_sglang_jsonl(no_footer)
    _one_line(exc, no_footer, "footer", "truncated")
    lost_row = _write_jsonl(tmp_path / "lost.jsonl", rows[:3] + rows[4:])  # a whole routing row missing
    with pytest.raises(GraceInputError) as exc:
        import_sglang_jsonl(lost_row)
    _one_line(exc, lost_row, "footer says prefill_forward_token_count=2")


def test_truncated_json(tmp_path: Path) -> None:
    doc = {"num_experts": 4, "layers": [1], "expert_usage_by_layer": {"1": {"0": 5, "1": 7, "2": 1, "3": 0}}}
    text = json.dumps(doc)
    path = tmp_path / "cut.json"
    path.write_text(text[: len(text) // 2])
    for importer in (import_switch_load, import_qwen_coactivation, import_load_matrix):
        with pytest.raises(GraceInputError) as exc:
            importer(path)
        _one_line(exc, path, "invalid JSON")
    with pytest.raises(GraceInputError) as exc:
        import_any(path)
    _one_line(exc, path)


@pytest.fixture()
def small_npz(tmp_path: Path) -> bytes:
    """Bytes of a valid mixtral-layout .npz (compressed), used to make truncated / corrupt copies."""
    rng = np.random.default_rng(1)
    ids = np.stack([rng.permutation(8)[:2] for _ in range(64 * 4)]).reshape(64, 4, 2).astype(np.int16)
    path = tmp_path / "good.npz"
    np.savez_compressed(path, expert_ids=ids, gate_probs=rng.random(ids.shape).astype(np.float32),
                        request=np.array(["a"] * 32 + ["b"] * 32))
    assert import_mixtral_npz(path).expert_ids.shape == (64, 4, 2)
    return path.read_bytes()


@pytest.mark.parametrize("importer", [import_mixtral_npz, import_qwen_coactivation, import_load_matrix, import_any,
                                      IMPORT_FORMATS["grace-trace"], IMPORT_FORMATS["grace-stats"]])
def test_truncated_and_corrupt_npz(importer, small_npz: bytes, tmp_path: Path) -> None:
    cases = {
        "half.npz": small_npz[: len(small_npz) // 2],
        "tail.npz": small_npz[:-7],
        "flipped.npz": small_npz[:200] + bytes(b ^ 0x5A for b in small_npz[200:400]) + small_npz[400:],
        "garbage.npz": os.urandom(3000),
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(GraceInputError) as exc:
            importer(path, top_k=8) if importer is import_load_matrix else importer(path)
        _one_line(exc, path)


def test_corrupt_bytes_in_text_files(tmp_path: Path) -> None:
    blob = b"\xff\xfe\x00\x81garbage\x00\x00\xc3\x28" * 20
    for name, importer in (("x.jsonl", import_vllm_records_jsonl), ("y.jsonl", import_sglang_jsonl), ("z.json", import_switch_load),
                           ("q.json", import_qwen_coactivation), ("m.csv", import_load_matrix), ("m.pt", import_load_matrix)):
        path = tmp_path / name
        path.write_bytes(blob)
        with pytest.raises(GraceInputError) as exc:
            importer(path, top_k=2) if importer is import_load_matrix else importer(path)
        _one_line(exc, path)
        with pytest.raises(GraceInputError) as exc:
            import_any(path)
        _one_line(exc, path)


def test_pickled_pt_is_refused(tmp_path: Path) -> None:
    import fractions

    import torch

    path = tmp_path / "evil.pt"
    torch.save({"logical_count": fractions.Fraction(1, 3)}, path)  # needs full unpickling
    with pytest.raises(GraceInputError) as exc:
        import_load_matrix(path, top_k=1)
    _one_line(exc, path, "not a readable .pt")


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda r: r.pop("experts"), ["line 3", "lacks", "experts"]),
        (lambda r: r.update(layer="0"), ["line 3", "layer must be"]),
        (lambda r: r.update(experts="0,1"), ["line 3", "experts must be"]),
        (lambda r: r.update(experts=[0, 1.5]), ["line 3", "experts must be"]),
        (lambda r: r.update(token_idx=-1), ["line 3", "token_idx"]),
        (lambda r: r.update(experts=[0, -2]), ["line 3", "negative expert id -2"]),
        (lambda r: r.update(experts=[0, 9]), ["line 3", "expert id 9 out of range [0, 4)"]),
        (lambda r: r.update(experts=[0, 1, 2], gating_probs=[0.5, 0.3, 0.2]), ["line 3", "inconsistent k"]),
        (lambda r: r.update(experts=[2, 2]), ["line 3", "same expert"]),
        (lambda r: r.update(gating_probs=[float("nan"), 0.1]), ["line 3", "gate weights"]),
        (lambda r: r.update(gating_probs=[0.9]), ["line 3", "1 gate weights for 2 experts"]),
        (lambda r: r.pop("gating_probs"), ["line 3", "gating_probs missing"]),
        (lambda r: r.update(layer=0, token_idx=0), ["line 3", "duplicate record", "line 1"]),
    ],
)
def test_vllm_bad_records(mutate, words: list[str], tmp_path: Path) -> None:
    rows = _good_records()
    mutate(rows[2])
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(GraceInputError) as exc:
        import_vllm_records_jsonl(path, num_experts=4)
    _one_line(exc, path, *words)


def test_vllm_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text(json.dumps(_mixtral_record()) + "\n[1, 2]\n")
    with pytest.raises(GraceInputError) as exc:
        import_vllm_records_jsonl(path)
    _one_line(exc, path, "line 2", "JSON object")


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda rows: rows[2]["routing"][0].update(expert_ids=[0, 7]), ["line 3", "expert id 7 out of range [0, 4)"]),
        (lambda rows: rows[2]["routing"][0].update(expert_ids=[-1, 2]), ["line 3", "negative expert id"]),
        (lambda rows: rows[2]["routing"][1].update(expert_ids=[0, 1, 2], gate_weights=[0.5, 0.3, 0.2]), ["line 3", "inconsistent k"]),
        (lambda rows: rows[2]["routing"][0].update(layer_index=2), ["line 3", "layer_index 2", "moe_layer_indices"]),
        (lambda rows: rows[2].update(phase="generate"), ["line 3", "phase"]),
        (lambda rows: rows[2].pop("request_id"), ["line 3", "request_id"]),
        (lambda rows: rows[2].update(routing={}), ["line 3", "routing must be"]),
        (lambda rows: rows[3]["routing"][0].pop("gate_weights"), ["line 4", "gate_weights missing"]),
        (lambda rows: rows[2]["routing"][0].update(gate_weights=[-0.1, 0.2]), ["line 3", "gate weights"]),
        (lambda rows: rows[3].update(token_index=0), ["line 4", "duplicate routing", "line 3"]),
        (lambda rows: rows[0]["provenance"].update(expert_count="four"), ["line 1", "expert_count"]),
        (lambda rows: rows[0]["provenance"].update(moe_layer_indices=[1, 1]), ["line 1", "moe_layer_indices"]),
    ],
)
def test_sglang_bad_rows(mutate, words: list[str], tmp_path: Path) -> None:
    rows = _sglang_rows()
    mutate(rows)
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(GraceInputError) as exc:
        import_sglang_jsonl(path)
    _one_line(exc, path, *words)


def test_mixtral_npz_bad_arrays(tmp_path: Path) -> None:
    ids = np.zeros((4, 2, 2), dtype=np.int16)
    ids[:, :, 1] = 1
    cases = {
        "nokey.npz": ({"ids": ids}, "no 'expert_ids'"),
        "float.npz": ({"expert_ids": ids.astype(np.float32)}, "integer"),
        "neg.npz": ({"expert_ids": np.where(ids == 1, -3, ids)}, "negative expert id -3"),
        "partial.npz": ({"expert_ids": np.where((ids == 1) & (np.arange(4)[:, None, None] == 2), -1, ids)}, "inconsistent k"),
        "gate.npz": ({"expert_ids": ids, "gate_probs": np.full(ids.shape, -1.0, np.float32)}, "gate_probs"),
        "req.npz": ({"expert_ids": ids, "request": np.array(["a", "b"])}, "one entry per token"),
    }
    for name, (arrays, words) in cases.items():
        path = tmp_path / name
        np.savez(path, **arrays)
        with pytest.raises(GraceInputError) as exc:
            import_mixtral_npz(path)
        _one_line(exc, path, words)
    path = tmp_path / "range.npz"
    np.savez(path, expert_ids=ids + 6)
    with pytest.raises(GraceInputError) as exc:
        import_mixtral_npz(path, num_experts=7)
    _one_line(exc, path, "out of range")


def _qwen_doc() -> dict:
    return {"model": "tiny", "k": 2, "n_decode_tokens": 10, "n_layers": 2, "n_expert_per_layer": 4,
            "layers": [{"layer": 0, "heat": [5, 5, 5, 5], "pairs": [[0, 1, 4, 1.6], [2, 3, 3, 1.5]]},
                       {"layer": 1, "heat": [10, 4, 4, 2], "pairs": [[0, 1, 4, 1.0]]}]}


def test_qwen_small_json_and_npz(tmp_path: Path) -> None:
    doc = _qwen_doc()
    path = tmp_path / "q.json"
    path.write_text(json.dumps(doc))
    st = import_qwen_coactivation(path)
    assert st.model == "tiny" and st.top_k == 2 and st.tokens.tolist() == [10, 10]
    assert st.coactivation[0, 1, 0] == 4 and st.coactivation[1, 0, 1] == 4 and int(st.coactivation_observed.sum()) == 6
    npz = tmp_path / "q.npz"
    pairs = np.array([[0, 0, 1, 4, 1.6], [0, 2, 3, 3, 1.5], [1, 0, 1, 4, 1.0]])
    np.savez(npz, heat=np.array([l["heat"] for l in doc["layers"]]), pairs_layer_i_j_count_lift=pairs)
    with pytest.raises(GraceInputError) as exc:  # no k in the npz, and not Qwen3-30B-A3B's shape
        import_qwen_coactivation(npz)
    _one_line(exc, npz, "top_k")
    st2 = import_qwen_coactivation(npz, top_k=2, model="tiny")
    for name in ("load", "tokens", "coactivation", "coactivation_observed"):
        np.testing.assert_array_equal(getattr(st2, name), getattr(st, name))
    with pytest.raises(GraceInputError) as exc:
        import_qwen_coactivation(npz, top_k=3)
    _one_line(exc, npz, "not a multiple of top_k=3")


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda d: d["layers"][0]["pairs"].append([0, 9, 1, 2.0]), ["expert 9 out of range [0, 4)"]),
        (lambda d: d["layers"][1]["pairs"].append([-1, 2, 1, 2.0]), ["expert -1 out of range"]),
        (lambda d: d["layers"][0]["pairs"].append([1, 1, 1, 2.0]), ["with itself"]),
        (lambda d: d["layers"][0]["pairs"].append([1, 0, 4, 1.6]), ["listed twice"]),
        (lambda d: d["layers"][0]["pairs"].append([0, 2, 50, 1.6]), ["exceeds"]),
        (lambda d: d["layers"][0]["pairs"].append([0, 2, -5, 1.6]), ["negative count"]),
        (lambda d: d["layers"][0]["pairs"].append(["a", 2, 5, 1.6]), ["numbers"]),
        (lambda d: d["layers"][0]["heat"].append(3), ["same length"]),
        (lambda d: d["layers"][0].update(heat=[5, -5, 5, 5]), ["negative count"]),
        (lambda d: d["layers"][0].update(heat=[5, float("nan"), 5, 5]), ["NaN"]),
        (lambda d: d["layers"][0].update(heat=[50, 5, 5, 5]), ["inconsistent k"]),  # 65 choices > 10 tokens x 2
        (lambda d: d["layers"][1].update(layer=0), ["listed twice"]),
        (lambda d: d.pop("k"), ["lacks", "'k'"]),
        (lambda d: d.update(k="eight"), ["k must be"]),
        (lambda d: d.update(layers={}), ["'layers' must be"]),
    ],
)
def test_qwen_bad_json(mutate, words: list[str], tmp_path: Path) -> None:
    doc = _qwen_doc()
    mutate(doc)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(GraceInputError) as exc:
        import_qwen_coactivation(path)
    _one_line(exc, path, *words)


def test_qwen_bad_npz(tmp_path: Path) -> None:
    heat = np.full((2, 4), 5)
    cases = {
        "range.npz": (np.array([[0, 0, 4, 1, 2.0]]), "expert 4 out of range [0, 4)"),
        "layer.npz": (np.array([[2, 0, 1, 1, 2.0]]), "layer 2 out of range [0, 2)"),
        "shape.npz": (np.array([1.0, 2.0]), "[N, 5]"),
        "nan.npz": (np.array([[0, 0, 1, np.nan, 2.0]]), "NaN"),
    }
    for name, (pairs, words) in cases.items():
        path = tmp_path / name
        np.savez(path, heat=heat, pairs_layer_i_j_count_lift=pairs)
        with pytest.raises(GraceInputError) as exc:
            import_qwen_coactivation(path, top_k=2)
        _one_line(exc, path, words)
    path = tmp_path / "nopairs.npz"
    np.savez(path, heat=heat)
    with pytest.raises(GraceInputError) as exc:
        import_qwen_coactivation(path, top_k=2)
    _one_line(exc, path, "pairs_layer_i_j_count_lift")


@pytest.mark.parametrize(
    ("usage", "words"),
    [
        ({"1": {"0": 5, "1": -2}}, ["layer 1, expert 1", "non-negative"]),
        ({"1": {"0": 5, "1": float("nan")}}, ["layer 1, expert 1"]),
        ({"1": {"0": 5, "9": 2}}, ["expert id 9 out of range [0, 4)"]),
        ({"1": {"0": 5, "x": 2}}, ["'x' is not an integer"]),
        ({"1": {"0": 5, "1": "2"}}, ["count must be"]),
        ({"1": [5, 2]}, ["expected an object"]),
        ({"one": {"0": 5}}, ["layer names must be integers"]),
        ({}, ["non-empty"]),
    ],
)
def test_switch_bad(usage: dict, words: list[str], tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"num_experts": 4, "expert_usage_by_layer": usage}))
    with pytest.raises(GraceInputError) as exc:
        import_switch_load(path)
    _one_line(exc, path, *words)


def test_switch_wrong_schema(tmp_path: Path) -> None:
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"usage": [1, 2]}))
    with pytest.raises(GraceInputError) as exc:
        import_switch_load(path)
    _one_line(exc, path, "expert_usage_by_layer")


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("nan.json", "[[1, NaN], [2, 3]]", ["NaN", "layer 0, expert 1"]),
        ("neg.json", "[[1, -4], [2, 3]]", ["negative count", "layer 0, expert 1"]),
        ("ragged.json", "[[1, 2], [3]]", ["ragged"]),
        ("strings.json", '[["1", "2"]]', ["numbers"]),
        ("dict.json", '{"counts": [[1, 2]]}', ["logical_count"]),
        ("vec.json", "[1, 2, 3]", ["[layers, experts]"]),
        ("neg.csv", "1,2\n3,-1\n", ["negative count"]),
        ("ragged.csv", "1,2\n3,4,5\n", ["line 2", "3 values, expected 2"]),
        ("words.csv", "a,b\n1,2\nx,y\n", ["line 3", "not a row of numbers"]),
        ("nan.txt", "1 2\nnan 4\n", ["NaN"]),
    ],
)
def test_load_matrix_bad(name: str, content: str, words: list[str], tmp_path: Path) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(GraceInputError) as exc:
        import_load_matrix(path, top_k=1)
    _one_line(exc, path, *words)


def test_load_matrix_bad_binary(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "nan.npy"
    np.save(path, np.array([[1.0, np.nan]]))
    with pytest.raises(GraceInputError) as exc:
        import_load_matrix(path, top_k=1)
    _one_line(exc, path, "NaN")
    path = tmp_path / "two.npz"
    np.savez(path, a=np.ones((2, 2)), b=np.ones((2, 2)))
    with pytest.raises(GraceInputError) as exc:
        import_load_matrix(path, top_k=1)
    _one_line(exc, path, "logical_count")
    path = tmp_path / "neg.pt"
    torch.save({"logical_count": -torch.ones(2, 3)}, path)
    with pytest.raises(GraceInputError) as exc:
        import_load_matrix(path, top_k=1)
    _one_line(exc, path, "negative")
    path = tmp_path / "nokey.pt"
    torch.save({"counts": torch.ones(2, 3)}, path)
    with pytest.raises(GraceInputError) as exc:
        import_load_matrix(path, top_k=1)
    _one_line(exc, path, "logical_count")
    path = tmp_path / "big_k.npy"
    np.save(path, np.ones((2, 3)))
    with pytest.raises(GraceInputError) as exc:
        import_load_matrix(path, top_k=4)
    _one_line(exc, path, "top_k=4")


# ====================================================================== detection and dispatch
def test_detect_format_real_files() -> None:
    _need(TRACES)
    expected = {
        MIXTRAL / "gsm8k_2_routing.jsonl": "vllm-records-jsonl",
        MIXTRAL / "mixtral8x7b_fp8_decode_routing.npz": "mixtral-npz",
        GRANITE / "routing-trace_sglang.jsonl": "sglang-jsonl",
        GRANITE / "granite_length_cap_transformers.jsonl": "sglang-jsonl",
        QWEN / "coactivation_qwen3-30b-a3b.json": "qwen-coactivation",
        QWEN / "qwen3_30b_a3b_load_and_pairs.npz": "qwen-coactivation",
        SWITCH / "expert_statistics_3d.json": "switch-load",
    }
    for path, fmt in expected.items():
        assert path.exists(), f"missing from the shared traces: {path}"
        assert detect_format(path) == fmt, path
    assert set(IMPORT_FORMATS) == {"vllm-records-jsonl", "mixtral-npz", "sglang-jsonl", "qwen-coactivation",
                                   "switch-load", "load-matrix", "topk-ids", "grace-trace", "grace-stats"}


def test_import_any_dispatch(tmp_path: Path) -> None:
    files = _mixtral_jsonl()
    tr = import_any(files, num_experts=8)
    assert isinstance(tr, RoutingTrace) and tr.expert_ids.shape == (585, 32, 2)
    st = import_any(_need(QWEN / "qwen3_30b_a3b_load_and_pairs.npz"), fmt="qwen-coactivation", top_k=None)
    assert isinstance(st, ExpertStats) and st.top_k == 8
    with pytest.raises(GraceInputError) as exc:
        import_any(files[0], fmt="parquet")
    _one_line(exc, files[0], "unknown import format 'parquet'")
    with pytest.raises(GraceInputError) as exc:
        import_any(files[0], top_k=2)
    _one_line(exc, files[0], "option top_k does not apply")
    with pytest.raises(GraceInputError) as exc:
        import_any([QWEN / "coactivation_qwen3-30b-a3b.json", QWEN / "qwen3_30b_a3b_load_and_pairs.npz"])
    _one_line(exc, None, "takes one file")
    unknown = tmp_path / "notes.md"
    unknown.write_text("hello")
    with pytest.raises(GraceInputError) as exc:
        import_any(unknown)
    _one_line(exc, unknown, "unrecognized")
    odd = tmp_path / "odd.jsonl"
    _write_jsonl(odd, [{"foo": 1}])
    with pytest.raises(GraceInputError) as exc:
        detect_format(odd)
    _one_line(exc, odd, "unrecognized JSONL")


def test_random_bytes_never_leak_raw_errors(tmp_path: Path) -> None:
    """Fuzz: random and mangled files only ever raise GraceInputError, whatever their name."""
    rng = np.random.default_rng(7)
    good = json.dumps(_qwen_doc()).encode()
    seeds = [good, b"".join(json.dumps(r).encode() + b"\n" for r in _sglang_rows())]
    for trial in range(60):
        src = seeds[trial % 2]
        kind = trial % 3
        if kind == 0:
            data = rng.bytes(int(rng.integers(1, 400)))
        elif kind == 1:
            data = src[: int(rng.integers(1, len(src)))]
        else:
            arr = np.frombuffer(src, dtype=np.uint8).copy()
            pos = rng.integers(0, arr.size, size=5)
            arr[pos] = rng.integers(0, 256, size=5)
            data = arr.tobytes()
        suffix = [".json", ".jsonl", ".npz", ".csv", ".npy"][trial % 5]
        path = tmp_path / f"fuzz{trial}{suffix}"
        path.write_bytes(data)
        try:
            result = import_any(path)
        except GraceInputError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc)
        else:  # a mutation that still parses is another valid input: what was read must be self-consistent
            result.validate()
            if isinstance(result, RoutingTrace):
                ids = result.expert_ids
                assert ids.ndim == 3 and ids.min(initial=-1) >= -1 and ids.max(initial=-1) < result.num_experts
            else:
                assert np.isfinite(result.load).all() and (result.load >= 0).all() and result.top_k >= 1
