"""Hugging Face model folders: config.json, generation_config.json, tokenizer files and weights
(model.safetensors, sharded safetensors with an index, pytorch_model*.bin)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from ..config import ModelConfig, read_json
from ..errors import LlamascopeError
from ..tokenizer import Tokenizer
from .checkpoint import Checkpoint, TensorSource, split_fused
from .tensorfiles import SafetensorsFile, load_bin

TORCH_TYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _shard_path(folder: Path, index_path: Path, shard: str) -> Path:
    """A shard the index names: a file in the model folder, by a name that cannot lead out of it (no
    absolute path, no ".."). A symbolic link there is followed, as for model.safetensors itself:
    Hugging Face's cache links each snapshot's files to blobs beside it."""
    path, parts = folder / shard, Path(shard).parts
    if not parts or Path(shard).is_absolute() or ".." in parts or "\\" in shard:
        raise LlamascopeError(f"{index_path}: shard {shard!r} is not a file inside the model folder {folder}")
    if not path.is_file():
        raise LlamascopeError(f"{index_path}: shard {shard!r} is listed but missing")
    return path


def _weight_files(folder: Path) -> tuple[str, list[Path]]:
    for index_name, fmt in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "bin")):
        index_path = folder / index_name
        if index_path.is_file():
            index = read_json(index_path)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise LlamascopeError(f"{index_path}: missing or empty 'weight_map'")
            if not all(isinstance(shard, str) for shard in weight_map.values()):
                raise LlamascopeError(f"{index_path}: every 'weight_map' value must be a shard's file name")
            return fmt, [_shard_path(folder, index_path, shard) for shard in sorted(set(weight_map.values()))]
    if (folder / "model.safetensors").is_file():
        return "safetensors", [folder / "model.safetensors"]
    singles = sorted(folder.glob("*.safetensors"))
    if singles:
        return "safetensors", singles
    if (folder / "pytorch_model.bin").is_file():
        return "bin", [folder / "pytorch_model.bin"]
    raise LlamascopeError(
        f"{folder}: no weights found (expected model.safetensors, model.safetensors.index.json or pytorch_model.bin)"
    )


def _bin_slice(t: torch.Tensor, dim: int, start: int, stop: int) -> torch.Tensor:
    return t.narrow(dim, start, stop - start).clone()


def _bin_tensors(path: Path) -> dict[str, TensorSource]:
    state = load_bin(path)  # memory-mapped: reading a tensor touches only its pages
    out = {}
    for name, t in state.items():
        # Slices of the memory-mapped tensor touch only their own pages (for rows; a column
        # block of a matrix touches every row's pages, which the kernel may drop again).
        out[name] = TensorSource(
            tuple(t.shape),
            TORCH_TYPE_NAMES.get(t.dtype, str(t.dtype)),
            path,
            t.numel() * t.element_size(),
            functools.partial(lambda t: t, t),
            functools.partial(_bin_slice, t),
        )
    return out


def open_hf_folder(folder: Path) -> Checkpoint:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise LlamascopeError(f"{folder}: no config.json (not a Hugging Face model folder)")
    config_dict = read_json(config_path)
    config = ModelConfig.from_dict(config_dict, source=str(config_path))
    gen_path = folder / "generation_config.json"
    generation_json = read_json(gen_path) if gen_path.is_file() else None

    fmt, files = _weight_files(folder)
    tensors: dict[str, TensorSource] = {}
    for path in files:
        if fmt == "safetensors":
            st = SafetensorsFile(path)
            for name in st.names():
                tensors[name] = TensorSource(
                    st.shape(name),
                    TORCH_TYPE_NAMES.get(st.dtype(name), str(st.dtype(name))),
                    path,
                    st.nbytes(name),
                    functools.partial(st.read, name),
                    functools.partial(st.read_slice, name),
                    read_into=functools.partial(st.read_into, name),
                    stored=(st.offset(name), st.dtype(name)),
                )
        else:
            tensors.update(_bin_tensors(path))

    def tokenizer_factory():
        return Tokenizer.from_hf_folder(folder, config=config)

    has_tokenizer = (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()
    return Checkpoint(
        path=folder,
        format=fmt,
        config=config,
        config_dict=config_dict,
        generation_json=generation_json,
        tensors=split_fused(tensors, config),
        files=[(p, p.stat().st_size) for p in files],
        tokenizer_factory=tokenizer_factory if has_tokenizer else None,
    )
