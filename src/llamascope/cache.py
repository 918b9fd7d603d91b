"""A preallocated key/value cache: one [B, kv_heads, capacity, head_dim] tensor pair per layer.

Columns are token slots. `length` is how many columns are filled; a forward pass writes its new
keys and values at columns [length, length + T) and the model then calls `advance(T)`. All
sequences of a batch share columns (a left-padded batch keeps its padding as masked columns).

A model whose every layer attends within one sliding window (Mistral) never reads a column more
than window - 1 columns before the newest, so its cache can hold the window and no more
(`window_capacity`): before a pass would overflow it, `make_room` moves the last window - 1
columns to the front and counts the columns it dropped (`dropped`). Columns stay in sequence
order, so every attention path (PyTorch's, the native kernels) reads them as before, and a
padding mask over the sequence's columns is cut by `dropped` to match.
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
        window: int | None = None,
    ):
        self.capacity = capacity
        self.length = 0
        self.window = window  # every layer's attention window, where `make_room` may drop columns
        self.dropped = 0  # columns dropped from the front: column c holds the sequence's column c + dropped
        self.storage_version = 0  # bumped whenever the key/value tensors are replaced (not written)
        shape = (batch_size, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @classmethod
    def for_model(cls, model, batch_size: int, capacity: int, first_pass: int | None = None) -> KVCache:
        """A cache for `model`, of at least `capacity` columns (a compiled decode step rounds it up).
        With `first_pass` (the columns of the first forward pass, the prompt's) a model with one
        sliding window in every layer gets only `window_capacity` columns, dropping older ones."""
        c = model.config
        capacity, window = cls.columns_for(model, capacity, first_pass)
        return cls(
            c.num_hidden_layers, batch_size, model.kv_heads, c.head_dim, capacity, model.dtype, model.device, window
        )

    @staticmethod
    def columns_for(model, capacity: int, first_pass: int | None = None) -> tuple[int, int | None]:
        """The columns `for_model` allocates for these arguments, and the window it may drop by."""
        window = sliding_window_of(model.config) if first_pass is not None else None
        if window is not None:
            capacity = min(capacity, window_capacity(window, first_pass))
        if model.decode_step is not None:
            capacity = model.decode_step.capacity_for(capacity)
        return capacity, window

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, KVH, T, D] after the filled columns; return all keys/values [B, KVH, S, D]."""
        T = k.shape[2]
        end = self.length + T
        self.check_room(T)
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def check_room(self, T: int) -> None:
        if self.length + T > self.capacity:
            raise LlamascopeError(f"KV cache full: {self.length + T} positions needed, capacity {self.capacity}")

    def advance(self, T: int) -> None:
        self.length += T

    def make_room(self, T: int) -> None:
        """Before a pass of T new columns: where they would not fit and the cache has a window,
        keep only the last window - 1 columns (all a query from now on can see), moved to the front."""
        if self.window is None or self.length + T <= self.capacity:
            return
        keep = min(self.window - 1, self.length)
        if keep + T > self.capacity:
            raise LlamascopeError(
                f"KV cache full: a pass of {T} positions after the {keep} the window keeps needs "
                f"{keep + T} columns, capacity {self.capacity}"
            )
        start = self.length - keep
        for layer in self.keys + self.values:
            layer[:, :, :keep] = layer[:, :, start : self.length].clone()  # [B, KVH, keep, D]
        self.dropped += start
        self.length = keep

    def clear(self) -> None:
        """Forget every cached column (the next call writes from column 0)."""
        self.length = self.dropped = 0

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep batch rows `rows` (beam search: each beam continues from a parent)."""
        self.storage_version += 1  # first: should a layer fail, the ones before it are replaced already
        for i in range(len(self.keys)):
            self.keys[i] = self.keys[i].index_select(0, rows)
            self.values[i] = self.values[i].index_select(0, rows)


# Columns a windowed cache holds past the window and the first pass: one move of window - 1 columns
# per this many decode steps.
WINDOW_SLACK = 256


def sliding_window_of(config) -> int | None:
    """The window every layer attends within, where they share one and RoPE does not depend on the
    length (a longrope or dynamic restart recomputes the whole sequence); else None."""
    windows = {config.layer_window(i) for i in range(config.num_hidden_layers)}
    if len(windows) != 1 or None in windows or config.rope_varies_with_length:
        return None
    return windows.pop()


def window_capacity(window: int, first_pass: int) -> int:
    """Columns a windowed cache needs: the first pass whole (a prompt is prefilled in one call,
    layer by layer), or the window - 1 kept columns, plus WINDOW_SLACK for the steps between moves."""
    return max(first_pass, window - 1) + WINDOW_SLACK


class SlotKVCache:
    """KV storage for sequences that come and go (the server's continuous batching).

    `num_slots` slots, each holding one sequence with its own length: slot s fills columns
    [0, lengths[s]) of row s. Storage per layer is one [rows, kv_heads, columns, head_dim] tensor
    that grows on demand (doubling, columns to a power of two, copying what is held) up to
    `num_slots` rows and `slot_capacity` columns, so memory never exceeds
    `num_slots * slot_capacity * bytes_per_token()` (the server reserves it all at start-up). A
    forward pass over some slots goes through `batch(slots, T)`, a view with the same
    `update` / `advance` calls as `KVCache`: row b writes its T new keys at its own columns
    [lengths[b], lengths[b] + T), and `mask(T)` hides each row's unused columns.
    """

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        kv_heads: int,
        head_dim: int,
        slot_capacity: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        if num_slots < 1 or slot_capacity < 1:
            raise LlamascopeError(
                f"SlotKVCache needs at least one slot and one column "
                f"(num_slots={num_slots}, slot_capacity={slot_capacity})"
            )
        self.num_layers, self.num_slots, self.slot_capacity = num_layers, num_slots, slot_capacity
        self.kv_heads, self.head_dim, self.dtype, self.device = kv_heads, head_dim, dtype, torch.device(device)
        self.lengths = [0] * num_slots  # filled columns of each slot
        self.in_use = [False] * num_slots
        self.keys: list[torch.Tensor] = []  # per layer [rows, KVH, columns, D]
        self.values: list[torch.Tensor] = []
        self.rows = self.columns = 0  # allocated storage
        self.storage_version = 0  # bumped whenever the key/value tensors are replaced (not written)

    @classmethod
    def for_model(cls, model, num_slots: int, slot_capacity: int) -> SlotKVCache:
        c = model.config
        return cls(c.num_hidden_layers, num_slots, model.kv_heads, c.head_dim, slot_capacity, model.dtype, model.device)

    # ---- memory ----------------------------------------------------------------------------
    @staticmethod
    def token_bytes(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes one cached position takes over all layers (keys and values)."""
        return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def bytes_per_token(self) -> int:
        return self.token_bytes(self.num_layers, self.kv_heads, self.head_dim, self.dtype)

    def max_bytes(self) -> int:
        return self.num_slots * self.slot_capacity * self.bytes_per_token()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def reserve(self, rows: int, columns: int) -> None:
        """Make storage hold at least `rows` slots of `columns` positions (doubling as it grows)."""
        if rows > self.num_slots or columns > self.slot_capacity:
            raise LlamascopeError(
                f"KV cache: {rows} slots x {columns} positions asked, limit {self.num_slots} x {self.slot_capacity}"
            )
        if rows <= self.rows and columns <= self.columns:
            return
        new_rows = self.rows if rows <= self.rows else min(self.num_slots, max(rows, 2 * self.rows))
        # columns to a power of two: a long prompt placed in a slot leaves room for its first steps
        new_columns = (
            self.columns
            if columns <= self.columns
            else min(self.slot_capacity, max(1 << (columns - 1).bit_length(), 2 * self.columns, 16))
        )
        shape = (new_rows, self.kv_heads, new_columns, self.head_dim)
        self.storage_version += 1  # first: should an allocation fail, the layers before it are replaced already
        for store in (self.keys, self.values):
            for layer in range(self.num_layers):
                grown = torch.zeros(shape, dtype=self.dtype, device=self.device)  # [rows, KVH, columns, D]
                if layer < len(store):
                    grown[: self.rows, :, : self.columns] = store[layer]
                    store[layer] = grown
                else:
                    store.append(grown)
        self.rows, self.columns = new_rows, new_columns

    # ---- slots -----------------------------------------------------------------------------
    def allocate(self) -> int:
        """The lowest free slot, now in use with length 0."""
        for slot, used in enumerate(self.in_use):
            if not used:
                self.in_use[slot], self.lengths[slot] = True, 0
                return slot
        raise LlamascopeError(f"KV cache: all {self.num_slots} slots are in use")

    def free(self, slot: int) -> None:
        self.in_use[slot], self.lengths[slot] = False, 0

    def free_slots(self) -> int:
        return self.in_use.count(False)

    def copy(self, source: int, target: int) -> None:
        """Make slot `target` (in use) hold what slot `source` holds."""
        if not (self.in_use[source] and self.in_use[target]):
            raise LlamascopeError(f"KV cache: cannot copy slot {source} to slot {target}: both must be in use")
        n = self.lengths[source]
        self.reserve(max(source, target) + 1, n)
        for store in (self.keys, self.values):
            for layer in range(self.num_layers):
                store[layer][target, :, :n] = store[layer][source, :, :n]
        self.lengths[target] = n

    def move(self, source: int, target: int) -> None:
        """Move the sequence in slot `source` to the free slot `target` (keeps used slots packed)."""
        if not self.in_use[source] or self.in_use[target]:
            raise LlamascopeError(f"KV cache: cannot move slot {source} to slot {target}")
        self.in_use[target] = True
        self.copy(source, target)
        self.free(source)

    def load(self, slot: int, cache: KVCache, row: int = 0, length: int | None = None) -> None:
        """Copy the first `length` columns (default: all filled) of row `row` of a `KVCache`
        (a prefill) into `slot`, which then holds that many positions."""
        n = cache.length if length is None else length
        if n > cache.length:
            raise LlamascopeError(f"KV cache: {n} positions asked, the source holds {cache.length}")
        self.reserve(slot + 1, n)
        for layer in range(self.num_layers):
            self.keys[layer][slot, :, :n] = cache.keys[layer][row, :, :n]
            self.values[layer][slot, :, :n] = cache.values[layer][row, :, :n]
        self.lengths[slot] = n

    def batch(self, slots: list[int], T: int) -> SlotBatch:
        """A view over `slots` (in this row order) for one forward pass of T new tokens each."""
        if not slots:
            raise LlamascopeError("KV cache: a batch needs at least one slot")
        for slot in slots:
            if not self.in_use[slot]:
                raise LlamascopeError(f"KV cache: slot {slot} is not in use")
        self.reserve(max(slots) + 1, max(self.lengths[s] for s in slots) + T)
        return SlotBatch(self, list(slots))


class SlotBatch:
    """Some slots of a `SlotKVCache` as the batch of one forward pass (rows in the given order)."""

    def __init__(self, cache: SlotKVCache, slots: list[int]):
        self.cache, self.slots = cache, slots
        device = cache.device
        self.index = torch.tensor(slots, dtype=torch.long, device=device)  # [B]
        self.starts = torch.tensor([cache.lengths[s] for s in slots], dtype=torch.long, device=device)  # [B]
        first = slots[0]
        self.packed = slots == list(range(first, first + len(slots)))  # rows are a plain slice

    @property
    def batch_size(self) -> int:
        return len(self.slots)

    @property
    def lengths(self) -> list[int]:
        return [self.cache.lengths[s] for s in self.slots]

    def positions(self, T: int) -> torch.Tensor:
        """[B, T] positions of the next T tokens of each row (a sequence's column is its position)."""
        return self.starts[:, None] + torch.arange(T, device=self.starts.device)[None, :]

    def mask(self, T: int) -> torch.Tensor | None:
        """[B, 1, T, S] bool for the next T tokens: row b's query t sees its columns up to
        lengths[b] + t. None when every row has the same length (plain causal attention)."""
        lengths = self.lengths
        if len(set(lengths)) == 1:
            return None
        S = max(lengths) + T
        q_cols = self.positions(T)[:, None, :, None]  # [B, 1, T, 1]
        k_cols = torch.arange(S, device=self.starts.device)[None, None, None, :]  # [1, 1, 1, S]
        return k_cols <= q_cols  # [B, 1, T, S]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, KVH, T, D] at each row's own columns; return keys/values [B, KVH, S, D]
        with S = the longest row after this step (shorter rows' extra columns are for the mask to hide)."""
        cache = self.cache
        T = k.shape[2]
        keys, values = cache.keys[layer], cache.values[layer]
        if T == 1:
            keys[self.index, :, self.starts] = k[:, :, 0]  # [B, KVH, D]
            values[self.index, :, self.starts] = v[:, :, 0]
        else:
            columns = self.positions(T)  # [B, T]
            rows = self.index[:, None].expand_as(columns)  # [B, T]
            keys[rows, :, columns] = k.transpose(1, 2)  # [B, T, KVH, D]
            values[rows, :, columns] = v.transpose(1, 2)
        S = int(self.starts.max()) + T
        if self.packed:
            first = self.slots[0]
            rows_slice = slice(first, first + len(self.slots))
            return keys[rows_slice, :, :S], values[rows_slice, :, :S]
        return keys[:, :, :S].index_select(0, self.index), values[:, :, :S].index_select(0, self.index)

    def advance(self, T: int) -> None:
        for slot in self.slots:
            self.cache.lengths[slot] += T
        self.starts = self.starts + T
