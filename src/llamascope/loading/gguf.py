"""GGUF files (llama.cpp's format): metadata to a Hugging Face config, tensors to HF names.

The header is parsed by gguf_file.py (no weight is read until asked for); the `gguf` package gives
the tensor types and dequantises. This module adds:
- the `llama` metadata as a config.json-style dict (`gguf_config_dict`), checked against the
  tensor shapes, with errors that name the key or the tensor;
- GGUF tensor names to Hugging Face names (`hf_tensor_name`);
- weights dequantised to float32 at read time, in the HF layout [out, in], with llama.cpp's
  permutation of the Q and K projection rows undone (`unpermute_rows`);
- LLaMA-3.1 rope scaling recovered from the `rope_freqs.weight` tensor llama.cpp writes instead
  of the rope_scaling parameters (`llama3_rope_scaling`).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

from ..config import ARCHITECTURES, ModelConfig, longrope_attention_factor
from ..errors import LlamascopeError
from ..formats import KEPT_FORMATS, q5_0_as_q8_0
from ..tokenizer import Tokenizer
from .checkpoint import Checkpoint, TensorSource, check_layer_count, split_fused, stored_shapes
from .gguf_metadata import GGUFMetadata, read_gguf, token_id
from .tensorfiles import Scratch, read_array, read_array_slice

# general.architecture values read, each as the model_type of config.ARCHITECTURES with that
# gguf_name (a Mistral GGUF is a `llama` one: llama.cpp keeps no sliding window for it)
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "phi3")
# Architectures whose converter stores Q and K rows permuted for llama.cpp's interleaved RoPE; the
# others use the rotate-half (NeoX) layout that Hugging Face has.
PERMUTED_QK = ("llama",)
# Stored types that dequantise to float32 (gguf.quants implements each; see tests/test_gguf.py).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# Stored types whose blocks are kept in another format with the same numbers: (that format, the
# conversion of blocks [rows, row bytes] with `columns` weights a row).
KEPT_AS = {"Q5_0": ("Q8_0", q5_0_as_q8_0)}
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

TOP_LEVEL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm",  # (Qwen3)
    "attn_k_norm": "self_attn.k_norm",
    "attn_qkv": "self_attn.qkv_proj",  # (Phi-3: fused, split at loading)
}
# Phi-3's ffn_up holds gate and up side by side (Hugging Face's gate_up_proj)
FUSED_BLOCK_NAMES = {"phi3": {"ffn_up": "mlp.gate_up_proj"}}
BLOCK_PATTERN = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")
ROPE_FREQS = "rope_freqs.weight"
# Phi-3's LongRoPE factors (llama.cpp's names), read into rope_scaling
ROPE_FACTORS = {"long_factor": "rope_factors_long.weight", "short_factor": "rope_factors_short.weight"}
ROPE_TENSORS = (ROPE_FREQS, *ROPE_FACTORS.values())
# Tensors llama.cpp never loads for `llama` (old converters saved rotary_emb.inv_freq as these).
IGNORED_TENSORS = re.compile(r"blk\.\d+\.attn_rot_embd(\.weight)?")

# ---- names and layouts -------------------------------------------------------------------------


def _block_names(arch: str) -> dict[str, str]:
    """A block tensor's short GGUF name -> its module in Hugging Face's names, for `arch`."""
    return {**BLOCK_NAMES, **FUSED_BLOCK_NAMES.get(arch, {})}


def hf_tensor_name(name: str, arch: str = "llama") -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight` (Phi-3's fused tensors to
    its fused names); None for unknown names."""
    if name in TOP_LEVEL_NAMES:
        return TOP_LEVEL_NAMES[name]
    match = BLOCK_PATTERN.fullmatch(name)
    names = _block_names(arch)
    if match and match[2] in names:
        return f"model.layers.{match[1]}.{names[match[2]]}.{match[3]}"
    return None


def gguf_tensor_name(hf_name: str, arch: str = "llama") -> str:
    """The inverse of `hf_tensor_name`, for messages about missing tensors."""
    for gguf_name, name in TOP_LEVEL_NAMES.items():
        if name == hf_name:
            return gguf_name
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf_name)
    if match:
        for short, module in _block_names(arch).items():
            if module == match[2]:
                return f"blk.{match[1]}.{short}.{match[3]}"
    return hf_name


def unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K permutation of the rows of a projection weight [out, in] or bias [out].

    convert_hf_to_gguf.py stores `w.reshape(heads, 2, D/2, ...).swapaxes(1, 2)`: within each head
    the two rotary halves are interleaved (pairs). Hugging Face's rotate-half RoPE wants the halves
    back: view the rows as [heads, D/2, 2] and swap the last two axes.
    """
    return _halves(weight, heads).reshape(tuple(weight.shape))  # [H*D, ...] in halves order


def _halves(weight: np.ndarray | torch.Tensor, heads: int) -> np.ndarray | torch.Tensor:
    """unpermute_rows's rows as a view [H, 2, D/2, ...] (no copy yet): a contiguous tensor of that
    shape, or `weight`'s shape, takes them in one copy."""
    pairs = weight.reshape(heads, weight.shape[0] // heads // 2, 2, *weight.shape[1:])  # [H, D/2, 2, ...]
    return pairs.swapaxes(1, 2)


def _unpermute_into(weight: torch.Tensor, heads: int, out: torch.Tensor) -> torch.Tensor:
    """unpermute_rows(weight, heads) copied straight into `out` (contiguous, weight's shape) -> out."""
    halves = _halves(weight, heads)  # [H, 2, D/2, ...]
    out.view(halves.shape).copy_(halves)
    return out


def dequantize_tensor(tensor, path: Path) -> np.ndarray:
    """float32 values of one GGUF tensor, in numpy's row-major order ([rows, cols] or [n])."""
    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except Exception as e:
        raise LlamascopeError(
            f"{path}: cannot dequantise tensor {tensor.name!r} ({tensor.tensor_type.name}): {e}"
        ) from None
    if values.dtype != np.float32 or not values.flags.writeable or np.may_share_memory(values, tensor.data):
        values = np.array(values, dtype=np.float32)  # own memory, not a view of the mapped file
    return values


class GGUFWeight:
    """One GGUF tensor as Hugging Face sees it: `shape` [out, in], Q/K rows un-permuted."""

    def __init__(self, tensor, shape: tuple[int, ...], heads: int | None, path: Path):
        self.tensor, self.shape, self.heads, self.path = tensor, shape, heads, path
        self.type_name = tensor.tensor_type.name

    def _unpermute(self, values: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Q/K rows [rows, ...] (all of them, or whole heads) back in Hugging Face order, contiguous."""
        if not self.heads:
            return values
        head_rows = self.shape[0] // self.heads
        rows = unpermute_rows(values, values.shape[0] // head_rows)
        return rows.contiguous() if isinstance(rows, torch.Tensor) else np.ascontiguousarray(rows)

    def read_into(self, out: torch.Tensor) -> bool:
        """`read()` of a float tensor stored in `out`'s dtype into `out` (contiguous, of its shape):
        straight in, or Q/K rows un-permuted from the file's order as they are copied in; False
        (nothing read) for other types and dtypes."""
        if FLOAT_TYPES.get(self.type_name) != out.dtype:
            return False
        offset, name = int(self.tensor.data_offset), self.tensor.name
        if not self.heads:
            read_array(self.path, offset, out.dtype, self.shape, name, out)
            return True
        raw = read_array(self.path, offset, out.dtype, self.shape, name)  # [out, in] in the file's row order
        _unpermute_into(raw, self.heads, out)
        return True

    def stored(self) -> tuple[int, torch.dtype] | None:
        """(byte offset, dtype) of a float tensor whose bytes are `read()`'s as they lie (not
        Q/K rows, which the file holds in llama.cpp's order); None for others."""
        if self.type_name not in FLOAT_TYPES or self.heads:
            return None
        return int(self.tensor.data_offset), FLOAT_TYPES[self.type_name]

    def read(self) -> torch.Tensor:
        """[out, in] (or [n]): float32, or the stored dtype of a float tensor (F16, BF16)."""
        if self.type_name in FLOAT_TYPES:
            return self._read_floats(None)
        values = dequantize_tensor(self.tensor, self.path).reshape(self.shape)
        return torch.from_numpy(self._unpermute(values))

    def _read_floats(self, part: tuple[int, int, int] | None) -> torch.Tensor:
        """A float-typed tensor (F32, F16, BF16), or indices [start, stop) along `dim` of it
        (`part`, whole heads for Q/K rows), in its stored dtype (as a safetensors tensor reads: the
        model converts once, to its own dtype, and a BF16 file loading at bfloat16 converts nothing)
        through plain file reads: dequantising the mapped file would leave every page of it resident
        beside the result, and costs more."""
        dtype, offset, name = FLOAT_TYPES[self.type_name], int(self.tensor.data_offset), self.tensor.name
        if part is None:
            values = read_array(self.path, offset, dtype, self.shape, name)
        else:
            values = read_array_slice(self.path, offset, dtype, self.shape, *part, name)
        return self._unpermute(values)

    def read_blocks(self, scratch: Scratch | None = None) -> torch.Tensor:
        """The stored blocks as uint8 [rows, row bytes], rows in Hugging Face order (each row's
        blocks are contiguous, so undoing the Q/K row permutation on them is exact). With
        `scratch`, read through its reused buffers: the result may be a view of them, valid until
        the next read through it."""
        # Plain file reads, not the memory map: mapped pages once touched stay resident beside the
        # copy (two copies at peak); a read leaves only the tensor.
        rows = self.shape[0]
        shape = (rows, int(self.tensor.n_bytes) // rows)
        into = None if scratch is None else scratch.take(0, shape)
        raw = read_array(self.path, int(self.tensor.data_offset), torch.uint8, shape, self.tensor.name, into)
        if scratch is not None and self.heads:
            raw = _unpermute_into(raw, self.heads, scratch.take(1, shape))  # [out, row bytes]
        else:
            raw = self._unpermute(raw)  # [out, row bytes]
        return self._kept(raw, self.shape[1])

    def _kept(self, blocks: torch.Tensor, columns: int) -> torch.Tensor:
        """Blocks in the format the model keeps (KEPT_AS): Q5_0 as the same numbers in Q8_0."""
        kept = KEPT_AS.get(self.type_name)
        return kept[1](blocks, columns) if kept else blocks

    def read_slice(self, dim: int, start: int, stop: int) -> torch.Tensor:
        """Indices [start, stop) along `dim` of `read()`, dequantising only those rows or blocks:
        whole heads for Q/K rows; for columns, the blocks that hold [start, stop) (widened to block
        boundaries, then cut)."""
        if dim == 1 and len(self.shape) == 2:
            block = self._block_size()
            lo, hi = start // block * block, min(-(-stop // block) * block, self.shape[1])
            if (lo, hi) != (start, stop) and hi % block == 0:
                return self.read_slice(1, lo, hi).narrow(1, start - lo, stop - start).clone()
        part = self._stored_part(dim, start, stop)
        if part is None:
            return self.read().narrow(dim, start, stop - start).clone()
        if self.type_name in FLOAT_TYPES:
            return self._read_floats((dim, start, stop))
        values = np.array(dequantize(part, self.tensor.tensor_type), dtype=np.float32)
        shape = list(self.shape)
        shape[dim] = stop - start
        return torch.from_numpy(self._unpermute(values.reshape(shape)))

    def _block_size(self) -> int:
        return GGML_QUANT_SIZES[self.tensor.tensor_type][0]

    def read_blocks_slice(self, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) (dim 0) or weight columns [start, stop) (dim 1, on block boundaries)
        of `read_blocks()`, as uint8 [rows, bytes], reading only those bytes of the file (tensor
        parallelism: each rank keeps its own quantised blocks). Q/K row slices must hold whole heads."""
        rows = self.shape[0]
        row_bytes = int(self.tensor.n_bytes) // rows
        block, type_size = GGML_QUANT_SIZES[self.tensor.tensor_type]
        name = self.tensor.name
        if dim == 0:
            head_rows = rows // self.heads if self.heads else 1
            if not 0 <= start <= stop <= rows or start % head_rows or stop % head_rows:
                raise LlamascopeError(
                    f"{self.path}: tensor {name!r}: rows [{start}, {stop}) are not whole heads "
                    f"of {head_rows} rows within its {rows} rows"
                )
            out = torch.empty((stop - start, row_bytes), dtype=torch.uint8)  # [rows, row bytes]
            spans = [(int(self.tensor.data_offset) + start * row_bytes, out.numpy().reshape(-1))]
        elif dim == 1 and len(self.shape) == 2:
            if not 0 <= start <= stop <= self.shape[1] or start % block or stop % block:
                raise LlamascopeError(
                    f"{self.path}: tensor {name!r}: columns [{start}, {stop}) do not fall on "
                    f"its {block}-weight block boundaries"
                )
            first, last = start // block * type_size, stop // block * type_size
            out = torch.empty((rows, last - first), dtype=torch.uint8)  # [rows, slice bytes]
            view = out.numpy()
            base = int(self.tensor.data_offset) + first
            spans = [(base + r * row_bytes, view[r]) for r in range(rows)]
        else:
            raise LlamascopeError(f"{self.path}: tensor {name!r} has no dimension {dim} to slice blocks along")
        # Plain reads of just these bytes (see read_blocks): one per row for a column slice.
        with open(self.path, "rb", buffering=0) as f:
            fd = f.fileno()
            for offset, buffer in spans:
                if buffer.size and os.preadv(fd, [memoryview(buffer)], offset) != buffer.size:
                    raise LlamascopeError(f"{self.path}: file is truncated in tensor {name!r}")
        return self._kept(self._unpermute(out), self.shape[1] if dim == 0 else stop - start)

    def _stored_part(self, dim: int, start: int, stop: int) -> np.ndarray | None:
        data = self.tensor.data
        if dim == 0:
            head_rows = self.shape[0] // self.heads if self.heads else 1
            return data[start:stop] if start % head_rows == 0 and stop % head_rows == 0 else None
        block, type_size = GGML_QUANT_SIZES[self.tensor.tensor_type]
        if dim != 1 or len(self.shape) != 2 or start % block or stop % block:
            return None
        if self.type_name in ("F32", "F16"):  # the reader gives typed values, not bytes
            return data[:, start:stop]
        return data[:, start // block * type_size : stop // block * type_size]


# ---- metadata to config ------------------------------------------------------------------------


def _vocab_size(meta: GGUFMetadata, tensors: dict, arch: str) -> int:
    """Vocabulary size from the embedding rows, the token list and `{arch}.vocab_size`, which must agree."""
    sources = []
    embed = tensors.get("token_embd.weight")
    if embed is not None:
        sources.append(("tensor 'token_embd.weight' (rows)", int(embed.shape[1]) if len(embed.shape) == 2 else -1))
    if meta.has("tokenizer.ggml.tokens"):
        sources.append(("metadata key 'tokenizer.ggml.tokens' (length)", meta.array_length("tokenizer.ggml.tokens")))
    if meta.has(f"{arch}.vocab_size"):
        sources.append((f"metadata key '{arch}.vocab_size'", meta.integer(f"{arch}.vocab_size")))
    if not sources:
        raise LlamascopeError(
            f"{meta.path}: no vocabulary size (no token_embd.weight, tokenizer.ggml.tokens or {arch}.vocab_size)"
        )
    first_name, first = sources[0]
    for name, size in sources[1:]:
        if size != first:
            raise LlamascopeError(f"{meta.path}: {name} says {size} tokens, but {first_name} says {first}")
    return first


def _rope_scaling(meta: GGUFMetadata, arch: str) -> dict | None:
    """rope_scaling from `{arch}.rope.scaling.*` (or the older `{arch}.rope.scale_linear`)."""
    kind = meta.string(f"{arch}.rope.scaling.type", None)
    if kind is None and meta.has(f"{arch}.rope.scale_linear"):
        factor = meta.number(f"{arch}.rope.scale_linear")
        return None if factor == 1.0 else {"rope_type": "linear", "factor": factor}
    if kind in (None, "none"):
        return None
    if kind != "linear":
        raise LlamascopeError(
            f"{meta.path}: metadata key '{arch}.rope.scaling.type' = {kind!r} is not supported "
            f"(supported: none, linear; LLaMA-3 scaling comes as the tensor {ROPE_FREQS!r})"
        )
    return {"rope_type": "linear", "factor": meta.number(f"{arch}.rope.scaling.factor")}


def llama3_rope_scaling(factors: np.ndarray, head_dim: int, rope_theta: float, source: str) -> dict | None:
    """rope_scaling {"rope_type": "llama3", ...} that reproduces llama.cpp's `rope_freqs.weight`.

    llama.cpp divides each rotary frequency by factors[i]: 1 for short wavelengths, `factor` for
    long ones and 1 / ((1 - s) / factor + s) between, with s = old_context / wavelength / (high - low)
    - low / (high - low) linear in 1/wavelength. Fitting that line on the in-between entries gives
    old_context / (high - low) and low / (high - low); with low_freq_factor = 1 this fixes the rest.
    The result is checked by recomputing every factor.
    """
    factors = np.asarray(factors, dtype=np.float64).reshape(-1)  # [D/2]
    if factors.shape[0] != head_dim // 2:
        raise LlamascopeError(
            f"{source}: tensor {ROPE_FREQS!r} has {factors.shape[0]} entries, expected head_dim / 2 = {head_dim // 2}"
        )
    if np.allclose(factors, 1.0, rtol=0, atol=1e-6):
        return None
    inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # [D/2]
    wavelength = 2 * math.pi / inv_freq
    factor = float(factors.max())
    between = (factors > 1 + 1e-5) & (factors < factor * (1 - 1e-5))
    scaling = None
    if between.sum() >= 2 and factor > 1:
        smooth = (1 / factors[between] - 1 / factor) / (1 - 1 / factor)  # s per in-between entry
        design = np.stack([1 / wavelength[between], -np.ones(int(between.sum()))], axis=1)
        (a, b), *_ = np.linalg.lstsq(design, smooth, rcond=None)
        if b > 0:
            span = 1 / b  # high - low with low = 1
            old = a * span
            scaling = {
                "rope_type": "llama3",
                "factor": _round(factor),
                "low_freq_factor": 1.0,
                "high_freq_factor": _round(1 + span),
                "original_max_position_embeddings": int(round(old)) if abs(old - round(old)) < 1e-3 * old else old,
            }
    if scaling is None or not np.allclose(_llama3_factors(scaling, wavelength), factors, rtol=1e-4, atol=1e-6):
        raise LlamascopeError(
            f"{source}: tensor {ROPE_FREQS!r} does not follow LLaMA-3 rope scaling "
            f"(llamascope cannot run other per-frequency rope factors)"
        )
    return scaling


def _round(value: float) -> float:
    return float(round(value, 4)) if abs(value - round(value, 4)) < 1e-5 * max(1.0, abs(value)) else float(value)


def _llama3_factors(scaling: dict, wavelength: np.ndarray) -> np.ndarray:
    """The divisors of each frequency under `scaling` (llama.cpp's formula)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    smooth = (old / wavelength - low) / (high - low)
    out = 1 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelength < old / high, 1.0, out)
    return np.where(wavelength > old / low, factor, out)


def _architecture(meta: GGUFMetadata) -> str:
    arch = meta.string("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise LlamascopeError(
            f"{meta.path}: unsupported architecture general.architecture = {arch!r} "
            f"(llamascope reads GGUF files of: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    return arch


def _model_type(arch: str) -> str:
    """The model_type of a GGUF architecture: the first in config.ARCHITECTURES with that gguf_name."""
    return next(a.model_type for a in ARCHITECTURES.values() if a.gguf_name == arch)


def _attention_sizes(meta: GGUFMetadata, arch: str) -> tuple[int, int, int, int]:
    """(hidden size, heads, kv heads, head size), checked against each other."""
    p = f"{arch}."
    hidden = meta.integer(p + "embedding_length")
    heads = meta.integer(p + "attention.head_count")
    kv_heads = meta.integer(p + "attention.head_count_kv", heads)
    if heads % kv_heads:
        raise LlamascopeError(
            f"{meta.path}: metadata key '{p}attention.head_count' = {heads} is not a multiple "
            f"of '{p}attention.head_count_kv' = {kv_heads}"
        )
    head_dim = meta.integer(p + "attention.key_length", hidden // heads if hidden % heads == 0 else None)
    if head_dim is None:
        raise LlamascopeError(
            f"{meta.path}: '{p}embedding_length' = {hidden} is not a multiple of "
            f"'{p}attention.head_count' = {heads} and there is no '{p}attention.key_length'"
        )
    for key in (p + "attention.value_length", p + "rope.dimension_count"):
        value = meta.integer(key, head_dim)
        if value != head_dim:
            raise LlamascopeError(
                f"{meta.path}: metadata key {key!r} = {value} differs from the head size "
                f"{head_dim} (partial or asymmetric heads are not supported)"
            )
    if head_dim % 2:
        raise LlamascopeError(f"{meta.path}: head size {head_dim} is odd; rotary embeddings need an even size")
    return hidden, heads, kv_heads, head_dim


def _rope(meta: GGUFMetadata, arch: str, tensors: dict, head_dim: int) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from the metadata or from the rope_freqs.weight tensor (LLaMA 3.1)
    or the rope_factors_long / _short tensors (Phi-3's LongRoPE)."""
    rope_theta = meta.number(f"{arch}.rope.freq_base", 10000.0)
    rope_scaling = _rope_scaling(meta, arch)
    given = [name for name in ROPE_TENSORS if name in tensors]
    if given and rope_scaling is not None:
        raise LlamascopeError(f"{meta.path}: both '{arch}.rope.scaling.type' and tensor {given[0]!r} are given")
    if ROPE_FREQS in tensors:
        factors = dequantize_tensor(tensors[ROPE_FREQS], meta.path)
        rope_scaling = llama3_rope_scaling(factors, head_dim, rope_theta, str(meta.path))
    elif any(name in tensors for name in ROPE_FACTORS.values()):
        rope_scaling = _longrope_scaling(meta, arch, tensors)
    return rope_theta, rope_scaling


def _longrope_scaling(meta: GGUFMetadata, arch: str, tensors: dict) -> dict:
    """rope_scaling {"rope_type": "longrope", ...} from llama.cpp's factor tensors and
    `{arch}.rope.scaling.original_context_length` / `.attn_factor`."""
    scaling: dict[str, Any] = {"rope_type": "longrope"}
    for key, name in ROPE_FACTORS.items():
        if name not in tensors:
            raise LlamascopeError(f"{meta.path}: LongRoPE needs tensor {name!r} beside the other factors")
        scaling[key] = [float(v) for v in dequantize_tensor(tensors[name], meta.path).reshape(-1)]
    scaling["original_max_position_embeddings"] = meta.integer(f"{arch}.rope.scaling.original_context_length")
    attention = meta.number(f"{arch}.rope.scaling.attn_factor", None)
    trained = scaling["original_max_position_embeddings"]
    implied = longrope_attention_factor(meta.integer(f"{arch}.context_length") / trained, trained)
    if attention is not None and abs(attention - implied) > 1e-6 * implied:  # (stored in float32)
        scaling["attention_factor"] = attention
    return scaling


def gguf_config_dict(meta: GGUFMetadata, tensors: dict) -> dict:
    """A config.json-style dict for a GGUF of a SUPPORTED_ARCHITECTURES; `tensors` maps GGUF names to
    reader tensors."""
    arch = _architecture(meta)
    model_type = _model_type(arch)
    hidden, heads, kv_heads, head_dim = _attention_sizes(meta, arch)
    rope_theta, rope_scaling = _rope(meta, arch, tensors, head_dim)
    eos_ids = _eos_ids(meta)
    extra = {}
    if rope_scaling is not None and rope_scaling["rope_type"] == "longrope":
        extra["original_max_position_embeddings"] = rope_scaling["original_max_position_embeddings"]
    if ARCHITECTURES[model_type].sliding == "all":
        extra["sliding_window"] = meta.integer(f"{arch}.attention.sliding_window", 0, positive=False) or None  # 0: none
    return {
        "architectures": [ARCHITECTURES[model_type].hf_class],
        "model_type": model_type,
        "vocab_size": _vocab_size(meta, tensors, arch),
        "hidden_size": hidden,
        "intermediate_size": meta.integer(f"{arch}.feed_forward_length"),
        "num_hidden_layers": meta.integer(f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": meta.integer(f"{arch}.context_length"),
        "rms_norm_eps": meta.number(f"{arch}.attention.layer_norm_rms_epsilon"),
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in tensors,
        "bos_token_id": token_id(meta, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos_ids[0] if eos_ids else None,
        "pad_token_id": token_id(meta, "tokenizer.ggml.padding_token_id"),
        **extra,
    }


def _eos_ids(meta: GGUFMetadata) -> list[int]:
    """End-of-generation ids: eos, then llama.cpp's eot and eom when they differ."""
    ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        value = token_id(meta, key)
        if value is not None and value not in ids:
            ids.append(value)
    return ids


def generation_settings(meta: GGUFMetadata) -> dict | None:
    """generation_config.json-style ids from the tokenizer metadata (None when there are none)."""
    out: dict = {}
    bos = token_id(meta, "tokenizer.ggml.bos_token_id")
    if bos is not None:
        out["bos_token_id"] = bos
    eos = _eos_ids(meta)
    if eos:
        out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    pad = token_id(meta, "tokenizer.ggml.padding_token_id")
    if pad is not None:
        out["pad_token_id"] = pad
    return out or None


# ---- tensors -----------------------------------------------------------------------------------

SHAPE_KEYS = {
    "embed_tokens": "embedding_length and the vocabulary size",
    "lm_head": "embedding_length and the vocabulary size",
    "q_proj": "embedding_length, attention.head_count and the head size",
    "o_proj": "embedding_length, attention.head_count and the head size",
    "k_proj": "embedding_length, attention.head_count_kv and the head size",
    "v_proj": "embedding_length, attention.head_count_kv and the head size",
    "gate_proj": "embedding_length and feed_forward_length",
    "up_proj": "embedding_length and feed_forward_length",
    "down_proj": "embedding_length and feed_forward_length",
}


def _shape_keys(hf_name: str, arch: str) -> str:
    for part, keys in SHAPE_KEYS.items():
        if f"{part}." in hf_name:
            return f"{arch}.{keys}"
    return f"{arch}.embedding_length"


def _map_tensors(reader, path: Path, arch: str) -> dict[str, Any]:
    """GGUF name -> reader tensor, refusing unknown names and types llamascope cannot dequantise."""
    tensors: dict[str, Any] = {}
    for tensor in reader.tensors:
        name = tensor.name
        if IGNORED_TENSORS.fullmatch(name):
            continue
        if name not in ROPE_TENSORS and hf_tensor_name(name, arch) is None:
            raise LlamascopeError(
                f"{path}: unexpected tensor {name!r} (shape {list(map(int, tensor.shape))}): not part of a LLaMA model"
            )
        if tensor.tensor_type.name not in SUPPORTED_TYPES:
            raise LlamascopeError(
                f"{path}: tensor {name!r} is stored as {tensor.tensor_type.name}, which llamascope cannot "
                f"dequantise (supported: {', '.join(SUPPORTED_TYPES)})"
            )
        tensors[name] = tensor
    return tensors


def _check_shapes(tensors: dict, config: ModelConfig, arch: str, path: Path) -> None:
    """Every tensor the config implies is present with the implied shape, and nothing else."""
    check_layer_count(config, len(tensors), str(path), key=f"{arch}.block_count", fused=config.architecture.fused)
    expected = stored_shapes(config)
    for name, tensor in tensors.items():
        hf_name = hf_tensor_name(name, arch)
        if hf_name is None:
            continue
        if hf_name not in expected:
            raise LlamascopeError(
                f"{path}: unexpected tensor {name!r}: the metadata ({arch}.block_count = "
                f"{config.num_hidden_layers}) has no place for it"
            )
        shape = tuple(int(d) for d in reversed(tensor.shape))
        if shape != expected[hf_name]:
            raise LlamascopeError(
                f"{path}: tensor {name!r} has shape {list(shape)} ([out, in]), but the metadata "
                f"({_shape_keys(hf_name, arch)}) implies {list(expected[hf_name])}"
            )
    present = {hf_tensor_name(n, arch) for n in tensors}
    for hf_name, shape in expected.items():
        if hf_name not in present:
            raise LlamascopeError(
                f"{path}: missing tensor {gguf_tensor_name(hf_name, arch)!r} (expected shape "
                f"{list(shape)} from the metadata; {arch}.block_count = {config.num_hidden_layers})"
            )


def _tensor_sources(tensors: dict, config: ModelConfig, path: Path, arch: str) -> dict[str, TensorSource]:
    """Each weight as a TensorSource under its Hugging Face name, Q/K rows un-permuted where the
    architecture's converter permuted them, fused projections split (`split_fused`)."""
    sources = {}
    for name, tensor in tensors.items():
        hf_name = hf_tensor_name(name, arch)
        if hf_name is None:
            continue
        shape = tuple(int(d) for d in reversed(tensor.shape))
        heads = None
        if arch in PERMUTED_QK and ".self_attn.q_proj." in hf_name:
            heads = config.num_attention_heads
        elif arch in PERMUTED_QK and ".self_attn.k_proj." in hf_name:
            heads = config.num_key_value_heads
        weight = GGUFWeight(tensor, shape, heads, path)
        # Block formats the layers compute with directly can stay quantised (load_model's default).
        kept_type = KEPT_AS[weight.type_name][0] if weight.type_name in KEPT_AS else weight.type_name
        has_blocks = kept_type in KEPT_FORMATS and len(shape) == 2
        sources[hf_name] = TensorSource(
            shape,
            weight.type_name,
            path,
            int(tensor.n_bytes),
            weight.read,
            kept_type=kept_type,
            slice_reader=weight.read_slice,
            read_blocks=weight.read_blocks if has_blocks else None,
            blocks_slice_reader=weight.read_blocks_slice if has_blocks else None,
            read_into=weight.read_into,
            stored=weight.stored(),
        )
    return split_fused(sources, config)


def open_gguf(path: Path) -> Checkpoint:
    """Config, generation settings, tokenizer factory and lazy weights of a GGUF file (float32, or a
    float tensor's stored dtype; blocks kept where the layers compute with them)."""
    path = Path(path)
    reader = read_gguf(path)
    meta = GGUFMetadata(reader, path)
    if reader.byte_order != "<":
        raise LlamascopeError(
            f"{path}: a big-endian GGUF; llamascope reads the weights of little-endian "
            f"files only (convert it with gguf-py's gguf_convert_endian)"
        )
    if not reader.tensors:
        raise LlamascopeError(
            f"{path}: the file holds no tensors (a vocabulary-only GGUF can serve as a tokenizer, not as a model)"
        )
    arch = _architecture(meta)
    tensors = _map_tensors(reader, path, arch)
    config_dict = gguf_config_dict(meta, tensors)
    config = ModelConfig.from_dict(config_dict, source=str(path))
    _check_shapes(tensors, config, arch, path)

    # The parsed metadata (about 12 MB of strings for a 49k vocabulary and its merges) is only
    # needed for the tokenizer: the first call uses it and lets it go, later calls parse the file again.
    held = [reader]

    def tokenizer_factory():
        source = held.pop() if held else path
        return Tokenizer.from_gguf(source)

    return Checkpoint(
        path=path,
        format="gguf",
        config=config,
        config_dict=config_dict,
        generation_json=generation_settings(meta),
        tensors=_tensor_sources(tensors, config, path, arch),
        files=[(path, path.stat().st_size)],
        tokenizer_factory=tokenizer_factory if meta.has("tokenizer.ggml.model") else None,
    )
