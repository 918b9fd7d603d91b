"""Weight block formats: ggml's layouts, quantised and dequantised on the plain path.

Formats of 32 weights a block with fp16 scales, so GGUF weights are used as stored and
`--quant int8|int4` quantises float weights into the same formats:

    Q8_0  int8, one scale per block              (8.5 bits per weight)   -- our `int8`
    Q4_0  4-bit, one scale per block, offset 8   (4.5 bits per weight)
    Q4_1  4-bit, scale and minimum per block     (5 bits per weight)     -- our `int4`

GGUF files also bring ggml's K-quants, kept as stored (super-blocks of 256 weights with 4-, 6- or
8-bit sub-block scales; dequantised here by gguf-py's reference, read natively by csrc/kquant.c;
not produced by `--quant`):

    Q2_K  2-bit, scale and minimum per 16        (2.625 bits per weight)
    Q3_K  3-bit, scale per 16                    (3.4375 bits per weight)
    Q4_K  4-bit, scale and minimum per 32        (4.5 bits per weight)
    Q5_K  5-bit, scale and minimum per 32        (5.5 bits per weight)
    Q6_K  6-bit, scale per 16                    (6.5625 bits per weight)

The native kernels keep Q8_0, Q4_0 and Q4_1 in a layout of their own, four blocks to a group
(`pack_blocks`, csrc/gemv.c); `unpack_blocks` gives ggml's back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from .choices import QUANT_CHOICES
from .errors import LlamascopeError
from .kernels import format_code

QK = 32
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}
QK_K = 256
K_QUANT_BYTES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}  # per 256-weight super-block
KEPT_FORMATS = frozenset(BLOCK_BYTES) | frozenset(K_QUANT_BYTES)  # what QuantLinear computes with
# Under --quant the LM head (it decides the token; llama.cpp also keeps the output high) and the
# token embedding (a tied head is the same table) keep 8 bits.
HIGH_QTYPE = "Q8_0"
HIGH_WEIGHTS = ("lm_head.weight", "model.embed_tokens.weight")
# Temporaries of a format conversion at load stay near this many bytes (rows at a time).
CONVERT_ROWS_BYTES = 16 << 20
# quantize() takes rows of this many float32 bytes at a time; its temporaries come to about five
# times that, so loading with --quant holds little beyond the quantised weights.
QUANTIZE_ROWS_BYTES = 2 << 20


# ---- block formats: quantise and dequantise (the plain path) -------------------------------


def block_layout(qtype: str) -> tuple[int, int]:
    """(weights, bytes) of one block of a kept format (a K-quant's super-block)."""
    if qtype in BLOCK_BYTES:
        return QK, BLOCK_BYTES[qtype]
    if qtype in K_QUANT_BYTES:
        return QK_K, K_QUANT_BYTES[qtype]
    raise LlamascopeError(f"unsupported block format {qtype!r}")


def quant_format(quant: str) -> str:
    """The block format a `--quant` name gives the projections (the LM head and embedding: HIGH_QTYPE)."""
    qtype = QUANT_CHOICES.get(quant.lower())
    if qtype is None:
        raise LlamascopeError(f"--quant {quant!r}: expected one of {', '.join(QUANT_CHOICES)}")
    return qtype


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
    matrix (at once, a large LM head would be held several times over)."""
    N, K = w.shape
    if K % QK:
        raise LlamascopeError(f"cannot quantise to {qtype}: input size {K} is not a multiple of {QK}")
    if qtype not in BLOCK_BYTES:
        raise LlamascopeError(f"unknown block format {qtype!r}")
    out = torch.empty(N, K // QK * BLOCK_BYTES[qtype], dtype=torch.uint8, device=w.device)  # [N, row bytes]
    rows = max(1, QUANTIZE_ROWS_BYTES // (K * 4))
    for r in range(0, N, rows):
        out[r : r + rows] = _quantize_rows(w[r : r + rows], qtype)
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
        b = src[r : r + rows]  # [n, nb, 22]
        fifth = ((b[..., 2:6, None] >> shifts) & 1).reshape(*b.shape[:2], 32) << 4  # [n, nb, 32]: bit j of qh
        qs = b[..., 6:22]  # [n, nb, 16]
        q = out[r : r + rows, :, 2:]  # [n, nb, 32]
        q[..., :16] = (qs & 0x0F) | fifth[..., :16]
        q[..., 16:] = (qs >> 4) | fifth[..., 16:]
        q -= 16  # (uint8 wraps to the int8 two's complement of q - 16)
    return out.reshape(N, nb * 34)


PACKED_QTYPES = ("Q8_0", "Q4_0", "Q4_1")  # kept in the kernel's repacked layout where the native kernels run
PACKED_GROUP_BYTES = {"Q8_0": 136, "Q4_0": 72, "Q4_1": 80}


def packed_row_bytes(qtype: str, K: int) -> int:
    """Bytes of one row of K weights in the kernels' packed layout (see pack_blocks)."""
    return (K // QK + 3) // 4 * PACKED_GROUP_BYTES[qtype]


def pack_blocks(blocks: torch.Tensor, qtype: str, K: int, lib=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """ggml Q8_0 / Q4_0 / Q4_1 blocks [N, nb * bytes] -> the kernel's rows [N, nbp/4 * group bytes]
    (csrc/gemv.c): per group of four blocks, Q4: their packed nibbles (64 bytes), their f16 scales d
    (8 bytes) and for Q4_1 their f16 minimums m (8 bytes); Q8_0: weights 0-15 of each block, then
    16-31 of each, as q + 128 (128 bytes), then d (8 bytes). nbp is nb rounded up to a multiple of 4
    with zero blocks (d = m = 0, q = 0). With the kernel library `lib`, its pack_blocks does it (the
    same bytes, at memory speed; loading a quantised model spent most of its time here). `out`: a
    contiguous uint8 [N, packed_row_bytes] to write into (rows of a fused layer's buffer, say)."""
    N, nb = blocks.shape[0], K // QK
    nbp = (nb + 3) // 4 * 4
    size, group_bytes = BLOCK_BYTES[qtype], PACKED_GROUP_BYTES[qtype]
    width = nbp // 4 * group_bytes
    if out is None:
        out = torch.empty(N, width, dtype=torch.uint8)  # [N, G * group bytes]
    elif out.shape != (N, width) or out.dtype != torch.uint8 or not out.is_contiguous():
        raise ValueError(f"pack_blocks: out is {list(out.shape)} {out.dtype}, not [{N}, {width}] uint8")
    if lib is not None and blocks.is_contiguous() and blocks.device.type == "cpu":
        lib.pack_blocks(format_code(qtype), blocks.data_ptr(), N, K, out.data_ptr(), torch.get_num_threads())
        return out
    # A slice of rows at a time into the result: whole, the padded copy and the gathered nibbles of a
    # large head would each be held beside it while loading.
    rows = max(1, CONVERT_ROWS_BYTES // max(1, 3 * nbp * size))  # (three temporaries a slice)
    for r in range(0, N, rows):
        n = min(rows, N - r)
        b = F.pad(blocks[r : r + n].reshape(n, nb, size), (0, 0, 0, nbp - nb))  # [n, nbp, bytes]
        groups = b.reshape(n, nbp // 4, 4, size)  # [n, G, 4, bytes]
        dest = out[r : r + n].view(n, nbp // 4, group_bytes)  # [n, G, group bytes]
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
