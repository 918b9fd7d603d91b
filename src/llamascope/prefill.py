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

A prompt may also resume after positions another prompt computed (the server's prefix cache). At a
multiple of PREFILL_PIECE that is exact by the cut rule alone. At any other column its first piece
is shorter than in its own run, so each of those rows must get the same bits in a shorter call: true
of the engine's own row-wise work (norms, RoPE, SiLU, the native prefill attention, which walks
every row's columns in blocks of 64 from column 0), not of PyTorch's attention (it blocks rows and
columns by the call's lengths), and of the matrix products only as the library behaves.
`resume_rows` measures it (on the AMD machine PyTorch's bfloat16 products were row-invariant from
9 rows, its float32 ones from 12; see docs/serving.md).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .cache import KVCache
from .layers import KERNEL_MAX_ROWS, FastLinear, QuantLinear, dequantized_once

PREFILL_PIECE = 256
PREFILL_TAIL = KERNEL_MAX_ROWS + 1
# The first-piece lengths resume_rows tries: every one up to 32 (where libraries switch kernels and
# handle remainders), then a few about the powers of two
RESUME_PROBE_ROWS = (*range(PREFILL_TAIL, 33), 48, 63, 64, 65, 96, 127, 128, 129, 192, 255)


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


def resume_rows(model: nn.Module, probe_rows: tuple[int, ...] = RESUME_PROBE_ROWS) -> int | None:
    """The fewest rows a prompt's first piece must have for the prompt to resume at any column with
    the numbers of its own run (None: resume only at multiples of PREFILL_PIECE).

    None unless every layer's attention is the native prefill kernel (float32 on the CPU, fused
    q/k/v projections): PyTorch's own attention blocks its rows and columns by the call's lengths.
    The matrix products are then measured on one layer of each kind (`_kind`: a GGUF may keep some
    layers' matrices in other formats) over one piece of random hidden states: that piece in one
    call, then again resumed at column PREFILL_PIECE - M for each M in `probe_rows`, the columns
    before it taken from the first call. Outputs, keys and values are compared to the bit; an M that
    differs rules out every count up to it. (The rows of every other step are computed one by one.)"""
    stack = model.model
    native = all(layer.self_attn.prefills_natively() for layer in stack.layers)
    if model.dtype != torch.float32 or model.device.type != "cpu" or not native:
        return None  # PyTorch's attention cuts its rows and columns into blocks by the call's lengths
    kinds = {_kind(layer): layer for layer in reversed(stack.layers)}  # (the first layer of each kind)
    failed = max(_first_differing_rows(model, layer, probe_rows) for layer in kinds.values())
    if failed == 0:
        return min(probe_rows)
    above = [rows for rows in probe_rows if rows > failed]
    return min(above) if above else None


def _kind(layer: nn.Module) -> tuple:
    """What decides a layer's arithmetic for a prompt piece, besides its numbers: each product's
    class, shape and (for block weights) the dtype its long inputs run in; the attention window."""
    products = []
    for name, module in layer.named_modules():
        if isinstance(module, QuantLinear):
            products.append((name, "blocks", module.long_inputs_in_bf16, module.out_features, module.in_features))
        elif isinstance(module, (FastLinear, nn.Linear)):
            products.append((name, type(module).__name__, module.weight.dtype, *module.weight.shape))
    return layer.self_attn.window, tuple(products)


def _first_differing_rows(model: nn.Module, layer: nn.Module, probe_rows: tuple[int, ...]) -> int:
    """The largest M of `probe_rows` for which `layer`, resumed at PREFILL_PIECE - M, gives other
    bits than in one call (0: none)."""
    stack, piece, index = model.model, PREFILL_PIECE, layer.self_attn.layer_index
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(1, piece, model.config.hidden_size, generator=generator) * 0.1).to(model.device, model.dtype)
    cos, sin = stack.rotary_emb(torch.arange(piece, device=model.device)[None], x.dtype)  # [1, piece, D] each
    with torch.inference_mode(), dequantized_once(layer):
        whole, cache = KVCache.for_model(model, 1, piece), KVCache.for_model(model, 1, piece)
        out = layer(x, cos, sin, None, whole, None)  # [1, piece, hidden]
        for rows in sorted(probe_rows, reverse=True):  # (the first that differs is the largest)
            start = piece - rows
            cache.keys[index][:, :, :start] = whole.keys[index][:, :, :start]
            cache.values[index][:, :, :start] = whole.values[index][:, :, :start]
            cache.length = start
            resumed = layer(x[:, start:], cos[:, start:].contiguous(), sin[:, start:].contiguous(), None, cache, None)
            same = torch.equal(resumed, out[:, start:]) and all(
                torch.equal(mine[index][:, :, start:], theirs[index][:, :, start:])
                for mine, theirs in ((cache.keys, whole.keys), (cache.values, whole.values))
            )
            if not same:
                return rows
    return 0
