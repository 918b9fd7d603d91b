"""llamascope: run LLaMA-family models fast on an ordinary machine, and see every step of generation.

The names below are imported on first use, so `import llamascope` (and the `llamascope` command's
start) does not import PyTorch: see startup.py for what must happen before it loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .exports import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _HOMES, globals())
