"""One decode step through the whole decoder stack in a single native call.

The module-by-module path runs the native kernels one projection at a time; on a small model the
Python between them (about 30 module calls per layer) costs more than the arithmetic. `DecodeStep`
describes the model once, as C structs pointing at the weights the modules already hold (no copy),
and then each decode step is one call into csrc/decode_step.c, which runs the same kernels in the
same order: RMSNorm, q/k/v (with Qwen3's per-head norms), attention with the cache (within the
layer's sliding window), o, RMSNorm, gate/up, SiLU, down, and at the end the final norm and the LM
head.

It applies where the module path would run those kernels anyway: one new token for each of up to
KERNEL_MAX_ROWS sequences (over a `KVCache` without padding, or the server's `SlotBatch`, where
each sequence sits at its own column), on the CPU, every projection a `FastLinear` or
`QuantLinear` with its kernel, and nothing asked to be captured. With float32 activations and
one sequence it gives bit-identical results to the module path (which uses the same attention
kernel there); for several sequences the module path's attention is PyTorch's, equal to float
rounding. A bfloat16 model gets its own step (bfloat16 weights on AVX512-BF16) that rounds to
bfloat16 at every point where PyTorch does; only float summation order differs. Anything else
(prefill, tracing, tensor parallelism) takes the module path, which stays the reference.

Each step runs on as many of torch.get_num_threads() as its `ThreadTuner` picks from the measured
step times: all of them on a quiet machine, fewer where other work contends for the cores
(thread_tuner.py). The count never changes a number.
"""

from __future__ import annotations

import ctypes
import time
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .cache import KVCache, SlotBatch
from .errors import LlamascopeError
from .layers import KERNEL_MAX_ROWS, FastLinear, QuantEmbedding, QuantLinear
from .model import check_token_ids
from .thread_tuner import ThreadTuner

_p, _i, _f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float


# The structs of csrc/kernels.h (ls_linear_t, ls_layer_t, ls_stack_t), field for field.
class _Linear(ctypes.Structure):
    _fields_ = [
        ("format", _i),
        ("layout", _i),
        ("float_activations", _i),
        ("N", _i),
        ("K", _i),
        ("w", _p),
        ("bias", _p),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("attn_norm", _p),
        ("mlp_norm", _p),
        ("q_norm", _p),
        ("k_norm", _p),
        ("window", _i),
        ("qkv", _Linear * 3),
        ("n_qkv", _i),
        ("o", _Linear),
        ("gate_up", _Linear * 2),
        ("n_gate_up", _i),
        ("down", _Linear),
    ]


class _Stack(ctypes.Structure):
    _fields_ = [
        ("n_layers", _i),
        ("hidden", _i),
        ("H", _i),
        ("KVH", _i),
        ("D", _i),
        ("I", _i),
        ("eps", _f),
        ("scale", _f),
        ("layers", ctypes.POINTER(_Layer)),
        ("final_norm", _p),
        ("head", _Linear),
    ]


class NotApplicable(Exception):
    """The model has a part the native step does not run (it then keeps the module path)."""


def _float32(t: torch.Tensor | None, what: str) -> int:
    if t is None:
        return 0
    if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
        raise NotApplicable(f"{what} is not a contiguous float32 CPU tensor")
    return t.data_ptr()


def _float_copy(t: torch.Tensor, keep: list) -> int:
    """A float32 copy of a small bfloat16 tensor (norm weights, biases: exact), kept alive."""
    copy = t.detach().float().contiguous()
    keep.append(copy)
    return copy.data_ptr()


def _describe(module: nn.Module, keep: list, what: str, bf16: bool = False) -> _Linear:
    """The C description of one projection; its tensors go into `keep`. With `bf16` (a bfloat16
    model) only bfloat16 weights whose inputs are a multiple of 32 wide qualify."""
    desc = module.native_weight() if isinstance(module, (FastLinear, QuantLinear)) else None
    if desc is None:
        raise NotApplicable(f"{what} is a {type(module).__name__} without a native kernel")
    if bf16 and not (desc.format == "BF16" and desc.in_features % 32 == 0):
        raise NotApplicable(f"{what} is not a bfloat16 layer with the AVX512-BF16 kernel")
    if desc.layout == "rows" and desc.format in ("Q4_0", "Q4_1") or not desc.weight.is_contiguous():
        raise NotApplicable(f"{what}: no native step for {desc.format} weights in the {desc.layout} layout")
    bias = None if desc.bias is None else desc.bias.detach().float().contiguous()  # (exact from bfloat16)
    keep += [desc.weight, bias]
    return _Linear(
        kernels.format_code(desc.format),
        kernels.layout_code(desc.layout),
        desc.float_activations,
        desc.out_features,
        desc.in_features,
        desc.weight.data_ptr(),
        _float32(bias, what),
    )


class DecodeStep:
    """`step(tokens [B, 1], positions [B, 1], cache) -> logits [B, 1, vocab]` in one native call."""

    def __init__(self, model: nn.Module, lib: ctypes.CDLL):
        """Describe `model` to csrc/decode_step.c once: its layers, final norm and LM head as the
        structs of csrc/kernels.h, pointing at the tensors the modules hold (no copy). Raises
        NotApplicable where a part has no native form."""
        config = model.config
        self.dtype = model.dtype
        if model.device.type != "cpu":
            raise NotApplicable(f"the model is on {model.device}")
        if self.dtype not in (torch.float32, torch.bfloat16):
            raise NotApplicable(f"activations are {self.dtype}")
        self.model, self.lib = model, lib  # (the kernel library the step runs on)
        self._bf16 = self.dtype == torch.bfloat16
        self._keep: list = []  # every tensor the structs point at stays alive with them
        attn = model.model.layers[0].self_attn
        self.heads, self.kv_heads, self.head_dim = attn.heads, attn.kv_heads, attn.head_dim
        self._layers = (_Layer * config.num_hidden_layers)(*map(self._describe_layer, model.model.layers))
        head = _describe(model.lm_head, self._keep, "lm_head", self._bf16)
        self.vocab = head.N
        self.stack = _Stack(
            config.num_hidden_layers,
            config.hidden_size,
            self.heads,
            self.kv_heads,
            self.head_dim,
            config.intermediate_size,
            config.rms_norm_eps,
            self.head_dim**-0.5,
            self._layers,
            self._norm(model.model.norm.weight, "final norm"),
            head,
        )
        self._fn = lib.decode_step_bf16 if self._bf16 else lib.decode_step_f32
        # RoPE tables by position, computed by the model's own rotary module (so the same numbers
        # as the module path) for every position up to the longest asked for; length-dependent
        # scaling (dynamic, longrope) computes them each step instead (`_rope`).
        self._rope_table = None if config.rope_varies_with_length else (torch.empty(0), torch.empty(0))
        # (the cache, its storage_version, keys array, values array) of the last step
        self._cache_arrays: tuple = (lambda: None, -1, None, None)
        # how many of torch.get_num_threads() each step uses: fewer where cores are contended
        self.tuner = ThreadTuner()
        embed = model.model.embed_tokens
        self._q8_embedding = (
            isinstance(embed, QuantEmbedding) and embed.qtype == "Q8_0" and embed.out_dtype == self.dtype
        )
        self._vocab_rows = embed.blocks.shape[0] if isinstance(embed, QuantEmbedding) else embed.weight.shape[0]

    def _norm(self, weight: torch.Tensor, what: str) -> int:
        """The address of a norm's float32 weight (a bfloat16 model's: an exact float32 copy)."""
        return _float_copy(weight, self._keep) if self._bf16 else _float32(weight, what)

    def _describe_layer(self, block: nn.Module) -> _Layer:
        """One decoder layer as ls_layer_t: its norms and projections (q/k/v and gate/up fused or not)."""
        i, attn, mlp = block.index, block.self_attn, block.mlp
        qkv = [getattr(attn, name) for name in attn.input_projections()]
        gate_up = [getattr(mlp, name) for name in mlp.input_projections()]
        layer = _Layer(
            attn_norm=self._norm(block.input_layernorm.weight, f"layer {i} input_layernorm"),
            mlp_norm=self._norm(block.post_attention_layernorm.weight, f"layer {i} post_attention_layernorm"),
            window=attn.window or 0,
            n_qkv=len(qkv),
            n_gate_up=len(gate_up),
        )
        if attn.q_norm is not None:
            layer.q_norm = self._norm(attn.q_norm.weight, f"layer {i} q_norm")
            layer.k_norm = self._norm(attn.k_norm.weight, f"layer {i} k_norm")
        for j, part in enumerate(qkv):
            layer.qkv[j] = _describe(part, self._keep, f"layer {i} attention input", self._bf16)
        for j, part in enumerate(gate_up):
            layer.gate_up[j] = _describe(part, self._keep, f"layer {i} gate/up", self._bf16)
        layer.o = _describe(attn.o_proj, self._keep, f"layer {i} o_proj", self._bf16)
        layer.down = _describe(mlp.down_proj, self._keep, f"layer {i} down_proj", self._bf16)
        return layer

    @staticmethod
    def capacity_for(capacity: int) -> int:
        """The cache capacity to allocate for `capacity` columns: any (the step reads the columns filled)."""
        return capacity

    def applies(self, tokens: torch.Tensor, cache, mask, capture) -> bool:
        """True for one new token per sequence, at most KERNEL_MAX_ROWS sequences, over a plain
        `KVCache` (no padding mask: all rows at one column) or a server `SlotBatch` (each row at
        its own column; its mask says exactly that, so the step needs none), nothing captured."""
        if capture is not None or tokens.dim() != 2 or tokens.shape[1] != 1 or tokens.shape[0] > KERNEL_MAX_ROWS:
            return False
        if type(cache) is KVCache:
            store = cache.keys[0]
            return mask is None and store.shape[0] == tokens.shape[0] and self._matches(store)
        if type(cache) is SlotBatch:
            return cache.batch_size == tokens.shape[0] and bool(cache.cache.keys) and self._matches(cache.cache.keys[0])
        return False

    def _matches(self, store: torch.Tensor) -> bool:
        return store.dtype == self.dtype and store.device.type == "cpu" and store.shape[1] == self.kv_heads

    def _rope(self, positions: torch.Tensor, at: list[int], per_row: bool = False) -> tuple[int, int, tuple]:
        """Addresses of cos, sin [B, D] for positions [B, 1] (`at`: the same as ints), and what
        must stay alive while they are used. A length-dependent rope_type takes the batch's longest
        sequence (one generate() call, as transformers), or with `per_row` each row's own (server
        slots: each sequence as alone)."""
        rotary = self.model.model.rotary_emb
        if self._rope_table is None and not per_row:
            cos, sin = rotary(positions, self.dtype)
            cos, sin = cos.contiguous(), sin.contiguous()
            return cos.data_ptr(), sin.data_ptr(), (cos, sin)
        if self._rope_table is None:
            tables = [rotary(positions[b : b + 1], self.dtype) for b in range(positions.shape[0])]
            cos = torch.cat([c for c, _ in tables]).contiguous()  # [B, 1, D]
            sin = torch.cat([s for _, s in tables]).contiguous()  # [B, 1, D]
            return cos.data_ptr(), sin.data_ptr(), (cos, sin)
        cos, sin = self._rope_table
        if min(at) < 0:
            raise LlamascopeError(f"position id {min(at)} is negative")
        last = max(at)
        if last >= cos.shape[0]:  # grow by doubling: a few recomputations over a whole context
            n = max(2 * cos.shape[0], last + 1, 256)
            cos, sin = rotary(torch.arange(n)[None], self.dtype)  # [1, n, D] each
            cos, sin = cos[0].contiguous(), sin[0].contiguous()  # [n, D]
            self._rope_table = (cos, sin)
        if len(at) == 1:  # the table's own row
            row = at[0] * cos.shape[1] * cos.element_size()
            return cos.data_ptr() + row, sin.data_ptr() + row, (cos, sin)
        cos, sin = cos[positions], sin[positions]  # [B, 1, D] each
        return cos.data_ptr(), sin.data_ptr(), (cos, sin)

    def _embed(self, tokens: torch.Tensor, ids: list[int]) -> torch.Tensor:
        """The residual stream [B, 1, hidden] for tokens [B, 1] (`ids`: the same as ints)."""
        embed = self.model.model.embed_tokens
        check_token_ids(ids, self._vocab_rows)  # (the native lookup below would read outside the table)
        if type(embed) is nn.Embedding:
            return F.embedding(tokens, embed.weight).to(self.dtype).contiguous()
        if not self._q8_embedding:
            return embed(tokens).to(self.dtype).contiguous()
        # Q8_0 rows dequantised straight into x: the same products as quant.dequantize
        K, row_bytes = embed.embedding_dim, embed.blocks.shape[1]
        x = torch.empty(len(ids), 1, K, dtype=self.dtype)  # [B, 1, hidden]
        step, base = K * x.element_size(), embed.blocks.data_ptr()
        for b, token in enumerate(ids):
            self.lib.dequant_q8_0(
                base + token * row_bytes, 1, K, x.data_ptr() + b * step, int(self.dtype == torch.bfloat16), 1
            )
        return x

    def _cache_pointers(self, store) -> tuple:
        """ctypes arrays of each layer's key and value tensor address, rebuilt when the cache
        replaces its tensors (beam reordering, slot storage growing: its storage_version)."""
        cached, version, keys, values = self._cache_arrays
        if cached() is not store or version != store.storage_version:
            layers = len(store.keys)
            keys = (_p * layers)(*(k.data_ptr() for k in store.keys))
            values = (_p * layers)(*(v.data_ptr() for v in store.values))
            self._cache_arrays = (weakref.ref(store), store.storage_version, keys, values)
        return keys, values

    def __call__(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | SlotBatch,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # (`mask` is None for a KVCache, see `applies`; a SlotBatch's says what its columns say)
        B = tokens.shape[0]
        if type(cache) is KVCache:
            cache.check_room(1)
            store, slots, cols, capacity = cache, list(range(B)), [cache.length] * B, cache.capacity
        else:  # SlotBatch: `batch()` has made room for one more column in each of its slots
            store, slots, cols, capacity = cache.cache, cache.slots, cache.lengths, cache.cache.columns
        logits = self._step(tokens, positions, store, slots, cols, capacity, per_row=type(cache) is SlotBatch)
        cache.advance(1)
        return logits

    def verifies(self, tokens: torch.Tensor, cache) -> bool:
        """Whether `verify` takes these T new positions [1, T] of one sequence over its KVCache."""
        return (
            type(cache) is KVCache
            and _one_sequences_rows(tokens)
            and cache.keys[0].shape[0] == 1
            and self._matches(cache.keys[0])
        )

    def verify(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """T consecutive positions [1, T] of one sequence in one native call -> logits [1, T, vocab]
        (speculative decoding's check of drafted tokens). Position t is row t of the step, at column
        length + t of the one cache row: the step writes every row's key and value before any row
        attends, and a row attends to the columns up to its own, so each sees exactly the columns
        before it, those the earlier rows wrote included. The kernels give each row what a step of
        its own gives, so the logits are those of T one-token steps, bit for bit."""
        T = tokens.shape[1]
        cache.check_room(T)
        cols = [cache.length + t for t in range(T)]
        logits = self._step(tokens.view(T, 1), positions.view(T, 1), cache, [0] * T, cols, cache.capacity, True)
        cache.advance(T)
        return logits.view(1, T, -1)

    def verifies_slot(self, tokens: torch.Tensor, store) -> bool:
        """Whether `verify_slot` takes these T new positions [1, T] of one slot of a SlotKVCache."""
        return _one_sequences_rows(tokens) and (not store.keys or self._matches(store.keys[0]))

    def verify_slot(self, tokens: torch.Tensor, store, slot: int) -> torch.Tensor:
        """`verify` on one slot of the server's SlotKVCache: T consecutive positions [1, T] after
        the slot's columns, each as rows of one native call, RoPE at each row's own position ->
        logits [T, vocab]; the slot's length grows by T."""
        T, start = tokens.shape[1], store.lengths[slot]
        store.reserve(slot + 1, start + T)
        positions = torch.arange(start, start + T, device=tokens.device)[:, None]  # [T, 1]
        cols = list(range(start, start + T))
        logits = self._step(tokens.view(T, 1), positions, store, [slot] * T, cols, store.columns, True)
        store.lengths[slot] += T
        return logits.view(T, -1)

    def _step(self, tokens, positions, store, slots, cols, capacity, per_row: bool) -> torch.Tensor:
        """Rows tokens [B, 1] at positions [B, 1] through the native step: row b into column cols[b]
        of cache row slots[b] of `store` (a KVCache or a SlotKVCache) -> logits [B, 1, vocab]."""
        B = tokens.shape[0]
        ids, at = tokens.view(-1).tolist(), positions.reshape(-1).tolist()
        x = self._embed(tokens, ids)  # [B, 1, hidden]: the residual stream
        cos, sin, _alive = self._rope(positions, at, per_row)  # addresses of [B, D] each
        keys, values = self._cache_pointers(store)
        logits = torch.empty(B, 1, self.vocab)  # [B, 1, vocab]
        threads = self.tuner.threads(torch.get_num_threads())
        start = time.perf_counter()
        status = self._fn(
            ctypes.byref(self.stack),
            B,
            x.data_ptr(),
            cos,
            sin,
            keys,
            values,
            (_i * B)(*slots),
            (_i * B)(*cols),
            capacity,
            logits.data_ptr(),
            threads,
        )
        self.tuner.record(time.perf_counter() - start, B)
        if status == -2:
            raise LlamascopeError("decode step: a layer's weight format is not one csrc/decode_step.c runs")
        if status != 0:
            raise MemoryError("decode step: out of memory for its scratch buffers")
        return logits if self.dtype == torch.float32 else logits.to(self.dtype)  # (bfloat16-exact already)


def _one_sequences_rows(tokens: torch.Tensor) -> bool:
    """tokens [1, T]: positions of one sequence that one native step takes as its rows."""
    return tokens.dim() == 2 and tokens.shape[0] == 1 and 1 <= tokens.shape[1] <= KERNEL_MAX_ROWS


def enable(model: nn.Module, lib: ctypes.CDLL) -> bool:
    """Give the model its native decode step on `lib` where it applies; True when it does."""
    try:
        model.decode_step = DecodeStep(model, lib)
    except NotApplicable:
        model.decode_step = None
    return model.decode_step is not None
