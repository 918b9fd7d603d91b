"""A glass box over one generation: what each step of generate() took in, computed and chose.

    from llamascope import Engine
    from llamascope.trace import trace, render_trace
    engine = Engine.load()
    t = trace(engine, "My name is Mariama, my favorite", max_new_tokens=4, lens=True)
    render_trace(t)                  # rich tables: tokenization, settings, strategy, each step, ...
    t.to_json(); render_html(t)      # the same trace as JSON, and an HTML report with the lens heat map

The trace records; it never recomputes what the engine computed. It runs `generation.generate`
with `on_step` (which hands over each `Step`: the prepared inputs, the logits, the scores after
the processors and the chosen tokens) and `capture` (the model's named activations, see
`activations.py`). The per-position predictions come from the prefill's own logits (the `logits`
point, asked for at every position). The logit lens is the one computation added on top: it applies the model's final
norm and LM head to the residual stream after each layer; at the last layer that is exactly the
computation the model made, so that row equals the model's logits bit for bit.

`ActivationRecorder` captures activations by name (off by default), at the points
activations.NAMES lists: the residual stream around each block, the attention and MLP outputs,
attention weights, and inside chosen layers every tensor of transformers' modules.
"""

from __future__ import annotations

import fnmatch
import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .activations import NAMES, Capture
from .config import GenerationConfig, room_for_new_tokens
from .constraints import GrammarMask, describe
from .errors import LlamascopeError
from .generation import generate
from .info import (
    Contradiction,
    find_contradictions,
    generation_rows_json,
    section,
    settings_table,
    source_labels,
)
from .sampling import build_processors

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

    def new_capture(self, names: Iterable[str] | None = None, all_logits: bool = False) -> Capture:
        """A capture asking for what this recorder keeps (and `names` besides, e.g. what a trace reads)."""
        return Capture(
            names=self.patterns if names is None else [*self.patterns, *names],
            detail=self.detail,
            attention_weights=self.attention_weights,
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
    """One forward pass over `ids` (no cache): the named activations, each [1, T, ...]."""
    recorder = ActivationRecorder(names, attention_weights)
    tokens = torch.tensor([list(ids)], dtype=torch.long, device=model.device)  # [1, T]
    positions = torch.arange(tokens.shape[1], device=model.device)[None]  # [1, T]
    acts = recorder(0)
    with torch.inference_mode():
        model(tokens, positions, None, None, capture=acts)  # [1, T, V]
    return recorder.steps[0]


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
            "input_ids_shape": _shape(self.input_ids),
            "position_ids": self.position_ids,
            "position_ids_shape": _shape(self.position_ids),
            "attention_mask": self.attention_mask,
            "attention_mask_shape": _shape(self.attention_mask),
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
            "max_length_rule": _max_length_rule(self),
            "warnings": [w.to_json() for w in self.warnings],
            "strategy": {"name": self.strategy, "reason": self.strategy_reason, "processors": self.processors},
            "steps": [s.to_json() for s in self.steps],
            "predictions": [p.to_json() for p in self.predictions],
            "predictions_text": self.predictions_text,
            "lens": self.lens.to_json() if self.lens is not None else None,
            "output_ids": self.output_ids,
            "text": self.text,
            "finish_reason": self.finish_reason,
        }


def _shape(nested: list) -> list[int]:
    shape = []
    while isinstance(nested, list):
        shape.append(len(nested))
        nested = nested[0] if nested else None
    return shape


def _max_length_rule(t: Trace) -> str:
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
    ):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
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
        lens and the shapes, and at the prefill the logits at every prompt position."""
        read = ["embed", "layers.*.output", "norm", "logits"]
        if self.activations is not None:
            return self.activations.new_capture(read, all_logits=step_index == 0)
        return Capture(names=read, all_logits=step_index == 0)

    def on_step(self, step) -> None:
        acts = step.capture
        self.steps.append(self._step_trace(step, acts))
        self.chosen_ids.append(int(step.next_tokens[0]))
        if step.index == 0:
            self._predictions(acts["logits"][0].float())  # [T, V]
        if self.want_lens:
            self._lens(step, acts)

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
        T = step.input_ids.shape[1]
        if step.index == 0:
            cols = slice(0, T)  # the prompt's positions
        elif step.speculation is not None:  # a speculative round's pass: this step's own position
            cols = slice(step.speculation.index, step.speculation.index + 1)
        else:
            cols = slice(T - 1, T)
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
    """
    plan = _plan(engine, prompt, chat, settings, defaults or {}, defaults_source)
    assistant = engine.assistant(assistant_model)
    recorder = ActivationRecorder(activations, attention_weights) if (activations or attention_weights) else None
    record = _Recorder(engine.model, engine.tokenizer, plan.settings, plan.ids, top, lens, recorder)
    result = generate(
        engine.model,
        [plan.ids],
        plan.settings,
        tokenizer=engine.tokenizer,
        on_step=record.on_step,
        capture=record.capture,
        assistant=assistant,
    )
    return _assemble(engine, plan, record, result, top, lens)


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
        kv_cache=_kv_cache_facts(engine, config.max_length_for(len(ids), engine.config.max_position_embeddings))
        if config.use_cache
        else {},
    )


def _kv_cache_facts(engine, max_length: int) -> dict:
    """The cache one sequence's generate() allocates: per key and value, [layers, batch, kv_heads,
    capacity, head_dim] (as one tensor per layer), and its bytes per position and in all."""
    model, config = engine.model, engine.config
    capacity = model.decode_step.capacity_for(max_length) if model.decode_step is not None else max_length
    item = torch.empty((), dtype=model.dtype).element_size()
    per_position = 2 * config.num_hidden_layers * model.kv_heads * config.head_dim * item
    return {
        "shape": [config.num_hidden_layers, 1, model.kv_heads, capacity, config.head_dim],
        "dtype": str(model.dtype).removeprefix("torch."),
        "bytes_per_position": per_position,
        "bytes": per_position * capacity,
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


# ---- rendering: terminal ----------------------------------------------------------------------


def _tensor(rows: list[list[int]]) -> str:
    return "tensor([" + ", ".join("[" + ", ".join(map(str, r)) + "]" for r in rows) + "])"


def _shape_text(shape: list[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _q(text: str) -> str:
    return repr(text)


def render_trace(t: Trace, console=None, lens: bool = True, steps: Iterable[int] | None = (0,)) -> None:
    """Print the trace as rich text and tables, in the order generation happens: the tokenization,
    the settings, the strategy, the `steps` chosen in full (by default the first; None: all), one
    table with a row per step, the per-position predictions, the result and the lens."""
    console = console or Console()
    _render_tokenization(t, console)
    _render_settings(t, console)
    _render_strategy(t, console)
    full = None if steps is None else set(steps)
    for s in t.steps:
        if full is None or s.index in full:
            _render_step(t, s, console)
    if len(t.steps) > 1:
        _render_step_table(t, console)
    if t.predictions:
        _render_predictions(t, console)
    _render_result(t, console)
    if lens and t.lens is not None:
        _render_lens(t.lens, console)


def _render_step_table(t: Trace, console) -> None:
    """One row per step: what it fed, at which positions, what the cache held, what it chose and
    the runner-up."""
    section(console, f"steps ({len(t.steps)}; one row each)")
    notes = any(s.speculation is not None or s.constrained is not None or s.sampling is not None for s in t.steps)
    table = Table()
    for column in ("step", "input_ids", "positions", "cache", "chosen", "p", "runner-up", "p ") + (
        ("",) if notes else ()
    ):
        table.add_column(column, justify="right" if column in ("step", "cache", "p", "p ") else "left")
    for s in t.steps:
        ids, positions = s.input_ids[0], s.position_ids[0]
        fed = str(ids) if len(ids) <= 6 else f"[{ids[0]}, {ids[1]}, ... {ids[-1]}] ({len(ids)})"
        where = str(positions[0]) if len(positions) == 1 else f"{positions[0]}..{positions[-1]}"
        second = next((c for c in s.top if c.id != s.chosen.id), None)
        table.add_row(
            str(s.index),
            fed,
            where,
            "-" if s.cache_length is None else str(s.cache_length),
            f"{_q(s.chosen.text)} ({s.chosen.id})",
            f"{s.chosen.prob:.3f}",
            _q(second.text) if second else "",
            f"{second.prob:.3f}" if second else "",
            *((_step_note(s),) if notes else ()),
        )
    console.print(table)


def _step_note(s: StepTrace) -> str:
    """A speculative step's draft check, a constrained step's mask, in a few words."""
    parts = []
    check = s.speculation
    if check is not None and s.index > 0 and check.index < len(check.draft):
        verdict = "kept" if check.kept else "refused"
        parts.append(f"{check.source} draft token {check.index + 1} of {len(check.draft)}: {verdict}")
    if s.constrained is not None:
        changed = ", changed the choice" if s.constrained["changed"] else ""
        parts.append(f"constraint: {s.constrained['allowed']} allowed{changed}")
    if s.sampling is not None and s.sampling["stages"]:
        parts.append(f"drawn: rank {s.sampling['rank']} of {s.sampling['stages'][-1]['kept']:,} kept")
    return "; ".join(parts)


def _line(console, text: str) -> None:
    """Print a line as written (rich markup applies; no automatic highlighting)."""
    console.print(text, highlight=False)


def _render_tokenization(t: Trace, console) -> None:
    """The prompt, input_ids and attention_mask as tensors, and each token's piece and text."""
    section(console, "1. tokenization")
    if t.prompt is not None:
        _line(console, f"prompt: {t.prompt!r}")
    if t.adds_bos:
        _line(console, f"the tokenizer adds BOS {t.pieces[0]!r} (id {t.prompt_ids[0]}) in front")
    _line(console, f"input_ids      = {_tensor([t.prompt_ids])}  shape {_shape_text([1, t.prompt_length])}  int64")
    _line(
        console,
        f"attention_mask = {_tensor([t.attention_mask])}  shape {_shape_text([1, t.prompt_length])}  "
        f"(1 = a real token, 0 = padding)",
    )
    table = Table()
    for column in ("position", "id", "piece", "text"):
        table.add_column(column, justify="right" if column in ("position", "id") else "left")
    for pos, (i, piece, text) in enumerate(zip(t.prompt_ids, t.pieces, t.texts)):
        table.add_row(str(pos), str(i), piece, _q(text))
    console.print(table)


def _render_settings(t: Trace, console) -> None:
    """The generation settings in force, how max_length follows from them, and the warnings."""
    section(console, "2. generation settings")
    console.print(settings_table(t.settings))
    _line(console, _max_length_rule(t))
    for w in t.warnings:
        _line(console, f"[yellow]warning[/yellow] ({w.kind}): {w.message}")


def _render_strategy(t: Trace, console) -> None:
    """The decoding strategy, why these settings chose it, and the logits processors."""
    section(console, "3. decoding strategy")
    _line(console, f"[bold]{t.strategy}[/bold]: {t.strategy_reason}")
    _line(
        console,
        "logits processors: " + (", ".join(t.processors) if t.processors else "none (the scores are the logits)"),
    )


def _render_step(t: Trace, s: StepTrace, console) -> None:
    """One step: its prepared inputs, the forward pass's shapes, the chosen token and the top ones."""
    section(console, f"step {s.index} ({_phase(s)})")
    console.print(_inputs_table(s))
    console.print(_forward_table(s))
    if s.index == 0 and t.kv_cache:
        c = t.kv_cache
        layers, _, heads, capacity, head_dim = c["shape"]
        _line(
            console,
            f"KV cache: keys and values, each {c['shape']} {c['dtype']} (layers, batch, kv_heads, capacity, "
            f"head_dim; a tensor per layer), {c['bytes_per_position']:,} bytes a position "
            f"(2 x {layers} x {heads} x {head_dim} x {c['bytes_per_position'] // (2 * layers * heads * head_dim)}), "
            f"{c['bytes']:,} bytes for {capacity} positions",
        )
    if s.speculation is not None and s.index > 0:
        _render_draft_check(s.speculation, console)
    if s.sampling is not None:
        table = Table(title="sampling: the processors in turn", title_justify="left")
        for column in ("processor", "candidates kept", "model's p kept"):
            table.add_column(column, justify="left" if column == "processor" else "right")
        for stage in s.sampling["stages"]:
            table.add_row(stage["processor"], f"{stage['kept']:,}", f"{stage['mass']:.4f}")
        console.print(table)
        _line(console, f"drawn: {s.chosen.text!r}, rank {s.sampling['rank']} of the processed scores")
    if s.constrained is not None:
        c = s.constrained
        verdict = (
            f"it changed the choice: the model's own top token {c['model_choice']['text']!r} is not allowed here"
            if c["changed"]
            else "the model's own top token is allowed"
        )
        _line(console, f"constraint: {c['allowed']} tokens allowed after the processors; {verdict}")
    _line(console, f"next token: [bold]{s.chosen.text!r}[/bold] (id {s.chosen.id}), p = {s.chosen.prob:.4f}")
    console.print(_top_table(s, sampled=t.settings.do_sample))


def _render_draft_check(check: DraftCheck, console) -> None:
    """A speculative step: the round's draft, the token this step checked, and why it was kept or not."""
    drafted = ", ".join(
        f"[bold]{c.text!r}[/bold]" if i == check.index else repr(c.text) for i, c in enumerate(check.draft)
    )
    where = f"checks draft token {check.index + 1} of {len(check.draft)}" if check.index < len(check.draft) else ""
    _line(console, f"draft ({check.source}): [{drafted}]" + (f"; this step {where}" if where else ""))
    _line(console, check.why)


def _phase(s: StepTrace) -> str:
    """What kind of forward pass the step made."""
    if s.index == 0:
        return "prefill: the whole prompt in one forward pass"
    if s.speculation is not None and s.speculation.draft:
        return f"speculative: {len(s.input_ids[0])} positions, the newest token and its draft, in one pass"
    if s.speculation is not None:
        return "decode: one new token with the cache (no draft this round)"
    return "decode: one new token with the cache" if s.use_cache else "decode: the whole sequence again"


def _inputs_table(s: StepTrace) -> Table:
    """The inputs prepared for the step's forward pass, with their shapes, and the cache's state."""
    table = Table(title="prepared inputs", title_justify="left")
    table.add_column("input")
    table.add_column("value", overflow="fold")
    table.add_column("shape")
    table.add_row("input_ids", _tensor(s.input_ids), _shape_text(_shape(s.input_ids)))
    table.add_row("position_ids", _tensor(s.position_ids), _shape_text(_shape(s.position_ids)))
    table.add_row("attention_mask", _tensor(s.attention_mask), _shape_text(_shape(s.attention_mask)))
    table.add_row("cache", s.cache_state, "")
    table.add_row("use_cache", str(s.use_cache), "")
    return table


def _forward_table(s: StepTrace) -> Table:
    """The shape of the hidden states and logits at each stage, and of each captured activation."""
    table = Table(title="forward pass", title_justify="left")
    table.add_column("stage")
    table.add_column("shape")
    table.add_row("hidden states after the embeddings", _shape_text(s.shapes["embed"]))
    table.add_row("hidden states after the decoder layers", _shape_text(s.shapes["decoder_output"]))
    table.add_row("hidden states after the final norm", _shape_text(s.shapes["norm"]))
    table.add_row("logits (last position only)", _shape_text(s.shapes["logits"]))
    if "all_position_logits" in s.shapes:
        table.add_row("logits at every position (captured for the trace)", _shape_text(s.shapes["all_position_logits"]))
    table.add_row("next-token logits", _shape_text(s.shapes["next_token_logits"]))
    for name, tensor in s.activations.items():
        table.add_row(f"captured {name}", _shape_text(list(tensor.shape)))
    return table


def _top_table(s: StepTrace, sampled: bool) -> Table:
    """The most probable tokens, the chosen one in bold (when sampled, also the model's own p)."""
    table = Table(title=f"top {len(s.top)}", title_justify="left")
    for column in ["rank", "id", "token", "p"] + (["p (model)"] if sampled else []) + ["logit"]:
        table.add_column(column, justify="left" if column == "token" else "right")
    for rank, c in enumerate(s.top, 1):
        row = (
            [str(rank), str(c.id), _q(c.text), f"{c.prob:.4f}"]
            + ([f"{c.model_prob:.4f}"] if sampled else [])
            + [f"{c.logit:.3f}"]
        )
        table.add_row(*row, style="bold" if c.id == s.chosen.id else None)
    return table


def _render_result(t: Trace, console) -> None:
    """The new token ids, why generation stopped, and the text."""
    section(console, "result")
    _line(console, f"output_ids = {t.output_ids}  ({len(t.output_ids)} new tokens, finish reason: {t.finish_reason})")
    _line(console, f"text: {t.text!r}")
    if t.prompt is not None:
        _line(console, f"prompt + text: {t.prompt + t.text!r}")


def _render_predictions(t: Trace, console) -> None:
    """What the prefill predicted at each prompt position, against the token that followed."""
    section(console, "per-position predictions (from the prefill's logits)")
    console.print(
        "Each position sees the tokens up to itself and predicts the token that follows it: the "
        "prediction at position t lines up with the prompt token at t + 1, and the prediction at "
        "the last position is the first generated token.",
        highlight=False,
    )
    table = Table()
    for column in ("position", "token", "predicts next", "p", "actual next"):
        table.add_column(column, justify="right" if column in ("position", "p") else "left")
    for p in t.predictions:
        if p.next_id is None:
            actual = "(generated)"
        else:
            mark = "=" if p.predicted_id == p.next_id else "≠"
            actual = f"{mark} {t.texts[p.position + 1]!r}"
        table.add_row(str(p.position), _q(p.token_text), _q(p.predicted_text), f"{p.prob:.3f}", actual)
    console.print(table)
    console.print(f"prompt:          {''.join(t.texts)!r}", highlight=False)
    console.print(f"predictions:     {t.predictions_text!r}", highlight=False)


def _render_lens(lens: Lens, console) -> None:
    """The lens as tables of layer x position (the last layer on top), as many positions as fit."""
    section(console, "logit lens (final norm + LM head after each layer; top token and p)")
    console.print(
        f"the last row is the model's own output: max |lens - logits| = {lens.final_layer_max_abs_diff}",
        highlight=False,
    )
    cell_width = 16
    per_chunk = max(1, (console.width - 10) // (cell_width + 3))
    for start in range(0, len(lens.positions), per_chunk):
        cols = range(start, min(start + per_chunk, len(lens.positions)))
        table = Table()
        table.add_column("layer", justify="right")
        for c in cols:
            table.add_column(f"{lens.positions[c]}: {lens.tokens[c]!r}"[:cell_width], max_width=cell_width)
        for row in reversed(range(len(lens.layers))):
            cells = []
            for c in cols:
                i, text, p = lens.cells[row][c][0]
                style = "bold" if lens.next_ids[c] == i else ""
                cells.append(f"[{style}]{_short(text)} {p:.2f}[/{style}]" if style else f"{_short(text)} {p:.2f}")
            table.add_row(lens.layers[row], *cells)
        console.print(table)


def _short(text: str, width: int = 8) -> str:
    """A token as a quoted literal of at most `width` characters inside the quotes."""
    r = repr(text)[1:-1]
    return escape("'" + (r if len(r) <= width else r[: width - 1] + "…") + "'")


# ---- rendering: HTML --------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.5em; }
code, .tok { font-family: ui-monospace, monospace; white-space: pre; }
table { border-collapse: collapse; }
th, td { padding: 2px 6px; font-size: 12px; }
table.grid td, table.grid th { border: 1px solid #ddd; }
table.heatmap td.cell { position: relative; min-width: 64px; text-align: center; border: 1px solid #fff;
  font-family: ui-monospace, monospace; white-space: pre; cursor: default; }
table.heatmap td.cell.next { outline: 2px solid #222; outline-offset: -2px; }
table.heatmap th.layer { text-align: right; }
table.heatmap th.pos { font-weight: normal; font-family: ui-monospace, monospace; white-space: pre; }
td.cell .tip { display: none; position: absolute; z-index: 2; left: 50%; top: 100%; background: #fff;
  border: 1px solid #888; padding: 4px 6px; text-align: left; box-shadow: 0 2px 6px rgba(0,0,0,.25); color: #222; }
td.cell:hover .tip { display: block; }
.warn { color: #a15c00; }
table.heatmap .generated-start { border-left: 3px solid #c00 !important; }
.legend .swatch { display: inline-block; padding: 1px 8px; margin-right: 2px; font-size: 11px; border: 1px solid #ddd; }
"""


def _heat(p: float) -> str:
    """White (p = 0) to deep blue (p = 1)."""
    lightness = 97 - 62 * max(0.0, min(1.0, p))
    return f"hsl(215, 80%, {lightness:.0f}%)"


def render_html(t: Trace) -> str:
    """A self-contained HTML report (inline CSS, no scripts, no network): the lens heat map
    (layer x position, hover for the top-K), the per-position predictions and the steps."""
    parts = _html_summary(t)
    if t.lens is not None:
        parts += _html_lens(t.lens, t.top, t.prompt_length)
    if t.predictions:
        parts += _html_predictions(t)
    parts += _html_steps(t)
    parts.append("</body></html>")
    return "\n".join(parts)


def _html_summary(t: Trace) -> list[str]:
    """The document's head, then the prompt, its ids, the decoding strategy, warnings and output."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>llamascope trace: {e(t.model.get('name', ''))}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>llamascope trace: {e(t.model.get('name', ''))}</h1>",
    ]
    if t.model:
        m = t.model
        parts.append(
            f'<p class="model">model <code>{e(m["file"])}</code> ({e(m["format"])}, {e(m["architecture"])}, '
            f"{e(m['dtype'])}), llamascope {e(m['llamascope_version'])}</p>"
        )
    if t.prompt is not None:
        parts.append(f"<p>prompt: <code>{e(repr(t.prompt))}</code></p>")
    parts.append(f"<p>input_ids <code>{e(_tensor([t.prompt_ids]))}</code> shape [1, {t.prompt_length}]</p>")
    parts.append(f"<p>decoding: <b>{e(t.strategy)}</b> — {e(t.strategy_reason)}. {e(_max_length_rule(t))}</p>")
    for w in t.warnings:
        parts.append(f'<p class="warn">warning ({e(w.kind)}): {e(w.message)}</p>')
    parts.append(f"<p>output: <code>{e(repr(t.text))}</code> ({len(t.output_ids)} tokens, {e(t.finish_reason)})</p>")
    return parts


def _html_lens(lens: Lens, top: int, prompt_length: int) -> list[str]:
    """The lens heat map: a row per layer (the last on top), a column per position; a line
    before the first generated position, and a legend of the colours."""
    e = html.escape
    legend = "".join(
        f'<span class="swatch" style="background:{_heat(p)};color:{"#fff" if p > 0.55 else "#222"}">{p:.2f}</span>'
        for p in (0.0, 0.25, 0.5, 0.75, 1.0)
    )
    parts = [
        "<h2>logit lens</h2>",
        "<p>Each cell: the top token when the final norm and LM head are applied to the residual "
        "stream after that layer, at that position; colour = its probability. Hover for the top "
        f"{top}. A framed cell predicts the token that actually came next. The top row is the "
        "model's own output, the bottom row the embeddings; the prompt's positions are left of the "
        "line, the generated ones right of it.</p>",
        f'<p class="legend" id="legend">p of the top token: {legend}</p>',
        '<table class="heatmap" id="lens"><thead><tr><th></th>',
    ]
    for pos, token in zip(lens.positions, lens.tokens):
        first = " generated-start" if pos == prompt_length else ""
        parts.append(f'<th class="pos{first}" title="position {pos}">{pos}<br>{e(repr(token))}</th>')
    parts.append("</tr></thead><tbody>")
    for row in reversed(range(len(lens.layers))):
        parts.append(f'<tr><th class="layer">{e(lens.layers[row])}</th>')
        parts += [_html_lens_cell(lens, row, col, prompt_length) for col in range(len(lens.cells[row]))]
        parts.append("</tr>")
    parts.append("</tbody></table>")
    return parts


def _html_lens_cell(lens: Lens, row: int, col: int, prompt_length: int) -> str:
    """One cell of the heat map: the top token coloured by its p, the top-K in a hover tip."""
    e = html.escape
    cell = lens.cells[row][col]
    top_id, top_text, top_p = cell[0]
    framed = " next" if lens.next_ids[col] == top_id else ""
    framed += " generated-start" if lens.positions[col] == prompt_length else ""
    tip = "<br>".join(f"{e(repr(text))} (id {i}) {p:.4f}" for i, text, p in cell)
    color = "#fff" if top_p > 0.55 else "#222"
    return (
        f'<td class="cell{framed}" data-layer="{e(lens.layers[row])}" data-position="{lens.positions[col]}"'
        f' data-token-id="{top_id}" data-prob="{top_p:.6f}"'
        f' style="background:{_heat(top_p)};color:{color}">'
        f'{e(_cell_label(top_text))}<div class="tip"><b>layer {e(lens.layers[row])}, position {lens.positions[col]}</b>'
        f"<br>{tip}</div></td>"
    )


def _cell_label(text: str) -> str:
    """A token as its literal without quotes, at most 8 characters; a token of spaces made visible."""
    label = repr(text)[1:-1]
    label = label if len(label) <= 8 else label[:7] + "…"
    if not label.strip():
        label = "␣" * len(label)  # a token of spaces, made visible
    return label


def _html_predictions(t: Trace) -> list[str]:
    """The prefill's prediction at each prompt position, against the token that followed."""
    e = html.escape
    parts = [
        "<h2>per-position predictions (prefill)</h2>",
        "<p>Each position predicts the token that follows it.</p>",
        '<table class="grid"><tr><th>position</th><th>token</th><th>predicts next</th><th>p</th>'
        "<th>actual next</th></tr>",
    ]
    for p in t.predictions:
        actual = "(generated)" if p.next_id is None else e(repr(t.texts[p.position + 1]))
        parts.append(
            f"<tr><td>{p.position}</td><td class=tok>{e(repr(p.token_text))}</td>"
            f"<td class=tok>{e(repr(p.predicted_text))}</td><td>{p.prob:.3f}</td>"
            f"<td class=tok>{actual}</td></tr>"
        )
    parts.append("</table>")
    parts.append(f"<p>reads as: <code>{e(repr(t.predictions_text))}</code></p>")
    return parts


def _html_steps(t: Trace) -> list[str]:
    """A row per step: the input and position ids, the cache, the logits' shape and the chosen token."""
    e = html.escape
    parts = [
        "<h2>steps</h2>",
        '<table class="grid"><tr><th>step</th><th>input_ids</th><th>position_ids</th><th>cache</th>'
        "<th>logits</th><th>next token</th><th>p</th></tr>",
    ]
    for s in t.steps:
        parts.append(
            f"<tr><td>{s.index}</td><td><code>{e(str(_shape(s.input_ids)))}</code></td>"
            f"<td><code>{e(str(s.position_ids[0]))}</code></td><td>{e(s.cache_state)}</td>"
            f"<td><code>{e(str(s.shapes['logits']))}</code></td>"
            f"<td class=tok>{e(repr(s.chosen.text))} ({s.chosen.id})</td><td>{s.chosen.prob:.4f}</td></tr>"
        )
    parts.append("</table>")
    return parts
