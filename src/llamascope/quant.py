"""Linear layers over quantised and float weights, with fast batch-1 kernels.

Block formats are ggml's (32 weights per block, fp16 scales), so GGUF weights are used as stored
and `--quant int8|int4` quantises float weights into the same formats:

    Q8_0  int8, one scale per block              (8.5 bits per weight)   -- our `int8`
    Q4_0  4-bit, one scale per block, offset 8   (4.5 bits per weight)
    Q4_1  4-bit, scale and minimum per block     (5 bits per weight)     -- our `int4`

GGUF files also bring ggml's K-quants, kept as stored and read by csrc/kquant.c (super-blocks of
256 weights with 4-, 6- or 8-bit sub-block scales; not produced by `--quant`):

    Q2_K  2-bit, scale and minimum per 16        (2.625 bits per weight)
    Q3_K  3-bit, scale per 16                    (3.4375 bits per weight)
    Q4_K  4-bit, scale and minimum per 32        (4.5 bits per weight)
    Q5_K  5-bit, scale and minimum per 32        (5.5 bits per weight)
    Q6_K  6-bit, scale per 16                    (6.5625 bits per weight)

Every layer has a plain path (dequantise, then `F.linear`) that is the reference for its fast path.
Decoding (a few rows of activations) goes through the native kernels in csrc/gemv.c and
csrc/kquant.c; longer inputs (prefill) dequantise the weight once per call and use PyTorch's
matrix multiply.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .model import Linear, RMSNorm
from .errors import LlamascopeError

QK = 32
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}
QK_K = 256
K_QUANT_BYTES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}  # per 256-weight super-block
KEPT_FORMATS = frozenset(BLOCK_BYTES) | frozenset(K_QUANT_BYTES)  # what QuantLinear computes with
QTYPE_CODES = {"Q8_0": 0, "Q4_0": 1, "Q4_1": 2, "Q4_K": 3, "Q5_K": 4, "Q6_K": 5, "Q2_K": 6, "Q3_K": 7}  # as in csrc/gemv.c, kquant.c
QUANT_CHOICES = {"int8": "Q8_0", "int4": "Q4_1", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1"}
# Under --quant the LM head (it decides the token; llama.cpp also keeps the output high) and the
# token embedding (a tied head is the same table) keep 8 bits.
HIGH_QTYPE = "Q8_0"
HIGH_WEIGHTS = ("lm_head.weight", "model.embed_tokens.weight")
# Up to this many activation rows per call, the batch-1 kernels beat dequantise + matmul.
KERNEL_MAX_ROWS = 8
# Temporaries of a format conversion at load stay near this many bytes (rows at a time).
CONVERT_ROWS_BYTES = 16 << 20
# quantize() takes rows of this many float32 bytes at a time; its temporaries come to about five
# times that (with 16 MB slices loading a 296 MB float32 model as int8 grew by twice the int8 weights).
QUANTIZE_ROWS_BYTES = 2 << 20


# ---- block formats: quantise and dequantise (the plain path) -------------------------------

def block_layout(qtype: str) -> tuple[int, int]:
    """(weights, bytes) of one block of a kept format (a K-quant's super-block)."""
    if qtype in BLOCK_BYTES:
        return QK, BLOCK_BYTES[qtype]
    if qtype in K_QUANT_BYTES:
        return QK_K, K_QUANT_BYTES[qtype]
    raise LlamascopeError(f"unsupported block format {qtype!r}")


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """[N, nb] float -> [N, nb, 2] uint8 (little-endian fp16)."""
    return x.to(torch.float16).contiguous().view(torch.uint8).view(*x.shape, 2)


def _fp16_from(b: torch.Tensor) -> torch.Tensor:
    """[N, nb, 2] uint8 -> [N, nb] float32."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """roundf: to the nearest integer, halves away from zero (in place on a temporary of x's size)."""
    return x.abs().add_(0.5).floor_().copysign_(x)


def quantize(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """w [N, K] float -> blocks [N, K/32 * bytes] uint8, following ggml's reference quantisers.

    Rows go a slice at a time (QUANTIZE_ROWS_BYTES), so the temporaries stay small whatever the
    matrix (a whole 49152 x 576 head at once held several copies of its 113 MB)."""
    N, K = w.shape
    if K % QK:
        raise LlamascopeError(f"cannot quantise to {qtype}: input size {K} is not a multiple of {QK}")
    if qtype not in BLOCK_BYTES:
        raise LlamascopeError(f"unknown block format {qtype!r}")
    out = torch.empty(N, K // QK * BLOCK_BYTES[qtype], dtype=torch.uint8, device=w.device)  # [N, row bytes]
    rows = max(1, QUANTIZE_ROWS_BYTES // (K * 4))
    for r in range(0, N, rows):
        out[r:r + rows] = _quantize_rows(w[r:r + rows], qtype)
    return out


def _quantize_rows(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """quantize() of a few rows, all at once."""
    N, K = w.shape
    x = w.float().reshape(N, K // QK, QK)  # [N, nb, 32]
    if qtype == "Q8_0":
        d = x.abs().amax(-1) / 127  # [N, nb]
        inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
        q = _round_half_away(x * inv[..., None]).clamp_(-128, 127).to(torch.int8)
        return torch.cat([_fp16_bytes(d), q.view(torch.uint8)], -1).reshape(N, -1)
    if qtype == "Q4_0":
        idx = x.abs().argmax(-1, keepdim=True)
        peak = x.gather(-1, idx).squeeze(-1)  # signed value of largest magnitude
        d = peak / -8
        inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
        q = (x * inv[..., None]).add_(8.5).trunc_().clamp_(max=15).to(torch.uint8)
        packed = q[..., :16] | (q[..., 16:] << 4)  # [N, nb, 16]
        return torch.cat([_fp16_bytes(d), packed], -1).reshape(N, -1)
    # Q4_1
    lo, hi = x.amin(-1), x.amax(-1)
    d = (hi - lo) / 15
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = (x - lo[..., None]).mul_(inv[..., None]).add_(0.5).trunc_().clamp_(max=15).to(torch.uint8)
    packed = q[..., :16] | (q[..., 16:] << 4)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(lo), packed], -1).reshape(N, -1)


def dequantize(blocks: torch.Tensor, qtype: str, K: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """blocks [N, K/32 * bytes] uint8 (K-quants: [N, K/256 * bytes]) -> w [N, K] at `dtype`.
    K-quants go through gguf-py's reference dequantiser (ggml's arithmetic, in numpy)."""
    N = blocks.shape[0]
    if qtype in K_QUANT_BYTES:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize as gguf_dequantize

        values = gguf_dequantize(blocks.cpu().numpy(), GGMLQuantizationType[qtype])  # [N, K] float32
        return torch.from_numpy(values.reshape(N, K)).to(device=blocks.device, dtype=dtype)
    b = blocks.reshape(N, K // QK, BLOCK_BYTES[qtype])  # [N, nb, bytes]
    d = _fp16_from(b[..., 0:2])[..., None]  # [N, nb, 1]
    if qtype == "Q8_0":
        w = b[..., 2:].contiguous().view(torch.int8).float() * d
    else:
        packed = b[..., 4:] if qtype == "Q4_1" else b[..., 2:]  # [N, nb, 16]
        q = torch.cat([packed & 0x0F, packed >> 4], -1).float()  # [N, nb, 32]
        w = q * d + _fp16_from(b[..., 2:4])[..., None] if qtype == "Q4_1" else (q - 8) * d
    return w.reshape(N, K).to(dtype)


def q5_0_as_q8_0(blocks: torch.Tensor, K: int) -> torch.Tensor:
    """ggml Q5_0 blocks [N, K/32 * 22] -> Q8_0 blocks [N, K/32 * 34] of the same numbers.

    Q5_0 (d:f16, qh:u32, qs:u8[16]) stores w = d * (q - 16), q in 0..31 from a nibble of qs (low
    nibbles: weights 0-15, high: 16-31) and bit j of qh as the fifth bit of weight j. q - 16 fits
    in int8, so the block is Q8_0's d * q exactly, which the Q8_0 kernels read (llama.cpp's
    Q4_K_M files store Q5_0 where a row is not a whole number of 256-weight super-blocks)."""
    N, nb = blocks.shape[0], K // QK
    src = blocks.reshape(N, nb, 22)
    out = torch.empty(N, nb, 34, dtype=torch.uint8)  # [N, nb, 34]
    out[..., 0:2] = src[..., 0:2]  # d
    shifts = torch.arange(8, dtype=torch.uint8)
    rows = max(1, CONVERT_ROWS_BYTES // max(1, nb * 34 * 8))  # bounded temporaries, in uint8 throughout
    for r in range(0, N, rows):
        b = src[r:r + rows]  # [n, nb, 22]
        fifth = ((b[..., 2:6, None] >> shifts) & 1).reshape(*b.shape[:2], 32) << 4  # [n, nb, 32]: bit j of qh
        qs = b[..., 6:22]  # [n, nb, 16]
        q = out[r:r + rows, :, 2:]  # [n, nb, 32]
        q[..., :16] = (qs & 0x0F) | fifth[..., :16]
        q[..., 16:] = (qs >> 4) | fifth[..., 16:]
        q -= 16  # (uint8 wraps to the int8 two's complement of q - 16)
    return out.reshape(N, nb * 34)


PACKED_QTYPES = ("Q8_0", "Q4_0", "Q4_1")  # kept in the kernel's repacked layout where the native kernels run
PACKED_GROUP_BYTES = {"Q8_0": 136, "Q4_0": 72, "Q4_1": 80}


def pack_blocks(blocks: torch.Tensor, qtype: str, K: int) -> torch.Tensor:
    """ggml Q8_0 / Q4_0 / Q4_1 blocks [N, nb * bytes] -> the kernel's rows [N, nbp/4 * group bytes]
    (csrc/gemv.c): per group of four blocks, Q4: their packed nibbles (64 bytes), their f16 scales d
    (8 bytes) and for Q4_1 their f16 minimums m (8 bytes); Q8_0: weights 0-15 of each block, then
    16-31 of each, as q + 128 (128 bytes), then d (8 bytes). nbp is nb rounded up to a multiple of 4
    with zero blocks (d = m = 0, q = 0)."""
    N, nb = blocks.shape[0], K // QK
    nbp = (nb + 3) // 4 * 4
    size, group_bytes = BLOCK_BYTES[qtype], PACKED_GROUP_BYTES[qtype]
    out = torch.empty(N, nbp // 4 * group_bytes, dtype=torch.uint8)  # [N, G * group bytes]
    # A slice of rows at a time into the result: whole, the padded copy and the gathered nibbles of
    # a 1.1B model's 37 MB Q4_0 head held 100 MB more while loading.
    rows = max(1, CONVERT_ROWS_BYTES // max(1, 3 * nbp * size))  # (three temporaries a slice)
    for r in range(0, N, rows):
        n = min(rows, N - r)
        b = F.pad(blocks[r:r + n].reshape(n, nb, size), (0, 0, 0, nbp - nb))  # [n, nbp, bytes]
        groups = b.reshape(n, nbp // 4, 4, size)  # [n, G, 4, bytes]
        dest = out[r:r + n].view(n, nbp // 4, group_bytes)  # [n, G, group bytes]
        if qtype == "Q8_0":
            dest[..., :64] = groups[..., 2:18].reshape(n, nbp // 4, 64) ^ 0x80  # (int8 q + 128 as uint8)
            dest[..., 64:128] = groups[..., 18:34].reshape(n, nbp // 4, 64) ^ 0x80
            dest[..., 128:136] = groups[..., 0:2].reshape(n, nbp // 4, 8)
            continue
        dest[..., :64] = groups[..., -16:].reshape(n, nbp // 4, 64)
        dest[..., 64:72] = groups[..., 0:2].reshape(n, nbp // 4, 8)
        if qtype == "Q4_1":
            dest[..., 72:80] = groups[..., 2:4].reshape(n, nbp // 4, 8)
    return out


def unpack_blocks(packed: torch.Tensor, qtype: str, K: int) -> torch.Tensor:
    """The inverse of pack_blocks."""
    N, nb = packed.shape[0], K // QK
    nbp = (nb + 3) // 4 * 4
    groups = packed.reshape(N, nbp // 4, PACKED_GROUP_BYTES[qtype])  # [N, G, group bytes]
    if qtype == "Q8_0":
        first = (groups[..., :64] ^ 0x80).reshape(N, nbp, 16)
        last = (groups[..., 64:128] ^ 0x80).reshape(N, nbp, 16)
        parts = [groups[..., 128:136].reshape(N, nbp, 2), first, last]
    else:
        q = groups[..., :64].reshape(N, nbp, 16)
        d = groups[..., 64:72].reshape(N, nbp, 2)
        parts = [d] + ([groups[..., 72:80].reshape(N, nbp, 2)] if qtype == "Q4_1" else []) + [q]
    return torch.cat(parts, dim=-1)[:, :nb].reshape(N, -1).contiguous()  # [N, nb * bytes]


# ---- layers ---------------------------------------------------------------------------------

class QuantLinear(nn.Module):
    """y = x @ W^T (+ b) with W kept in a block format."""

    def __init__(self, blocks: torch.Tensor, qtype: str, in_features: int, bias: torch.Tensor | None = None,
                 *, packed: bool = False, head: bool = False):
        """`blocks`: uint8 [N, row bytes] in ggml's block format, or with `packed` (Q8_0 / Q4 with the
        native kernels only) already in the kernel's layout, as another layer's `packed` rows.
        `head`: an LM head, whose Q8_0 blocks stay in ggml's layout for the float-activation kernel
        (`use_float_activations`) and may be a tied embedding's own blocks, not a copy."""
        super().__init__()
        size, nbytes = block_layout(qtype)
        if in_features % size:
            raise LlamascopeError(f"{qtype} weights need an input size that is a multiple of {size}, not {in_features}")
        if not packed and (blocks.dim() != 2 or blocks.shape[1] != in_features // size * nbytes):
            raise LlamascopeError(f"{qtype} weights of input size {in_features} take {in_features // size * nbytes} "
                                  f"bytes a row, got blocks of shape {list(blocks.shape)}")
        self.qtype, self.in_features, self.out_features = qtype, in_features, blocks.shape[0]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        lib = kernels.load() if blocks.device.type == "cpu" else None  # native kernels are the CPU's
        self._code = QTYPE_CODES[qtype]
        if lib is not None and qtype in PACKED_QTYPES and not (head and qtype == "Q8_0" and not packed):
            # Kept only in the kernel's layout (same numbers, see csrc/gemv.c); `blocks` rebuilds ggml's.
            self.register_buffer("packed", blocks if packed else pack_blocks(blocks, qtype, in_features))  # [N, row bytes]
            self._kernel = lib.gemv_packed_f32
        elif packed:
            raise LlamascopeError("packed rows need the native kernels")
        else:
            self.register_buffer("stored", blocks.contiguous())  # [N, K/32 (K-quants K/256) * bytes] uint8
            if lib is None:
                self._kernel = None
            else:
                self._kernel = lib.gemv_kquant_f32 if qtype in K_QUANT_BYTES else lib.gemv_blocks_f32
        self._exact_kernel = None
        # (oneDNN's bfloat16 product is fast where the CPU has AVX512-BF16, whichever kernel build runs)
        self.long_inputs_in_bf16 = lib is not None and kernels.cpu_has("avx512_bf16")

    def use_float_activations(self) -> None:
        """Keep the activations in float32 (Q8_0 only): for the LM head, where 8-bit activations
        next to the final hidden state's outlier channels can swap the top candidates."""
        lib = kernels.load()
        self.long_inputs_in_bf16 = False
        if lib is not None and self.qtype == "Q8_0":
            if hasattr(self, "packed"):  # (a head built without head=True) back to ggml's layout
                stored = unpack_blocks(self.packed, self.qtype, self.in_features)
                del self.packed
                self.register_buffer("stored", stored)
                self._kernel = lib.gemv_blocks_f32
            self._exact_kernel = lib.gemv_q8_0_exact_f32

    @property
    def blocks(self) -> torch.Tensor:
        """The weight in ggml's block format, uint8 [N, K/32 * bytes]."""
        if hasattr(self, "packed"):
            return unpack_blocks(self.packed, self.qtype, self.in_features)
        return self.stored

    def _weight_ptr(self) -> int:
        return self.packed.data_ptr() if hasattr(self, "packed") else self.stored.data_ptr()

    @classmethod
    def from_float(cls, linear: nn.Linear | torch.Tensor, qtype: str) -> "QuantLinear":
        weight = linear.weight if isinstance(linear, nn.Linear) else linear
        bias = linear.bias if isinstance(linear, nn.Linear) else None
        return cls(quantize(weight.detach(), qtype), qtype, weight.shape[1],
                   None if bias is None else bias.detach().float())

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.blocks, self.qtype, self.in_features, dtype)  # [N, K]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}"

    def forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), bias)

    def dequantized_fast(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """`dequantized(dtype)` by the native kernel: the same numbers, on both cores."""
        lib = kernels.load()
        if lib is None or dtype not in (torch.float32, torch.bfloat16):
            return self.dequantized(dtype)
        bf16 = int(dtype == torch.bfloat16)
        out = torch.empty(self.out_features, self.in_features, dtype=dtype)  # [N, K]
        if hasattr(self, "packed"):
            lib.dequant_packed(self._code, self.packed.data_ptr(), self.out_features, self.in_features,
                                  out.data_ptr(), bf16, torch.get_num_threads())
        elif self.qtype in K_QUANT_BYTES:
            lib.dequant_kquant(self._code, self.stored.data_ptr(), self.out_features, self.in_features,
                               out.data_ptr(), bf16, torch.get_num_threads())
        else:
            lib.dequant_q8_0(self.stored.data_ptr(), self.out_features, self.in_features, out.data_ptr(),
                             bf16, torch.get_num_threads())
        return out

    def forward_long(self, x: torch.Tensor) -> torch.Tensor:
        """Many rows (prefill): dequantise once natively, then PyTorch's matrix product. With
        `long_inputs_in_bf16` (the default where the CPU has AVX512-BF16) that product runs in
        bfloat16 (oneDNN: float32 sums, the result rounded to bfloat16): the weight is already 4 or 8
        bits, and 8 significant bits for the activations and the result is no coarser than the
        decode kernels' 8-bit activation blocks (llama.cpp runs prefill in 8 bits too); it runs the
        product about 2.5x faster. The plain path stays float32."""
        if x.dtype == torch.float32 and self.long_inputs_in_bf16:
            y = F.linear(x.to(torch.bfloat16), self.dequantized_fast(torch.bfloat16)).float()  # [..., N]
            return y if self.bias is None else y + self.bias
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_fast(x.dtype), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N]
        rows = x.numel() // self.in_features
        if self._kernel is None or x.device.type != "cpu":
            return self.forward_plain(x)
        if rows > KERNEL_MAX_ROWS:
            return self.forward_long(x)
        N = self.out_features
        xf = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()  # [..., K]
        y = torch.empty(*x.shape[:-1], N)  # [..., N] float32
        if self._exact_kernel is not None:
            self._exact_kernel(self.stored.data_ptr(), N, self.in_features, xf.data_ptr(), rows, y.data_ptr(),
                               torch.get_num_threads())
        elif self._kernel(self._code, self._weight_ptr(), N, self.in_features, xf.data_ptr(), rows, y.data_ptr(),
                          torch.get_num_threads()):
            raise MemoryError(f"{self.qtype} product: out of memory for the kernel's scratch buffers")
        if self.bias is not None:
            y += self.bias
        return y if x.dtype == torch.float32 else y.to(x.dtype)


class FastLinear(nn.Module):
    """A float32 or bfloat16 linear layer whose batch-1 product uses both cores.

    (PyTorch's float32 matrix-vector product runs on one thread; bfloat16 goes through oneDNN.)
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.bias = bias
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        lib = kernels.load()
        name = {torch.float32: "gemv_f32", torch.bfloat16: "gemv_bf16"}.get(weight.dtype)
        self._kernel = getattr(lib, name) if lib is not None and name else None
        # bfloat16 activations with bfloat16 weights: exact products, float32 sums
        self._bf16_kernel = None
        if lib is not None and weight.dtype == torch.bfloat16 and weight.shape[1] % 32 == 0:
            self._bf16_kernel = lib.gemv_bf16_bf16

    def forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self._kernel is None or rows > KERNEL_MAX_ROWS or x.device.type != "cpu" or x.requires_grad:
            return self.forward_plain(x)
        y = torch.empty(*x.shape[:-1], self.out_features)  # [..., N] float32
        if self._bf16_kernel is not None and x.dtype == torch.bfloat16:
            xb = x.contiguous()
            self._bf16_kernel(self.weight.data_ptr(), self.out_features, self.in_features, xb.data_ptr(), rows,
                              y.data_ptr(), torch.get_num_threads())
            y = y.to(torch.bfloat16)
            return y if self.bias is None else y + self.bias
        xf = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()  # [..., K]
        self._kernel(self.weight.data_ptr(), self.out_features, self.in_features, xf.data_ptr(), rows,
                     y.data_ptr(), torch.get_num_threads())
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

    @property
    def weight(self) -> torch.Tensor:
        """The full dequantised table (plain path; for inspection, not used on the hot path)."""
        return dequantize(self.blocks, self.qtype, self.embedding_dim, self.out_dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, dim]
        rows = self.blocks.index_select(0, tokens.reshape(-1))  # [B*T, row bytes]
        lib = kernels.load() if rows.device.type == "cpu" else None
        if self.qtype in K_QUANT_BYTES and lib is not None and self.out_dtype in (torch.float32, torch.bfloat16):
            # the native dequantiser (gguf-py's numbers, tested) rather than numpy on every lookup
            out = torch.empty(rows.shape[0], self.embedding_dim, dtype=self.out_dtype)  # [B*T, dim]
            lib.dequant_kquant(QTYPE_CODES[self.qtype], rows.data_ptr(), rows.shape[0], self.embedding_dim,
                               out.data_ptr(), int(self.out_dtype == torch.bfloat16), 1)
            return out.reshape(*tokens.shape, -1)
        return dequantize(rows, self.qtype, self.embedding_dim, self.out_dtype).reshape(*tokens.shape, -1)


# ---- whole-model transforms ---------------------------------------------------------------------

def _linear_slots(model: nn.Module):
    """(parent module, attribute name) of each projection and of the LM head."""
    for layer in model.model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj")),
                              (layer.mlp, ("gate_proj", "up_proj", "gate_up_proj", "down_proj"))):
            for name in names:
                if getattr(parent, name, None) is not None:  # fused layers replace their parts
                    yield _local_slot(parent, name)
    yield _local_slot(model, "lm_head")


def _local_slot(parent: nn.Module, name: str) -> tuple[nn.Module, str]:
    """Under tensor parallelism, o_proj, down_proj and the LM head are wrappers that hold the
    module computing this rank's part as `local` (parallel.RowParallelLinear, VocabParallelHead):
    transforms replace that one and the wrapper keeps its collective."""
    module = getattr(parent, name)
    return (module, "local") if isinstance(getattr(module, "local", None), nn.Module) else (parent, name)


def quant_qtype(quant: str) -> str:
    """The block format `--quant` gives the projections (the head and embedding: HIGH_QTYPE)."""
    qtype = QUANT_CHOICES.get(quant.lower())
    if qtype is None:
        raise LlamascopeError(f"--quant {quant!r}: expected one of int8, int4, q8_0, q4_0, q4_1")
    return qtype


def quantize_model(model: nn.Module, quant: str) -> nn.Module:
    """Replace each float projection with a QuantLinear in `quant`'s format, the LM head with a
    Q8_0 one and the token embedding with a Q8_0 QuantEmbedding (a tied head shares its blocks):
    the weights `load_model(quant=...)` builds while reading, from a model already in memory."""
    model.decode_step = None  # it points at the modules being replaced: decode_step.enable again after
    qtype = quant_qtype(quant)
    head = _local_slot(model, "lm_head")
    embed = model.model.embed_tokens
    float_embedding = type(embed) is nn.Embedding
    tied = float_embedding and head == (model, "lm_head") and model.lm_head.weight.data_ptr() == embed.weight.data_ptr()
    for parent, name in _linear_slots(model):
        module = getattr(parent, name)
        if (parent, name) == head and tied:
            continue  # it becomes the embedding's blocks below
        layer_qtype = HIGH_QTYPE if (parent, name) == head else qtype
        if isinstance(module, (nn.Linear, FastLinear)):
            bias = None if module.bias is None else module.bias.detach().float()
            setattr(parent, name, QuantLinear(quantize(module.weight.detach(), layer_qtype), layer_qtype,
                                              module.in_features, bias, head=(parent, name) == head))
    if float_embedding:
        blocks = quantize(embed.weight.detach(), HIGH_QTYPE)
        model.model.embed_tokens = QuantEmbedding(blocks, HIGH_QTYPE, embed.embedding_dim, embed.weight.dtype)
        if tied:
            model.lm_head = QuantLinear(blocks, HIGH_QTYPE, embed.embedding_dim, head=True)
    return model


def native_kernel_modules(model: nn.Module):
    """The names of the model's modules that call a native kernel: FastLinear / QuantLinear with one,
    and the RMSNorm, attention and MLP modules `accelerate_model` gave theirs ("" is the model)."""
    for name, module in model.named_modules():
        if any(getattr(module, attr, None) is not None
               for attr in ("_kernel", "kernel", "decode_kernel", "rope_kernel", "prefill_kernel", "act_kernel")):
            yield name


def accelerate_model(model: nn.Module) -> nn.Module:
    """Give float projections the two-core batch-1 kernels (same weights, shared, no copy), and
    RMSNorm, SiLU(gate) * up, a prompt's RoPE and attention, and one-token attention their
    native float32 versions (split over the threads for a prompt's rows)."""
    model.decode_step = None  # it points at the modules being replaced: decode_step.enable again after
    lib = kernels.load()
    if lib is None:
        return model
    parent, name = _local_slot(model, "lm_head")
    if isinstance(getattr(parent, name), QuantLinear):
        getattr(parent, name).use_float_activations()
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.kernel = lib.rmsnorm_rows_f32
        elif hasattr(module, "decode_kernel"):
            module.decode_kernel = lib.decode_attention_f32
            module.rope_kernel = lib.rope_rows_f32
            module.prefill_kernel = lib.prefill_attention_f32
        elif hasattr(module, "act_kernel"):
            module.act_kernel = lib.silu_mul_rows_f32
    for parent, name in _linear_slots(model):
        module = getattr(parent, name)
        if isinstance(module, nn.Linear) and module.weight.dtype in (torch.float32, torch.bfloat16):
            setattr(parent, name, FastLinear(module.weight, module.bias))
    return model


def install_block_weights(model: nn.Module, blocks: dict[str, tuple[str, torch.Tensor]], dtype: torch.dtype) -> None:
    """Put weights kept in a block format into the model: projections and the LM head become
    QuantLinear, the token embedding a QuantEmbedding (a tied LM head shares its blocks)."""
    config = model.config
    for name, (qtype, data) in blocks.items():
        path = name.removesuffix(".weight")
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if name == "model.embed_tokens.weight":
            parent.embed_tokens = QuantEmbedding(data, qtype, config.hidden_size, dtype)
            if config.tie_word_embeddings:
                model.lm_head = QuantLinear(data, qtype, config.hidden_size, head=True)
        else:
            old = getattr(parent, attr)
            bias = getattr(old, "bias", None)
            bias = None if bias is None or bias.is_meta else bias.detach().float()
            setattr(parent, attr, QuantLinear(data, qtype, old.in_features, bias, head=name == "lm_head.weight"))


def _fused(modules: list[nn.Module]) -> nn.Module | None:
    """One layer computing the given layers' outputs side by side, or None where they differ in kind."""
    biases = [m.bias for m in modules]
    if any(b is not None for b in biases) and any(b is None for b in biases):
        return None
    bias = None if biases[0] is None else torch.cat([b.detach().float() for b in biases])
    if all(isinstance(m, QuantLinear) for m in modules) and len({m.qtype for m in modules}) == 1:
        qtype, K = modules[0].qtype, modules[0].in_features
        if all(hasattr(m, "packed") for m in modules):  # rows are independent in the kernel's layout too
            return QuantLinear(torch.cat([m.packed for m in modules]), qtype, K, bias, packed=True)
        return QuantLinear(torch.cat([m.blocks for m in modules]), qtype, K, bias)
    if all(isinstance(m, (nn.Linear, FastLinear)) for m in modules) and len({m.weight.dtype for m in modules}) == 1:
        weight = torch.cat([m.weight.detach() for m in modules])
        bias = None if bias is None else bias.to(weight.dtype)
        return FastLinear(weight, bias) if kernels.load() is not None else _linear(weight, bias)
    return None


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    with torch.device("meta"):
        layer = Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


def fuse_projections(model: nn.Module) -> nn.Module:
    """q, k and v (and gate and up) as one product each: half the calls per layer, and the
    activations are read (and quantised) once. Outputs are the same numbers as separate layers."""
    model.decode_step = None  # it points at the modules being replaced: decode_step.enable again after
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if getattr(attn, "qkv_proj", None) is None:
            fused = _fused([attn.q_proj, attn.k_proj, attn.v_proj])
            if fused is not None:
                attn.fuse(fused)
        if getattr(mlp, "gate_up_proj", None) is None:
            fused = _fused([mlp.gate_proj, mlp.up_proj])
            if fused is not None:
                mlp.fuse(fused)
    return model
