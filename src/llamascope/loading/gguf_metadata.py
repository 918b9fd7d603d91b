"""A GGUF file's header, read and checked (`read_gguf`), and typed reads of its key/value
metadata with errors naming the file and the key (`GGUFMetadata`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LlamascopeError
from .gguf_file import GGUFFile, GGUFFormatError

_MISSING = object()


def read_gguf(path: Path) -> GGUFFile:
    """The header of the GGUF file at `path`; a LlamascopeError naming the file when it is not a
    whole GGUF."""
    path = Path(path)
    if not path.is_file():
        raise LlamascopeError(f"{path}: file not found")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:  # no permission to read it, ...
        raise LlamascopeError(f"{path}: cannot read it ({e.strerror or e})") from None
    if magic != b"GGUF":
        raise LlamascopeError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF'; {size} bytes)")
    try:
        header = GGUFFile(path)
    except GGUFFormatError as e:
        problem = (
            f"file is truncated or damaged ({e}; it has {size} bytes)"
            if e.truncated
            else f"not a readable GGUF file: {e}"
        )
        raise LlamascopeError(f"{path}: {problem}") from None
    except (OSError, ValueError, OverflowError, MemoryError) as e:  # (mapping it, a value out of range)
        raise LlamascopeError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    for tensor in header.tensors:
        end = tensor.data_offset + tensor.n_bytes
        if end > size:
            raise LlamascopeError(
                f"{path}: file is truncated: tensor {tensor.name!r} ends at byte {end}, the file has {size} bytes"
            )
    return header


def _shortest_float(value: float) -> float:
    """A float32 from the file as the decimal it was written from (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


class GGUFMetadata:
    """Typed reads of a GGUF file's key/value metadata, with errors naming the file and the key."""

    def __init__(self, reader, path: Path):
        self.reader, self.path = reader, Path(path)

    def has(self, key: str) -> bool:
        return key in self.reader.fields

    def value(self, key: str, default: Any = _MISSING) -> Any:
        """The key's value as Python data (float32 numbers as the decimals they were written from)."""
        field = self.reader.fields.get(key)
        if field is None:
            if default is _MISSING:
                raise LlamascopeError(f"{self.path}: missing metadata key {key!r}")
            return default
        try:
            value = field.contents()
        except Exception as e:
            raise LlamascopeError(f"{self.path}: metadata key {key!r} is unreadable ({e})") from None
        if field.types and field.types[0].name == "FLOAT32":
            value = _shortest_float(value)
        return value

    def _typed(self, key: str, default: Any, valid, kind: str) -> Any:
        if not self.has(key) and default is not _MISSING:
            return default
        value = self.value(key)
        if not valid(value):
            raise LlamascopeError(f"{self.path}: metadata key {key!r} must be {kind}, found {value!r}")
        return value

    def integer(self, key: str, default: Any = _MISSING, positive: bool = True) -> Any:
        def valid(v):
            return isinstance(v, int) and not isinstance(v, bool) and (v > 0 or not positive)

        return self._typed(key, default, valid, "a positive integer" if positive else "an integer")

    def number(self, key: str, default: Any = _MISSING) -> Any:
        def valid(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        return self._typed(key, default, valid, "a number")

    def string(self, key: str, default: Any = _MISSING) -> Any:
        return self._typed(key, default, lambda v: isinstance(v, str), "a string")

    def flag(self, key: str, default: bool | None = None) -> bool | None:
        return self._typed(key, default, lambda v: isinstance(v, bool), "true or false")

    def array(self, key: str, default: Any = _MISSING) -> Any:
        return self._typed(key, default, lambda v: isinstance(v, list), "an array")

    def array_length(self, key: str) -> int | None:
        """Elements in an array key without decoding them (None when the key is absent)."""
        field = self.reader.fields.get(key)
        return None if field is None else len(field)


def token_id(meta: GGUFMetadata, key: str, default: int | None = None) -> int | None:
    """A token id key; None when absent or set to llama.cpp's "no token" (-1 / 0xFFFFFFFF)."""
    value = meta.integer(key, default, positive=False)
    return None if value in (-1, 0xFFFFFFFF) else value
