"""Read tensors from safetensors and PyTorch .bin files one at a time, with clear errors.

safetensors files (and GGUF's float tensors and blocks, through `read_array`) are read with
plain file reads into freshly allocated tensors, where a weight must be a copy of its own
(converted, re-ordered, or `mmap=False`): reading such a weight through a memory map would keep
every touched page of the file resident beside the copy (two copies at peak). Weights used as the
file holds them are views of it instead (mapping.py). The header is validated first, so a
truncated or foreign file fails with its name.
.bin files go through `torch.load(weights_only=True, mmap=True)`: no code in a pickle ever runs.
"""

from __future__ import annotations

import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..errors import LlamascopeError

# Largest buffer a sliced read uses for ranges shorter than a page.
SLICE_BUFFER_BYTES = 4 << 20

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsFile:
    """The header of one .safetensors file; `read(name)` loads one tensor."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._read_header()
        except OSError as e:  # no permission to read it, a folder of that name, ...
            raise LlamascopeError(f"{self.path}: cannot read it ({e.strerror or e})") from None

    def _read_header(self) -> None:
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise LlamascopeError(f"{self.path}: not a safetensors file (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(size - 8, 100_000_000):
                raise LlamascopeError(
                    f"{self.path}: not a safetensors file or truncated (header claims {header_len} bytes, "
                    f"file has {size})"
                )
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise LlamascopeError(f"{self.path}: not a safetensors file (header is not JSON)") from None
            except RecursionError:
                raise LlamascopeError(f"{self.path}: not a safetensors file (header JSON nested too deeply)") from None
        if not isinstance(header, dict):
            raise LlamascopeError(f"{self.path}: not a safetensors file (header is not an object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + header_len
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise LlamascopeError(f"{self.path}: tensor {name!r} has a malformed header entry") from None
            if begin < 0 or end < begin or any(s < 0 for s in shape):
                raise LlamascopeError(
                    f"{self.path}: tensor {name!r} has data_offsets {[begin, end]} and shape {list(shape)}: "
                    f"offsets must satisfy 0 <= begin <= end, and sizes must not be negative"
                )
            expected = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
            if end - begin != expected:
                raise LlamascopeError(
                    f"{self.path}: tensor {name!r} has {end - begin} bytes for shape {list(shape)} "
                    f"({info['dtype']}), expected {expected}"
                )
            if self.data_start + end > size:
                raise LlamascopeError(
                    f"{self.path}: file is truncated: tensor {name!r} ends at byte {self.data_start + end}, "
                    f"file has {size} bytes"
                )
            self.entries[name] = (dtype, shape, begin, end)
        self._check_layout()

    def _check_layout(self) -> None:
        """The safetensors format's rule: the tensors' bytes tile the data region in order, from its
        start, with neither overlap nor gap (else one tensor could read another's bytes)."""
        position = 0
        for name, (_, _, begin, end) in sorted(self.entries.items(), key=lambda item: item[1][2:]):
            if begin != position:
                what = "overlaps the tensor before it" if begin < position else "leaves a gap before it"
                raise LlamascopeError(
                    f"{self.path}: tensor {name!r} starts at data byte {begin}, where the tensor before it "
                    f"ends at {position}: it {what} (the format forbids both)"
                )
            position = end

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def offset(self, name: str) -> int:
        """The file byte where tensor `name`'s data starts."""
        return self.data_start + self.entries[name][2]

    def nbytes(self, name: str) -> int:
        _, _, begin, end = self.entries[name]
        return end - begin

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, begin, _ = self.entries[name]
        return read_array(self.path, self.data_start + begin, dtype, shape, name)

    def read_into(self, name: str, out: torch.Tensor) -> bool:
        """Tensor `name` read straight into `out` (contiguous, of its shape) where `out` has its
        dtype; False (nothing read) where it has another."""
        dtype, shape, begin, _ = self.entries[name]
        if out.dtype != dtype:
            return False
        read_array(self.path, self.data_start + begin, dtype, shape, name, out)
        return True

    def read_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Indices [start, stop) of tensor `name` along `dim`, reading only those bytes."""
        dtype, shape, begin, _ = self.entries[name]
        return read_array_slice(self.path, self.data_start + begin, dtype, shape, dim, start, stop, name)


def read_array(
    path: Path, offset: int, dtype: torch.dtype, shape: tuple[int, ...], name: str, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The row-major array of `shape` and `dtype` stored at byte `offset` of `path`, read into a
    fresh tensor, or into `out` (contiguous, that shape and dtype: a part of a larger buffer, say)
    (plain reads: no page of the file stays mapped)."""
    if out is None:
        out = torch.empty(shape, dtype=dtype)
    elif tuple(out.shape) != tuple(shape) or out.dtype != dtype or not out.is_contiguous():
        raise LlamascopeError(
            f"{path}: tensor {name!r} ({list(shape)}, {dtype}) cannot be read into "
            f"a {list(out.shape)} {out.dtype} buffer"
        )
    if out.numel():
        with open(path, "rb", buffering=0) as f:
            _pread(f.fileno(), out.view(-1).view(torch.uint8).numpy(), offset, path, name)
    return out


def read_array_slice(
    path: Path, offset: int, dtype: torch.dtype, shape: tuple[int, ...], dim: int, start: int, stop: int, name: str
) -> torch.Tensor:
    """Indices [start, stop) along `dim` of the array `read_array` would give, reading only
    those bytes.

    Along dim 0 the slice is one contiguous byte range. Along a later dim it is one range per
    index of the dims before it (a column block of each row of a matrix): each is read
    straight into place when it is at least a page long, else blocks of whole rows go
    through a buffer of at most `SLICE_BUFFER_BYTES`.
    """
    if not 0 <= dim < len(shape) or not 0 <= start <= stop <= shape[dim]:
        raise LlamascopeError(
            f"{path}: tensor {name!r} of shape {list(shape)} has no slice [{start}:{stop}] along dim {dim}"
        )
    item = torch.empty((), dtype=dtype).element_size()
    outer = int(np.prod(shape[:dim], dtype=np.int64))  # independent ranges
    inner = int(np.prod(shape[dim + 1 :], dtype=np.int64)) * item  # bytes per index along dim
    row = shape[dim] * inner  # bytes per outer index
    piece = (stop - start) * inner  # bytes wanted per outer index
    out = torch.empty(shape[:dim] + (stop - start,) + shape[dim + 1 :], dtype=dtype)
    if out.numel() == 0:
        return out
    dst = out.view(-1).view(torch.uint8).numpy().reshape(outer, piece)  # [outer, piece] bytes of out
    first = offset + start * inner  # file offset of the first wanted byte
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        if outer == 1 or piece == row:
            _pread(fd, dst.reshape(-1), first, path, name)
        elif piece >= 4096:
            for o in range(outer):
                _pread(fd, dst[o], first + o * row, path, name)
        else:
            block = max(1, SLICE_BUFFER_BYTES // row)
            buffer = np.empty((min(block, outer), row), dtype=np.uint8)
            for o in range(0, outer, block):
                n = min(block, outer - o)
                _pread(fd, buffer[:n].reshape(-1), offset + o * row, path, name)
                dst[o : o + n] = buffer[:n, start * inner : stop * inner]
    return out


class Scratch:
    """Reused uint8 buffers for what loading reads and at once copies elsewhere (a weight's raw
    blocks, packed straight into the layer's layout): a fresh buffer per tensor costs a page fault
    for every page of it (loading unmaps large freed buffers, memory.freed_memory_returned), which
    took longer than reading the file."""

    def __init__(self):
        self.buffers: dict[int, torch.Tensor] = {}

    def take(self, slot: int, shape: tuple[int, ...]) -> torch.Tensor:
        """Buffer `slot` as a uint8 tensor of `shape` (its contents are what the last user left)."""
        n = int(np.prod(shape, dtype=np.int64))
        buffer = self.buffers.get(slot)
        if buffer is None or buffer.numel() < n:
            buffer = self.buffers[slot] = torch.empty(n, dtype=torch.uint8)
        return buffer[:n].view(shape)


# Reads of at least this many bytes are split over the process's threads (os.preadv lets go of the
# GIL): copying from the page cache and faulting in the destination's pages both scale with cores.
PARALLEL_READ_BYTES = 32 * 2**20


def _pread(fd: int, into: np.ndarray, offset: int, path: Path, name: str) -> None:
    """Fill `into` with the file's bytes from `offset` (large reads in parallel parts)."""
    data = into.reshape(-1).view(np.uint8)
    parts = min(torch.get_num_threads(), data.nbytes // PARALLEL_READ_BYTES)
    if parts < 2:
        _pread_part(fd, data, offset, path, name)
        return
    bounds = [data.nbytes * i // parts // 4096 * 4096 for i in range(parts)] + [data.nbytes]
    with ThreadPoolExecutor(parts) as pool:
        done = [
            pool.submit(_pread_part, fd, data[lo:hi], offset + lo, path, name) for lo, hi in zip(bounds, bounds[1:])
        ]
        for future in done:
            future.result()


def _pread_part(fd: int, into: np.ndarray, offset: int, path: Path, name: str) -> None:
    view = memoryview(into).cast("B")
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            raise LlamascopeError(f"{path}: file is truncated while reading tensor {name!r}")
        view, offset = view[n:], offset + n


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A pytorch_model.bin state dict, refusing any pickle that would run code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or EOFError depending on the damage
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "Unpickl" in type(e).__name__:
            raise LlamascopeError(
                f"{path}: refused to load: the pickle holds objects other than tensors "
                f"(loading it could run code). {text}"
            ) from None
        raise LlamascopeError(f"{path}: not a readable PyTorch checkpoint ({text})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LlamascopeError(f"{path}: expected a state dict of tensors")
    return state
