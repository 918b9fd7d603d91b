"""The layer view (`trace --layer N`): every tensor of one decoder layer at the prefill, in the
order the layer computes it, named as in transformers (`model.layers.N.self_attn.q_proj`, ...),
with its shape, dtype and how the next operation reads it (the heads view, the key/value head
each query head shares, RoPE's positions, the causal mask, the residual adds).

The shapes and dtypes are those of the tensors the model computed (a `Capture` with the layer in
`detail`, at step 0); nothing is recomputed. The layer's slot of the KV cache is described from
the cache generate() allocated (`Trace.kv_cache`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LlamascopeError


@dataclass
class LayerRow:
    name: str  # transformers' module (its output) or tensor: "model.layers.0.self_attn.q_proj"
    shape: list[int]
    dtype: str
    what: str  # what it is and how the next operation reads it

    def to_json(self) -> dict:
        return {"name": self.name, "shape": self.shape, "dtype": self.dtype, "what": self.what}


@dataclass
class LayerView:
    layer: int
    positions: list[int]  # the positions the prefill fed
    rows: list[LayerRow]

    def to_json(self) -> dict:
        return {"layer": self.layer, "positions": self.positions, "rows": [r.to_json() for r in self.rows]}


def check_layer(layer: int | None, layers: int) -> None:
    """Refuse a layer the model does not have (None: no layer view)."""
    if layer is not None and not (isinstance(layer, int) and 0 <= layer < layers):
        raise LlamascopeError(f"--layer {layer}: this model has {layers} decoder layers, 0 to {layers - 1}")


def layer_names(layer: int) -> list[str]:
    """The capture patterns that keep every point of `layer` (activations.NAMES)."""
    return [f"layers.{layer}.*"]


def tensor_facts(acts: dict, layer: int) -> dict[str, tuple[list[int], str]]:
    """Point name (without "layers.{layer}.") -> (shape, dtype) of each tensor the capture kept."""
    prefix = f"layers.{layer}."
    return {
        name.removeprefix(prefix): (list(t.shape), str(t.dtype).removeprefix("torch."))
        for name, t in acts.items()
        if name.startswith(prefix) and isinstance(t, torch.Tensor)
    }


def _span(positions: list[int]) -> str:
    return str(positions[0]) if len(positions) == 1 else f"{positions[0]}..{positions[-1]}"


def _groups(heads: int, kv_heads: int) -> str:
    """Which query heads each key/value head serves (transformers' repeat_kv: consecutive heads)."""
    g = heads // kv_heads
    return "; ".join(
        f"kv head {j}: q heads {', '.join(str(h) for h in range(j * g, (j + 1) * g))}" for j in range(kv_heads)
    )


def _notes(layer: int, facts: dict, positions: list[int]) -> dict[str, tuple[str, str]]:
    """Point -> (transformers' name relative to the layer, what it is), for the points a layer has."""
    B, H, T, D = facts["self_attn.q_rope"][0]  # [B, H, T, D]
    KVH = facts["self_attn.k_rope"][0][1]
    span, g = _span(positions), H // KVH
    kv_view = f"viewed as [{B}, {KVH}, {T}, {D}] (batch, kv_heads, positions, head_dim)"
    return {
        "input": ("(input)", f"the residual stream coming in (transformers' hidden_states[{layer}])"),
        "input_layernorm": ("input_layernorm", "RMSNorm of the input (in float32, times its weight)"),
        "self_attn.q_proj": (
            "self_attn.q_proj",
            f"queries, {H} heads side by side; viewed as [{B}, {T}, {H}, {D}] and transposed to "
            f"[{B}, {H}, {T}, {D}] (batch, heads, positions, head_dim)",
        ),
        "self_attn.k_proj": ("self_attn.k_proj", f"keys, {KVH} heads; {kv_view}: each serves {g} query heads"),
        "self_attn.v_proj": ("self_attn.v_proj", f"values, {KVH} heads; {kv_view}"),
        "self_attn.q_norm": ("self_attn.q_norm", "RMSNorm over each query head's head_dim values"),
        "self_attn.k_norm": ("self_attn.k_norm", "RMSNorm over each key head's head_dim values"),
        "self_attn.q_rope": (
            "self_attn (query_states)",
            f"queries after RoPE (apply_rotary_pos_emb) at positions {span}",
        ),
        "self_attn.k_rope": (
            "self_attn (key_states)",
            f"keys after RoPE at positions {span}; these go into the KV cache",
        ),
        "attn_weights": (
            "self_attn (attn_weights)",
            f"softmax(q k^T / sqrt({D}) + causal mask): position t sees keys 0..t; each key/value head's "
            f"keys repeated for its {g} query heads ({_groups(H, KVH)})",
        ),
        "self_attn.heads": (
            "self_attn (attn_output)",
            f"attn_weights @ values, transposed to [{B}, {T}, {H}, {D}]; reshaped to [{B}, {T}, {H * D}] for o_proj",
        ),
        "attn_out": ("self_attn.o_proj", "the attention's output, before it is added"),
        "mid": ("(residual)", "the input + the attention's output"),
        "post_attention_layernorm": ("post_attention_layernorm", "RMSNorm of the residual, the MLP's input"),
        "mlp.gate_proj": ("mlp.gate_proj", "gate projection"),
        "mlp.up_proj": ("mlp.up_proj", "up projection"),
        "mlp.act": ("mlp.act_fn(gate_proj) * up_proj", "SiLU of the gate times up: down_proj's input"),
        "mlp_out": ("mlp.down_proj", "the MLP's output, before it is added"),
        "output": ("(output)", "the residual + the MLP's output: the layer's output"),
    }


def layer_view(layer: int, facts: dict[str, tuple[list[int], str]], positions: list[int], kv_cache: dict) -> LayerView:
    """The rows of the layer view, in the order the layer computes them, from what the capture kept
    (`tensor_facts`) at the positions the prefill fed; the layer's KV cache slot after the keys."""
    prefix = f"model.layers.{layer}."
    rows = []
    for point, (name, what) in _notes(layer, facts, positions).items():
        if point not in facts:  # (q_norm and k_norm: Qwen3 only)
            continue
        shape, dtype = facts[point]
        full = prefix[:-1] + " " + name if name.startswith("(") else prefix + name
        rows.append(LayerRow(full, shape, dtype, what))
        if point == "self_attn.k_rope" and kv_cache:
            rows.append(_cache_row(layer, kv_cache, positions))
    return LayerView(layer, positions, rows)


def _cache_row(layer: int, kv_cache: dict, positions: list[int]) -> LayerRow:
    """The layer's slot of the KV cache: keys and values, each [batch, kv_heads, capacity, head_dim]."""
    _, batch, kv_heads, capacity, head_dim = kv_cache["shape"]
    per_position = kv_cache["bytes_per_position"] // kv_cache["shape"][0]  # this layer's keys and values
    return LayerRow(
        f"past_key_values.layers[{layer}].keys, .values",
        [batch, kv_heads, capacity, head_dim],
        kv_cache["dtype"],
        f"this layer's keys and values in the KV cache (each this shape): columns {_span(positions)} "
        f"written by this step, of {capacity}; {per_position:,} bytes a position for both",
    )
