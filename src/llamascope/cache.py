"""A preallocated key/value cache: one [B, kv_heads, capacity, head_dim] tensor pair per layer.

Columns are token slots. `length` is how many columns are filled; a forward pass writes its new
keys and values at columns [length, length + T) and the model then calls `advance(T)`. All
sequences of a batch share columns (a left-padded batch keeps its padding as masked columns).
"""

from __future__ import annotations

import torch

from .errors import LlamascopeError


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        self.capacity = capacity
        self.length = 0
        shape = (batch_size, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @classmethod
    def for_model(cls, model, batch_size: int, capacity: int) -> "KVCache":
        c = model.config
        return cls(c.num_hidden_layers, batch_size, c.num_key_value_heads, c.head_dim, capacity,
                   model.dtype, model.device)

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, KVH, T, D] after the filled columns; return all keys/values [B, KVH, S, D]."""
        T = k.shape[2]
        end = self.length + T
        if end > self.capacity:
            raise LlamascopeError(f"KV cache full: {end} positions needed, capacity {self.capacity}")
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, T: int) -> None:
        self.length += T

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep batch rows `rows` (beam search: each beam continues from a parent)."""
        for i in range(len(self.keys)):
            self.keys[i] = self.keys[i].index_select(0, rows)
            self.values[i] = self.values[i].index_select(0, rows)
