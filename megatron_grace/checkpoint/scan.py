"""One sequential read of a safetensors file: its sha256 and every tensor's sha256.

:func:`scan_many` scans several files on a few threads (``hashlib`` releases the GIL while it
hashes, so files are hashed in parallel on several cores).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from megatron_grace.checkpoint.safetensors_io import read_header
from megatron_grace.checkpoint.source import sha256_file
from megatron_grace.errors import GraceInputError

_BLOCK = 1 << 22


def scan_safetensors(path: Path, expected: dict[str, str] | None) -> tuple[str, int, list[str]]:
    """Hash ``path`` and check each tensor against ``expected[key]`` (hex sha256 of its bytes).

    With ``expected=None`` only the file's sha256 and size are computed (the header is still parsed).

    Returns:
        ``(file sha256, file bytes, problems)``; problems name the key whose bytes differ, keys
        the file lacks and keys it has but ``expected`` does not list.
    """
    entries, _, start = read_header(path)
    if expected is None:
        return sha256_file(path), path.stat().st_size, []
    problems = [f"{path}: tensor {k} is missing" for k in expected if k not in entries]
    problems += [f"{path}: unexpected tensor {k}" for k in entries if k not in expected]
    file_hash = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        head = fh.read(start)
        file_hash.update(head)
        size += len(head)
        pos = start
        for key, entry in sorted(entries.items(), key=lambda kv: kv[1].begin):
            if entry.begin != pos:  # gap (not written by us): hash it into the file only
                gap = fh.read(entry.begin - pos)
                file_hash.update(gap)
                size += len(gap)
            h = hashlib.sha256()
            left = entry.end - entry.begin
            while left:
                block = fh.read(min(_BLOCK, left))
                if not block:
                    problems.append(f"{path}: truncated inside tensor {key}")
                    return file_hash.hexdigest(), size, problems
                h.update(block)
                file_hash.update(block)
                size += len(block)
                left -= len(block)
            pos = entry.end
            if key in expected and h.hexdigest() != expected[key]:
                problems.append(f"{path}: tensor {key} does not match the manifest (sha256 differs)")
        while block := fh.read(_BLOCK):
            file_hash.update(block)
            size += len(block)
    return file_hash.hexdigest(), size, problems


def scan_many(jobs: list[tuple[Path, dict[str, str] | None]], threads: int | None = None,
              tolerant: bool = False) -> Iterator[tuple[str, int, list[str]]]:
    """:func:`scan_safetensors` of each ``(path, expected)``, results in the order given.

    With ``tolerant`` an unreadable file gives ``("", 0, [its error])`` instead of raising.
    """

    def one(job: tuple[Path, dict[str, str] | None]) -> tuple[str, int, list[str]]:
        try:
            return scan_safetensors(*job)
        except GraceInputError as exc:
            if not tolerant:
                raise
            return "", 0, [str(exc)]

    workers = threads or min(4, os.cpu_count() or 1, max(1, len(jobs)))
    if workers <= 1:
        yield from map(one, jobs)
        return
    with ThreadPoolExecutor(workers) as pool:
        yield from pool.map(one, jobs)
