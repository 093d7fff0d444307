"""The Megatron-Core patches in patches/ apply cleanly to the pinned release and do what they say.

Skipped unless megatron-core 0.16.1 (the pinned release) is installed. The installed files are
copied into a temporary tree and patched there (``patch -p1``, or a small pure-Python applier
when the ``patch`` tool is missing); the installed package is never modified.
"""

from __future__ import annotations

import os
import py_compile
import re
import shutil
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PATCHES = REPO / "patches"
PINNED = "0.16.1"


def _installed_root() -> Path:
    try:
        version = metadata.version("megatron-core")
    except metadata.PackageNotFoundError:
        pytest.skip("megatron-core is not installed")
    if version != PINNED:
        pytest.skip(f"the patches are for megatron-core {PINNED}, {version} is installed")
    dist = metadata.distribution("megatron-core")
    root = Path(dist.locate_file(""))
    if not (root / "megatron" / "core").is_dir():
        pytest.skip(f"megatron/core not found under {root}")
    return root


def _patch_files() -> list[Path]:
    files = sorted(PATCHES.glob(f"megatron-core-{PINNED}-*.patch"))
    assert files, f"no patch for megatron-core {PINNED} in {PATCHES}"
    return files


def _targets(patch_text: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^\+\+\+ b/(\S+)", patch_text, flags=re.M)]


def _apply_python(patch_text: str, root: Path) -> None:
    """Minimal unified-diff applier (exact context, hunks in order); raises AssertionError on mismatch."""
    files = re.split(r"^--- a/\S+.*\n(?=\+\+\+ b/)", patch_text, flags=re.M)[1:]
    for block in files:
        target = re.match(r"\+\+\+ b/(\S+)", block).group(1)
        path = root / target
        lines = path.read_text().splitlines(keepends=True)
        out, pos = [], 0
        for hunk in re.finditer(r"^@@ -(\d+)(?:,\d+)? \+\d+(?:,\d+)? @@.*\n((?:[ +\-].*\n?)*)", block, flags=re.M):
            start = int(hunk.group(1)) - 1
            body = hunk.group(2).splitlines(keepends=True)
            old = [ln[1:] for ln in body if ln[:1] in (" ", "-")]
            new = [ln[1:] for ln in body if ln[:1] in (" ", "+")]
            assert lines[start: start + len(old)] == old, f"{target}: hunk at line {start + 1} does not match"
            out.extend(lines[pos:start])
            out.extend(new)
            pos = start + len(old)
        out.extend(lines[pos:])
        path.write_text("".join(out))


def _patched_tree(tmp_path: Path, patch: Path) -> tuple[Path, list[str]]:
    root = _installed_root()
    text = patch.read_text()
    targets = _targets(text)
    assert targets, f"{patch.name} changes no file"
    for t in targets:
        dst = tmp_path / t
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / t, dst)
    if shutil.which("patch"):
        dry = subprocess.run(["patch", "-p1", "--dry-run", "--forward", "-i", str(patch)], cwd=tmp_path, capture_output=True, text=True)
        assert dry.returncode == 0, f"{patch.name} does not apply cleanly:\n{dry.stdout}\n{dry.stderr}"
        assert "offset" not in dry.stdout and "fuzz" not in dry.stdout, dry.stdout
        real = subprocess.run(["patch", "-p1", "--forward", "-i", str(patch)], cwd=tmp_path, capture_output=True, text=True)
        assert real.returncode == 0, real.stdout + real.stderr
    else:
        _apply_python(text, tmp_path)
    return tmp_path, targets


@pytest.mark.parametrize("patch", _patch_files() if PATCHES.is_dir() else [], ids=lambda p: p.name)
def test_patch_applies_cleanly(tmp_path, patch):
    root, targets = _patched_tree(tmp_path, patch)
    for t in targets:
        py_compile.compile(str(root / t), doraise=True)


def test_python_applier_agrees_with_patch_tool(tmp_path):
    if not shutil.which("patch"):
        pytest.skip("the patch tool is not installed")
    for patch in _patch_files():
        a, targets = _patched_tree(tmp_path / "tool", patch)
        src = _installed_root()
        for t in targets:
            dst = tmp_path / "py" / t
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / t, dst)
        _apply_python(patch.read_text(), tmp_path / "py")
        for t in targets:
            assert (tmp_path / "py" / t).read_text() == (a / t).read_text()


def test_subclass_gets_pg_collection_after_patch(tmp_path):
    """Build a TransformerLayer with the GRACE spec and a custom ProcessGroupCollection, before and after the patch."""
    patch = PATCHES / f"megatron-core-{PINNED}-grace.patch"
    root, targets = _patched_tree(tmp_path, patch)
    patched = root / "megatron/core/transformer/transformer_layer.py"
    script = textwrap.dedent(f"""
        import os, sys
        import torch, torch.distributed as dist
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
        dist.init_process_group("gloo", rank=0, world_size=1)
        from megatron_grace.adapters.megatron import testing as mt, grace_spec, GraceMegatronMoELayer
        from megatron_grace.adapters.megatron import transformer_layer_passes_pg_collection_to_subclasses as passes
        mt.init_megatron_parallel(1)
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.core.transformer.spec_utils import build_module
        from megatron.core.transformer import transformer_layer

        def build():
            cfg = mt.small_moe_config(num_experts=4, top_k=2, num_layers=1, expert_parallel_size=1)
            custom = ProcessGroupCollection.use_mpu_process_groups()
            custom.ep = dist.new_group([0])  # a group distinct from parallel_state's
            spec = grace_spec(get_gpt_layer_local_spec(num_experts=4), plan=None)
            spec.module = transformer_layer.TransformerLayer  # the class as (re)defined in the module now
            layer = build_module(spec, config=cfg, layer_number=1, pg_collection=custom)
            assert isinstance(layer.mlp, GraceMegatronMoELayer)
            return layer.mlp.ep_group is custom.ep

        before = (build(), passes())
        src = open({str(patched)!r}).read()
        exec(compile(src, {str(patched)!r}, "exec"), transformer_layer.__dict__)
        after = (build(), passes())
        print("RESULT", before, after)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    from _dist_utils import free_port

    proc = subprocess.run([sys.executable, "-c", script, str(free_port())], capture_output=True, text=True, env=env, timeout=180)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert lines[0] == "RESULT (False, False) (True, True)", lines[0]
