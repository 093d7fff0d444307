"""One sequential read of a safetensors file: every tensor's sha256, the file's tree digest and, if asked, its plain sha256.

:func:`scan_many` scans several files on a few threads (``hashlib`` releases the GIL while it
hashes, so files are hashed in parallel on several cores).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from megatron_grace.checkpoint.safetensors_io import in_file_order, read_header, tree_sha256
from megatron_grace.errors import GraceInputError

_BLOCK = 1 << 22


@dataclass
class Scan:
    """What one read of a file found: ``tree_sha256`` (see :func:`tree_sha256`), ``sha256`` of
    the bytes (None unless asked for), ``size``, and ``problems`` (one line each)."""

    tree_sha256: str = ""
    sha256: str | None = None
    size: int = 0
    problems: list[str] = field(default_factory=list)


def scan_safetensors(path: Path, expected: dict[str, str], plain: bool = False) -> Scan:
    """Read ``path`` once; check each tensor against ``expected[key]`` (hex sha256 of its bytes).

    Problems name the key whose bytes differ, keys the file lacks, keys it has but ``expected``
    does not list, and bytes outside every tensor (gaps, trailing bytes: not covered by the tree digest).
    """
    entries, _, start = read_header(path)
    out = Scan(problems=[f"{path}: tensor {k} is missing" for k in expected if k not in entries])
    out.problems += [f"{path}: unexpected tensor {k}" for k in entries if k not in expected]
    file_hash = hashlib.sha256() if plain else None
    digests = []
    with open(path, "rb") as fh:
        head = fh.read(start)
        if file_hash is not None:
            file_hash.update(head)
        out.size += len(head)
        pos = start
        for key, entry in in_file_order(((e.begin, e.end), (k, e)) for k, e in entries.items()):
            if entry.begin < pos:
                out.problems.append(f"{path}: tensor {key} overlaps the one before it")
                return out
            if entry.begin > pos:
                out.problems.append(f"{path}: {entry.begin - pos} bytes before tensor {key} belong to no tensor")
                gap = fh.read(entry.begin - pos)
                out.size += len(gap)
                if file_hash is not None:
                    file_hash.update(gap)
            h = hashlib.sha256()
            left = entry.end - entry.begin
            while left:
                block = fh.read(min(_BLOCK, left))
                if not block:
                    out.problems.append(f"{path}: truncated inside tensor {key}")
                    return out
                h.update(block)
                if file_hash is not None:
                    file_hash.update(block)
                out.size += len(block)
                left -= len(block)
            pos = entry.end
            digests.append(h.digest())
            if key in expected and h.hexdigest() != expected[key]:
                out.problems.append(f"{path}: tensor {key} does not match the manifest (sha256 differs)")
        while block := fh.read(_BLOCK):
            if file_hash is not None:
                file_hash.update(block)
            out.size += len(block)
    if out.size > pos:
        out.problems.append(f"{path}: {out.size - pos} bytes after the last tensor")
    out.tree_sha256 = tree_sha256(head, digests)
    out.sha256 = file_hash.hexdigest() if file_hash is not None else None
    return out


def scan_many(jobs: list[tuple[Path, dict[str, str], bool]], threads: int | None = None, tolerant: bool = False) -> Iterator[Scan]:
    """:func:`scan_safetensors` of each ``(path, expected, plain)``, results in the order given.

    With ``tolerant`` an unreadable file gives a :class:`Scan` with its error as the one problem instead of raising.
    """

    def one(job: tuple[Path, dict[str, str], bool]) -> Scan:
        try:
            return scan_safetensors(*job)
        except GraceInputError as exc:
            if not tolerant:
                raise
            return Scan(problems=[str(exc)])

    workers = threads or min(4, os.cpu_count() or 1, max(1, len(jobs)))
    if workers <= 1:
        yield from map(one, jobs)
        return
    with ThreadPoolExecutor(workers) as pool:
        yield from pool.map(one, jobs)
