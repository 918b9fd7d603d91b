"""GGUF -> Hugging Face folder: config.json, generation_config.json, tokenizer.json,
tokenizer_config.json and safetensors weights that `transformers` loads as the same model.

Weights are dequantised (the folder holds plain float tensors at `dtype`), Q/K rows are in
Hugging Face's order, and a tied output head is left to `tie_word_embeddings`. Large models are
written in shards with a model.safetensors.index.json, one shard in memory at a time.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import LlamascopeError
from .loading import DTYPES, Checkpoint, check_tensors
from .loading.checkpoint import FUSED_PROJECTIONS, stored_shapes
from .loading.gguf import open_gguf
from .tokenizer import Tokenizer

log = logging.getLogger("llamascope")

DEFAULT_SHARD_BYTES = 5_000_000_000


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def hf_config(checkpoint: Checkpoint, dtype: str) -> dict:
    """config.json: the model's config in transformers' 4.x layout (which 5.x reads too)."""
    config = checkpoint.config.to_hf_dict()
    config["torch_dtype"] = dtype
    return config


def tokenizer_config(tokenizer, model_max_length: int | None = None) -> dict:
    """tokenizer_config.json for a tokenizer.json that already holds the whole pipeline."""
    out: dict = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    for role in ("bos", "eos", "unk", "pad"):
        token = getattr(tokenizer, f"{role}_token")
        if token is not None:
            out[f"{role}_token"] = token
    out["add_bos_token"] = bool(tokenizer.adds_bos)
    out["add_eos_token"] = bool(tokenizer.adds_eos)
    if model_max_length is not None:
        out["model_max_length"] = model_max_length
    if tokenizer.chat_template:
        out["chat_template"] = tokenizer.chat_template
    return out


def write_tokenizer(tokenizer, out_dir: Path, model_max_length: int | None = None) -> None:
    """tokenizer.json (the backend, post-processor included) and tokenizer_config.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.backend.save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config(tokenizer, model_max_length))


def convert_gguf_tokenizer(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Only the tokenizer of a GGUF (model or vocabulary-only) as tokenizer.json + tokenizer_config.json."""
    out_dir = Path(out_dir)
    write_tokenizer(Tokenizer.from_gguf(Path(gguf_path)), out_dir)
    return out_dir


def _shard_plan(checkpoint: Checkpoint, dtype: torch.dtype, max_shard_bytes: int) -> list[list[str]]:
    """HF tensor names grouped into shards of at most `max_shard_bytes` (a larger tensor gets its own)."""
    element = torch.empty((), dtype=dtype).element_size()
    shapes = stored_shapes(checkpoint.config)
    names = [n for n in shapes if not (n == "lm_head.weight" and checkpoint.config.tie_word_embeddings)]
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = element * int(torch.Size(shapes[name]).numel())
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _read_stored(checkpoint: Checkpoint, name: str) -> torch.Tensor:
    """A weight as the architecture's checkpoints store it (`stored_shapes`): the model's own
    tensor, or a fused projection (Phi-3's qkv_proj, gate_up_proj) made of its parts' rows."""
    for fused, parts in FUSED_PROJECTIONS:
        if name.endswith("." + fused) and name not in checkpoint.tensors:
            prefix = name[: -len(fused)]
            return torch.cat([checkpoint.tensors[prefix + part].read() for part in parts])
    return checkpoint.tensors[name].read()


def write_weights(
    checkpoint: Checkpoint,
    out_dir: Path,
    dtype: torch.dtype,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """model.safetensors, or model-0000k-of-0000n.safetensors shards with their index.
    `progress(done, total)` is called after each tensor is converted."""
    shards = _shard_plan(checkpoint, dtype, max_shard_bytes)
    count, done = sum(len(names) for names in shards), 0
    if len(shards) == 1:
        files = [out_dir / "model.safetensors"]
    else:
        files = [out_dir / f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map, total = {}, 0
    for names, path in zip(shards, files):
        state = {}
        for name in names:
            state[name] = _read_stored(checkpoint, name).to(dtype).contiguous()
            total += state[name].numel() * state[name].element_size()
            weight_map[name] = path.name
            done += 1
            if progress is not None:
                progress(done, count)
        save_file(state, str(path), metadata={"format": "pt"})
        log.info("wrote %s (%d tensors)", path, len(names))
        del state
    if len(files) > 1:
        _write_json(
            out_dir / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
        )
    return files


def check_gguf_input(path: Path) -> None:
    """Refuse what is not a .gguf file, naming the path (a folder is what convert writes)."""
    if path.is_dir():
        raise LlamascopeError(
            f"{path}: is a folder; convert takes a .gguf file (a Hugging Face folder needs no converting)"
        )
    if not path.exists():
        raise LlamascopeError(f"{path}: no such file")
    if path.suffix.lower() != ".gguf":
        raise LlamascopeError(f"{path}: not a .gguf file; convert takes a GGUF model file")


def convert_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    dtype: str = "float32",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the Hugging Face folder for a GGUF (any architecture open_gguf reads); returns `out_dir`.

    dtype: "float32", "bfloat16" or "float16", the type of the written weights.
    progress(done, total): called after each tensor is converted.
    """
    if dtype not in DTYPES:
        raise LlamascopeError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    check_gguf_input(Path(gguf_path))
    checkpoint = open_gguf(Path(gguf_path))
    check_tensors(checkpoint)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LlamascopeError(f"{out_dir}: exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "config.json", hf_config(checkpoint, dtype))
    if checkpoint.generation_json:
        _write_json(out_dir / "generation_config.json", dict(checkpoint.generation_json))
    if checkpoint.tokenizer_factory is not None:
        write_tokenizer(checkpoint.tokenizer_factory(), out_dir, checkpoint.config.max_position_embeddings)
    write_weights(checkpoint, out_dir, DTYPES[dtype], max_shard_bytes, progress)
    return out_dir
