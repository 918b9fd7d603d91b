"""A decode step compiled by `torch.compile` (`--backend compiled`): for where the native kernels do not run.

On a GPU (or a CPU without AVX2) every layer runs PyTorch's operations, and a decode step is some
thirty small operations per layer, each dispatched from Python. `CompiledDecode` hands the plain
modules' decode step to `torch.compile` once, so each step is one call of generated code with the
elementwise work fused (RMSNorm, RoPE, SiLU, residual sums).

Compiled code wants fixed shapes, so the step is written the way a static cache allows (as
gpt-fast does): the new token's keys and values go to cache column `column` (a tensor, not a
Python int) with `index_copy_`, and attention reads the cache's whole capacity with a mask of the
columns filled so far (and the batch's padding). One graph then serves every step of a
generation; caches are made in capacities rounded up to CAPACITY_STEP columns (`capacity_for`),
so generations of different lengths share it too. It recompiles for another batch size, dtype
or device.

It applies where the native step would: one new token per sequence over a `KVCache` (a
generation's, beam search's, the server's one-token prefills), nothing captured. Prefill,
tracing and the server's slot caches take the modules as they are. The modules are the plain
path's, so the tokens are the plain path's: in bfloat16 the compiled code rounds wherever eager
PyTorch rounds (inductor's `emulate_precision_casts`); float summation order may still differ.

PyTorch compiles at most a few graphs per function (8 by default); each new batch size, capacity
bucket or kind of cache tensor is one. Past that, shapes that would need another graph run the
same step uncompiled instead of failing. One generation at a time per model: the step keeps its
inputs in buffers of the model's.
"""

from __future__ import annotations

import logging
import shutil

import torch
from torch import nn

from .cache import KVCache
from .model import check_token_ids
from .native import native_modules

CAPACITY_STEP = 256
log = logging.getLogger("llamascope")


class NotApplicable(Exception):
    """The model has a part the compiled step cannot run."""


class _StaticColumns:
    """The cache as the compiled graph sees it: `update` writes column `column` in place and
    returns every column (the mask hides those not filled)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], column: torch.Tensor):
        self.keys, self.values, self.column = keys, values, column

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: [B, KVH, 1, D] into column `column` of [B, KVH, capacity, D]
        self.keys[layer].index_copy_(2, self.column, k)
        self.values[layer].index_copy_(2, self.column, v)
        return self.keys[layer], self.values[layer]

    def advance(self, T: int) -> None:  # (the caller advances the real cache)
        pass


class CompiledDecode:
    """`step(tokens [B, 1], positions [B, 1], cache, mask) -> logits [B, 1, vocab]`, compiled."""

    def __init__(self, model: nn.Module):
        if model.config.rope_varies_with_length:
            kind = model.config.rope_type
            raise NotApplicable(f"{kind} RoPE scaling recomputes its frequencies from each step's positions")
        name = next(native_modules(model), None)
        if name is not None:
            raise NotApplicable(f"{name or 'the model'} calls a native kernel (load it with backend='compiled')")
        if model.device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
            raise NotApplicable("compiling for the CPU needs a C++ compiler (g++ or clang++)")
        self.model = model
        self.dtype = model.dtype
        self.device = model.device
        self._graph = torch.compile(
            self._forward, fullgraph=True, dynamic=False, options={"emulate_precision_casts": True}
        )
        self._uncompiled: set[tuple] = set()  # graph keys past PyTorch's recompile limit
        self._inputs: tuple | None = None  # ((B, capacity), ids, column, pad) of the latest generation

    @staticmethod
    def capacity_for(capacity: int) -> int:
        """The cache capacity to allocate for `capacity` columns: rounded up, so generations of
        different lengths reuse one compiled graph."""
        return -(-capacity // CAPACITY_STEP) * CAPACITY_STEP

    def applies(self, tokens: torch.Tensor, cache, mask, capture) -> bool:
        if capture is not None or tokens.dim() != 2 or tokens.shape[1] != 1 or type(cache) is not KVCache:
            return False
        store = cache.keys[0]
        return (
            store.shape[0] == tokens.shape[0]
            and store.dtype == self.dtype
            and store.device == self.device
            and (mask is None or (mask.dtype == torch.bool and mask.shape[-1] == cache.length + 1))
        )

    def _forward(self, tokens, positions, keys, values, column, pad):
        capacity = keys[0].shape[2]
        # [B, 1, 1, capacity]: filled columns (this token's included) that the padding does not hide
        allowed = pad & (torch.arange(capacity, device=tokens.device) <= column)
        h = self.model.hidden_states(tokens, positions, _StaticColumns(keys, values, column), allowed)  # [B, 1, hidden]
        return self.model.lm_head(h)  # [B, 1, vocab]

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, capacity = tokens.shape[0], cache.capacity
        cache.check_room(1)
        check_token_ids(tokens.view(-1).tolist(), self.model.config.vocab_size)
        if self._inputs is None or self._inputs[0] != (B, capacity):  # the graph's inputs: fixed shapes and strides
            ids = torch.zeros(2, B, 1, dtype=torch.long, device=self.device)  # [2, B, 1]: tokens, positions
            column = torch.zeros(1, dtype=torch.long, device=self.device)  # [1]
            pad = torch.ones(B, 1, 1, capacity, dtype=torch.bool, device=self.device)  # [B, 1, 1, capacity]
            self._inputs = ((B, capacity), ids, column, pad)
        _, ids, column, pad = self._inputs
        ids[0].copy_(tokens)
        ids[1].copy_(positions)
        column.fill_(cache.length)
        if mask is not None:  # left padding: [B, 1, 1, length + 1]
            pad[..., : cache.length + 1].copy_(mask)
        else:
            pad.fill_(True)
        graph_key = (B, capacity, cache.keys[0].is_inference())
        if graph_key in self._uncompiled:
            logits = self._forward(ids[0], ids[1], cache.keys, cache.values, column, pad)  # [B, 1, vocab]
        else:
            try:
                logits = self._graph(ids[0], ids[1], cache.keys, cache.values, column, pad)  # [B, 1, vocab]
            except torch._dynamo.exc.FailOnRecompileLimitHit:  # (raised before anything runs)
                log.warning(
                    "--backend compiled: PyTorch's limit of compiled graphs is reached; batch %d with a %d-column "
                    "cache runs uncompiled",
                    B,
                    capacity,
                )
                self._uncompiled.add(graph_key)
                logits = self._forward(ids[0], ids[1], cache.keys, cache.values, column, pad)
        cache.advance(1)
        return logits


def enable(model: nn.Module) -> bool:
    """Give the model the compiled decode step; False (and a warning) where it cannot run."""
    try:
        model.decode_step = CompiledDecode(model)
    except NotApplicable as e:
        log.warning("--backend compiled: not used: %s", e)
        model.decode_step = None
    return model.decode_step is not None
