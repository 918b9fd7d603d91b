"""Turn a path (Hugging Face folder or .gguf file) into a ready model, tokenizer and settings.

    load_model(path, LoadOptions(...))  ->  LoadedModel(model, config, tokenizer, generation_json, ...)

| module            | job                                                                     |
|-------------------|-------------------------------------------------------------------------|
| `options.py`      | `LoadOptions` (dtype, device, quant, backend, huge_pages, mmap) and their checks |
| `checkpoint.py`   | `Checkpoint` / `TensorSource`: a checkpoint before any weight is read; the tensors LLaMA needs |
| `hf.py`, `gguf.py`| open a Hugging Face folder or a GGUF file as a Checkpoint                |
| `tensorfiles.py`, `gguf_file.py`, `gguf_metadata.py` | read safetensors / .bin / GGUF bytes, safely |
| `gguf_tokenizer.py`, `spm.py` | tokenizer settings from GGUF metadata or a SentencePiece model |
| `build.py`        | the model with plain layers, each weight read once (kept, quantised, or sharded) |
| `load.py`         | `load_model`: open, build, give the model its backend                   |
| `mapping.py`      | map checkpoint files copy-on-write; weights as views of them            |
| `hugepages.py`    | move large weights into 2 MB pages                                      |

The names below are imported on first use, so that the tokenizer can read `spm.py` and
`gguf_tokenizer.py` without importing the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..exports import lazy_exports

if TYPE_CHECKING:
    from .build import build_model
    from .checkpoint import (
        IGNORED_SUFFIXES,
        Checkpoint,
        TensorSource,
        check_tensors,
        default_model_path,
        expected_shapes,
        resolve_dtype,
    )
    from .load import LoadedModel, load_model, open_checkpoint
    from .options import BACKENDS, DTYPES, LoadOptions, resolve_device

_HOMES = {
    "build_model": "build",
    "IGNORED_SUFFIXES": "checkpoint",
    "Checkpoint": "checkpoint",
    "TensorSource": "checkpoint",
    "check_tensors": "checkpoint",
    "default_model_path": "checkpoint",
    "expected_shapes": "checkpoint",
    "resolve_dtype": "checkpoint",
    "LoadedModel": "load",
    "load_model": "load",
    "open_checkpoint": "load",
    "BACKENDS": "options",
    "DTYPES": "options",
    "LoadOptions": "options",
    "resolve_device": "options",
}

__all__ = sorted(_HOMES)


__getattr__, __dir__ = lazy_exports(__name__, _HOMES, globals())
