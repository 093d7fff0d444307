"""Pieces of the checkpoint package without a framework: safetensors streaming, safe loading, conversions."""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import random
from pathlib import Path

import pytest
import torch

from megatron_grace.checkpoint.convert import expert_geometry, grace_state
from megatron_grace.checkpoint.safe_load import load_dcp_metadata, load_torch_file, load_torch_file_located
from megatron_grace.checkpoint.safetensors_io import SafetensorsLayout, in_file_order, read_header, read_tensor, tensor_bytes, tree_sha256
from megatron_grace.checkpoint.scan import scan_safetensors
from megatron_grace.checkpoint.source import FileSpan, TensorSpec
from megatron_grace.checkpoint.stream_copy import StreamWriter, copy_range, file_identity
from megatron_grace.errors import GraceInputError


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16),
            "c": torch.arange(6, dtype=torch.int64).reshape(2, 3), "empty": torch.zeros(0, 4), "d": torch.randn(4, 2, generator=g).t()}


def test_streamed_safetensors_read_by_the_library_and_by_pread(tmp_path):
    from safetensors.torch import load_file

    tensors = _tensors()
    layout = SafetensorsLayout([(k, TensorSpec.of(v)) for k, v in tensors.items()], {"format": "test"})
    path = tmp_path / "x.safetensors"
    writer = StreamWriter({"x": (path, layout)}, block=8, file_sha256=True)  # 8-byte blocks: many buffer reuses
    digests: dict[str, str] = {}
    for k in reversed(list(tensors)):  # out of file order: the file is hashed by a read in finish()
        writer.put(tensors[k], [("x", k)], digests, k)
    record = writer.finish()
    assert path.stat().st_size == layout.size == record["x"]["bytes"]
    assert record["x"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    lib = load_file(str(path))
    entries, meta, _ = read_header(path)
    assert meta == {"format": "test"} and set(lib) == set(tensors) == set(entries)
    fd = os.open(path, os.O_RDONLY)
    for k, t in tensors.items():
        assert torch.equal(lib[k], t) and lib[k].dtype == t.dtype
        assert torch.equal(read_tensor(fd, entries[k]), t)
    os.close(fd)
    want = {k: hashlib.sha256(tensor_bytes(t)).hexdigest() for k, t in tensors.items()}
    assert digests == want
    scan = scan_safetensors(path, want, plain=True)
    assert not scan.problems and scan.size == layout.size and scan.sha256 == record["x"]["sha256"]
    assert scan.tree_sha256 == record["x"]["tree_sha256"] == tree_sha256(layout.head, [
        hashlib.sha256(tensor_bytes(tensors[k])).digest() for k in sorted(tensors, key=lambda k: (entries[k].begin, entries[k].end))])
    raw = bytearray(path.read_bytes())
    raw[entries["c"].begin + 3] ^= 0xFF
    path.write_bytes(raw)
    bad = scan_safetensors(path, want)
    assert bad.problems == [f"{path}: tensor c does not match the manifest (sha256 differs)"] and bad.tree_sha256 != scan.tree_sha256
    path.write_bytes(raw + b"x")
    assert scan_safetensors(path, want).problems[-1] == f"{path}: 1 bytes after the last tensor"
    path.write_bytes(raw[:-5])
    with pytest.raises(GraceInputError, match="truncated"):
        read_header(path)


class _NotAllowlisted:
    """A class no library registers with torch.serialization.add_safe_globals."""


def test_torch_files_are_loaded_weights_only(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.ones(2)}, "args": __import__("argparse").Namespace(a=1)}, good)
    assert torch.equal(load_torch_file(good)["model"]["w"], torch.ones(2))
    bad = tmp_path / "bad.pt"
    torch.save({"model": {}, "x": _NotAllowlisted()}, bad)  # (Path is allowlisted once megatron.core is imported)
    with pytest.raises(GraceInputError, match="weights_only=True"):
        load_torch_file(bad)
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(1)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(GraceInputError, match="not a torch.save zip file"):
        load_torch_file(legacy)


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_dcp_metadata_unpickler_runs_no_foreign_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / ".metadata"
    path.write_bytes(pickle.dumps(_Exploit(str(marker))))
    with pytest.raises(GraceInputError, match="not a DCP metadata class"):
        load_dcp_metadata(path)
    assert not marker.exists()
    from torch.distributed.checkpoint.metadata import Metadata

    path.write_bytes(pickle.dumps(Metadata(state_dict_metadata={})))
    assert load_dcp_metadata(path).state_dict_metadata == {}


@pytest.mark.parametrize("naming", ["megatron-swiglu", "megatron-gelu", "hf", "mixtral", "fc"])
def test_grace_state_computes_the_framework_expert(naming):
    """The converted state, run as the GRACE experts compute, equals the framework's own formula."""
    h, f = 6, 4
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, h, dtype=torch.float64, generator=g)
    lin = {n: torch.randn(*s, dtype=torch.float64, generator=g) for n, s in (("gate", (f, h)), ("up", (f, h)), ("down", (h, f)))}
    silu, gelu = torch.nn.functional.silu, torch.nn.functional.gelu
    ref_glu = (silu(x @ lin["gate"].T) * (x @ lin["up"].T)) @ lin["down"].T
    ref_gelu = gelu(x @ lin["up"].T) @ lin["down"].T
    tensors, ref = {
        "megatron-swiglu": ({"linear_fc1.weight": torch.cat([lin["gate"], lin["up"]]), "linear_fc2.weight": lin["down"]}, ref_glu),
        "megatron-gelu": ({"linear_fc1.weight": lin["up"], "linear_fc2.weight": lin["down"]}, ref_gelu),
        "hf": ({"gate_proj.weight": lin["gate"], "up_proj.weight": lin["up"], "down_proj.weight": lin["down"]}, ref_glu),
        "mixtral": ({"w1.weight": lin["gate"], "w3.weight": lin["up"], "w2.weight": lin["down"]}, ref_glu),
        "fc": ({"fc1.weight": lin["up"], "fc2.weight": lin["down"]}, ref_gelu),
    }[naming]
    act, hh, ff = expert_geometry({k: tuple(v.shape) for k, v in tensors.items()})
    assert (hh, ff) == (h, f)
    s = grace_state(tensors, act)
    y = (silu(x @ s["gate"]) * (x @ s["up"])) @ s["down"] if act == "swiglu" else gelu(x @ s["fc1"]) @ s["fc2"]
    assert torch.allclose(y, ref, rtol=0, atol=1e-12)
    with pytest.raises(GraceInputError, match="not (gelu|swiglu)"):
        grace_state(tensors, "gelu" if act == "swiglu" else "swiglu")


def test_unknown_expert_naming_is_refused():
    with pytest.raises(GraceInputError, match="match no known naming"):
        grace_state({"fc1.weight": torch.zeros(4, 6), "fc1.bias": torch.zeros(4), "fc2.weight": torch.zeros(6, 4)})


def _random_state(rng: random.Random, g: torch.Generator) -> dict:
    """A torch.save-able state like the frameworks write: tensors of many dtypes and shapes, views
    sharing storages (contiguous and not), an args namespace, numpy RNG state, nesting."""
    import numpy as np

    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8, torch.bool]
    model = {}
    for i in range(rng.randrange(3, 12)):
        shape = tuple(rng.randrange(0 if rng.random() < 0.1 else 1, 9) for _ in range(rng.randrange(1, 4)))
        model[f"t{i}"] = (torch.rand(shape, generator=g) * 100).to(rng.choice(dtypes))
    base = torch.randn(6, 10, generator=g)
    model.update({"row_view": base[2:4], "col_view": base[:, 3:5], "t_view": base.t(), "whole": base, "tail": base.reshape(-1)[37:]})
    return {"model": model, "args": argparse.Namespace(hidden=4, name="x"), "rng": {"np": np.random.RandomState(0).get_state()[1]},
            "nested": [torch.arange(5), (torch.ones(2, 2),)], "iteration": 3}


def _all_tensors(obj, out):
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _all_tensors(v, out)
    elif isinstance(obj, list | tuple):
        for v in obj:
            _all_tensors(v, out)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_span_locator_gives_each_tensors_bytes_on_random_files(tmp_path, seed):
    """The fast path (pread of a located byte range) against the reference (the loaded tensor's bytes)."""
    path = tmp_path / "f.pt"
    torch.save(_random_state(random.Random(seed), torch.Generator().manual_seed(seed)), path)
    state, locator = load_torch_file_located(path)
    assert locator.enabled
    raw = path.read_bytes()
    located = 0
    for t in _all_tensors(state, []):
        span = locator.span(t)
        if t.numel() == 0 or not t.is_contiguous():
            assert span is None
            continue
        assert span is not None and span.path == path
        assert raw[span.offset: span.offset + span.nbytes] == tensor_bytes(t).tobytes()
        located += 1
    assert located >= 5
    # a tensor that is not from this file is never located
    assert locator.span(torch.ones(3)) is None and locator.data(torch.ones(3)).shape == (3,)


def test_stream_writer_span_and_tensor_paths_write_the_same_files(tmp_path):
    """Replicas in two files, written front to back (hashes from the buffers, no re-read) from
    source byte ranges and from tensors: identical files; every digest equals a fresh sha256."""
    g = torch.Generator().manual_seed(3)
    tensors = {f"w{i}": torch.randn(5 + 37 * i, 3, generator=g).to(torch.bfloat16 if i % 2 else torch.float32) for i in range(5)}
    src = tmp_path / "src.pt"
    torch.save(tensors, src)
    loaded, locator = load_torch_file_located(src)
    spans = {k: locator.span(t) for k, t in loaded.items()}
    assert all(isinstance(s, FileSpan) for s in spans.values())
    layout = SafetensorsLayout([(k, TensorSpec.of(t)) for k, t in tensors.items()], {"format": "test"})
    results = []
    with src.open("rb") as a, (tmp_path / "probe").open("wb") as b:  # does this file system copy in the kernel?
        kernel_ok = copy_range(a.fileno(), 0, b.fileno(), 0, 16) == 16
    for label, source, plain, max_open, kernel in (("span_kernel", spans, True, 8, True), ("span_buffer", spans, False, 8, False),
                                                   ("tensor", tensors, True, 1, True)):  # one file open at a time: reopened
        files = {n: (tmp_path / f"{label}_{n}.safetensors", layout) for n in ("a", "b")}
        writer = StreamWriter(files, hash_threads=2, block=64, file_sha256=plain, max_open=max_open,
                              kernel_copy=kernel)  # small blocks: many ring reuses
        digests: dict[str, str] = {}
        for k in tensors:
            writer.put(source[k], [("a", k), ("b", k)], digests, k)
        record = writer.finish()
        copied = 2 * sum(tensor_bytes(t).nbytes for t in tensors.values()) if label == "span_kernel" and kernel_ok else 0
        assert writer.kernel_copied == copied  # the kernel copy is used where the file system has it, and only when asked
        for n, (path, _) in files.items():  # written front to back: the plain sha256 comes from the blocks, not a re-read
            scan = scan_safetensors(path, {}, plain=True)
            assert record[n]["tree_sha256"] == scan.tree_sha256 and record[n]["bytes"] == layout.size
            assert record[n].get("sha256") == (hashlib.sha256(path.read_bytes()).hexdigest() if plain else None)
        assert digests == {k: hashlib.sha256(tensor_bytes(t)).hexdigest() for k, t in tensors.items()}
        results.append([files[n][0].read_bytes() for n in files])
    assert results[0] == results[1] == results[2] and results[0][0] == results[0][1]


@pytest.mark.parametrize("failure", ["zero", "error_after_part"])
def test_stream_writer_falls_back_when_the_kernel_copy_stops(tmp_path, monkeypatch, failure):
    """copy_file_range returning 0 (some network / FUSE file systems) or failing part way: the rest of the block is
    written from the read buffer, the kernel copy is turned off, and the files are byte-identical to a buffer-only run."""
    g = torch.Generator().manual_seed(5)
    tensors = {f"w{i}": torch.randn(300 + 7 * i, generator=g) for i in range(4)}
    src = tmp_path / "src.pt"
    torch.save(tensors, src)
    loaded, locator = load_torch_file_located(src)
    spans = {k: locator.span(t) for k, t in loaded.items()}
    layout = SafetensorsLayout([(k, TensorSpec.of(t)) for k, t in tensors.items()])
    real = os.copy_file_range
    calls = []

    def flaky(fd_in, fd_out, count, offset_src=None, offset_dst=None):
        calls.append(count)
        if failure == "zero":
            return 0
        if len(calls) == 1:  # part of the first block, then an error
            return real(fd_in, fd_out, min(count, 100), offset_src, offset_dst)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "copy_file_range", flaky)
    out = {}
    for label, kernel in (("flaky", True), ("buffer", False)):
        writer = StreamWriter({"f": (tmp_path / f"{label}.safetensors", layout)}, block=512, kernel_copy=kernel,
                              source_identity={src: file_identity(src)})
        digests: dict[str, str] = {}
        for k in tensors:
            writer.put(spans[k], [("f", k)], digests, k)
        writer.finish()
        assert writer.kernel_copy is False
        out[label] = (tmp_path / f"{label}.safetensors").read_bytes()
        assert digests == {k: hashlib.sha256(tensor_bytes(t)).hexdigest() for k, t in tensors.items()}
    assert calls and out["flaky"] == out["buffer"]


def test_stream_writer_refuses_a_source_that_changes_during_the_copy(tmp_path):
    """The kernel copy reads the source again: a source written to meanwhile is refused in finish()."""
    t = torch.arange(64, dtype=torch.float32)
    src = tmp_path / "src.bin"
    src.write_bytes(tensor_bytes(t).tobytes())
    layout = SafetensorsLayout([("x", TensorSpec.of(t))])
    writer = StreamWriter({"f": (tmp_path / "f.safetensors", layout)})
    writer.put(FileSpan(src, 0, src.stat().st_size), [("f", "x")], {}, "x")
    with src.open("r+b") as fh:  # same size, new bytes and modification time
        fh.write(b"\1" * 4)
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))
    with pytest.raises(GraceInputError, match="changed while it was being patched"):
        writer.finish()
    writer.close()
    before = file_identity(src)  # recorded when the index was read; replaced before the writer first opens it
    replacement = tmp_path / "other.bin"
    replacement.write_bytes(tensor_bytes(t).tobytes())
    os.replace(replacement, src)
    writer = StreamWriter({"f": (tmp_path / "g.safetensors", layout)}, source_identity={src: before})
    with pytest.raises(GraceInputError, match="changed while it was being patched"):
        writer.put(FileSpan(src, 0, src.stat().st_size), [("f", "x")], {}, "x")
    writer.close()


def test_stream_writer_refuses_incomplete_or_truncated_input(tmp_path):
    t = torch.arange(32, dtype=torch.float32)
    layout = SafetensorsLayout([("x", TensorSpec.of(t)), ("y", TensorSpec.of(t))])
    writer = StreamWriter({"f": (tmp_path / "f.safetensors", layout)})
    writer.put(t, [("f", "x")], {}, "x")
    with pytest.raises(GraceInputError, match="tensor y was never written"):
        writer.finish()
    writer.close()
    short = tmp_path / "short.bin"
    short.write_bytes(b"\0" * 100)
    writer = StreamWriter({"f": (tmp_path / "g.safetensors", layout)})
    with pytest.raises(GraceInputError, match="truncated"):  # shorter than its index says, seen before reading
        writer.put(FileSpan(short, 0, 128), [("f", "x")], {}, "x")
    fd = os.open(short, os.O_RDONLY)
    try:  # truncated by someone else after that check: the read comes back short, also refused (a map would fault)
        with pytest.raises(GraceInputError, match="truncated"):
            writer._read_span(0, fd, 64, 64, short)
    finally:
        os.close(fd)
    with pytest.raises(GraceInputError, match="written twice"):
        writer.put(t, [("f", "x")], {}, "x")
    writer.close()


def test_torch_files_go_through_the_input_and_archive_checks(tmp_path):
    from megatron_grace import limits

    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    with pytest.raises(GraceInputError, match="FIFO"):
        load_torch_file(fifo)  # refused unopened (a FIFO would block)
    big = tmp_path / "big.pt"
    torch.save({"w": torch.zeros(1 << 18)}, big)  # one 1 MB record
    with limits.override(memory_gb=0.0005), pytest.raises(GraceInputError, match="memory limit") as refused:
        load_torch_file(big)
    assert f"{big}: torch storage record 'big/data/0' (expanded) would need 0.00105 GB" in str(refused.value)  # not "array ..."
    assert load_torch_file(big)["w"].numel() == 1 << 18


def test_atomic_dir_temporaries_follow_the_package_rule(tmp_path):
    """One naming and one stale rule for temporary files and directories: a dead run's directory on
    this host is removed, a live run's and another host's (shared file system) are kept."""
    import subprocess
    import sys

    from megatron_grace._files import temporary_prefix
    from megatron_grace.checkpoint.atomic_dir import atomic_dir

    dst = tmp_path / "ckpt"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = temporary_prefix(dst)
    assert mine.startswith(".ckpt.grace") and f"grace{os.getpid()}h" in mine
    stale = tmp_path / mine.replace(f"grace{os.getpid()}h", f"grace{dead.pid}h")
    stale = Path(f"{stale}abcdefgh.tmpdir")
    live = tmp_path / f"{mine}live0001.tmpdir"
    other_host = tmp_path / f".ckpt.grace{dead.pid}h00000000.abcdefgh.tmpdir"
    for d in (stale, live, other_host):
        d.mkdir()
        (d / "part").write_bytes(b"x")
    with atomic_dir(dst, overwrite=False) as tmp:
        assert tmp.name.startswith(mine) and tmp.name.endswith(".tmpdir")
        (tmp / "data").write_bytes(b"ok")
    umask = os.umask(0)
    os.umask(umask)
    assert (dst / "data").read_bytes() == b"ok" and dst.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    assert not stale.exists() and live.exists() and other_host.exists()
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "failed", overwrite=False) as tmp:
        (tmp / "data").write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert not (tmp_path / "failed").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".failed.")]


def test_file_order_puts_empty_tensors_first_and_matches_the_written_files(tmp_path):
    """The one tensor order of tree digests: by byte range, an empty tensor before the one starting at
    its offset; the writer's and the scan's tree digests equal sha256(header || digests in layout order)."""
    rng = random.Random(5)
    for _ in range(50):
        sizes = [rng.choice([0, 0, 1, 7, 64]) for _ in range(rng.randint(1, 12))]
        pieces, pos = [], 0
        for i, n in enumerate(sizes):
            pieces.append(((pos, pos + n), i))
            pos += n
        shuffled = pieces[:]
        rng.shuffle(shuffled)
        got = in_file_order(shuffled)
        # reference: at each offset the empty tensors (equal ranges in any order), then the one that starts there
        assert [pieces[i][0] for i in got] == [r for r, _ in pieces]
    tensors = _tensors()
    layout = SafetensorsLayout([(k, TensorSpec.of(t)) for k, t in tensors.items()])
    assert layout.entries["empty"].begin == layout.entries["d"].begin  # an empty tensor shares its offset
    writer = StreamWriter({"f": (tmp_path / "f.safetensors", layout)})
    for k in reversed(tensors):  # written out of order
        writer.put(tensors[k], [("f", k)], {}, k)
    record = writer.finish()
    reference = hashlib.sha256(layout.head + b"".join(hashlib.sha256(tensor_bytes(t)).digest() for t in tensors.values()))
    assert record["f"]["tree_sha256"] == scan_safetensors(tmp_path / "f.safetensors", {}).tree_sha256 == reference.hexdigest()


def test_disk_space_check_names_the_bytes_and_the_folder(tmp_path, monkeypatch):
    """The package's one up-front disk check: ``nbytes`` + 1% + 16 MiB must be free; nothing is created."""
    import shutil

    from megatron_grace import _files

    real = shutil.disk_usage
    target = tmp_path / "a" / "b" / "ckpt"
    need = 1_000_000
    slack = need // 100 + (16 << 20)
    monkeypatch.setattr(_files.shutil, "disk_usage", lambda p: real(p)._replace(free=need + slack))
    _files.check_disk_space(target, need, "the thing")  # exactly enough
    monkeypatch.setattr(_files.shutil, "disk_usage", lambda p: real(p)._replace(free=need + slack - 1))
    with pytest.raises(GraceInputError) as refused:
        _files.check_disk_space(target, need, "the thing")
    assert str(refused.value) == (f"{target}: not enough disk space: the thing needs up to 1.0 MB of disk (+16.8 MB slack for the "
                                  f"file system), 17.8 MB are free in {tmp_path}")
    assert not (tmp_path / "a").exists()
