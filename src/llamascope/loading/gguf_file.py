"""The GGUF container: its header (metadata keys and values, tensor descriptions) read in one pass.

gguf-py's GGUFReader makes a numpy view for every element of every metadata array, two for each
string: on the default model's 49152-token vocabulary and 48900 merges that is about 250,000
arrays, 0.7 s and 60-80 MB of Python objects, for values the tokenizer then turns into plain
strings anyway. This reader decodes each value straight into Python data (numbers arrays as one
numpy array), walking the header with `struct` over a memory map, which only touches the header's
pages. The format's constants and the tensor types' block sizes still come from the `gguf`
package; so do the dequantisers (gguf.quants) that loading/gguf.py calls.

Layout (GGUF v2/v3, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): magic "GGUF",
uint32 version, uint64 tensor count, uint64 metadata count; each metadata item is a string key,
a uint32 value type and the value; each tensor is a string name, uint32 dimension count, uint64
dimensions (innermost first), uint32 type and uint64 offset into the data section, which starts
at the next multiple of `general.alignment` (32 unless set) after the header. Strings are a uint64
length and UTF-8 bytes. A file written on a big-endian machine has its version's low bytes zero
when read little-endian; every number is then read big-endian.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

SUPPORTED_VERSIONS = (2, 3)

# value type -> (struct code, numpy dtype) of the fixed-size scalars
_SCALARS = {
    GGUFValueType.UINT8: ("B", np.uint8),
    GGUFValueType.INT8: ("b", np.int8),
    GGUFValueType.UINT16: ("H", np.uint16),
    GGUFValueType.INT16: ("h", np.int16),
    GGUFValueType.UINT32: ("I", np.uint32),
    GGUFValueType.INT32: ("i", np.int32),
    GGUFValueType.FLOAT32: ("f", np.float32),
    GGUFValueType.UINT64: ("Q", np.uint64),
    GGUFValueType.INT64: ("q", np.int64),
    GGUFValueType.FLOAT64: ("d", np.float64),
    GGUFValueType.BOOL: ("?", np.bool_),
}
# tensor types whose data is typed values rather than bytes of blocks (as gguf's reader gives them)
_TYPED_DATA = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


class GGUFFormatError(ValueError):
    """The header is not GGUF as this reader knows it; `truncated` when it runs past the file's end."""

    def __init__(self, message: str, truncated: bool = False):
        super().__init__(message)
        self.truncated = truncated


@dataclass
class GGUFField:
    """One metadata item: `types` is [value type] or [ARRAY, element type] (as gguf-py's fields)."""

    name: str
    types: list[GGUFValueType]
    value: Any  # a Python scalar or str; an array: list of str, or a 1-D numpy array of numbers
    problem: str | None = None  # why the value cannot be used (a string that is not UTF-8)

    def __len__(self) -> int:
        return len(self.value) if self.types[0] == GGUFValueType.ARRAY else 1

    def contents(self) -> Any:
        """The value as plain Python data (arrays as lists); ValueError for an unusable value."""
        if self.problem is not None:
            raise ValueError(self.problem)
        return self.value.tolist() if isinstance(self.value, np.ndarray) else self.value


@dataclass
class GGUFTensor:
    """One tensor's description; `data` maps its bytes on first use ([rows, row bytes] of uint8
    for block formats, typed values otherwise, numpy's order: outermost dimension first). It
    holds the file's path, not the parsed header, so the metadata can be let go."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order, innermost first
    n_elements: int
    n_bytes: int
    data_offset: int
    path: Path = field(repr=False)
    byte_order: str = field(default="<", repr=False)

    @cached_property
    def data(self) -> np.ndarray:
        dims = tuple(reversed(self.shape))
        typed = _TYPED_DATA.get(self.tensor_type)
        if typed is None:
            block, size = GGML_QUANT_SIZES[self.tensor_type]
            dims, typed = (*dims[:-1], dims[-1] // block * size), np.uint8
        dtype = np.dtype(typed).newbyteorder(self.byte_order)
        if self.n_bytes == 0:
            return np.zeros(dims, dtype)
        mapped = np.memmap(self.path, mode="r", offset=self.data_offset, shape=(self.n_bytes,))
        return mapped.view(np.ndarray).view(dtype).reshape(dims)


class GGUFFile:
    """A GGUF file's header: `fields` (key -> GGUFField, in file order), `tensors` (in file order),
    `data_offset` (where the data section starts). Weights are read by the caller, by offset."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self.size = f.seek(0, 2)
            if self.size < 24:
                raise GGUFFormatError(f"header needs 24 bytes, the file has {self.size}", truncated=True)
            header = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse(header)
        except (struct.error, IndexError) as e:
            raise GGUFFormatError(f"the header runs past the end of the file ({e})", truncated=True) from None
        finally:
            header.close()

    def _parse(self, buf: mmap.mmap) -> None:
        """The header in its file order: magic and version, the metadata, the tensor infos."""
        n_tensors, n_fields = self._read_version(buf)
        offset = self._read_fields(buf, 24, n_fields)
        alignment = self._alignment()
        described, offset = self._read_tensor_infos(buf, offset, n_tensors)
        self.data_offset = -(-offset // alignment) * alignment
        self.tensors: list[GGUFTensor] = []
        names = set()
        for name, dims, raw_type, relative in described:
            if name in names:
                raise GGUFFormatError(f"tensor {name!r} appears twice")
            names.add(name)
            self.tensors.append(self._tensor(name, dims, raw_type, relative))
        self._check_no_overlap()

    def _check_no_overlap(self) -> None:
        """No two tensors share bytes (else one would read another's as its weights)."""
        end, before = self.data_offset, None
        for tensor in sorted(self.tensors, key=lambda t: t.data_offset):
            if tensor.n_bytes and tensor.data_offset < end:
                raise GGUFFormatError(
                    f"tensor {tensor.name!r} starts at byte {tensor.data_offset}, inside tensor {before!r} "
                    f"(which ends at byte {end}): tensors may not overlap"
                )
            if tensor.n_bytes:
                end, before = tensor.data_offset + tensor.n_bytes, tensor.name

    def _read_version(self, buf: mmap.mmap) -> tuple[int, int]:
        """Magic, byte order and version; returns the announced tensor and metadata counts."""
        if buf[:4] != b"GGUF":
            raise GGUFFormatError(f"starts with {buf[:4]!r}, expected b'GGUF'")
        self.byte_order, self._bad_text = "<", None
        version = struct.unpack_from("<I", buf, 4)[0]
        if version & 0xFFFF == 0:  # written on a big-endian machine
            self.byte_order = ">"
            version = struct.unpack_from(">I", buf, 4)[0]
        if version not in SUPPORTED_VERSIONS:
            raise GGUFFormatError(f"unsupported GGUF version {version} (supported: 2, 3)")
        self.version = version
        n_tensors, n_fields = struct.unpack_from(self.byte_order + "QQ", buf, 8)
        if n_tensors > self.size or n_fields > self.size:
            raise GGUFFormatError(
                f"announces {n_tensors} tensors and {n_fields} metadata items in {self.size} bytes", truncated=True
            )
        return n_tensors, n_fields

    def _read_fields(self, buf: mmap.mmap, offset: int, n_fields: int) -> int:
        """The key/value metadata into `fields`; returns the offset after it."""
        e = self.byte_order
        self.fields: dict[str, GGUFField] = {}
        for _ in range(n_fields):
            key, offset = self._string(buf, offset, what="a metadata key")
            self._bad_text = None
            (raw_type,), offset = struct.unpack_from(e + "I", buf, offset), offset + 4
            value_type = self._value_type(raw_type, key)
            if value_type == GGUFValueType.ARRAY:
                (raw_item,), offset = struct.unpack_from(e + "I", buf, offset), offset + 4
                item_type = self._value_type(raw_item, key)
                value, offset = self._array(buf, offset, item_type, key)
                types = [value_type, item_type]
            else:
                value, offset = self._scalar(buf, offset, value_type, key)
                types = [value_type]
            if key in self.fields:
                raise GGUFFormatError(f"metadata key {key!r} appears twice")
            # A value that is not UTF-8 fails when it is read (as with gguf-py), naming its key:
            # an unused one (a description) does not make the file unreadable.
            self.fields[key] = GGUFField(key, types, value, self._bad_text)
        return offset

    def _alignment(self) -> int:
        """The data section's alignment: general.alignment (a power of two) or GGUF's default."""
        if "general.alignment" not in self.fields:
            return GGUF_DEFAULT_ALIGNMENT
        align = self.fields["general.alignment"]
        if align.types != [GGUFValueType.UINT32] or align.value <= 0 or align.value & (align.value - 1):
            raise GGUFFormatError(
                f"metadata key 'general.alignment' must be a power of two as uint32, found {align.value!r}"
            )
        return align.value

    def _read_tensor_infos(self, buf: mmap.mmap, offset: int, n_tensors: int) -> tuple[list[tuple], int]:
        """Each tensor's (name, dims, raw type, offset in the data section); and the offset after them."""
        e, described = self.byte_order, []
        for _ in range(n_tensors):
            name, offset = self._string(buf, offset, what="a tensor name")
            (n_dims,), offset = struct.unpack_from(e + "I", buf, offset), offset + 4
            if n_dims > 8:
                raise GGUFFormatError(f"tensor {name!r} has {n_dims} dimensions")
            dims = struct.unpack_from(f"{e}{n_dims}Q", buf, offset)
            offset += 8 * n_dims
            raw_type, relative = struct.unpack_from(e + "IQ", buf, offset)
            offset += 12
            described.append((name, dims, raw_type, relative))
        return described, offset

    def _tensor(self, name: str, dims: tuple[int, ...], raw_type: int, relative: int) -> GGUFTensor:
        """One tensor's description, checked: a known type and rows of whole blocks."""
        try:
            tensor_type = GGMLQuantizationType(raw_type)
        except ValueError:
            raise GGUFFormatError(
                f"tensor {name!r} has type {raw_type}, which the gguf package does not know"
            ) from None
        block, size = GGML_QUANT_SIZES[tensor_type]
        elements = math.prod(dims)  # (Python integers: damaged dimensions cannot wrap around)
        if not dims and block > 1:
            raise GGUFFormatError(f"tensor {name!r} has no dimensions but the block type {tensor_type.name}")
        if dims and dims[0] % block:
            raise GGUFFormatError(
                f"tensor {name!r}: rows of {dims[0]} values are not whole {tensor_type.name} blocks of {block}"
            )
        return GGUFTensor(
            name,
            tensor_type,
            tuple(int(d) for d in dims),
            elements,
            elements // block * size,
            self.data_offset + relative,
            self.path,
            self.byte_order,
        )

    def _value_type(self, raw: int, key: str) -> GGUFValueType:
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise GGUFFormatError(f"metadata key {key!r} has value type {raw}, which GGUF does not define") from None

    def _string(self, buf: mmap.mmap, offset: int, what: str | None = None) -> tuple[str, int]:
        """The string at `offset` and the offset after it. One that is not UTF-8: an error when it
        is `what` (a key or a name), else recorded in _bad_text for the field being read."""
        (length,) = struct.unpack_from(self.byte_order + "Q", buf, offset)
        end = offset + 8 + length
        if end > self.size:
            raise IndexError(f"a string of {length} bytes at byte {offset}")
        raw = buf[offset + 8 : end]
        try:
            return raw.decode("utf-8"), end
        except UnicodeDecodeError as e:
            if what is not None:
                raise GGUFFormatError(f"{what} at byte {offset} is not UTF-8 ({e.reason})") from None
            if self._bad_text is None:
                self._bad_text = f"holds a string that is not UTF-8 at byte {offset} ({e.reason})"
            return raw.decode("utf-8", errors="replace"), end

    def _scalar(self, buf: mmap.mmap, offset: int, value_type: GGUFValueType, key: str) -> tuple[Any, int]:
        if value_type == GGUFValueType.STRING:
            return self._string(buf, offset)
        code = _SCALARS[value_type][0]
        (value,) = struct.unpack_from(self.byte_order + code, buf, offset)
        return value, offset + struct.calcsize(code)

    def _array(self, buf: mmap.mmap, offset: int, item_type: GGUFValueType, key: str) -> tuple[Any, int]:
        (count,), offset = struct.unpack_from(self.byte_order + "Q", buf, offset), offset + 8
        if count > (self.size - offset) // (8 if item_type == GGUFValueType.STRING else 1):
            raise IndexError(f"an array of {count} items at byte {offset}")
        if item_type == GGUFValueType.STRING:
            items, string = [], self._string
            for _ in range(count):
                text, offset = string(buf, offset)
                items.append(text)
            return items, offset
        if item_type == GGUFValueType.ARRAY:
            raise GGUFFormatError(f"metadata key {key!r} is an array of arrays, which llamascope does not read")
        dtype = np.dtype(_SCALARS[item_type][1]).newbyteorder(self.byte_order)
        end = offset + count * dtype.itemsize
        if end > self.size:
            raise IndexError(f"an array of {count} items at byte {offset}")
        values = np.frombuffer(buf[offset:end], dtype=dtype).astype(dtype.newbyteorder("="))
        return values, end
