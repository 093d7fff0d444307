"""Pieces of the checkpoint package without a framework: safetensors streaming, safe loading, conversions."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from megatron_grace.checkpoint.convert import expert_geometry, grace_state
from megatron_grace.checkpoint.safe_load import load_dcp_metadata, load_torch_file
from megatron_grace.checkpoint.safetensors_io import SafetensorsLayout, read_header, read_tensor, tensor_bytes, write_tensor
from megatron_grace.checkpoint.scan import scan_safetensors
from megatron_grace.checkpoint.source import TensorSpec
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
    layout.create(path)
    fd = os.open(path, os.O_WRONLY)
    for k in reversed(list(tensors)):  # any order: each tensor has its place
        write_tensor(fd, layout.entries[k], tensor_bytes(tensors[k]))
    os.close(fd)
    assert path.stat().st_size == layout.size
    lib = load_file(str(path))
    entries, meta, _ = read_header(path)
    assert meta == {"format": "test"} and set(lib) == set(tensors) == set(entries)
    fd = os.open(path, os.O_RDONLY)
    for k, t in tensors.items():
        assert torch.equal(lib[k], t) and lib[k].dtype == t.dtype
        assert torch.equal(read_tensor(fd, entries[k]), t)
    os.close(fd)
    import hashlib

    want = {k: hashlib.sha256(tensor_bytes(t)).hexdigest() for k, t in tensors.items()}
    sha, size, problems = scan_safetensors(path, want)
    assert not problems and size == layout.size and sha == hashlib.sha256(path.read_bytes()).hexdigest()
    raw = bytearray(path.read_bytes())
    raw[entries["c"].begin + 3] ^= 0xFF
    path.write_bytes(raw)
    assert scan_safetensors(path, want)[2] == [f"{path}: tensor c does not match the manifest (sha256 differs)"]
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
