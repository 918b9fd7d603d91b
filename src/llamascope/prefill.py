"""A prompt through the model: the pieces it is cut into, and the run that takes them a stage at a time.

A prompt reaches the model PREFILL_PIECE positions at a time, cut at multiples of it (absolute
cache columns): the same prompt then takes the same arithmetic whether it runs in one call
(generate), between other sequences' decode steps (the server), or resumes after a cached prefix
of whole pieces. Pieces of 256 rows keep the matrix products near their full speed. No last piece
is shorter than PREFILL_TAIL positions (where fewer would follow a multiple, the piece before runs
on to the end): up to KERNEL_MAX_ROWS rows a product takes the decode kernels and their 8-bit
activations, which a prompt longer than that should not get for its last positions.

`PrefillRun` takes the pieces through the model layer by layer (every piece through a layer before
the next layer, so that a quantised layer dequantises its weight once for all of them), one stage
at a time: a stage is one piece through one layer, or a one-token piece alone (the native decode
step, as forward() runs it). A server runs a few stages between its decode steps, so that a long
prompt holds the running streams up for milliseconds, not for its whole prefill; the numbers are
the same however the stages are spread (docs/serving.md).

    for layer in layers:                      # dequantised once, held while its pieces go through
        for piece in pieces:                  # one stage each
            cache.length = piece.start
            x[piece] = layer(x[piece], rope[piece], cache)   # writes the piece's keys/values
    logits = lm_head(norm(x[last piece]))[:, -1:]
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .cache import KVCache
from .layers import KERNEL_MAX_ROWS, dequantized_once

PREFILL_PIECE = 256
PREFILL_TAIL = KERNEL_MAX_ROWS + 1


def prefill_spans(start: int, stop: int, piece: int = PREFILL_PIECE, tail: int = PREFILL_TAIL) -> list[tuple[int, int]]:
    """Cache columns [start, stop) cut at the multiples of `piece` after which at least `tail`
    positions are left: [(start, b1), (b1, b2), ...]."""
    spans = []
    while start < stop:
        end = (start // piece + 1) * piece
        if stop - end < tail:
            end = stop
        spans.append((start, end))
        start = end
    return spans


class PrefillRun:
    """New positions `tokens` [B, T] at `positions` [B, T] through `model`, written into `cache`
    from its current length on, in the pieces `prefill_spans` cuts, a stage at a time.

    `advance(stages)` runs the next stages (None: all) and says whether the run is done; then
    `logits` holds [B, T, vocab], or the last position's [B, 1, vocab] with last_only, and
    cache.length has moved past the new positions. While a run is unfinished its cache belongs to
    it. `close()` abandons it (and lets go of the layer weights it holds dequantised)."""

    def __init__(
        self,
        model: nn.Module,  # a model.Transformer (not imported here: model.py imports this module)
        tokens: torch.Tensor,  # [B, T] int64
        positions: torch.Tensor,  # [B, T] int64
        cache: KVCache,
        last_only: bool = True,
    ):
        self.model, self.tokens, self.positions, self.cache = model, tokens, positions, cache
        self.last_only = last_only
        self.spans = prefill_spans(cache.length, cache.length + tokens.shape[1])
        self.logits: torch.Tensor | None = None
        self._stages = self._run()

    @property
    def done(self) -> bool:
        return self.logits is not None

    def advance(self, stages: int | None = None) -> bool:
        """Run up to `stages` more stages (None: to the end) -> whether the run is done."""
        while not self.done and (stages is None or stages > 0):
            next(self._stages)
            stages = None if stages is None else stages - 1
        return self.done

    def close(self) -> None:
        self._stages.close()

    def _run(self) -> Iterator[None]:
        """The stages, each ending at a yield; the last one sets `logits`. A first piece of one
        token (the whole prompt, or a cached prefix that ends one short of a multiple) goes through
        forward() alone, as in a call of its own: the native decode step. (A last piece of several
        is never that short: PREFILL_TAIL.)"""
        spans, offset, logits = list(self.spans), self.spans[0][0], []
        if spans[0][1] - spans[0][0] == 1:
            spans.pop(0)
            logits.append(self.model(self.tokens[:, :1], self.positions[:, :1], self.cache, last_only=self.last_only))
        if spans:
            if logits:
                yield
            logits.append((yield from self._layers_over_pieces(spans, offset)))
        self.logits = logits[-1] if self.last_only else torch.cat(logits, dim=1)
        yield

    def _layers_over_pieces(self, spans: list[tuple[int, int]], offset: int) -> Iterator[None]:
        """The pieces `spans` (cache columns; tokens[:, 0] sits at column `offset`) through the
        layers, one piece through one layer a stage -> their logits [B, t, vocab], or the last
        one's [B, 1, vocab] (the stage that ends the last layer also takes the final norm and head)."""
        stack, cache = self.model.model, self.cache
        pieces = [slice(start - offset, stop - offset) for start, stop in spans]
        xs = [stack.embed_tokens(self.tokens[:, piece]) for piece in pieces]  # [B, t, hidden] each
        # RoPE over the whole run at once, then cut: a length-dependent rope_type (dynamic, longrope)
        # takes its frequencies from the whole call's positions, as a call without pieces does
        cos, sin = stack.rotary_emb(self.positions, xs[0].dtype)  # [B, T, D] each
        ropes = [(cos[:, piece].contiguous(), sin[:, piece].contiguous()) for piece in pieces]
        last = (len(stack.layers) - 1, len(spans) - 1)
        for number, layer in enumerate(stack.layers):
            with dequantized_once(layer):
                for i, (start, _) in enumerate(spans):
                    cache.length = start  # this piece's columns, in this layer (every layer writes them)
                    xs[i] = layer(xs[i], *ropes[i], None, cache, None)
                    if (number, i) != last:
                        yield
        cache.length = spans[-1][1]
        if self.last_only:
            return self.model.lm_head(stack.norm(xs[-1])[:, -1:])  # [B, 1, vocab]
        return torch.cat([self.model.lm_head(stack.norm(x)) for x in xs], dim=1)  # [B, t, vocab]
