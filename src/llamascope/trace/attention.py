"""Attention you can see (`trace --attention`): every layer's and head's attention weights over
the prompt and the generated tokens, one row per query position.

Step 0 (the prefill) gives the prompt's rows ([1, H, T, T]); each later step gives its own
position's row ([1, H, 1, S]), so the matrix over all positions is what generation computed, step
by step, with the KV cache. The weights come from the model's explicit softmax (a capture asking
for them runs it: transformers' eager attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LlamascopeError


def own_rows(step) -> slice:
    """The rows of a step's forward pass that are its own new positions: the prompt's at the
    prefill, a speculative round's checked position, else the last fed one."""
    T = step.input_ids.shape[1]
    if step.index == 0:
        return slice(0, T)
    if step.speculation is not None:  # a speculative round's pass: this step's own position
        return slice(step.speculation.index, step.speculation.index + 1)
    return slice(T - 1, T)


def attention_rows(step, acts: dict, layers: int) -> list[tuple[int, torch.Tensor]]:
    """(position, weights [layers, heads, position + 1]) for each of the step's own positions:
    the weights its query put on each key up to itself (cache column = position: one sequence)."""
    rows = own_rows(step)
    positions = step.position_ids[0, rows].tolist()
    columns = acts["layers.0.attn_weights"].shape[-1]
    if columns < positions[-1] + 1:
        raise LlamascopeError(
            f"--attention: at step {step.index} the cache held {columns} columns for position {positions[-1]} "
            f"(a sliding window dropped the oldest); trace the attention of fewer tokens"
        )
    weights = torch.stack([acts[f"layers.{i}.attn_weights"][0, :, rows] for i in range(layers)])  # [L, H, n, S]
    return [(p, weights[:, :, j, : p + 1].float().clone()) for j, p in enumerate(positions)]


@dataclass
class AttentionMap:
    """Attention weights of every layer and head, a row per query position over keys 0..position."""

    heads: int
    kv_heads: int
    positions: list[int]  # the query positions, in order (prompt, then one per later step)
    tokens: list[str]  # the token fed at each position
    prompt_length: int
    rows: list[torch.Tensor]  # per position p: [layers, heads, p + 1] float32

    @property
    def layers(self) -> int:
        return self.rows[0].shape[0]

    def groups(self) -> list[list[int]]:
        """The query heads each key/value head serves (transformers' repeat_kv: consecutive heads)."""
        g = self.heads // self.kv_heads
        return [list(range(j * g, (j + 1) * g)) for j in range(self.kv_heads)]

    def weights(self, layer: int, head: int, decimals: int = 4) -> list[list[float]]:
        """One head's rows: row p holds the weights of query p on keys 0..p, rounded."""
        return [row[layer, head].double().round(decimals=decimals).tolist() for row in self.rows]  # (short reprs)

    def to_json(self) -> dict:
        return {
            "layers": self.layers,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "groups": self.groups(),
            "positions": self.positions,
            "tokens": self.tokens,
            "prompt_length": self.prompt_length,
            "weights": [[self.weights(i, h) for h in range(self.heads)] for i in range(self.layers)],
        }


def attention_map(
    rows: list[tuple[int, torch.Tensor]], kv_heads: int, texts: list[str], prompt_length: int
) -> AttentionMap:
    """The map from the rows the steps gave (`attention_rows`), in position order; `texts`: each
    token of the sequence (prompt and generated) decoded on its own."""
    rows = sorted(rows, key=lambda r: r[0])
    return AttentionMap(
        heads=rows[0][1].shape[1],
        kv_heads=kv_heads,
        positions=[p for p, _ in rows],
        tokens=[texts[p] for p, _ in rows],
        prompt_length=prompt_length,
        rows=[w for _, w in rows],
    )
