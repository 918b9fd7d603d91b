"""llamascope: run LLaMA-family models fast on an ordinary machine, and see every step of generation."""

from .config import GenerationConfig, ModelConfig
from .engine import Completion, Engine
from .errors import LlamascopeError
from .generation import generate
from .loading import load_model

__all__ = ["Completion", "Engine", "GenerationConfig", "LlamascopeError", "ModelConfig", "generate", "load_model"]
