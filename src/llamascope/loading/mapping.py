"""Weights that are the checkpoint file's own bytes: each file mapped once, copy-on-write, and
tensors that view it.

A float tensor stored row-major in the dtype the model computes in (a safetensors tensor, a GGUF
F32/F16/BF16 tensor whose rows are not llama.cpp's Q/K order) needs no copy: its tensor can be a
view of the file mapped into memory, backed by the page cache. Loading such a weight then costs
filling in page-table entries (`populate`), not allocating fresh memory, faulting it in and copying
into it (the copy was most of a float load's time).

    maps = FileMaps()
    weight = maps.tensor(path, offset, torch.float32, (rows, cols))  # [rows, cols], no bytes read
    maps.populate()                                                  # all mapped spans made resident

The mapping is private (MAP_PRIVATE): a write to such a tensor copies that page for this process
and never reaches the file. A file changed on disk while mapped changes the weights of the pages
not yet written, and one truncated while mapped ends the process with SIGBUS on the next read
(as with llama.cpp's mapped loading); load with `mmap=False` (`--no-mmap`) where files may be
rewritten in place under a running model.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import mmap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..errors import LlamascopeError

log = logging.getLogger("llamascope")

MADV_POPULATE_READ = 22  # Linux 5.14+: fill the page tables for reading, without copy-on-write faults
PAGE = mmap.PAGESIZE


class FileMaps:
    """The files of one load, each mapped once when a tensor first views it, and the spans viewed."""

    def __init__(self):
        self._files: dict[Path, torch.Tensor | None] = {}  # path -> uint8 [file bytes] viewing its mapping
        self.spans: list[tuple[int, int]] = []  # (address, bytes) of each tensor handed out

    def tensor(self, path: Path, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The `shape` array of `dtype` stored row-major at byte `offset` of `path`, as a view of
        the file's mapping; None where it cannot be one (no elements, an offset that is not a
        multiple of the element size, a file that cannot be mapped)."""
        item, count = dtype.itemsize, math.prod(shape)
        if count == 0 or offset % item:
            return None
        file = self._file(Path(path))
        if file is None:
            return None
        nbytes = count * item
        if offset < 0 or offset + nbytes > file.numel():
            raise LlamascopeError(
                f"{path}: a tensor of {nbytes} bytes at byte {offset} runs past the file's end ({file.numel()} bytes)"
            )
        view = file[offset : offset + nbytes].view(dtype).view(shape)
        self.spans.append((view.data_ptr(), nbytes))
        return view

    def _file(self, path: Path) -> torch.Tensor | None:
        """uint8 [file bytes] viewing the file's mapping, or None where it cannot be mapped (a
        file system without mmap: its weights are then read)."""
        if path not in self._files:
            try:
                with open(path, "rb") as f:
                    mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as e:
                log.info("%s: cannot be mapped (%s): its weights are read into memory instead", path, e)
                self._files[path] = None
            else:  # (the tensor holds the mapping's buffer: it stays mapped while any weight views it)
                self._files[path] = torch.frombuffer(mapping, dtype=torch.uint8)
        return self._files[path]

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.spans)

    def populate(self) -> float:
        """Make every mapped span resident and mapped now, in parts over the threads, so the first
        forward pass does not fault each page in; returns the seconds it took."""
        start = time.perf_counter()
        parts = _parts(self.spans, max(1, torch.get_num_threads()))
        if parts:
            with ThreadPoolExecutor(len(parts)) as pool:
                list(pool.map(_populate, parts))
        return time.perf_counter() - start


def _parts(spans: list[tuple[int, int]], count: int) -> list[list[tuple[int, int]]]:
    """The spans' pages (merged where they touch, page-aligned) cut into `count` runs of about
    equal bytes."""
    merged: list[list[int]] = []
    for address, nbytes in sorted(spans):
        lo, hi = address // PAGE * PAGE, -(-(address + nbytes) // PAGE) * PAGE
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    total = sum(hi - lo for lo, hi in merged)
    share = -(-total // PAGE // count) * PAGE if total else 0
    parts: list[list[tuple[int, int]]] = []
    current: list[tuple[int, int]] = []
    room = share
    for lo, hi in merged:
        while lo < hi:
            take = min(hi - lo, room)
            current.append((lo, take))
            lo, room = lo + take, room - take
            if room == 0:
                parts.append(current)
                current, room = [], share
    if current:
        parts.append(current)
    return parts


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def _populate(part: list[tuple[int, int]]) -> None:
    """MADV_POPULATE_READ on each (page-aligned) span; where the kernel has no such advice
    (before Linux 5.14), read one byte of each page instead. (ctypes lets go of the GIL.)"""
    libc = _libc()
    for address, nbytes in part:
        if libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(nbytes), MADV_POPULATE_READ) != 0:
            pages = (ctypes.c_char * nbytes).from_address(address)
            for page in range(0, nbytes, PAGE):
                pages[page]
