"""`load_model`: open the checkpoint (checkpoint.py, gguf.py, hf.py: config and tensor index, no
weights), build the model with plain layers (build.py), then give it its backend (`_give_backend`:
native kernels, plain PyTorch, or a compiled decode step)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import compiled, kernels, native, openmp
from ..config import ModelConfig
from ..errors import LlamascopeError
from ..memory import freed_memory_returned, peak_rss_bytes, rss_bytes
from ..parallel import ParallelGroup
from . import hugepages
from .build import build_model
from .checkpoint import Checkpoint, default_model_path, resolve_dtype
from .gguf import open_gguf
from .hf import open_hf_folder
from .options import LoadOptions, resolve_device

log = logging.getLogger("llamascope")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: ModelConfig
    tokenizer: object
    generation_json: dict | None
    checkpoint: Checkpoint
    options: LoadOptions
    load_seconds: float = 0.0
    # the process's resident memory and its peak so far when loading began (None where /proc is not
    # available): what the runtime took before any weight, and whether a later peak is loading's own
    rss_before_bytes: int | None = None
    peak_rss_before_bytes: int | None = None


def open_checkpoint(path: str | Path | None) -> Checkpoint:
    """Read the config and the tensor index of a folder or GGUF file (None: the default model);
    no weights yet."""
    path = default_model_path() if path is None else Path(path)
    if not path.exists():
        raise LlamascopeError(f"{path}: no such file or folder")
    if path.is_dir():
        return open_hf_folder(path)
    if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
        return open_gguf(path)
    raise LlamascopeError(f"{path}: not a model (expected a Hugging Face folder or a .gguf file)")


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def load_model(
    path: str | Path | None = None,
    options: LoadOptions | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
    parallel: ParallelGroup | None = None,
    **option_fields,
) -> LoadedModel:
    """Load a model, its tokenizer and generation settings from a folder or GGUF file (None: the
    default model), as `options` says; keyword arguments set LoadOptions' fields
    (`load_model(path, backend="plain")`).

    With `parallel` (from `parallel.init_from_env`), this rank loads only its shard of the model,
    on the group's device. `progress(done, total)` is called as each weight is read.
    GGUF block formats stay quantised only where a native kernel reads them (the native backend on
    a CPU with a kernel build); elsewhere they are dequantised to the dtype once at load, since
    dequantising a whole matrix for every product would be several times slower.
    """
    options = LoadOptions.build(options, **option_fields)
    start, rss_before, peak_before = time.perf_counter(), rss_bytes(), peak_rss_bytes()
    several = parallel is not None and parallel.world_size > 1
    if several and options.backend == "compiled":
        raise LlamascopeError("--backend compiled does not run under tensor parallelism (--tp)")
    device = _device(options.device, parallel)
    checkpoint = open_checkpoint(path)
    dtype = resolve_dtype(options.dtype, checkpoint.config, checkpoint)
    _log_start(checkpoint, dtype, parallel)
    lib = kernels.load() if options.backend == "native" and device.type == "cpu" else None
    keep_blocks = _keeps_blocks(checkpoint, options, lib, device, dtype)
    # before the weights: a GGUF tokenizer's parsed metadata is then freed before they take memory
    tokenizer = checkpoint.tokenizer_factory() if checkpoint.tokenizer_factory else None
    with freed_memory_returned():
        model = build_model(
            checkpoint,
            dtype,
            device,
            progress,
            parallel,
            keep_blocks=keep_blocks,
            quantize_to=options.quant_format,
            pack_with=lib,  # (kept blocks go straight into the layout the kernels read)
            map_files=options.mmap and not options.huge_pages,
        )
        _give_backend(model, options.backend, lib, one_process=not several)
        if options.huge_pages and device.type == "cpu":
            hugepages.move_to_huge_pages(model)  # (it rebuilds the decode step on the moved weights)
    # the model may run on another thread than this one (a server, an application's worker): this
    # thread's OpenMP workers would make that thread's team the second one (openmp.py)
    openmp.release_pool()
    seconds = time.perf_counter() - start
    log.info("loaded in %.2f s", seconds)
    return LoadedModel(
        model,
        checkpoint.config,
        tokenizer,
        checkpoint.generation_json,
        checkpoint,
        options,
        seconds,
        rss_before,
        peak_before,
    )


def _log_start(checkpoint: Checkpoint, dtype: torch.dtype, parallel: ParallelGroup | None) -> None:
    for file, size in checkpoint.files:
        log.info("reading %s (%d bytes)", file, size)
    log.info(
        "loading %s (%s, %d tensors) as %s%s",
        checkpoint.path,
        checkpoint.format,
        len(checkpoint.tensors),
        str(dtype).removeprefix("torch."),
        f", tensor parallel {parallel.describe()}" if parallel else "",
    )


def _keeps_blocks(checkpoint: Checkpoint, options: LoadOptions, lib, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a GGUF's block formats stay blocks: where a native kernel reads them and --quant
    does not ask for other weights; elsewhere they become float at load (a line says so)."""
    keep = options.quant is None and checkpoint.format == "gguf"
    if keep and lib is None:
        where = f"with --backend {options.backend}" if options.backend != "native" else f"on {device} here"
        log.info(
            "no native kernel reads GGUF block formats %s: weights dequantised to %s at load",
            where,
            str(dtype).removeprefix("torch."),
        )
    return keep and lib is not None


def _device(name: str | torch.device, parallel: ParallelGroup | None) -> torch.device:
    """The device to load on: the option's, or under tensor parallelism the group's (an explicit
    --device of another kind is refused)."""
    if parallel is None:
        return resolve_device(name)
    if name != "auto" and resolve_device(name).type != parallel.device.type:
        raise LlamascopeError(
            f"tensor parallel over {parallel.backend} runs on {parallel.device.type}, but the model was asked "
            f"for on {name}"
        )
    return parallel.device


def _give_backend(model: torch.nn.Module, backend: str, lib, one_process: bool) -> None:
    """native: the kernels (`lib`; where there is none, the plain layers with fused projections);
    compiled: the plain layers with a compiled decode step; plain: the model as built."""
    if backend == "compiled":
        compiled.enable(model)
    elif backend == "native" and lib is not None:
        native.attach(model, lib, one_process)
    elif backend == "native" and one_process:
        native.fuse_projections(model)
