"""``save_npz_atomic``: the on-disk dtypes asked for apply to plain and streamed arrays alike."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_grace._files import StreamedArray, save_npz_atomic

_INTS = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16]


def _blocks(arr: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """``arr`` cut into random consecutive slices along axis 0 (empty ones included)."""
    cuts = np.sort(rng.integers(0, arr.shape[0] + 1, size=rng.integers(0, 4)))
    return np.split(arr, cuts)


@pytest.mark.parametrize("seed", range(6))
def test_streamed_and_plain_arrays_are_stored_as_the_dtypes_asked_for(tmp_path, seed):
    rng = np.random.default_rng(seed)
    arrays, dtypes, expected = {}, {}, {}
    for i in range(6):
        shape = (int(rng.integers(0, 40)), *rng.integers(1, 4, size=rng.integers(0, 3)).tolist())
        own = np.dtype(rng.choice(_INTS + [np.float32, np.float64]))
        disk = np.dtype(rng.choice(_INTS)) if own.kind in "iu" else np.dtype(rng.choice([np.float16, np.float32]))
        if own.kind in "iu":
            lo, hi = max(np.iinfo(own).min, np.iinfo(disk).min), min(np.iinfo(own).max, np.iinfo(disk).max)
        else:
            lo, hi = -9, 9
        values = rng.integers(lo, hi, size=shape, endpoint=True).astype(own)  # values that fit both dtypes
        name = f"a{i}"
        if rng.random() < 0.3:  # no dtype asked for: kept as is
            disk = own
        else:
            dtypes[name] = disk
        streamed = rng.random() < 0.5
        arrays[name] = StreamedArray(shape, own, iter(_blocks(values, rng))) if streamed else values
        expected[name] = values.astype(disk)
    path = tmp_path / "out.npz"
    save_npz_atomic(path, arrays, dtypes=dtypes)
    with np.load(path, allow_pickle=False) as f:
        assert sorted(f.files) == sorted(expected)
        for name, want in expected.items():
            got = f[name]
            assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want), name


def test_values_that_do_not_fit_the_disk_dtype_are_refused_not_wrapped(tmp_path):
    path = tmp_path / "out.npz"
    ids = np.array([[0, 5], [127, 128]], dtype=np.int32)
    for arr in (ids, StreamedArray(ids.shape, ids.dtype, iter([ids[:1], ids[1:]]))):
        with pytest.raises(ValueError, match=r"values (0|127)\.\.128 do not fit int8"):
            save_npz_atomic(path, {"ids": arr}, dtypes={"ids": np.int8})
        assert not path.exists() and not list(tmp_path.iterdir())  # nothing written, no temporary left
    save_npz_atomic(path, {"ids": StreamedArray(ids.shape, ids.dtype, iter([ids]))}, dtypes={"ids": np.int16})
    with np.load(path, allow_pickle=False) as f:
        assert f["ids"].dtype == np.int16 and np.array_equal(f["ids"], ids)
