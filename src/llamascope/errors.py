"""The one exception type users see: a clear message naming the file, key or setting."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class LlamascopeError(Exception):
    """A problem with the user's input (file, key, setting). The CLI prints it as one line."""


def library_call(call: Callable[[], Any], where: str) -> Any:
    """call() -> its result, or a LlamascopeError "where (what went wrong)" for any error a
    library raises on what a file says: its own exceptions, and pyo3's PanicException (a
    BaseException, not an Exception) when Rust code such as the tokenizers library's panics."""
    try:
        return call()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001
        raise LlamascopeError(f"{where} ({type(e).__name__}: {e})") from None
