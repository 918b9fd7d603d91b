"""llamascope: run LLaMA-family models fast on an ordinary machine, and see every step of generation.

The names below are imported on first use, so `import llamascope` (and the `llamascope` command's
start) does not import PyTorch: see startup.py for what must happen before it loads.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import GenerationConfig, ModelConfig
    from .engine import Completion, Engine
    from .errors import LlamascopeError
    from .generation import generate
    from .loading import load_model

_HOMES = {
    "Completion": "engine",
    "Engine": "engine",
    "GenerationConfig": "config",
    "ModelConfig": "config",
    "LlamascopeError": "errors",
    "generate": "generation",
    "load_model": "loading",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    """An exported name, or a submodule (`llamascope.loading` after `import llamascope`), on first use."""
    if name in _HOMES:
        value = getattr(import_module(f".{_HOMES[name]}", __name__), name)
    else:
        try:
            value = import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'llamascope' has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
