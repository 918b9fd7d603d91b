"""Linear and embedding layers over float and block-format weights.

Every layer has a plain path (PyTorch's operations: dequantise, then `F.linear`) that is the
reference for its native path. A layer computes natively once `native.attach` has given it the
kernel library (`layer.native`); `native_weight()` then describes what its kernel reads, which is
how the one-call decode step (decode_step.py) finds the weights without looking inside the layer.

Decoding (a few rows of activations) goes through the batch-1 kernels (csrc/gemv.c,
csrc/kquant.c); longer inputs (prefill) dequantise the weight once per call and use PyTorch's
matrix product.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .errors import LlamascopeError
from .formats import (
    K_QUANT_BYTES,
    PACKED_QTYPES,
    block_layout,
    dequantize,
    pack_blocks,
    quantize,
    unpack_blocks,
)

# Up to this many activation rows per call, the batch-1 kernels beat dequantise + matmul.
KERNEL_MAX_ROWS = 8
# A QuantLinear's weight layout (kernels.h's enum ls_layout): "rows" (ggml's blocks, a row of them
# per output, as GGUF stores them) or "packed" (the kernels' groups of four blocks,
# formats.pack_blocks; Q8_0, Q4_0 and Q4_1 only).
LAYOUTS = ("rows", "packed")


@dataclass(frozen=True)
class NativeWeight:
    """What a layer's native product reads for y = x W^T (+ bias).

    `format`: "F32", "BF16" or a block format ("Q8_0", "Q4_K", ...); `layout`: "rows" (float rows,
    or ggml's blocks as stored) or "packed" (formats.pack_blocks); `float_activations`: the activations
    stay float32 (a Q8_0 LM head), instead of being quantised to 8 bits per block."""

    format: str
    layout: str
    weight: torch.Tensor  # [N, K] float, or uint8 [N, row bytes]
    bias: torch.Tensor | None  # [N] or None
    out_features: int
    in_features: int
    float_activations: bool = False


class LocalPart(nn.Module):
    """A layer computing a share of a larger product (parallel.py's row-parallel projections and
    vocabulary-parallel head): `local` is the module doing this rank's part, which transforms
    (quantisation, native kernels) replace while the wrapper keeps its collective."""

    local: nn.Module


class Linear(nn.Linear):
    """nn.Linear whose weights always come from a checkpoint: construction allocates and does not
    draw random values (which on the meta device would also pull in a second of imports)."""

    def reset_parameters(self) -> None:
        pass


def linear_from(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A Linear holding `weight` [N, K] and `bias` [N] as they are (no copy)."""
    with torch.device("meta"):
        layer = Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


class QuantLinear(nn.Module):
    """y = x @ W^T (+ b) with W kept in a block format, in the layout `layout` names."""

    def __init__(
        self,
        qweight: torch.Tensor,
        qtype: str,
        in_features: int,
        bias: torch.Tensor | None = None,
        *,
        layout: str = "rows",
        float_activations: bool = False,
    ):
        """`qweight`: uint8 [N, row bytes] in `layout`. `float_activations`: the native product keeps
        the activations in float32 (Q8_0 only; for an LM head, where 8-bit activations next to the
        final hidden state's outlier channels can swap the top candidates)."""
        super().__init__()
        size, nbytes = block_layout(qtype)
        if in_features % size:
            raise LlamascopeError(f"{qtype} weights need an input size that is a multiple of {size}, not {in_features}")
        if layout not in LAYOUTS or (layout == "packed" and qtype not in PACKED_QTYPES):
            raise LlamascopeError(f"{qtype} weights have no {layout!r} layout")
        if layout == "rows" and (qweight.dim() != 2 or qweight.shape[1] != in_features // size * nbytes):
            raise LlamascopeError(
                f"{qtype} weights of input size {in_features} take {in_features // size * nbytes} "
                f"bytes a row, got blocks of shape {list(qweight.shape)}"
            )
        if float_activations and (qtype != "Q8_0" or layout != "rows"):
            raise LlamascopeError(f"float activations are for Q8_0 weights in rows, not {qtype} {layout}")
        self.qtype, self.layout, self.float_activations = qtype, layout, float_activations
        self.format_code = kernels.format_code(qtype)  # (kernels.h's enum ls_format: the kernels' argument)
        self.in_features, self.out_features = in_features, qweight.shape[0]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.register_buffer("qweight", qweight.contiguous())  # [N, row bytes] uint8
        self.native: ctypes.CDLL | None = None  # the kernel library (native.attach sets it)
        # Prefill's product in bfloat16 (native.attach sets it where the CPU has AVX512-BF16)
        self.long_inputs_in_bf16 = False
        # Inside `dequantized_once`: the dequantised weight, kept for the next pieces of one prompt
        self.held: torch.Tensor | None = None
        self.holding = False

    @classmethod
    def from_float(cls, linear: nn.Linear | torch.Tensor, qtype: str) -> QuantLinear:
        weight = linear.weight if isinstance(linear, nn.Linear) else linear
        bias = linear.bias if isinstance(linear, nn.Linear) else None
        return cls(
            quantize(weight.detach(), qtype), qtype, weight.shape[1], None if bias is None else bias.detach().float()
        )

    @property
    def blocks(self) -> torch.Tensor:
        """The weight in ggml's block format, uint8 [N, K/32 * bytes]."""
        if self.layout == "packed":
            return unpack_blocks(self.qweight, self.qtype, self.in_features)
        return self.qweight

    def in_layout(self, layout: str, float_activations: bool = False) -> QuantLinear:
        """The same weights in `layout` (self where nothing changes); the kernel library carries over."""
        if layout == self.layout and float_activations == self.float_activations:
            return self
        if layout == "packed":
            qweight = pack_blocks(self.blocks, self.qtype, self.in_features, self.native)
        else:
            qweight = self.blocks
        bias = None if self.bias is None else self.bias.data
        layer = QuantLinear(
            qweight, self.qtype, self.in_features, bias, layout=layout, float_activations=float_activations
        )
        layer.native, layer.long_inputs_in_bf16 = self.native, self.long_inputs_in_bf16
        return layer

    def native_weight(self) -> NativeWeight | None:
        if self.native is None:
            return None
        return NativeWeight(
            self.qtype,
            self.layout,
            self.qweight,
            self.bias,
            self.out_features,
            self.in_features,
            self.float_activations,
        )

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.blocks, self.qtype, self.in_features, dtype)  # [N, K]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}, "
            f"layout={self.layout}"
        )

    def forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), bias)

    def dequantized_fast(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """`dequantized(dtype)` by the native kernel: the same numbers, on both cores."""
        lib = self.native
        if lib is None or dtype not in (torch.float32, torch.bfloat16):
            return self.dequantized(dtype)
        bf16, threads = int(dtype == torch.bfloat16), torch.get_num_threads()
        N, K, w = self.out_features, self.in_features, self.qweight.data_ptr()
        out = torch.empty(N, K, dtype=dtype)  # [N, K]
        if self.layout == "packed":
            lib.dequant_packed(self.format_code, w, N, K, out.data_ptr(), bf16, threads)
        elif self.qtype in K_QUANT_BYTES:
            lib.dequant_kquant(self.format_code, w, N, K, out.data_ptr(), bf16, threads)
        else:
            lib.dequant_q8_0(w, N, K, out.data_ptr(), bf16, threads)
        return out

    def forward_long(self, x: torch.Tensor) -> torch.Tensor:
        """Many rows (prefill): dequantise once natively, then PyTorch's matrix product. With
        `long_inputs_in_bf16` that product runs in bfloat16 (oneDNN: float32 sums, the result
        rounded to bfloat16): the weight is already 4 or 8 bits, and 8 significant bits for the
        activations and the result is no coarser than the decode kernels' 8-bit activation blocks
        (llama.cpp runs prefill in 8 bits too); see docs/performance.md. The plain path stays float32."""
        if x.dtype == torch.float32 and self.long_inputs_in_bf16:
            y = F.linear(x.to(torch.bfloat16), self._long_weight(torch.bfloat16)).float()  # [..., N]
            return y if self.bias is None else y + self.bias
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self._long_weight(x.dtype), bias)

    def _long_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantised weight [N, K] for forward_long: made anew each call, or kept while holding."""
        if self.held is not None and self.held.dtype == dtype:
            return self.held
        weight = self.dequantized_fast(dtype)
        if self.holding:
            self.held = weight
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N]
        rows = x.numel() // self.in_features
        lib = self.native
        if lib is None or x.device.type != "cpu":
            return self.forward_plain(x)
        if rows > KERNEL_MAX_ROWS:
            return self.forward_long(x)
        N, K, w, threads = self.out_features, self.in_features, self.qweight.data_ptr(), torch.get_num_threads()
        xf = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()  # [..., K]
        y = torch.empty(*x.shape[:-1], N)  # [..., N] float32
        if self.float_activations:
            lib.gemv_q8_0_exact_f32(w, N, K, xf.data_ptr(), rows, y.data_ptr(), threads)
        else:
            product = (
                lib.gemv_packed_f32
                if self.layout == "packed"
                else (lib.gemv_kquant_f32 if self.qtype in K_QUANT_BYTES else lib.gemv_blocks_f32)
            )
            if product(self.format_code, w, N, K, xf.data_ptr(), rows, y.data_ptr(), threads):
                raise MemoryError(f"{self.qtype} product: out of memory for the kernel's scratch buffers")
        if self.bias is not None:
            y += self.bias
        return y if x.dtype == torch.float32 else y.to(x.dtype)


class FastLinear(nn.Module):
    """A float32 or bfloat16 linear layer whose batch-1 product runs natively on every core
    (PyTorch's float32 matrix-vector product runs on one thread)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, native: ctypes.CDLL):
        super().__init__()
        if weight.dtype not in (torch.float32, torch.bfloat16):
            raise LlamascopeError(f"the native float product takes float32 or bfloat16 weights, not {weight.dtype}")
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.bias = bias
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.native = native
        # bfloat16 activations with bfloat16 weights: exact products, float32 sums
        self.bf16_activations = weight.dtype == torch.bfloat16 and weight.shape[1] % 32 == 0

    def native_weight(self) -> NativeWeight:
        fmt = "F32" if self.weight.dtype == torch.float32 else "BF16"
        return NativeWeight(fmt, "rows", self.weight, self.bias, self.out_features, self.in_features)

    def forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N]
        rows = x.numel() // self.in_features
        if rows > KERNEL_MAX_ROWS or x.device.type != "cpu" or x.requires_grad:
            return self.forward_plain(x)
        N, K, threads = self.out_features, self.in_features, torch.get_num_threads()
        y = torch.empty(*x.shape[:-1], N)  # [..., N] float32
        if self.bf16_activations and x.dtype == torch.bfloat16:
            xb = x.contiguous()
            self.native.gemv_bf16_bf16(self.weight.data_ptr(), N, K, xb.data_ptr(), rows, y.data_ptr(), threads)
            y = y.to(torch.bfloat16)
            return y if self.bias is None else y + self.bias
        xf = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()  # [..., K]
        product = self.native.gemv_f32 if self.weight.dtype == torch.float32 else self.native.gemv_bf16
        product(self.weight.data_ptr(), N, K, xf.data_ptr(), rows, y.data_ptr(), threads)
        if x.dtype != torch.float32:
            y = y.to(x.dtype)
        if self.bias is not None:
            y += self.bias
        return y


class QuantEmbedding(nn.Module):
    """Token embeddings kept in a block format (a GGUF's Q8_0 or K-quant token_embd); rows
    dequantised on lookup."""

    def __init__(self, blocks: torch.Tensor, qtype: str, dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.qtype, self.embedding_dim, self.out_dtype = qtype, dim, dtype
        self.register_buffer("blocks", blocks.contiguous())  # [V, dim/32 * bytes]
        self.format_code = kernels.format_code(qtype)  # (kernels.h's enum ls_format)
        self.native: ctypes.CDLL | None = None  # the kernel library (native.attach sets it)

    @property
    def weight(self) -> torch.Tensor:
        """The full dequantised table (plain path; for inspection, not used on the hot path)."""
        return dequantize(self.blocks, self.qtype, self.embedding_dim, self.out_dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, dim]
        rows = self.blocks.index_select(0, tokens.reshape(-1))  # [B*T, row bytes]
        lib = self.native if rows.device.type == "cpu" else None
        if self.qtype in K_QUANT_BYTES and lib is not None and self.out_dtype in (torch.float32, torch.bfloat16):
            # the native dequantiser (gguf-py's numbers, tested) rather than numpy on every lookup
            out = torch.empty(rows.shape[0], self.embedding_dim, dtype=self.out_dtype)  # [B*T, dim]
            lib.dequant_kquant(
                self.format_code,
                rows.data_ptr(),
                rows.shape[0],
                self.embedding_dim,
                out.data_ptr(),
                int(self.out_dtype == torch.bfloat16),
                1,
            )
            return out.reshape(*tokens.shape, -1)
        return dequantize(rows, self.qtype, self.embedding_dim, self.out_dtype).reshape(*tokens.shape, -1)


# ---- whole-model transforms over these layers ---------------------------------------------------


def linear_slots(model: nn.Module):
    """(parent module, attribute name) of each projection and of the LM head; under tensor
    parallelism the slot of a LocalPart's `local` module."""
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for parent, names in (
            (attn, attn.input_projections() + ("o_proj",)),
            (mlp, mlp.input_projections() + ("down_proj",)),
        ):
            for name in names:
                yield local_slot(parent, name)
    yield local_slot(model, "lm_head")


def local_slot(parent: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The slot a transform replaces: (parent, name), or the `local` of a LocalPart there."""
    module = getattr(parent, name)
    return (module, "local") if isinstance(module, LocalPart) else (parent, name)


@contextmanager
def dequantized_once(module: nn.Module) -> Iterator[None]:
    """Inside, each QuantLinear in `module` dequantises its weight at most once, however many
    pieces of a prompt go through it (the same numbers as dequantising for each), and lets it go
    on leaving: the model's layer-by-layer prefill holds one layer's weights at a time."""
    linears = [m for m in module.modules() if isinstance(m, QuantLinear)]
    for linear in linears:
        linear.holding = True
    try:
        yield
    finally:
        for linear in linears:
            linear.holding, linear.held = False, None
