"""The LLaMA transformer: `forward(tokens[B,T], positions[B,T], cache, mask) -> logits[B,T,V]`.

Parameter names follow Hugging Face's LlamaForCausalLM (`model.layers.0.self_attn.q_proj.weight`,
...), so a checkpoint's state dict loads without renaming. Numerics follow transformers'
implementation step by step (RMSNorm in float32, RoPE tables in float32 cast to the activation
dtype, rotate-half layout), which is what makes greedy tokens match it. With the native kernels
(native.attach) a float32 model's RMSNorm, SiLU, attention and decode steps run in C:
the same formulas, summed in another order (float32 rounding apart; tests compare them).

Named points: with a `Capture` (activations.py) the forward pass passes each named activation
through `capture.tap(name, x)`, which records it and may edit it: `embed`, each block's `input`,
`attn_out`, `mid`, `mlp_out` and `output`, `norm`, `logits`; inside the layers the capture names, the
tensors of transformers' modules (`q_proj` ... `down_proj`, RoPE'd q and k, attention weights, each
head's output), computed on the plain path. With `capture=None` nothing is tapped or computed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .activations import Capture
from .cache import KVCache
from .config import ModelConfig, longrope_attention_factor
from .errors import LlamascopeError
from .layers import Linear
from .prefill import PrefillRun, prefill_spans

# ---- rotary embeddings: one function per rope_type ---------------------------------------------


def _default_inv_freq(config: ModelConfig, seq_len: int | None = None) -> torch.Tensor:
    dim = config.head_dim
    return 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))  # [D/2]


def _linear_inv_freq(config: ModelConfig, seq_len: int | None = None) -> torch.Tensor:
    return _default_inv_freq(config) / config.rope_scaling["factor"]


def _dynamic_inv_freq(config: ModelConfig, seq_len: int | None = None) -> torch.Tensor:
    """NTK-aware scaling: the base grows once the sequence passes the trained context."""
    max_pos = config.rope_scaling.get("original_max_position_embeddings", config.max_position_embeddings)
    if seq_len is None or seq_len <= max_pos:
        return _default_inv_freq(config)
    factor, dim = config.rope_scaling["factor"], config.head_dim
    base = config.rope_theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3_inv_freq(config: ModelConfig, seq_len: int | None = None) -> torch.Tensor:
    """LLaMA 3.1: low frequencies divided by `factor`, high ones kept, a smooth blend between."""
    scaling = config.rope_scaling
    inv_freq = _default_inv_freq(config)
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _longrope_inv_freq(config: ModelConfig, seq_len: int | None = None) -> torch.Tensor:
    """Phi-3's LongRoPE: each frequency divided by its own factor, the short list within the
    trained context and the long one past it (chosen by the call's sequence length)."""
    scaling = config.rope_scaling
    long = seq_len is not None and seq_len > scaling["original_max_position_embeddings"]
    factors = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32)  # [D/2]
    dim = config.head_dim
    return 1.0 / (factors * config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


ROPE_INIT = {
    "default": _default_inv_freq,
    "linear": _linear_inv_freq,
    "dynamic": _dynamic_inv_freq,
    "llama3": _llama3_inv_freq,
    "longrope": _longrope_inv_freq,
}


def rope_attention_scaling(config: ModelConfig) -> float:
    """The factor cos and sin are multiplied by: LongRoPE's attention_factor (given, or
    config.longrope_attention_factor's default), else 1."""
    if config.rope_type != "longrope":
        return 1.0
    scaling = config.rope_scaling
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    trained = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or config.max_position_embeddings / trained
    return longrope_attention_factor(factor, trained)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for explicit positions, computed in float32 like transformers."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.inv_freq_fn = ROPE_INIT[config.rope_type]
        self.attention_scaling = rope_attention_scaling(config)
        with torch.device("cpu"):  # a few numbers: computed here even when the model is built on "meta"
            inv_freq = self.inv_freq_fn(config)  # [D/2]
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if self.config.rope_varies_with_length:
            seq_len = int(positions.max()) + 1
            inv_freq = self.inv_freq_fn(self.config, seq_len).to(positions.device)
        freqs = positions[:, :, None].float() * inv_freq[None, None, :].float()  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, D]
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos, sin: [B, T, D]."""
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, D]
    return (x * cos) + (rotate_half(x) * sin)


def check_token_ids(ids: list[int], vocab_size: int, where: str = "") -> None:
    """Refuse, by name, an id outside the embedding table (PyTorch would fail deep inside its
    embedding; a native lookup would read outside the table). `where` prefixes the message."""
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):
        bad = next(t for t in ids if not 0 <= t < vocab_size)
        raise LlamascopeError(f"{where}token id {bad} is outside the vocabulary (0..{vocab_size - 1})")


def _tap(capture: Capture | None, name: str, x: torch.Tensor, prefix: str = "") -> torch.Tensor:
    """x, recorded or edited at point `prefix + name` when there is a capture (activations.py);
    without one nothing, not even the name, is made."""
    return x if capture is None else capture.tap(prefix + name, x)


# ---- blocks ------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.native = None  # the kernel library (native.attach sets it): float32 rows natively

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.native is not None
            and x.dtype == torch.float32
            and x.is_contiguous()
            and not x.requires_grad
            and x.device.type == "cpu"
        ):
            out = torch.empty_like(x)
            self.native.rmsnorm_rows_f32(
                x.data_ptr(),
                self.weight.data_ptr(),
                out.data_ptr(),
                x.numel() // x.shape[-1],
                x.shape[-1],
                self.eps,
                torch.get_num_threads(),
            )
            return out
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.point = f"layers.{layer_index}.self_attn."  # (the names of its capture points)
        self.head_dim = config.head_dim
        h, qkv_bias = config.hidden_size, config.qkv_bias
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.q_proj = Linear(h, heads * self.head_dim, bias=qkv_bias)
        self.k_proj = Linear(h, kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = Linear(h, kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = Linear(heads * self.head_dim, h, bias=config.attention_bias)
        # Qwen3: RMSNorm over each head's D values of q and of k, before RoPE
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        # Sliding-window attention (Mistral, Phi-3, some Qwen layers): a query sees this many
        # columns back, its own included; None: all of them.
        self.window = config.layer_window(layer_index)
        self.qkv_proj: nn.Module | None = None  # q, k, v as one product (native.fuse_projections)
        self.qkv_sizes: tuple[int, int, int] | None = None
        # The kernel library (native.attach sets it): one token's attention, a prompt's RoPE in place
        # on the fused q and k, and a prompt's causal attention run natively in float32.
        self.native = None

    def within_window(self, columns: int) -> bool:
        """Whether a query at any of the first `columns` cache columns sees all columns before it
        (no window, or one that reaches back that far): then attention is plain causal."""
        return self.window is None or columns <= self.window

    def input_projections(self) -> tuple[str, ...]:
        """The names of the layers computing q, k and v: one fused layer, or three."""
        return ("qkv_proj",) if self.qkv_proj is not None else ("q_proj", "k_proj", "v_proj")

    def fuse(self, qkv_proj: nn.Module) -> None:
        """Replace q_proj, k_proj and v_proj by one layer whose output is their outputs side by side."""
        self.qkv_sizes = (self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features)
        self.qkv_proj = qkv_proj
        del self.q_proj, self.k_proj, self.v_proj

    # Head counts come from the projections' shapes: under tensor parallelism (parallel.py) each
    # rank's projections hold only its share of the heads, and these count that share.
    @property
    def heads(self) -> int:
        size = self.qkv_sizes[0] if self.qkv_sizes else self.q_proj.out_features
        return size // self.head_dim

    @property
    def kv_heads(self) -> int:
        size = self.qkv_sizes[1] if self.qkv_sizes else self.k_proj.out_features
        return size // self.head_dim

    def forward(
        self,
        x: torch.Tensor,  # [B, T, hidden]
        cos: torch.Tensor,  # [B, T, D]
        sin: torch.Tensor,  # [B, T, D]
        mask: torch.Tensor | None,  # [B, 1, T, S] bool, True = may attend
        cache: KVCache | None,
        capture: Capture | None,
    ) -> torch.Tensor:  # [B, T, hidden]
        B, T, _ = x.shape
        # the points inside this layer are tapped: every step on PyTorch's plain operations
        inner = capture if capture is not None and capture.inside(self.layer_index) else None
        point = self.point
        if (
            self.native is not None
            and B == 1
            and T == 1
            and mask is None
            and capture is None
            and self.qkv_proj is not None
            and x.dtype == torch.float32
            and type(cache) is KVCache
            and x.device.type == "cpu"
            and self.q_norm is None
            and self._native_cache(cache)
        ):
            return self.o_proj(self._decode_one(x, cos, sin, cache))
        # H, KVH: the heads this module holds (this rank's share under tensor parallelism)
        qkv, roped = self._projections(x, cos, sin, inner is None)  # [B, T, (H + 2 KVH) * D], or None
        if qkv is not None:
            q, k, v = qkv.split(self.qkv_sizes, dim=-1)  # [B, T, H*D], [B, T, KVH*D] x2
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = _tap(inner, "q_proj", q, point), _tap(inner, "k_proj", k, point), _tap(inner, "v_proj", v, point)
        q = q.view(B, T, -1, self.head_dim)  # [B, T, H, D]
        k = k.view(B, T, -1, self.head_dim)  # [B, T, KVH, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # each head's D values normed
            q, k = _tap(inner, "q_norm", q, point), _tap(inner, "k_norm", k, point)
        q = q.transpose(1, 2)  # [B, H, T, D]
        k = k.transpose(1, 2)  # [B, KVH, T, D]
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, KVH, T, D]
        if not roped:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            q, k = _tap(inner, "q_rope", q, point), _tap(inner, "k_rope", k, point)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)  # [B, KVH, S, D], S = cached + T
            if roped and self._prefill_runs_natively(B, T, mask, cache, capture):
                return self.o_proj(self._prefill(qkv, cache, T, k.shape[2]))
        if not self.within_window(k.shape[2]):
            mask = window_mask(mask, T, k.shape[2], self.window, x.device)  # [B or 1, 1, T, S]
        out = self._attend(q, k, v, mask, capture)  # [B, H, T, D]
        heads = _tap(inner, "heads", out.transpose(1, 2), point)  # [B, T, H, D]
        return self.o_proj(heads.reshape(B, T, -1))  # [B, T, H*D] -> [B, T, hidden]

    def _projections(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, may_rope: bool
    ) -> tuple[torch.Tensor | None, bool]:
        """The fused q, k, v product [B, T, (H + 2 KVH) * D] (None where the projections are separate),
        and whether q and k in it are already rotated (the native RoPE, in place: PyTorch's numbers;
        only where `may_rope`)."""
        if self.qkv_proj is None:
            return None, False
        qkv = self.qkv_proj(x)  # [B, T, (H + 2 KVH) * D]
        B, T, _ = x.shape
        if not (
            may_rope
            and self.native is not None
            and self.q_norm is None  # (the norm comes before RoPE)
            and qkv.dtype == cos.dtype == torch.float32
            and qkv.device.type == "cpu"
            and not qkv.requires_grad
            and qkv.is_contiguous()
            and cos.is_contiguous()
            and sin.is_contiguous()
            and cos.shape == (B, T, self.head_dim)
        ):
            return qkv, False
        # q and k, side by side at the start of each row
        self.native.rope_rows_f32(
            qkv.data_ptr(),
            B * T,
            qkv.shape[-1],
            self.heads + self.kv_heads,
            self.head_dim,
            cos.data_ptr(),
            sin.data_ptr(),
            torch.get_num_threads(),
        )
        return qkv, True

    def prefills_natively(self) -> bool:
        """Whether a float32 prompt piece of one sequence (no padding, no capture) takes the native
        attention (`_prefill`), whose rows do not depend on the piece they are computed in."""
        return self.native is not None and self.qkv_proj is not None and self.q_norm is None and self.head_dim % 16 == 0

    def _prefill_runs_natively(self, B: int, T: int, mask, cache, capture) -> bool:
        """A float32 prompt (or piece of one) of one sequence without padding, of at most
        PREFILL_NATIVE_QUERIES positions, when attention weights are not asked for."""
        return (
            self.prefills_natively()
            and B == 1
            and T > 1
            and mask is None
            and type(cache) is KVCache
            and T <= PREFILL_NATIVE_QUERIES
            and self._native_cache(cache)
            and not (capture is not None and capture.weights_in(self.layer_index))
        )

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, capture: Capture | None
    ) -> torch.Tensor:
        """softmax(q k^T / sqrt(D) + mask) v: q [B, H, T, D], k, v [B, KVH, S, D] -> [B, H, T, D]
        (GQA: each group of query heads shares a KV head). Where the capture wants this layer's
        weights, an explicit softmax whose weights [B, H, T, S] are tapped; otherwise PyTorch's SDPA."""
        T, S = q.shape[2], k.shape[2]
        groups = q.shape[1] // k.shape[1]
        if capture is not None and capture.weights_in(self.layer_index):
            if groups > 1:
                k = k.repeat_interleave(groups, dim=1)  # [B, H, S, D]
                v = v.repeat_interleave(groups, dim=1)  # [B, H, S, D]
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)  # [B, H, T, S]
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            elif T > 1:
                scores = scores + _causal_bias(T, S, scores)
            weights = scores.float().softmax(-1).to(q.dtype)  # [B, H, T, S]
            weights = capture.tap(f"layers.{self.layer_index}.attn_weights", weights)
            return weights @ v
        if mask is None and (T == 1 or T == S):
            return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=groups > 1)
        if mask is None:  # several new tokens after cached ones: causal with an offset
            return F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_bias(T, S, q) == 0, enable_gqa=groups > 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=groups > 1)

    def _native_cache(self, cache: KVCache) -> bool:
        """Whether this layer's cache is what the native attention reads: one sequence's float32
        [1, KVH, cap, D] keys and values, contiguous, in CPU memory."""
        keys, values = cache.keys[self.layer_index], cache.values[self.layer_index]
        return all(
            t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() and t.shape[0] == 1
            for t in (keys, values)
        )

    def _prefill(self, qkv: torch.Tensor, cache: KVCache, T: int, S: int) -> torch.Tensor:
        """softmax(q k^T / sqrt(D) + causal mask) v for one sequence's T new queries (roped, in qkv
        [1, T, (H + 2 KVH) * D]) over its cache's first S columns (within the layer's window), in one
        native call -> [1, T, H*D]."""
        keys, values = cache.keys[self.layer_index], cache.values[self.layer_index]  # [1, KVH, cap, D]
        heads, D = self.heads, self.head_dim
        out = torch.empty(1, T, heads * D)  # [1, T, H*D]
        status = self.native.prefill_attention_f32(
            qkv.data_ptr(),
            qkv.shape[-1],
            keys.data_ptr(),
            values.data_ptr(),
            keys.shape[2],
            T,
            S - T,
            heads,
            self.kv_heads,
            D,
            D**-0.5,
            self.window or 0,
            out.data_ptr(),
            heads * D,
            torch.get_num_threads(),
        )
        if status != 0:
            raise LlamascopeError(f"out of memory for the attention of a {T}-token prompt")
        return out

    def _decode_one(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The same attention for one token of one sequence, in one native call: RoPE, cache write,
        softmax(q k^T / sqrt(D)) v over the cached positions within the window (the plain path above
        is the reference)."""
        qkv = self.qkv_proj(x).contiguous()  # [1, 1, (H + 2 KVH) * D]
        heads, kv_heads, D = self.heads, self.kv_heads, self.head_dim
        keys, values = cache.keys[self.layer_index], cache.values[self.layer_index]  # [1, KVH, cap, D]
        cache.check_room(1)
        out = torch.empty(1, 1, heads * D)  # [1, 1, H*D]
        cos, sin = cos.contiguous(), sin.contiguous()
        self.native.decode_attention_f32(
            qkv.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            keys.data_ptr(),
            values.data_ptr(),
            cache.length,
            cache.capacity,
            heads,
            kv_heads,
            D,
            D**-0.5,
            self.window or 0,
            out.data_ptr(),
            torch.get_num_threads(),
        )
        return out


# Up to this many new positions in one call a prompt's float32 attention runs natively
# (csrc/attention.c), over any number of cached columns; past it PyTorch's flash attention, whose
# larger blocks win when a thousand queries and more come at once (docs/performance.md). Prompts
# reach the model in pieces of prefill.PREFILL_PIECE positions, so this is for calls without a cache.
PREFILL_NATIVE_QUERIES = 1024


def window_mask(mask: torch.Tensor | None, T: int, S: int, window: int, device) -> torch.Tensor:
    """`mask` [B, 1, T, S] bool (None: causal, query t at column S - T + t) without the columns
    `window` or more before each query's own column, which is the last it may see (transformers'
    sliding-window rule, on cache columns: padding counts) -> [B or 1, 1, T, S]."""
    columns = torch.arange(S, device=device)  # [S]
    if mask is None:
        own = torch.arange(S - T, S, device=device)[:, None]  # [T, 1]
        return ((columns <= own) & (columns > own - window))[None, None]  # [1, 1, T, S]
    own = torch.where(mask, columns, -1).amax(-1, keepdim=True)  # [B, 1, T, 1]
    return mask & (columns > own - window)


def _causal_bias(T: int, S: int, like: torch.Tensor) -> torch.Tensor:
    """[T, S] additive bias where query t sits at column S - T + t."""
    q_pos = torch.arange(S - T, S, device=like.device)[:, None]
    k_pos = torch.arange(S, device=like.device)[None, :]
    bias = torch.zeros(T, S, dtype=like.dtype, device=like.device)
    return bias.masked_fill(k_pos > q_pos, float("-inf"))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(h, i, bias=bias)
        self.up_proj = Linear(h, i, bias=bias)
        self.down_proj = Linear(i, h, bias=bias)
        self.gate_up_proj: nn.Module | None = None  # gate and up as one product (native.fuse_projections)
        self.native = None  # the kernel library (native.attach sets it): silu(gate) * up natively

    def input_projections(self) -> tuple[str, ...]:
        """The names of the layers computing gate and up: one fused layer, or two."""
        return ("gate_up_proj",) if self.gate_up_proj is not None else ("gate_proj", "up_proj")

    def fuse(self, gate_up_proj: nn.Module) -> None:
        """Replace gate_proj and up_proj by one layer whose output is [gate | up]."""
        self.gate_up_proj = gate_up_proj
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor, inner: Capture | None = None, name: str = "") -> torch.Tensor:
        """[B, T, hidden] -> [B, T, hidden]; with `inner`, on the plain path with each product tapped
        under `name` ("layers.{i}.mlp.")."""
        if self.gate_up_proj is not None:
            gate_up = self.gate_up_proj(x)  # [B, T, 2I]
            if (
                inner is None
                and self.native is not None
                and gate_up.dtype == torch.float32
                and gate_up.is_contiguous()
                and not gate_up.requires_grad
                and gate_up.device.type == "cpu"
            ):
                rows, width = gate_up.numel() // gate_up.shape[-1], gate_up.shape[-1] // 2
                act = gate_up.new_empty(*gate_up.shape[:-1], width)  # [B, T, I]
                self.native.silu_mul_rows_f32(gate_up.data_ptr(), rows, width, act.data_ptr(), torch.get_num_threads())
                return self.down_proj(act)
            gate, up = gate_up.chunk(2, dim=-1)  # [B, T, I] each
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        gate, up = _tap(inner, "gate_proj", gate, name), _tap(inner, "up_proj", up, name)
        return self.down_proj(_tap(inner, "act", F.silu(gate) * up, name))  # [B, T, I] -> [B, T, hidden]


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.index = layer_index
        self.point = f"layers.{layer_index}."  # (the names of its capture points)
        self.self_attn = Attention(config, layer_index)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, capture):  # x: [B, T, hidden]
        if capture is None:
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, None)
            return x + self.mlp(self.post_attention_layernorm(x))
        name = self.point
        inner = capture if capture.inside(self.index) else None
        normed = _tap(inner, name + "input_layernorm", self.input_layernorm(x))
        attn_out = capture.tap(name + "attn_out", self.self_attn(normed, cos, sin, mask, cache, capture))
        x = _tap(inner, name + "mid", x + attn_out)
        normed = _tap(inner, name + "post_attention_layernorm", self.post_attention_layernorm(x))
        return x + capture.tap(name + "mlp_out", self.mlp(normed, inner, name + "mlp."))


class DecoderStack(nn.Module):
    """Hugging Face's `model.` submodule: embeddings, layers, final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        # weights come from the checkpoint: allocated, never randomly initialised
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size, _weight=torch.empty(config.vocab_size, config.hidden_size)
        )
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # One native call per batch-1 decode step (decode_step.enable sets it once the model's
        # layers have their kernels), or the compiled one (compiled.enable); forward falls back to
        # the modules wherever it does not apply.
        self.decode_step = None

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def kv_heads(self) -> int:
        """Key/value heads per layer held here: all, or this rank's share under tensor parallelism."""
        return self.model.layers[0].self_attn.kv_heads

    def hidden_states(
        self,
        tokens: torch.Tensor,  # [B, T] int64
        positions: torch.Tensor,  # [B, T] int64
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,  # [B, 1, T, S] bool, None = plain causal
        capture: Capture | None = None,
    ) -> torch.Tensor:
        """The final-normed hidden states [B, T, hidden]; the cache advances by T."""
        stack = self.model
        x = _tap(capture, "embed", stack.embed_tokens(tokens))  # [B, T, hidden]
        cos, sin = stack.rotary_emb(positions, x.dtype)  # [B, T, D] each
        for layer in stack.layers:
            x = _tap(capture, "input", x, layer.point)
            x = _tap(capture, "output", layer(x, cos, sin, mask, cache, capture), layer.point)
        if cache is not None:
            cache.advance(tokens.shape[1])
        return _tap(capture, "norm", stack.norm(x))  # [B, T, hidden]

    def forward(
        self,
        tokens: torch.Tensor,  # [B, T] int64
        positions: torch.Tensor,  # [B, T] int64
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,  # [B, 1, T, S] bool
        capture: Capture | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """logits [B, T, vocab] (or [B, 1, vocab] with last_only) in the model's dtype.

        With a `KVCache` and no mask, new positions go through in the pieces `prefill_spans` cuts
        (not when activations are captured: `trace` shows one pass over the whole prompt)."""
        if self.decode_step is not None and self.decode_step.applies(tokens, cache, mask, capture):
            return self.decode_step(tokens, positions, cache, mask)  # [B, 1, vocab]
        if type(cache) is KVCache and mask is None and capture is None:
            if len(prefill_spans(cache.length, cache.length + tokens.shape[1])) > 1:
                run = PrefillRun(self, tokens, positions, cache, last_only)
                run.advance()
                return run.logits  # (layer by layer over the pieces, to the bit as piece by piece)
        h = self.hidden_states(tokens, positions, cache, mask, capture)
        if capture is not None and (capture.all_logits or not last_only):
            logits = capture.tap("logits", self.lm_head(h))  # [B, T, vocab]
            if not last_only:
                return logits
        # (the last position's logits on their own: the numbers a pass without a capture returns)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h)
