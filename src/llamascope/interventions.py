"""Interventions: read and change named activations while the model runs (TransformerLens's hooks,
nnsight's edits, on this engine).

    engine = Engine.load()
    clean = engine.record("The capital of France is", ["layers.20.output"])
    engine.generate("The capital of Italy is", max_new_tokens=4,
                    interventions=[Patch("layers.20.output", clean["layers.20.output"])])
    engine.generate(prompt, interventions=[AblateHeads(3, [0, 2])])        # heads 0 and 2 of layer 3 -> 0
    engine.generate(prompt, interventions=[Steer(10, vector, scale=4.0)])  # + 4 vector after layer 10

Each intervention names one point of activations.NAMES and becomes, for every forward pass, an
edit of that pass's `Capture`: `apply(x, positions)` gets the point's tensor and the positions of
the pass ([B, T], as the model sees them: each token's index in its own sequence) and returns the
tensor the model goes on with. Several interventions on one point apply in the order given. They
apply to every row of a batch alike (a Patch's values may instead give one row per sequence).

With the KV cache, what the prefill's patched or steered activations make of the keys and values
is cached, and later tokens attend to it: the run is the one the edited prompt would give. A
pass without the cache (use_cache=False) recomputes every position and edits it again, to the
same numbers.

`record` runs one forward pass over a prompt and returns its activations by name (a Recording),
with interventions or without: the values to patch in, the means to ablate with.
"""

from __future__ import annotations

import fnmatch
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from .activations import NAMES, Capture, is_inner, layer_of
from .config import GenerationConfig, ModelConfig
from .errors import LlamascopeError
from .model import check_token_ids

# Points whose positions lie on dimension 2 ([B, H, T, ...]); every other point has them on 1.
HEAD_MAJOR = ("self_attn.q_rope", "self_attn.k_rope", "attn_weights")

# Where a Steer adds its vector: the residual stream around a block, or what is added to it.
STEER_POINTS = ("input", "mid", "output", "attn_out", "mlp_out")


def position_axis(name: str) -> int:
    """The dimension of the positions in point `name`'s tensor (see activations.NAMES)."""
    return 2 if name.endswith(HEAD_MAJOR) else 1


def check_point(name: str, config: ModelConfig, who: str) -> None:
    """Refuse a point the model never passes (unknown, a layer it lacks, q_norm without Qwen3's
    norms), and `logits`, which generation recomputes for the last position (edit `norm`)."""
    if not isinstance(name, str):
        raise LlamascopeError(f"{who}: the point's name is a {type(name).__name__}, not a string")
    if name == "logits":
        raise LlamascopeError(f"{who}: the point 'logits' cannot be edited (edit 'norm', the LM head's input)")
    layer = layer_of(name)
    template = name if layer is None else "layers.{i}." + name.split(".", 2)[2]
    if template not in NAMES:
        raise LlamascopeError(f"{who}: no point named {name!r} (see llamascope.activations.NAMES)")
    if layer is not None and not 0 <= layer < config.num_hidden_layers:
        raise LlamascopeError(f"{who}: layer {layer} of {name!r} is not in 0..{config.num_hidden_layers - 1}")
    if name.endswith(("q_norm", "k_norm")) and not config.qk_norm:
        raise LlamascopeError(f"{who}: {name!r} exists only in models with q_norm and k_norm (Qwen3)")


def _shape(t) -> list[int] | str:
    """A tensor's shape as a list, or what else it is (for messages)."""
    return list(t.shape) if isinstance(t, torch.Tensor) else f"none (a {type(t).__name__}, not a tensor)"


class Intervention(ABC):
    """One change to the activations at one point (`name`, in activations.NAMES) of every pass."""

    name: str

    def check(self, config: ModelConfig, prompt_lengths: Sequence[int]) -> None:
        """Refuse, before any work, what cannot apply to this model and these prompts."""
        check_point(self.name, config, type(self).__name__)

    @abstractmethod
    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The tensor the model goes on with at `name`, given the one it computed (`x`) and the
        positions of the pass [B, T]; the same shape and dtype as `x`."""


@dataclass(frozen=True, eq=False)
class AblateHeads(Intervention):
    """Ablate attention heads of `layer`: each head's output before o_proj (the point
    `layers.{layer}.self_attn.heads`, [B, T, H, D]) becomes zero (`how="zero"`), or that head's
    mean (`how="mean"`, `mean` [H, D], e.g. `Recording.mean` or `mean_activation` of that point).
    `heads`: the heads (None: all of them). The layer's attention then runs PyTorch's plain path."""

    layer: int
    heads: Sequence[int] | None = None
    how: str = "zero"
    mean: torch.Tensor | None = None

    def __post_init__(self):
        if isinstance(self.heads, int):
            object.__setattr__(self, "heads", [self.heads])  # (one head)
        if self.how not in ("zero", "mean"):
            raise LlamascopeError(f"AblateHeads: how={self.how!r}; use 'zero' or 'mean'")
        if (self.how == "mean") != (self.mean is not None):
            raise LlamascopeError("AblateHeads: a mean ablation needs mean= (a [heads, head_dim] tensor), and only it")

    @property
    def name(self) -> str:
        return f"layers.{self.layer}.self_attn.heads"

    def check(self, config: ModelConfig, prompt_lengths: Sequence[int]) -> None:
        super().check(config, prompt_lengths)
        H, D = config.num_attention_heads, config.head_dim
        bad = [h for h in self.heads or () if not 0 <= h < H]
        if bad:
            raise LlamascopeError(f"AblateHeads: head {bad[0]} of layer {self.layer} is not in 0..{H - 1}")
        if self.mean is not None and _shape(self.mean) != [H, D]:
            raise LlamascopeError(f"AblateHeads: mean has shape {_shape(self.mean)}, not [heads, head_dim] {[H, D]}")

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # x: [B, T, H, D]
        heads = list(range(x.shape[2])) if self.heads is None else list(self.heads)
        out = x.clone()  # [B, T, H, D]
        out[:, :, heads] = 0 if self.mean is None else self.mean[heads].to(device=x.device, dtype=x.dtype)  # [h, D]
        return out


@dataclass(frozen=True, eq=False)
class Patch(Intervention):
    """Replace the activation at point `name` at prompt `positions` (None: every position the
    values cover) with `values`: a recording over positions 0..P-1 ([1 or B, P, ...], as `record`
    returns; position p's values replace position p). Values of one row apply to every sequence,
    of B rows row by row. Positions must lie in every prompt: with the KV cache the patch acts at
    the prefill, and later tokens see its effect through the cache."""

    name: str
    values: torch.Tensor
    positions: Sequence[int] | None = None

    def __post_init__(self):
        axis = position_axis(self.name)
        if not isinstance(self.values, torch.Tensor) or self.values.dim() <= axis:
            got = list(self.values.shape) if isinstance(self.values, torch.Tensor) else type(self.values).__name__
            raise LlamascopeError(f"Patch at {self.name}: values {got} are not a recorded [B, T, ...] tensor")
        covered = self.values.shape[axis]
        outside = [p for p in self.positions or () if not 0 <= p < covered]
        if outside:
            raise LlamascopeError(
                f"Patch at {self.name}: position {outside[0]} is outside the values' positions 0..{covered - 1}"
            )

    def wanted(self) -> list[int]:
        """The positions patched."""
        if self.positions is None:
            return list(range(self.values.shape[position_axis(self.name)]))
        return list(self.positions)

    def check(self, config: ModelConfig, prompt_lengths: Sequence[int]) -> None:
        super().check(config, prompt_lengths)
        last = max(self.wanted(), default=-1)
        for row, length in enumerate(prompt_lengths):
            if last >= length:
                raise LlamascopeError(
                    f"Patch at {self.name}: position {last} is past the end of prompt {row} ({length} tokens); "
                    "pass positions= to patch fewer"
                )

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        axis = position_axis(self.name)
        inner = x.movedim(axis, 1)  # [B, T, *rest]
        values = self.values.movedim(axis, 1).to(device=x.device, dtype=x.dtype)  # [1 or B, P, *rest]
        B, T = positions.shape
        if values.dim() != inner.dim() or values.shape[2:] != inner.shape[2:] or values.shape[0] not in (1, B):
            raise LlamascopeError(
                f"Patch at {self.name}: values of shape {list(self.values.shape)} do not fit the activation's "
                f"{list(x.shape)} (the same shape but the positions, and 1 or {B} rows)"
            )
        hit = torch.isin(positions, torch.tensor(self.wanted(), device=positions.device))  # [B, T]
        if not bool(hit.any()):
            return x  # (a new token's pass: patches act at prompt positions)
        rows = torch.arange(B, device=x.device)[:, None] if values.shape[0] == B else 0  # [B, 1] or one row
        source = values[rows, positions.clamp(0, values.shape[1] - 1)]  # [B, T, *rest]
        hit = hit.view(B, T, *[1] * (inner.dim() - 2))  # [B, T, 1, ...]
        return torch.where(hit, source, inner).movedim(1, axis)


@dataclass(frozen=True, eq=False)
class Steer(Intervention):
    """Add `scale * vector` ([hidden]) to the residual stream of `layer` at every position, at the
    prefill and at each new token: at `point` "output" (after the block), "input" (before it),
    "mid" (after its attention is added), or to "attn_out" or "mlp_out" (what the block adds)."""

    layer: int
    vector: torch.Tensor
    scale: float = 1.0
    point: str = "output"

    def __post_init__(self):
        if self.point not in STEER_POINTS:
            raise LlamascopeError(f"Steer: point={self.point!r}; use one of {', '.join(STEER_POINTS)}")

    @property
    def name(self) -> str:
        return f"layers.{self.layer}.{self.point}"

    def check(self, config: ModelConfig, prompt_lengths: Sequence[int]) -> None:
        super().check(config, prompt_lengths)
        if _shape(self.vector) != [config.hidden_size]:
            raise LlamascopeError(
                f"Steer: vector has shape {_shape(self.vector)}, not [hidden_size] [{config.hidden_size}]"
            )

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # x: [B, T, hidden]
        delta = self.scale * self.vector.to(device=x.device, dtype=torch.float32)  # [hidden]
        return x + delta.to(x.dtype)  # added at each position


@dataclass(frozen=True, eq=False)
class Edit(Intervention):
    """Any change at point `name`: `fn(x)` -> the tensor the model goes on with (x's shape)."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class _PointEdit:
    """The interventions at one point of one pass, one after another, each result checked."""

    def __init__(self, interventions: list[Intervention], positions: torch.Tensor):
        self.interventions, self.positions = interventions, positions  # positions: [B, T]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for intervention in self.interventions:
            out = intervention.apply(x, self.positions)
            if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                who = type(intervention).__name__
                raise LlamascopeError(f"{who} at {intervention.name} returned {got}, not a tensor of {list(x.shape)}")
            x = out.to(x.dtype)
        return x


def edits_for(interventions: Sequence[Intervention], positions: torch.Tensor) -> dict[str, _PointEdit]:
    """The `Capture.edits` of one forward pass at `positions` [B, T]."""
    by_point: dict[str, list[Intervention]] = {}
    for intervention in interventions:
        by_point.setdefault(intervention.name, []).append(intervention)
    return {name: _PointEdit(group, positions) for name, group in by_point.items()}


def pass_capture(interventions: Sequence[Intervention], positions: torch.Tensor) -> Capture:
    """A Capture that records nothing and makes the interventions' edits, for a pass at `positions`."""
    return Capture(names=(), edits=edits_for(interventions, positions))


def check_interventions(
    interventions: Sequence[Intervention], config: ModelConfig, prompts: Sequence[Sequence[int]]
) -> None:
    """Refuse, naming it, anything that is not an Intervention or does not fit the model and prompts."""
    for index, intervention in enumerate(interventions):
        if not isinstance(intervention, Intervention):
            raise LlamascopeError(
                f"interventions[{index}] is a {type(intervention).__name__}, not an Intervention "
                "(AblateHeads, Patch, Steer, Edit)"
            )
        intervention.check(config, [len(p) for p in prompts])


def check_search(config: GenerationConfig, drafts: bool) -> None:
    """Interventions edit the passes of greedy search and sampling; refuse beam search and drafts."""
    if config.num_beams > 1:
        raise LlamascopeError(f"interventions: not with beam search (num_beams={config.num_beams}); use num_beams=1")
    if drafts or config.prompt_lookup_num_tokens is not None:
        raise LlamascopeError(
            "interventions: not with speculative decoding (assistant_model, prompt_lookup_num_tokens)"
        )


# ---- recording -----------------------------------------------------------------------------


class Recording(dict):
    """One forward pass's activations by name, each as activations.NAMES shapes it ([1, T, ...]),
    and the prompt's `prompt_ids`."""

    def __init__(self, activations: dict[str, torch.Tensor], prompt_ids: list[int]):
        super().__init__(activations)
        self.prompt_ids = prompt_ids

    def mean(self, name: str) -> torch.Tensor:
        """Point `name`'s mean over the positions (float32): [hidden], or [H, D] for `self_attn.heads`."""
        return mean_activation([self], name)


def mean_activation(recordings: Iterable[dict[str, torch.Tensor]], name: str) -> torch.Tensor:
    """Point `name`'s mean over every position of every recording (float32), e.g. the mean of
    `layers.3.self_attn.heads` over a set of prompts ([H, D]) for `AblateHeads(how="mean")`."""
    rows = []
    for index, recording in enumerate(recordings):
        if name not in recording:
            raise LlamascopeError(f"mean of {name}: recording {index} has no {name} (record it by name)")
        t = recording[name].movedim(position_axis(name), 1)  # [B, T, *rest]
        rows.append(t.reshape(-1, *t.shape[2:]).float())  # [B*T, *rest]
    if not rows:
        raise LlamascopeError(f"mean of {name}: no recordings")
    if len({tuple(r.shape[1:]) for r in rows}) > 1:
        raise LlamascopeError(f"mean of {name}: the recordings' shapes differ beyond the positions")
    return torch.cat(rows).mean(0)  # [*rest]


def detail_for(patterns: Sequence[str], num_layers: int) -> set[int]:
    """The layers whose inner points (or attention weights) `patterns` name: a Capture taps those
    only in its `detail` layers."""
    inner = [n for n in NAMES if n.startswith("layers.") and (is_inner(n.format(i=0)) or n.endswith("attn_weights"))]
    return {i for i in range(num_layers) for n in inner if any(fnmatch.fnmatchcase(n.format(i=i), p) for p in patterns)}


def record(
    model: torch.nn.Module,
    ids: Sequence[int],
    names: Iterable[str] = ("*",),
    interventions: Sequence[Intervention] = (),
    attention_weights: bool = False,
) -> Recording:
    """One forward pass over `ids` (no cache) with the `interventions`: the activations matching
    the glob patterns `names`, each [1, T, ...]. Naming a point inside a layer (q_proj, heads,
    attn_weights, ...) runs that layer on PyTorch's plain path; `attention_weights`: every layer's."""
    ids, patterns = [int(t) for t in ids], [names] if isinstance(names, str) else list(names)
    if not ids:
        raise LlamascopeError("record: the prompt has no tokens")
    check_token_ids(ids, model.config.vocab_size, "record: ")
    check_interventions(interventions, model.config, [ids])
    tokens = torch.tensor([ids], dtype=torch.long, device=model.device)  # [1, T]
    positions = torch.arange(len(ids), device=model.device)[None]  # [1, T]
    capture = Capture(
        names=patterns,
        detail=detail_for(patterns, model.config.num_hidden_layers),
        attention_weights=attention_weights,
        edits=edits_for(interventions, positions),
    )
    with torch.inference_mode():
        model(tokens, positions, None, None, capture=capture)  # [1, T, V]
    return Recording(dict(capture), ids)
