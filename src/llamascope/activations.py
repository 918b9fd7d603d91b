"""Named activations of one forward pass: which the model records, and edits that change them.

    capture = Capture(detail={0}, edits={"layers.3.attn_out": torch.zeros_like})
    logits = model(tokens, positions, cache, capture=capture)
    capture["layers.0.self_attn.q_proj"]          # [B, T, H*D]

The model calls `capture.tap(name, tensor)` at each point in NAMES and goes on with what it returns:
the tensor itself, or an edit's result where `edits` names the point. Points outside the layers
and at each block's edges are always tapped; the points inside a decoder layer (transformers'
module names: `q_proj`, `k_proj`, ..., `gate_proj`, `down_proj`) only in the layers `inside` says,
which then run PyTorch's plain operations (an explicit softmax, RoPE out of place), since the
native kernels fuse those steps and keep no intermediate. With `capture=None` nothing is tapped and
every fast path stays on.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Collection, Iterable, Mapping

import torch

from .errors import LlamascopeError

# The points, {i} the layer; shapes with B batch, T new positions, S cache columns (cached + T),
# H query heads, KVH key/value heads, D head size, I the MLP's width.
NAMES = {
    "embed": "token embeddings [B, T, hidden]",
    "layers.{i}.input": "residual stream before block i [B, T, hidden]",
    "layers.{i}.input_layernorm": "RMSNorm of the block's input [B, T, hidden]",
    "layers.{i}.self_attn.q_proj": "queries, all heads side by side [B, T, H*D]",
    "layers.{i}.self_attn.k_proj": "keys of the new positions [B, T, KVH*D]",
    "layers.{i}.self_attn.v_proj": "values of the new positions [B, T, KVH*D]",
    "layers.{i}.self_attn.q_norm": "queries after the per-head RMSNorm (Qwen3) [B, T, H, D]",
    "layers.{i}.self_attn.k_norm": "keys after the per-head RMSNorm (Qwen3) [B, T, KVH, D]",
    "layers.{i}.self_attn.q_rope": "queries rotated at their positions [B, H, T, D]",
    "layers.{i}.self_attn.k_rope": "keys rotated at their positions [B, KVH, T, D]",
    "layers.{i}.attn_weights": "attention probabilities [B, H, T, S]",
    "layers.{i}.self_attn.heads": "each head's weighted sum of values, before o_proj [B, T, H, D]",
    "layers.{i}.attn_out": "attention output (o_proj), before it is added [B, T, hidden]",
    "layers.{i}.mid": "residual stream after the attention is added [B, T, hidden]",
    "layers.{i}.post_attention_layernorm": "RMSNorm of the residual before the MLP [B, T, hidden]",
    "layers.{i}.mlp.gate_proj": "gate projection [B, T, I]",
    "layers.{i}.mlp.up_proj": "up projection [B, T, I]",
    "layers.{i}.mlp.act": "SiLU(gate) * up, the input of down_proj [B, T, I]",
    "layers.{i}.mlp_out": "MLP output (down_proj), before it is added [B, T, hidden]",
    "layers.{i}.output": "residual stream after block i [B, T, hidden]",
    "norm": "hidden states after the final norm [B, T, hidden]",
    "logits": "logits at every position [B, T, vocab]",
}

# The points inside a decoder layer (tapped only in the layers `Capture.inside` names).
INNER = (
    "input_layernorm",
    "self_attn.",
    "mid",
    "post_attention_layernorm",
    "mlp.",
)


def layer_of(name: str) -> int | None:
    """The layer a point name belongs to ("layers.3.mlp_out" -> 3), or None."""
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "layers" and parts[1].isdigit() else None


def is_inner(name: str) -> bool:
    """Whether the point lies inside a decoder layer's attention or MLP (see INNER)."""
    return layer_of(name) is not None and name.split(".", 2)[2].startswith(INNER)


class Capture(dict):
    """The activations one forward pass recorded, by name (a dict of tensors), and what it was
    asked to record and change.

    names: glob patterns of the points to keep ("*" all; "layers.*.output").
    detail: layers whose inner points are tapped (and computed on PyTorch's plain path).
    attention_weights: compute and offer `layers.{i}.attn_weights` in every layer.
    all_logits: offer `logits` at every position even where the caller asked for the last only.
    edits: point name -> function from the tensor to the tensor the model goes on with (same shape
        and dtype); a function edits the point each time the model passes it.
    """

    def __init__(
        self,
        names: Iterable[str] = ("*",),
        detail: Collection[int] = (),
        attention_weights: bool = False,
        all_logits: bool = False,
        edits: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    ):
        super().__init__()
        self.patterns = tuple(names)
        self.edits = dict(edits or {})
        self.detail = frozenset(detail) | {layer_of(n) for n in self.edits if is_inner(n)}
        self.attention_weights = attention_weights
        self.all_logits = all_logits

    def keeps(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def inside(self, layer: int) -> bool:
        """Whether this layer's inner points are tapped (its attention and MLP then run plainly)."""
        return layer in self.detail

    def weights_in(self, layer: int) -> bool:
        """Whether this layer's attention probabilities are computed explicitly and offered."""
        return self.attention_weights or layer in self.detail

    def tap(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """What the model goes on with at point `name`: `x`, or the edit's result; kept if asked."""
        edit = self.edits.get(name)
        if edit is not None:
            edited = edit(x)
            if not isinstance(edited, torch.Tensor) or edited.shape != x.shape:
                got = list(edited.shape) if isinstance(edited, torch.Tensor) else type(edited).__name__
                raise LlamascopeError(f"the edit at {name} returned {got}, not a tensor of shape {list(x.shape)}")
            x = edited.to(x.dtype)
        if self.keeps(name):
            self[name] = x
        return x
