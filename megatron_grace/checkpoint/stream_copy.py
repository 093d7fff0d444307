"""Copy tensors into safetensors files, hashing every tensor once, from the bytes as they are written.

:class:`StreamWriter` owns the output files of a patch (each created with its header, from a
:class:`~megatron_grace.checkpoint.safetensors_io.SafetensorsLayout`). :meth:`StreamWriter.put`
takes one tensor's bytes, either a :class:`~megatron_grace.checkpoint.source.FileSpan` of a
source file or an in-memory tensor, and writes them into every ``(file, key)`` target (an expert
and its replicas). A span is taken in blocks of :data:`BLOCK` bytes, each ``pread`` into one of
:data:`BUFFERS` fixed buffers (a ring: a buffer is reused once its block is hashed, so the bytes
in flight, and the memory, stay bounded). From that one block:

- the tensor's sha256 (the manifest's per-tensor hash) on a hash thread (``hashlib`` releases
  the GIL, so hashing runs beside the copy; tensors alternate between the threads),
- the copy into each target at its offset (main thread): ``os.copy_file_range`` from the same
  source bytes, else ``pwrite`` of the buffer (a tensor source, or a file system or kernel that
  cannot copy in the kernel).

Why the kernel copy: in the patch, on this project's 2-core VM, writing every block from the
buffer with ``pwrite`` (``grace checkpoint patch --no-kernel-copy``) costs twice the system time
of the kernel copy and is erratic (``scripts/bench_checkpoint.py`` measures both; BENCHMARKS.md).
Why ``pread`` rather than a memory map of the source window: a map pays a page fault per 4 KiB
page, the page-table set-up and the unmap (``scripts/bench_copy_paths.py``: the slowest of the
three ways), and it faults (SIGBUS) if the source is truncated meanwhile, where ``pread``
returns short. The kernel copy reads the source a second
time, so the bytes written are the bytes hashed only if the source does not change during the
patch: every source file's device, inode, size and modification time are recorded when the
patch reads its index (:func:`file_identity`) and checked when the file is opened for copying
and again in :meth:`finish` (a change is refused), and ``grace checkpoint verify`` hashes the
written files themselves.

Each file's digest is its tree digest
(:func:`~megatron_grace.checkpoint.safetensors_io.tree_sha256`: the header bytes and the
per-tensor digests in file order), so a replica costs a ``pwrite`` but no second hash. With
``file_sha256`` the plain sha256 of each file's bytes is recorded too, from the same blocks
(one more hash of every written byte); that needs each file written front to back, which the
patch's layouts ensure (a file written out of order is hashed by reading it once in
:meth:`finish`).

What :meth:`finish` verifies (the check before the rename): every key of every file was
written exactly once with exactly its byte count (each ``pwrite`` loop reports the bytes it
wrote, or the kernel copy its count), each file's size equals its layout's, and each file's header, read back from the file
and parsed, gives exactly the layout's keys, dtypes, shapes and offsets. The data bytes are not
re-read: a read-back right after writing is served by the page cache from the very pages just
written, so it cannot see more than the ``pwrite`` results already say, while it doubles the
memory traffic. The hashes in the manifest are those of the very bytes handed to ``pwrite``
(for spans, the source bytes as mapped or read); ``grace checkpoint verify`` recomputes them
from the files on disk.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import sys
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_grace.checkpoint.safetensors_io import SafetensorsLayout, in_file_order, read_header, tensor_bytes, tree_sha256
from megatron_grace.checkpoint.source import FileSpan, sha256_file
from megatron_grace.errors import GraceInputError

BLOCK = 8 << 20
"""Bytes per ``pread`` / ``pwrite`` / hash step."""
BUFFERS = 3
"""Ring slots: read buffers whose block may still be hashed."""
MAX_OPEN = 256
"""Output files open at once (see ``StreamWriter``'s ``max_open``)."""


def copy_range(src: int, src_offset: int, dst: int, dst_offset: int, nbytes: int) -> int:
    """Copy up to ``nbytes`` from file ``src`` at ``src_offset`` to ``dst`` at ``dst_offset`` in the kernel.

    Returns the bytes copied, from the start of the range: ``nbytes``, or fewer where
    ``os.copy_file_range`` is unavailable for these files (no such call, another file system, a
    special file), copies nothing (some network and FUSE file systems return 0 instead of an
    error), or fails part way. The caller writes the rest itself.
    """
    done = 0
    while done < nbytes:
        try:
            n = os.copy_file_range(src, dst, nbytes - done, src_offset + done, dst_offset + done)
        except (AttributeError, OSError):
            return done
        if n <= 0:
            return done
        done += n
    return done


def _writeback_starter() -> Callable[[int, int, int], Any] | None:
    """Linux's ``sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)`` (None elsewhere).

    It starts writing a range's dirty pages to the disk without waiting, so the fsync before the
    rename finds most of the data already written (measured: the final fsyncs of the benchmark
    patch took 0.6-0.8 s without it, ~0 with it). Advisory: its result is ignored, the fsync
    decides.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return lambda fd, offset, nbytes: fn(fd, offset, nbytes, 2)  # 2: SYNC_FILE_RANGE_WRITE


_start_writeback = _writeback_starter()


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """``pwrite`` all of ``data`` at ``offset`` (looping over short writes)."""
    done = 0
    while done < len(data):
        n = os.pwrite(fd, data[done:], offset + done)
        if n <= 0:
            raise OSError(f"pwrite wrote {n} bytes")
        done += n


@dataclass
class _Out:
    path: Path
    layout: SafetensorsLayout
    fd: int
    hasher: Any  # hashlib sha256 of the whole file, or None without file_sha256
    thread: int
    pos: int
    in_order: bool = True
    written: set[str] = field(default_factory=set)
    tensors: list[tuple[tuple[int, int], Any]] = field(default_factory=list)  # (byte range, the tensor's sha256 object)


def _stat_identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def file_identity(path: Path) -> tuple[int, int, int, int]:
    """``(device, inode, size, modification time in ns)`` of ``path``: what :class:`StreamWriter` checks unchanged.

    A file written to or replaced changes it (a rewrite within the file system's timestamp
    resolution that keeps the size may not, on some network file systems); ``grace checkpoint
    verify`` hashes the output itself.
    """
    return _stat_identity(os.stat(path))


def _update(hashers: list[Any], view: memoryview) -> None:
    for h in hashers:
        h.update(view)


class StreamWriter:
    """Write tensors into new safetensors files (see the module docstring).

    Args:
        files: ``name -> (path, layout)``; each path must not exist yet.
        hash_threads: threads that hash (tensors alternate between them; a file's plain hasher
            always runs on the same thread, so its updates stay in order).
        block: bytes per step (the size of each of the :data:`BUFFERS` read buffers).
        file_sha256: also compute each file's plain sha256 (see the module docstring).
        kernel_copy: copy source spans with ``os.copy_file_range`` where the kernel can (else
            every block is written from the read buffer).
        source_identity: ``path -> file_identity(path)`` of the source files taken when their
            index was read; each is checked when the file is opened for copying and again in
            :meth:`finish` (files read here and not listed are recorded when first opened).
        max_open: output files kept open at once (a plan with more GPUs than the descriptor
            limit: the least recently written file is closed and reopened when needed).
    """

    def __init__(self, files: dict[str, tuple[Path, SafetensorsLayout]], hash_threads: int = 2, block: int = BLOCK,
                 file_sha256: bool = False, max_open: int = MAX_OPEN, kernel_copy: bool = True,
                 source_identity: dict[Path, tuple[int, int, int, int]] | None = None) -> None:
        self.block = block
        self.kernel_copy = kernel_copy
        self.kernel_copied = 0  # bytes written by the kernel copy (the rest from buffers or tensors)
        # source file -> (device, inode, size, mtime) when its index was read (or when first opened here)
        self._identity: dict[Path, tuple[int, int, int, int]] = {Path(p): v for p, v in (source_identity or {}).items()}
        self.file_sha256 = file_sha256
        self._count = 0
        self.max_open = max(1, max_open)
        self._lru: OrderedDict[str, None] = OrderedDict()  # output files now open, least recently used first
        self.pools = [ThreadPoolExecutor(1, thread_name_prefix=f"grace-hash{i}") for i in range(max(1, hash_threads))]
        self.out: dict[str, _Out] = {}
        self._bufs = [bytearray(block) for _ in range(BUFFERS)]
        self._busy: list[list[Future[None]]] = [[] for _ in range(BUFFERS)]
        self._next = 0
        self._src: tuple[Path, int, int] | None = None
        self._pending: list[Future[None]] = []
        try:
            for i, (name, (path, layout)) in enumerate(files.items()):
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
                hasher = hashlib.sha256(layout.head) if file_sha256 else None  # the plain file sha256, only when asked for
                self.out[name] = _Out(Path(path), layout, fd, hasher, i % len(self.pools), len(layout.head), in_order=file_sha256)
                self._used(name)
                pwrite_all(fd, memoryview(layout.head), 0)
        except BaseException:
            self.close()
            raise

    def _used(self, name: str) -> None:
        """Mark output ``name`` (open) as just used; close the least recently used beyond ``max_open``."""
        self._lru[name] = None
        self._lru.move_to_end(name)
        while len(self._lru) > self.max_open:
            old, _ = self._lru.popitem(last=False)
            os.close(self.out[old].fd)
            self.out[old].fd = -1

    def _fd(self, name: str) -> int:
        o = self.out[name]
        if o.fd < 0:
            o.fd = os.open(o.path, os.O_RDWR)
        self._used(name)
        return o.fd

    # ------------------------------------------------------------------ source reads
    def _source_fd(self, path: Path) -> tuple[int, int]:
        """``(fd, size)`` of the source file ``path`` (kept open until the next file is asked for)."""
        if self._src is None or self._src[0] != path:
            if self._src is not None:
                os.close(self._src[1])
                self._src = None
            fd = os.open(path, os.O_RDONLY)
            st = os.fstat(fd)
            self._src = (path, fd, st.st_size)
            identity = _stat_identity(st)
            if self._identity.setdefault(path, identity) != identity:
                raise GraceInputError("the file changed while it was being patched (was it written to, or replaced?)", path)
        return self._src[1], self._src[2]

    def _wait_buffer(self, i: int, strict: bool = True) -> None:
        """Wait for the hashing of ring slot ``i``'s block (its buffer may then be refilled)."""
        for fut in self._busy[i]:
            if strict:
                fut.result()
            elif not fut.cancelled():
                fut.exception()
        self._busy[i] = []

    def _slot(self) -> int:
        """The next ring slot, once the hashing of the block it held last is done (bounds the bytes in flight)."""
        i = self._next
        self._next = (i + 1) % BUFFERS
        self._wait_buffer(i)
        return i

    def _read_span(self, i: int, fd: int, pos: int, n: int, path: Path) -> memoryview:
        """``n`` bytes of the source at ``pos``, ``pread`` into ring slot ``i``'s buffer."""
        view = memoryview(self._bufs[i])[:n]
        got = 0
        while got < n:
            k = os.preadv(fd, [view[got:]], pos + got)
            if k <= 0:
                raise GraceInputError(f"truncated: a tensor needs bytes up to {pos + n}", path)
            got += k
        return view

    def _blocks(self, data: torch.Tensor | FileSpan) -> Any:
        """Yield ``(ring slot, memoryview, source offset)`` blocks of the tensor's bytes, in order.

        The source offset is where the block lies in the open source file (a span), else None.
        """
        if isinstance(data, FileSpan):
            fd, size = self._source_fd(data.path)
            pos, end = data.offset, data.offset + data.nbytes
            if size < end:  # a file shorter than its index says: refused before anything is written
                raise GraceInputError(f"truncated: a tensor needs bytes {data.offset}..{end}", data.path)
            while pos < end:
                i = self._slot()
                view = self._read_span(i, fd, pos, min(self.block, end - pos), data.path)
                yield i, view, pos
                pos += len(view)
        else:
            raw = tensor_bytes(data)
            for start in range(0, len(raw), self.block):
                yield self._slot(), raw[start: start + self.block], None

    # ------------------------------------------------------------------ writing
    def put(self, data: torch.Tensor | FileSpan, targets: list[tuple[str, str]], digests: dict[str, str], name: str) -> None:
        """Write one tensor into each ``(file, key)`` of ``targets``; ``digests[name]`` gets its sha256 (hex) once hashed.

        The sha256 is of the bytes as written; ``digests`` is filled from a hash thread (complete after :meth:`finish`).

        Raises:
            GraceInputError: a target's byte count differs from the tensor's, a key written twice,
                or a truncated source span.
        """
        nbytes = data.nbytes if isinstance(data, FileSpan) else data.numel() * data.element_size()
        outs = []
        for rel, key in targets:
            o = self.out[rel]
            entry = o.layout.entries.get(key)
            if entry is None or key in o.written:
                raise GraceInputError(f"{o.path.name}: tensor {key} is {'unknown' if entry is None else 'written twice'}")
            if entry.end - entry.begin != nbytes:
                raise GraceInputError(f"{o.path.name}: {key} holds {entry.end - entry.begin} bytes, the source tensor {nbytes}")
            if entry.begin != o.pos:
                o.in_order = False  # plain sha256 (if asked for) by a read in finish()
            o.written.add(key)
            outs.append((rel, o, entry))
        tensor_hash = hashlib.sha256()
        for _, o, entry in outs:
            o.tensors.append(((entry.begin, entry.end), tensor_hash))
        home = self._count % len(self.pools)
        self._count += 1
        done = 0
        for i, view, src_pos in self._blocks(data):
            per_thread: list[list[Any]] = [[] for _ in self.pools]
            per_thread[home].append(tensor_hash)
            for rel, o, entry in outs:
                self._write(self._fd(rel), entry.begin + done, view, src_pos)
                if o.in_order:
                    per_thread[o.thread].append(o.hasher)
            self._busy[i] = [pool.submit(_update, hs, view) for pool, hs in zip(self.pools, per_thread, strict=True) if hs]
            done += len(view)
        for _, o, entry in outs:
            if o.in_order:
                o.pos = entry.end

        def record() -> None:
            digests[name] = tensor_hash.hexdigest()

        self._pending.append(self.pools[home].submit(record))  # after the tensor's updates: one thread runs in order

    def _write(self, fd: int, offset: int, view: memoryview, src_pos: int | None) -> None:
        """One block into output ``fd`` at ``offset`` (a kernel copy from the source, the rest from
        ``view``), then its writeback to the disk started."""
        copied = 0
        if src_pos is not None and self.kernel_copy and self._src is not None:
            copied = copy_range(self._src[1], src_pos, fd, offset, len(view))
            self.kernel_copy = copied == len(view)  # short: not possible for these files, the buffer from now on
            self.kernel_copied += copied
        if copied < len(view):
            pwrite_all(fd, view[copied:], offset + copied)
        if _start_writeback is not None:
            _start_writeback(fd, offset, len(view))

    def finish(self) -> dict[str, dict[str, Any]]:
        """Wait for the hashes, check every file (see the module docstring).

        Returns:
            ``name -> {"bytes", "tree_sha256"}`` (and ``"sha256"`` with ``file_sha256``).

        Raises:
            GraceInputError: a file misses keys, has the wrong size or reads back a different header,
                or a source file changed during the copy.
        """
        for pool in self.pools:
            pool.shutdown(wait=True)
        for fut in self._pending + [f for busy in self._busy for f in busy]:
            fut.result()
        for path, identity in self._identity.items():
            try:
                now = file_identity(path)
            except OSError:
                now = None
            if now != identity:
                raise GraceInputError("the file changed while it was being patched (was it written to, or replaced?)", path)
        records = {}
        for name, o in self.out.items():
            missing = set(o.layout.entries) - o.written
            if missing:
                raise GraceInputError(f"{o.path.name}: tensor {sorted(missing)[0]} was never written ({len(missing)} missing)")
            fd = self._fd(name)
            size = os.fstat(fd).st_size
            if size != o.layout.size:
                raise GraceInputError(f"{o.path.name}: {size} bytes written, its layout has {o.layout.size}")
            entries, _, start = read_header(o.path)
            if os.pread(fd, start, 0) != o.layout.head or entries != o.layout.entries:
                raise GraceInputError(f"{o.path.name}: the header read back differs from the one written")
            tree = tree_sha256(o.layout.head, [h.digest() for h in in_file_order(o.tensors)])
            records[name] = {"bytes": size, "tree_sha256": tree}
            if self.file_sha256:
                records[name]["sha256"] = o.hasher.hexdigest() if o.in_order and o.pos == size else sha256_file(o.path)
        self.close()
        return records

    def close(self) -> None:
        """Close every file (also after an error); hash threads are stopped."""
        for pool in self.pools:
            pool.shutdown(wait=True, cancel_futures=True)
        for i in range(BUFFERS):
            self._wait_buffer(i, strict=False)
        for o in self.out.values():
            if o.fd >= 0:
                os.close(o.fd)
                o.fd = -1
        self._lru.clear()
        if self._src is not None:
            os.close(self._src[1])
            self._src = None
