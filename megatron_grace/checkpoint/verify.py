"""``verify``: recompute every hash of a patched checkpoint, check it against its plan and, optionally, the source."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_grace._progress import progress
from megatron_grace.checkpoint import manifest as mf
from megatron_grace.checkpoint.detect import open_source
from megatron_grace.checkpoint.scan import Scan, scan_many
from megatron_grace.checkpoint.slots import SlotFiles
from megatron_grace.checkpoint.source import sha256_file
from megatron_grace.errors import GraceInputError
from megatron_grace.plan.placement import PlacementPlan


@dataclass
class VerifyReport:
    """What was checked and every disagreement found (empty ``problems`` = all agree)."""

    files: int = 0
    bytes: int = 0
    slots: int = 0
    experts_against_source: int = 0
    problems: list[str] = field(default_factory=list)

    def raise_if_failed(self) -> None:
        if self.problems:
            more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
            raise GraceInputError(f"verification failed: {self.problems[0]}{more}")


def expected_hashes(m: dict[str, Any]) -> dict[str, dict[str, str]]:
    """file -> tensor key -> sha256, from the manifest's slots and hashes."""
    out: dict[str, dict[str, str]] = {}
    for row in m["slots"]:
        sha = m["expert_sha256"][row["layer"]][row["expert"]]
        for name, d in row["tensors"].items():
            out.setdefault(row["file"], {})[d["key"]] = sha[name]
    out[mf.DENSE] = dict(m.get("dense_sha256", {}))
    if m.get("blob_sha256"):
        out[mf.EXTRA] = dict(m["blob_sha256"])
    return out


def _plain(path: Path) -> Scan:
    return Scan(sha256=sha256_file(path), size=path.stat().st_size)


def _check_plan(dst: Path, m: dict[str, Any], report: VerifyReport) -> None:
    plan = PlacementPlan.read(dst / mf.PLAN)
    p = m["plan"]
    if (plan.num_gpus, plan.num_layers, plan.num_experts) != (p["num_gpus"], p["num_layers"], p["num_experts"]):
        report.problems.append(f"plan.json has {plan.num_gpus} GPUs, {plan.num_layers} layers, {plan.num_experts} experts; the manifest "
                               f"says {p['num_gpus']}, {p['num_layers']}, {p['num_experts']}")
        return
    if len(m["layers"]) != plan.num_layers:
        report.problems.append(f"manifest lists {len(m['layers'])} MoE layers, the plan {plan.num_layers}")
    listed = {(r["layer"], r["rank"], r["slot"]): r["expert"] for r in m["slots"]}
    want = {(li, g, s): e for li, layer in enumerate(plan.gpu_experts) for g, ids in enumerate(layer) for s, e in enumerate(ids)}
    if listed != want:
        diff = sorted(set(listed.items()) ^ set(want.items()))[0]
        report.problems.append(f"manifest slots disagree with plan.json (first: layer {diff[0][0]}, rank {diff[0][1]}, slot {diff[0][2]})")
    for r in m["slots"]:
        if r["file"] != mf.rank_file(r["rank"]):
            report.problems.append(f"slot {r['layer']}/{r['rank']}/{r['slot']} points at {r['file']}, expected {mf.rank_file(r['rank'])}")
            break


def verify_checkpoint(dst: str | os.PathLike[str], against: str | os.PathLike[str] | None = None,
                      show_progress: bool = True) -> VerifyReport:
    """Check a patched checkpoint; returns the report (call ``raise_if_failed``)."""
    dst = Path(dst)
    m = mf.read_manifest(dst)
    report = VerifyReport()
    files = m["files"]
    present = {str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file()} - {mf.MANIFEST}
    for rel in sorted(present - set(files)):
        report.problems.append(f"{dst / rel}: not listed in the manifest")
    for rel in sorted(set(files) - present):
        report.problems.append(f"{dst / rel}: missing")
    expected = expected_hashes(m)
    names = sorted(set(files) & present)
    tensor_files = [rel for rel in names if rel.endswith(".safetensors")]
    jobs = [(dst / rel, expected.get(rel, {}), "sha256" in files[rel]) for rel in tensor_files]
    scans = dict(zip(tensor_files, scan_many(jobs, tolerant=True), strict=True))
    for rel in progress(names, "verifying", len(names), show_progress):
        path = dst / rel
        scan = scans[rel] if rel in scans else _plain(path)
        report.problems += scan.problems
        if not (scan.sha256 or scan.tree_sha256):
            continue  # unreadable: its problem is listed
        report.files += 1
        report.bytes += scan.size
        rec = files[rel]
        if scan.size != rec["bytes"]:
            report.problems.append(f"{path}: {scan.size} bytes, the manifest says {rec['bytes']} (truncated?)")
        elif not any(k in rec for k in ("sha256", "tree_sha256")):
            report.problems.append(f"{path}: the manifest records no hash for it")
        else:
            differ = [d for d in ("tree_sha256", "sha256") if d in rec and getattr(scan, d) != rec[d]]
            if differ:
                report.problems.append(f"{path}: {' and '.join(differ)} differ{'s' if len(differ) == 1 else ''} from the manifest (corrupt file)")
    if (dst / mf.PLAN).is_file() and not any(mf.PLAN in p for p in report.problems):
        try:
            _check_plan(dst, m, report)
        except GraceInputError as exc:
            report.problems.append(str(exc))
    report.slots = len(m["slots"])
    if against is not None and not report.problems:
        _against_source(dst, m, Path(against), report, show_progress)
    return report


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (NaNs included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return a.numel() == 0 or torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _against_source(dst: Path, m: dict[str, Any], src: Path, report: VerifyReport, show_progress: bool) -> None:
    reader = open_source(src, m["source"]["format"])
    for rel, rec in m["source"]["files"].items():
        path = src / rel
        if not path.is_file():
            report.problems.append(f"{path}: missing in the source")
        elif path.stat().st_size != rec["bytes"] or ("sha256" in rec and sha256_file(path) != rec["sha256"]):
            report.problems.append(f"{path}: differs from the source the checkpoint was patched from")
    if report.problems:
        return
    by_expert: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for row in m["slots"]:
        by_expert.setdefault((row["layer"], row["expert"]), []).append(row)
    files = SlotFiles(dst, m)
    try:
        total = sum(layer["num_experts"] for layer in m["layers"])
        for li, e, tensors in progress(reader.iter_experts(), "comparing with source", total, show_progress):
            for row in by_expert.get((li, e), []):
                for name, d in row["tensors"].items():
                    if not _same(files.read(row["file"], d["key"]), tensors[name]):
                        report.problems.append(f"{dst / row['file']}: {d['key']} (expert {e}, layer {li}) differs from the source")
            report.experts_against_source += 1
        for key, t in reader.iter_dense():
            if not _same(files.read(mf.DENSE, key), t):
                report.problems.append(f"{dst / mf.DENSE}: {key} differs from the source")
    finally:
        files.close()
