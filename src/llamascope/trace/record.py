"""Recording a trace: what each step of generate() took in, computed and chose (see the package's
docstring), and the records that hold it."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

import torch

from ..activations import NAMES, Capture
from ..attribution import POINTS, Attribution, attribute
from ..cache import KVCache
from ..config import GenerationConfig, room_for_new_tokens
from ..constraints import GrammarMask, describe
from ..errors import LlamascopeError
from ..generation import generate
from ..info import (
    Contradiction,
    find_contradictions,
    generation_rows_json,
    source_labels,
)
from ..interventions import record as record_activations
from ..sampling import build_processors
from .attention import AttentionMap, attention_map, attention_rows, own_rows
from .layer import LayerView, check_layer, layer_names, layer_view, tensor_facts

# ---- capturing activations by name ------------------------------------------------------------

ACTIVATION_NAMES = NAMES  # (activations.py: every point, with its shape)


class ActivationRecorder:
    """Pass as `generate(..., capture=recorder)`; afterwards `recorder.steps[k]` maps each captured
    name matching one of `names` (glob patterns such as "layers.*.output") to its tensor at step k.

    Attention weights are computed only when asked for (a pattern naming `attn_weights`, or
    `attention_weights=True`): attention then runs as an explicit softmax instead of PyTorch's
    fused kernel, which can change the last bits of the results. `detail`: layers whose inner
    points (q_proj ... down_proj, see activations.NAMES) are recorded too; `edits` as in `Capture`.
    """

    def __init__(
        self,
        names: Iterable[str] = ("*",),
        attention_weights: bool = False,
        detail: Iterable[int] = (),
        edits: dict | None = None,
    ):
        self.patterns = list(names)
        self.attention_weights = attention_weights or any("attn_weights" in p for p in self.patterns)
        self.all_logits = any(fnmatch.fnmatchcase("logits", p) for p in self.patterns)
        self.detail = tuple(detail)
        self.edits = edits
        self._raw: list[Capture] = []

    def new_capture(
        self,
        names: Iterable[str] | None = None,
        all_logits: bool = False,
        detail: Iterable[int] = (),
        attention_weights: bool = False,
    ) -> Capture:
        """A capture asking for what this recorder keeps (and `names`, `detail` layers and attention
        weights besides, e.g. what a trace reads)."""
        return Capture(
            names=self.patterns if names is None else [*self.patterns, *names],
            detail=(*self.detail, *detail),
            attention_weights=self.attention_weights or attention_weights,
            all_logits=self.all_logits or all_logits,
            edits=self.edits,
        )

    def __call__(self, step_index: int) -> Capture:
        acts = self.new_capture()
        self._raw.append(acts)
        return acts

    def select(self, acts: dict) -> dict[str, torch.Tensor]:
        return {name: value for name, value in acts.items() if any(fnmatch.fnmatchcase(name, p) for p in self.patterns)}

    @property
    def steps(self) -> list[dict[str, torch.Tensor]]:
        return [self.select(acts) for acts in self._raw]


def capture_activations(
    model: torch.nn.Module, ids: Sequence[int], names: Iterable[str] = ("*",), attention_weights: bool = False
) -> dict[str, torch.Tensor]:
    """One forward pass over `ids` (no cache): the named activations, each [1, T, ...]
    (interventions.record, which also takes interventions)."""
    return dict(record_activations(model, ids, names, attention_weights=attention_weights))


# ---- what a trace holds -----------------------------------------------------------------------


@dataclass
class TokenChoice:
    id: int
    text: str  # the token decoded on its own (special tokens kept)
    prob: float  # under the distribution the token was chosen from (after the processors)
    model_prob: float  # softmax of the model's raw logits
    logit: float

    def to_json(self) -> dict:
        return {"id": self.id, "text": self.text, "prob": self.prob, "model_prob": self.model_prob, "logit": self.logit}


@dataclass
class DraftCheck:
    """A speculative step: its round's draft and what became of the draft token it checked."""

    source: str  # "prompt lookup" or "assistant"
    draft: list[TokenChoice]  # the round's drafted tokens, with the model's p for each at this step
    index: int  # the draft token this step checked (== len(draft): none left, the model's own token)
    kept: bool
    why: str  # in words: why the checked token was kept or refused

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "draft": [c.to_json() for c in self.draft],
            "index": self.index,
            "kept": self.kept,
            "why": self.why,
        }


@dataclass
class StepTrace:
    index: int
    input_ids: list[list[int]]  # [B, T] fed this step
    position_ids: list[list[int]]  # [B, T]
    attention_mask: list[list[int]]  # [B, S]
    use_cache: bool
    cache_length: int | None  # positions the cache held before this step (None: no cache)
    shapes: dict[str, list[int]]  # embed, decoder_output, norm, logits (what the model returned per step)
    chosen: TokenChoice
    top: list[TokenChoice]
    activations: dict[str, torch.Tensor] = field(default_factory=dict)
    speculation: DraftCheck | None = None  # speculative decoding: the round's draft and this step's check
    # structured output: the tokens the processors left (the constraint's mask first) and the
    # model's own top choice, and whether the constraint changed it
    constrained: dict | None = None
    # sampling: each processor in turn with the candidates it left and the model's probability mass
    # on them, and the drawn token's rank among the processed scores (1: the most likely)
    sampling: dict | None = None
    # trace(attribution=...): the chosen token's logit split into the direct contributions of the
    # embedding, each attention head and each MLP (attribution.py)
    attribution: Attribution | None = None

    @property
    def cache_state(self) -> str:
        if not self.use_cache:
            return "no cache (use_cache=False): the whole sequence is fed again"
        if not self.cache_length:
            return "empty (0 positions)"
        return f"holding {self.cache_length} positions"

    def to_json(self) -> dict:
        return {
            "index": self.index,
            "phase": "prefill" if self.index == 0 else "decode",
            "input_ids": self.input_ids,
            "input_ids_shape": shape_of(self.input_ids),
            "position_ids": self.position_ids,
            "position_ids_shape": shape_of(self.position_ids),
            "attention_mask": self.attention_mask,
            "attention_mask_shape": shape_of(self.attention_mask),
            "use_cache": self.use_cache,
            "cache_length": self.cache_length,
            "cache_state": self.cache_state,
            "shapes": self.shapes,
            "chosen": self.chosen.to_json(),
            "top": [c.to_json() for c in self.top],
            "activations": {name: list(t.shape) for name, t in self.activations.items()},
            "speculation": None if self.speculation is None else self.speculation.to_json(),
            "constrained": self.constrained,
            "sampling": self.sampling,
            "attribution": None if self.attribution is None else self.attribution.to_json(),
        }


@dataclass
class PositionPrediction:
    position: int
    token_id: int  # the prompt token at this position
    token_text: str
    predicted_id: int  # argmax of the logits at this position
    predicted_text: str
    prob: float
    next_id: int | None  # the prompt token that follows (None at the last position)

    def to_json(self) -> dict:
        return {
            "position": self.position,
            "token_id": self.token_id,
            "token": self.token_text,
            "predicted_id": self.predicted_id,
            "predicted": self.predicted_text,
            "prob": self.prob,
            "next_id": self.next_id,
            "correct": None if self.next_id is None else self.predicted_id == self.next_id,
        }


@dataclass
class Lens:
    """Logit lens: final norm + LM head applied to the residual stream after each layer."""

    layers: list[str]  # "embed", "0", ..., str(L-1)
    positions: list[int]
    tokens: list[str]  # the token fed at each position
    next_ids: list[int | None]  # the token that came next at each position (prompt or generated)
    cells: list[list[list[tuple[int, str, float]]]]  # [layer][position] -> top-K (id, text, prob)
    final_layer_max_abs_diff: float  # |lens at the last layer - the model's logits|, max over steps

    def to_json(self) -> dict:
        return {
            "layers": self.layers,
            "positions": self.positions,
            "tokens": self.tokens,
            "next_ids": self.next_ids,
            "final_layer_max_abs_diff": self.final_layer_max_abs_diff,
            "cells": [[[{"id": i, "text": t, "prob": p} for i, t, p in cell] for cell in row] for row in self.cells],
        }


@dataclass
class Trace:
    prompt: str | None
    prompt_ids: list[int]
    pieces: list[str]  # the tokenizer's pieces ("Ġname")
    texts: list[str]  # each token decoded on its own (" name")
    attention_mask: list[int]
    adds_bos: bool
    settings: GenerationConfig
    max_length: int
    context: int  # the model's max_position_embeddings
    warnings: list[Contradiction]
    strategy: str
    strategy_reason: str
    processors: list[str]
    steps: list[StepTrace]
    predictions: list[PositionPrediction]
    output_ids: list[int]
    text: str
    finish_reason: str
    top: int
    lens: Lens | None = None
    # what was traced: the model's name, file, format, architecture, dtype and llamascope's version
    model: dict = field(default_factory=dict)
    # the KV cache generation allocated: its tensors' shape and dtype, bytes per position and in all
    kv_cache: dict = field(default_factory=dict)
    layer: LayerView | None = None  # every tensor of one layer at the prefill (--layer)
    attention: AttentionMap | None = None  # every layer's and head's attention weights (--attention)

    @property
    def prompt_length(self) -> int:
        return len(self.prompt_ids)

    @property
    def predictions_text(self) -> str:
        """The per-position argmax tokens read one after another."""
        return "".join(p.predicted_text for p in self.predictions)

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "kv_cache": self.kv_cache,
            "prompt": self.prompt,
            "tokenization": {
                "input_ids": [self.prompt_ids],
                "input_ids_shape": [1, self.prompt_length],
                "pieces": self.pieces,
                "texts": self.texts,
                "attention_mask": [self.attention_mask],
                "attention_mask_shape": [1, self.prompt_length],
                "adds_bos": self.adds_bos,
            },
            "settings": generation_rows_json(self.settings),
            "max_length": self.max_length,
            "max_length_rule": max_length_rule(self),
            "warnings": [w.to_json() for w in self.warnings],
            "strategy": {"name": self.strategy, "reason": self.strategy_reason, "processors": self.processors},
            "steps": [s.to_json() for s in self.steps],
            "predictions": [p.to_json() for p in self.predictions],
            "predictions_text": self.predictions_text,
            "lens": self.lens.to_json() if self.lens is not None else None,
            "layer": self.layer.to_json() if self.layer is not None else None,
            "attention": self.attention.to_json() if self.attention is not None else None,
            "output_ids": self.output_ids,
            "text": self.text,
            "finish_reason": self.finish_reason,
        }


def shape_of(nested: list) -> list[int]:
    shape = []
    while isinstance(nested, list):
        shape.append(len(nested))
        nested = nested[0] if nested else None
    return shape


def max_length_rule(t: Trace) -> str:
    s = t.settings
    if s.max_new_tokens is not None:
        return (
            f"max_length = prompt length {t.prompt_length} + max_new_tokens {s.max_new_tokens} "
            f"({s.sources['max_new_tokens']}) = {t.max_length}"
        )
    if s.max_length is not None:
        return f"max_length = {t.max_length} ({s.sources['max_length']}; max_new_tokens not set)"
    return (
        f"max_length = min(prompt length {t.prompt_length} + 20, context {t.context}) = {t.max_length} "
        f"(transformers' default when neither max_new_tokens nor max_length is set)"
    )


def decoding_strategy(settings: GenerationConfig) -> tuple[str, str]:
    """transformers' generation mode for these settings, and the settings that chose it."""

    def said(name: str) -> str:
        return f"{name}={getattr(settings, name)!r} ({settings.sources.get(name, 'default')})"

    if settings.num_beams > 1:
        if settings.do_sample:
            return "beam sampling", f"{said('num_beams')} > 1 and {said('do_sample')}"
        return "beam search", (
            f"{said('num_beams')} > 1 and {said('do_sample')}: keeps the best beams by log-probability"
        )
    if settings.do_sample:
        return "sampling", (
            f"{said('do_sample')} and {said('num_beams')}: the next token is drawn from the "
            f"softmax of the processed logits"
        )
    return "greedy search", (f"{said('do_sample')} and {said('num_beams')}: the next token is the argmax of the logits")


# ---- recording --------------------------------------------------------------------------------


class _Recorder:
    """on_step / capture callbacks for generate(): keeps what the trace shows, drops the rest."""

    def __init__(
        self,
        model,
        tokenizer,
        settings: GenerationConfig,
        prompt_ids: list[int],
        top: int,
        lens: bool,
        activations: ActivationRecorder | None,
        layer: int | None = None,
        attention: bool = False,
        attributed: frozenset[int] | None = frozenset(),
    ):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.attributed = attributed  # the steps whose choice is attributed (None: every step)
        self.layer, self.want_attention = layer, attention  # (--layer, --attention)
        self.layer_facts: dict[str, tuple[list[int], str]] = {}  # the layer's tensors at step 0: shape, dtype
        self.layer_positions: list[int] = []
        self.attention_rows: list[tuple[int, torch.Tensor]] = []  # (position, [layers, heads, position + 1])
        self.prompt_ids, self.top, self.want_lens = prompt_ids, top, lens
        self.activations = activations
        self.steps: list[StepTrace] = []
        self.chosen_ids: list[int] = []  # the tokens chosen so far (the sequence is prompt_ids + these)
        self.processors: list | None = None  # sampling: generation's processors, replayed one at a time
        self.predictions: list[PositionPrediction] = []
        self.lens_cells: list[list[list[tuple[int, str, float]]]] = []  # [layer][position]
        self.lens_positions: list[int] = []
        self.lens_max_diff = 0.0
        self._texts: dict[int, str] = {}

    def text(self, token_id: int) -> str:
        if token_id not in self._texts:
            self._texts[token_id] = self.tokenizer.decode([token_id]) if self.tokenizer is not None else f"<{token_id}>"
        return self._texts[token_id]

    def capture(self, step_index: int) -> Capture:
        """What the trace reads (and the user's recorder asks for): the residual stream for the
        lens and the shapes, at the prefill the logits at every prompt position, and at the steps
        attributed each head's output and each MLP's in every layer."""
        read = ["embed", "layers.*.output", "norm", "logits"]
        detail = (self.layer,) if step_index == 0 and self.layer is not None else ()
        if detail:  # the layer view: every tensor of that layer at the prefill
            read += layer_names(self.layer)
        if self.want_attention:
            read.append("layers.*.attn_weights")
        if self._attributes(step_index):  # each head's output in every layer, on the plain path
            read += POINTS
            detail = tuple(range(self.model.config.num_hidden_layers))
        asked = dict(all_logits=step_index == 0, detail=detail, attention_weights=self.want_attention)
        if self.activations is not None:
            return self.activations.new_capture(read, **asked)
        return Capture(names=read, **asked)

    def _attributes(self, step_index: int) -> bool:
        return self.attributed is None or step_index in self.attributed

    def on_step(self, step) -> None:
        acts = step.capture
        self.steps.append(self._step_trace(step, acts))
        if self._attributes(step.index) and "layers.0.self_attn.heads" in acts:  # (a round's pass: if it asked)
            self.steps[-1].attribution = self._attribution(step, acts)
        self.chosen_ids.append(int(step.next_tokens[0]))
        if step.index == 0:
            self._predictions(acts["logits"][0].float())  # [T, V]
        if self.want_lens:
            self._lens(step, acts)
        if step.index == 0 and self.layer is not None:
            self.layer_facts = tensor_facts(acts, self.layer)
            self.layer_positions = step.position_ids[0].tolist()
        if self.want_attention:
            self.attention_rows += attention_rows(step, acts, self.model.config.num_hidden_layers)

    def _step_trace(self, step, acts: dict) -> StepTrace:
        """What the step took in, the shapes the model returned, the chosen token and the top ones."""
        chosen, top = self._choices(step)
        return StepTrace(
            index=step.index,
            input_ids=step.input_ids.tolist(),
            position_ids=step.position_ids.tolist(),
            attention_mask=step.attention_mask.tolist(),
            use_cache=step.cache_length is not None,
            cache_length=step.cache_length,
            shapes=_step_shapes(step, acts, self.model.config.num_hidden_layers),
            chosen=chosen,
            top=top,
            activations=self.activations.select(acts) if self.activations is not None else {},
            speculation=self._draft_check(step, chosen) if step.speculation is not None else None,
            constrained=self._constrained(step, chosen) if self.settings.constraint is not None else None,
            sampling=self._sampling(step, chosen) if self.settings.do_sample else None,
        )

    def _attribution(self, step, acts: dict) -> Attribution:
        """The chosen token's logit (and the runner-up's) at the position that chose it, part by part."""
        chosen = int(step.next_tokens[0])
        scores = step.scores[0]  # [V] after the processors: what the choice was made from
        ranked = torch.topk(scores, min(2, scores.shape[-1])).indices.tolist()
        others = [i for i in ranked if i != chosen and torch.isfinite(scores[i])]
        with torch.inference_mode():
            column = own_rows(step).stop - 1  # the last of its own rows: whose logits chose the token
            a = attribute(self.model, acts, column, [chosen, *others[:1]], step.logits[0])
        for t in (a.token, a.runner_up) if a.runner_up is not None else (a.token,):
            t.text = self.text(t.id)
        return a

    def _sampling(self, step, chosen: TokenChoice) -> dict:
        """The processors applied one at a time to the step's logits, as generation applied them:
        after each, how many candidates are left and how much of the model's probability they hold;
        and where the drawn token ranks among the processed scores."""
        logits = step.logits[:1].float()  # [1, V]
        model_probs = logits.softmax(-1)[0]  # [V]
        ids = torch.tensor([self.prompt_ids + self.chosen_ids], device=logits.device)  # [1, S]: before this step
        if self.processors is None:  # (built once: a stateful one, the constraint's mask, syncs with ids)
            vocab = self.model.config.vocab_size
            self.processors = build_processors(
                self.settings, len(self.prompt_ids), vocab_size=vocab, tokenizer=self.tokenizer
            )
        stages, scores = [], logits
        for processor in self.processors:
            scores = processor(ids, scores)
            kept = torch.isfinite(scores[0])
            stages.append(
                {
                    "processor": _describe_processor(processor),
                    "kept": int(kept.sum()),
                    "mass": float(model_probs[kept].sum()),
                }
            )
        final = step.scores[0]
        return {"stages": stages, "rank": int((final > final[chosen.id]).sum()) + 1}

    def _constrained(self, step, chosen: TokenChoice) -> dict:
        """How many tokens the processors left (the constraint's mask is the first of them) and
        whether the model's own top token was among them."""
        own = int(step.logits[0].argmax())
        return {
            "allowed": int(torch.isfinite(step.scores[0]).sum()),
            "model_choice": {"id": own, "text": self.text(own)},
            "changed": own != chosen.id,
        }

    def _draft_check(self, step, chosen: TokenChoice) -> DraftCheck:
        """The round's draft as the model saw it at this step, and why the checked token fared as it did."""
        spec = step.speculation
        probs = step.scores[0].softmax(-1)  # [V]
        logits, model_probs = step.logits[0], step.logits[0].softmax(-1)
        draft = [
            TokenChoice(i, self.text(i), float(probs[i]), float(model_probs[i]), float(logits[i])) for i in spec.draft
        ]
        kept = spec.accepts(chosen.id)
        if not spec.checked:
            why = (
                "no draft this round: a plain step"
                if not spec.draft
                else "the draft was kept whole: the model's own next token"
            )
        elif kept and spec.draft_prob is None:
            why = "the model chose the drafted token"
        elif kept:
            why = f"kept with probability min(1, p/q) = min(1, {draft[spec.index].prob:.4f}/{spec.draft_prob:.4f})"
        else:
            theirs = draft[spec.index]
            rank = int((probs > probs[theirs.id]).sum()) + 1
            if spec.draft_prob is None:
                why = (
                    f"refused: the model chose {chosen.text!r} (p = {chosen.prob:.4f}), not the draft's "
                    f"{theirs.text!r} (p = {theirs.prob:.4f}, rank {rank}); the rest of the draft is dropped"
                )
            else:
                why = (
                    f"refused: kept with probability min(1, p/q) = min(1, {theirs.prob:.4f}/{spec.draft_prob:.4f}) "
                    f"and the draw said no; {chosen.text!r} drawn from max(0, p - q) instead"
                )
        return DraftCheck(spec.source, draft, spec.index, kept, why)

    def _choices(self, step) -> tuple[TokenChoice, list[TokenChoice]]:
        """The chosen token and the `top` most probable ones under the processed scores."""
        logits = step.logits[0]  # [V] float32, last position, before the processors
        scores = step.scores[0]  # [V] after the processors
        probs, model_probs = scores.softmax(-1), logits.softmax(-1)  # [V]
        chosen_id = int(step.next_tokens[0])

        def choice(i: int) -> TokenChoice:
            return TokenChoice(i, self.text(i), float(probs[i]), float(model_probs[i]), float(logits[i]))

        k = min(self.top, probs.shape[-1])
        top_ids = torch.topk(probs, k).indices.tolist()
        return choice(chosen_id), [choice(i) for i in top_ids]

    def _predictions(self, all_logits: torch.Tensor) -> None:
        probs = all_logits.softmax(-1)  # [T, V]
        best = probs.max(-1)
        ids = self.prompt_ids
        for t, (p, i) in enumerate(zip(best.values.tolist(), best.indices.tolist())):
            self.predictions.append(
                PositionPrediction(
                    t, ids[t], self.text(ids[t]), i, self.text(i), p, ids[t + 1] if t + 1 < len(ids) else None
                )
            )

    def _lens(self, step, acts: dict) -> None:
        """Final norm + LM head on the residual stream after each layer, at this step's new positions."""
        model = self.model
        L = model.config.num_hidden_layers
        cols = own_rows(step)  # the prompt's positions, or this step's own
        new = cols.stop - cols.start
        self.lens_positions.extend(step.position_ids[0, cols].tolist())
        if not self.lens_cells:
            self.lens_cells = [[] for _ in range(L + 1)]
        streams = [acts["embed"][:, cols]] + [acts[f"layers.{i}.output"][:, cols] for i in range(L)]
        with torch.inference_mode():
            final = lens_logits(model, streams[-1])[0]  # [new, V], the model's own computation
            reference = acts["logits"][0, cols].float() if step.index == 0 else step.logits
            self.lens_max_diff = max(self.lens_max_diff, (final - reference).abs().max().item())
            # The other layers in one product per chunk of positions (at most ~64 MB of logits).
            chunk = max(1, (1 << 24) // (L * model.config.vocab_size))
            for lo in range(0, new, chunk):
                hi = min(new, lo + chunk)
                normed = torch.cat([model.model.norm(s)[:, lo:hi] for s in streams[:-1]])  # [L, n, hidden]
                logits = torch.cat([model.lm_head(normed).float(), final[None, lo:hi]])  # [L + 1, n, V]
                values, indices = torch.topk(logits.softmax(-1), min(self.top, logits.shape[-1]), dim=-1)
                for row, (vs_row, ids_row) in enumerate(zip(values.tolist(), indices.tolist())):
                    for vs, ids in zip(vs_row, ids_row):
                        self.lens_cells[row].append([(i, self.text(i), p) for i, p in zip(ids, vs)])


def _attribution_steps(value: bool | str | Iterable[int]) -> frozenset[int] | None:
    """trace(attribution=...): False: no step; True or "first": the first; "all": None (every
    step); step numbers: those."""
    if value is True or value == "first":
        return frozenset({0})
    if value == "all":
        return None
    steps = tuple(value) if isinstance(value, Iterable) and not isinstance(value, str) else None
    if value is not False and (steps is None or not all(isinstance(i, int) and i >= 0 for i in steps)):
        raise LlamascopeError(f"attribution={value!r}: expected True, False, 'first', 'all' or step numbers")
    return frozenset(steps or ())


def _step_shapes(step, acts: dict, layers: int) -> dict[str, list[int]]:
    """The shape of what the model returned at each stage of this step's forward pass."""
    shapes = {
        "embed": list(acts["embed"].shape),
        "decoder_output": list(acts[f"layers.{layers - 1}.output"].shape),
        "norm": list(acts["norm"].shape),
        "logits": [step.logits.shape[0], 1, step.logits.shape[1]],
        "next_token_logits": list(step.logits.shape),
    }
    if "logits" in acts:
        shapes["all_position_logits"] = list(acts["logits"].shape)
    return shapes


def lens_logits(model, stream: torch.Tensor, positions: int | None = None) -> torch.Tensor:
    """The logit lens on one residual stream [B, T, hidden]: the model's final norm, then its LM
    head on the last `positions` positions (all by default) -> float32 [B, positions, vocab].

    The norm runs over all T positions and the head over the kept ones, as the model's forward
    does, so on the last layer's output this is the model's own computation, bit for bit.
    """
    with torch.inference_mode():
        h = model.model.norm(stream)  # [B, T, hidden]
        if positions is not None:
            h = h[:, -positions:]
        return model.lm_head(h).float()  # [B, positions, V]


def trace(
    engine,
    prompt: str | Sequence[int],
    *,
    chat: bool = False,
    top: int = 5,
    lens: bool = False,
    activations: Iterable[str] | None = None,
    attention_weights: bool = False,
    defaults: dict[str, Any] | None = None,
    defaults_source: str = "default (caller)",
    assistant_model=None,
    layer: int | None = None,
    attention: bool = False,
    attribution: bool | str | Iterable[int] = False,
    **settings: Any,
) -> Trace:
    """Generate for one prompt and record every step (greedy search or sampling).

    `settings` are generation settings (max_new_tokens, use_cache, do_sample, ...) given by the
    call; the rest come from generation_config.json, config.json and defaults as in transformers.
    `defaults`: the caller's own defaults for settings the call leaves unset (the CLI's number of
    new tokens); they win like the call's settings, and the trace names their source
    `defaults_source` ("default (CLI)") rather than "call".
    `activations`: glob patterns of capture names to keep per step (off by default).
    `assistant_model`: as in `Engine.generate` (speculative steps show their drafts).
    `layer`: the layer whose every tensor the prefill records (`Trace.layer`; off by default: that
    layer's prefill then runs PyTorch's plain operations, which can change the last bits).
    `attention`: record every layer's and head's attention weights at every step (`Trace.attention`;
    attention then runs as an explicit softmax, transformers' eager attention).
    `attribution`: the steps whose chosen token's logit is split into the direct contributions of
    the embedding, each attention head and each MLP (`StepTrace.attribution`, attribution.py): True
    or "first" the first, "all" every step, or step numbers; those steps run every layer plainly.
    """
    check_layer(layer, engine.config.num_hidden_layers)
    plan = _plan(engine, prompt, chat, settings, defaults or {}, defaults_source)
    assistant = engine.assistant(assistant_model)
    recorder = ActivationRecorder(activations, attention_weights) if (activations or attention_weights) else None
    attributed = _attribution_steps(attribution)
    record = _Recorder(
        engine.model, engine.tokenizer, plan.settings, plan.ids, top, lens, recorder, layer, attention, attributed
    )
    result = generate(
        engine.model,
        [plan.ids],
        plan.settings,
        tokenizer=engine.tokenizer,
        on_step=record.on_step,
        capture=record.capture,
        assistant=assistant,
    )
    traced = _assemble(engine, plan, record, result, top, lens)
    if record.layer_facts:
        traced.layer = layer_view(layer, record.layer_facts, record.layer_positions, traced.kv_cache)
    if record.attention_rows:
        texts = [record.text(i) for i in traced.prompt_ids + traced.output_ids]
        traced.attention = attention_map(record.attention_rows, engine.model.kv_heads, texts, traced.prompt_length)
    return traced


@dataclass
class _Plan:
    """What is settled before generation: the prompt's ids, the settings in force and what they imply."""

    prompt: str | None  # None: the prompt was given as token ids
    ids: list[int]
    chat: bool
    settings: GenerationConfig
    strategy: str
    strategy_reason: str
    warnings: list[Contradiction]


def _plan(
    engine, prompt: str | Sequence[int], chat: bool, settings: dict, defaults: dict, defaults_source: str
) -> _Plan:
    """Encode the prompt and settle the settings; refuse, before anything runs, what trace cannot follow."""
    if isinstance(prompt, str):
        text_prompt: str | None = prompt
        ids = engine.encode(prompt, chat=chat)
    else:
        text_prompt, ids = None, [int(i) for i in prompt]
    if not ids:
        raise LlamascopeError("the prompt encodes to no tokens: nothing to trace")
    room_for_new_tokens(len(ids), engine.config.context_limit)  # (before anything is computed or shown)
    config = _settings_in_force(engine, settings, defaults, defaults_source, chat)
    strategy, reason = decoding_strategy(config)
    if config.num_beams > 1:
        raise LlamascopeError(
            f"trace follows greedy search and sampling step by step; these settings choose "
            f"{strategy} ({reason}). Pass num_beams=1 to trace."
        )
    return _Plan(text_prompt, ids, chat, config, strategy, reason, _contradictions_in_force(engine, config))


def _contradictions_in_force(engine, config: GenerationConfig) -> list[Contradiction]:
    """The engine's files, the settings in force and the tokenizer, checked against each other."""
    config_label, generation_label = source_labels(engine.loaded.checkpoint.format)
    return find_contradictions(
        engine.config,
        engine.loaded.checkpoint.config_dict,
        engine.generation_json,
        engine.tokenizer,
        generation=config,
        config_label=config_label,
        generation_label=generation_label,
    )


def _assemble(engine, plan: _Plan, record: _Recorder, result, top: int, lens: bool) -> Trace:
    """The Trace: the plan, what the recorder kept of each step and the generation's result."""
    tokenizer, ids, config = engine.tokenizer, plan.ids, plan.settings
    output_ids = result.output_ids[0]
    built = build_processors(config, len(ids), vocab_size=engine.config.vocab_size, tokenizer=tokenizer)
    processors = [_describe_processor(p) for p in built]
    lens_result = _lens_of(record, ids + output_ids, engine.config.num_hidden_layers) if lens else None
    pieces = tokenizer.tokens(ids) if tokenizer is not None else [str(i) for i in ids]
    text = tokenizer.decode(output_ids, skip_special_tokens=True) if tokenizer is not None else ""
    return Trace(
        prompt=plan.prompt,
        prompt_ids=ids,
        pieces=pieces,
        texts=[record.text(i) for i in ids],
        attention_mask=record.steps[0].attention_mask[0] if record.steps else [1] * len(ids),
        adds_bos=_adds_bos(tokenizer, plan),
        settings=config,
        max_length=config.max_length_for(len(ids), engine.config.max_position_embeddings),
        context=engine.config.max_position_embeddings,
        warnings=plan.warnings,
        strategy=plan.strategy,
        strategy_reason=plan.strategy_reason,
        processors=processors,
        steps=record.steps,
        predictions=record.predictions,
        output_ids=output_ids,
        text=text,
        finish_reason=result.finish_reasons[0],
        top=top,
        lens=lens_result,
        model=_model_facts(engine),
        kv_cache=_kv_cache_facts(
            engine, config.max_length_for(len(ids), engine.config.max_position_embeddings), len(ids)
        )
        if config.use_cache
        else {},
    )


def _kv_cache_facts(engine, max_length: int, prompt_length: int) -> dict:
    """The cache one sequence's generate() allocates: per key and value, [layers, batch, kv_heads,
    capacity, head_dim] (as one tensor per layer), its bytes per position and in all, and the
    sliding window by which it drops columns (None: it holds every position)."""
    model, config = engine.model, engine.config
    capacity, window = KVCache.columns_for(model, max_length, prompt_length)
    item = torch.empty((), dtype=model.dtype).element_size()
    per_position = 2 * config.num_hidden_layers * model.kv_heads * config.head_dim * item
    return {
        "shape": [config.num_hidden_layers, 1, model.kv_heads, capacity, config.head_dim],
        "dtype": str(model.dtype).removeprefix("torch."),
        "bytes_per_position": per_position,
        "bytes": per_position * capacity,
        "window": window,
    }


def _model_facts(engine) -> dict:
    """What a saved trace needs to say what it is: the model, its file, and the code that ran it."""
    checkpoint = engine.loaded.checkpoint
    return {
        "name": checkpoint.path.name,
        "file": str(checkpoint.path),
        "format": checkpoint.format,
        "architecture": engine.config.model_type,
        "dtype": str(engine.model.dtype).removeprefix("torch."),
        "llamascope_version": version("llamascope"),
    }


def _lens_of(record: _Recorder, sequence: list[int], layers: int) -> Lens:
    """The lens the recorder gathered, with the token fed and the token that came next at each position."""
    next_ids = [sequence[p + 1] if p + 1 < len(sequence) else None for p in record.lens_positions]
    return Lens(
        layers=["embed"] + [str(i) for i in range(layers)],
        positions=record.lens_positions,
        tokens=[record.text(sequence[p]) for p in record.lens_positions],
        next_ids=next_ids,
        cells=record.lens_cells,
        final_layer_max_abs_diff=record.lens_max_diff,
    )


def _adds_bos(tokenizer, plan: _Plan) -> bool:
    """Whether the tokenizer put its BOS in front of a text prompt (outside a chat template)."""
    return bool(
        plan.prompt is not None
        and not plan.chat
        and tokenizer is not None
        and tokenizer.adds_bos
        and plan.ids[0] == tokenizer.bos_id
    )


def _settings_in_force(engine, settings: dict, defaults: dict, defaults_source: str, chat: bool) -> GenerationConfig:
    """The engine's settings for this call (a chat turn also ends at the template's end-of-turn ids),
    with the caller's defaults where the call sets nothing."""
    unset = {name: value for name, value in defaults.items() if settings.get(name) is None}
    config = engine.generation_config(chat, **{**settings, **unset})
    for name in unset:
        config.sources[name] = defaults_source
    return config


def _describe_processor(processor) -> str:
    if isinstance(processor, GrammarMask):
        return f"GrammarMask({describe(processor.constraint)})"
    values = ", ".join(f"{k}={v!r}" for k, v in vars(processor).items())
    return f"{type(processor).__name__}({values})"
