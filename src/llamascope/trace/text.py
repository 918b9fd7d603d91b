"""A trace in the terminal: rich text and tables, in the order generation happens."""

from __future__ import annotations

from collections.abc import Iterable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..attribution import Attribution
from ..info import (
    section,
    settings_table,
)
from .attention import AttentionMap
from .layer import LayerView
from .record import DraftCheck, Lens, StepTrace, Trace, max_length_rule, shape_of

# ---- rendering: terminal ----------------------------------------------------------------------


def tensor_text(rows: list[list[int]]) -> str:
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
        if s.index == 0 and t.layer is not None:
            _render_layer(t.layer, console)
    if len(t.steps) > 1:
        _render_step_table(t, console)
    if t.predictions:
        _render_predictions(t, console)
    _render_result(t, console)
    if lens and t.lens is not None:
        _render_lens(t.lens, console)
    if t.attention is not None:
        _render_attention(t.attention, console)


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
    _line(console, f"input_ids      = {tensor_text([t.prompt_ids])}  shape {_shape_text([1, t.prompt_length])}  int64")
    _line(
        console,
        f"attention_mask = {tensor_text([t.attention_mask])}  shape {_shape_text([1, t.prompt_length])}  "
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
    _line(console, max_length_rule(t))
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
        if c.get("window") is not None:
            _line(
                console,
                f"  every layer attends within a window of {c['window']}: when full, the cache keeps the last "
                f"{c['window'] - 1} positions and drops older ones",
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
    if s.attribution is not None:
        _render_attribution(s, console)


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
    table.add_row("input_ids", tensor_text(s.input_ids), _shape_text(shape_of(s.input_ids)))
    table.add_row("position_ids", tensor_text(s.position_ids), _shape_text(shape_of(s.position_ids)))
    table.add_row("attention_mask", tensor_text(s.attention_mask), _shape_text(shape_of(s.attention_mask)))
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


# ---- inside one layer (--layer) and the attention (--attention) ---------------------------------


def _render_layer(view: LayerView, console) -> None:
    """Every tensor of one layer at the prefill, in the order the layer computes it."""
    prefix = f"model.layers.{view.layer}"
    section(console, f"inside layer {view.layer} at step 0 (transformers' {prefix}; --layer N for another)")
    dtypes = {r.dtype for r in view.rows}
    table = Table()
    for column in ("tensor", "shape") + (("dtype",) if len(dtypes) > 1 else ()) + ("what",):
        table.add_column(column)
    for r in view.rows:
        name = r.name.removeprefix(prefix).removeprefix(".").strip() or prefix
        dtype = (r.dtype,) if len(dtypes) > 1 else ()
        table.add_row(name, _shape_text(r.shape), *dtype, r.what)
    console.print(table)
    if len(dtypes) == 1:
        _line(console, f"every tensor above is {dtypes.pop()}; names are relative to {prefix}")


def _render_attention(a: AttentionMap, console) -> None:
    """What --attention recorded, and where to see it."""
    section(console, "attention weights (--attention)")
    groups = "; ".join(f"kv head {j}: q heads {', '.join(map(str, g))}" for j, g in enumerate(a.groups()))
    _line(
        console,
        f"recorded {a.layers} layers x {a.heads} heads over {len(a.positions)} positions (a row per query "
        f"position: the prompt's from step 0, each later one from its own step); {groups}. "
        f"--html FILE draws them, --json holds them",
    )


# ---- why this token (--attribution) --------------------------------------------------------------

ATTRIBUTION_ROWS = 10  # the parts shown each way: the most positive, the most negative


def _render_attribution(s: StepTrace, console) -> None:
    """The chosen token's logit part by part (attribution.py): the parts that raise it most and
    lower it most, the sum of the parts against the model's logit, and against the runner-up the
    parts that decide between them."""
    a, token, other = s.attribution, s.attribution.token, s.attribution.runner_up
    position = s.position_ids[0][a.position]
    table = Table(
        title=escape(f"why {token.text!r}: its logit part by part, at position {position} (direct logit attribution)"),
        title_justify="left",
    )
    for column in ("part", f"to {token.text!r}") + ((f"to {other.text!r}", "difference") if other else ()):
        table.add_column(escape(column), justify="left" if column == "part" else "right")

    def row(name: str, mine: float, theirs: float | None, style: str | None = None) -> None:
        pair = (f"{theirs:+.4f}", f"{mine - theirs:+.4f}") if theirs is not None else ()
        table.add_row(name, f"{mine:+.4f}", *pair, style=style)

    order = sorted(range(len(a.parts)), key=lambda k: -token.values[k])
    shown = order if len(order) <= 2 * ATTRIBUTION_ROWS else order[:ATTRIBUTION_ROWS] + order[-ATTRIBUTION_ROWS:]
    for n, k in enumerate(shown):
        if n == ATTRIBUTION_ROWS and len(shown) < len(order):
            rest = order[ATTRIBUTION_ROWS:-ATTRIBUTION_ROWS]
            table.add_row(f"... {len(rest)} parts between", "", *(("", "") if other else ()), style="dim")
        row(a.parts[k], token.values[k], other.values[k] if other else None)
    row("sum of parts", token.total, other.total if other else None, style="bold")
    row("logit (the model's)", token.logit, other.logit if other else None, style="bold")
    console.print(table)
    _line(
        console,
        escape(
            f"each part c contributes W_U[token] . (g * c / rms): g the final norm's weight, rms that of "
            f"position {position}'s residual stream = {a.scale:.4f}, held fixed"
        ),
    )
    _line(console, f"{a.basis} (logit - sum of parts = {token.logit - token.total:+.2e})")
    if other is not None:
        _line(console, escape(why_not(a)))


def why_not(a: Attribution) -> str:
    """The chosen token against the runner-up: the logit gap, and the parts that decide it."""
    token, other = a.token, a.runner_up
    gaps = sorted(((m - t, name) for m, t, name in zip(token.values, other.values, a.parts)), reverse=True)
    favour = ", ".join(f"{name} ({gap:+.3f})" for gap, name in gaps[:3] if gap > 0) or "none"
    against = ", ".join(f"{name} ({gap:+.3f})" for gap, name in reversed(gaps[-3:]) if gap < 0) or "none"
    return (
        f"{token.text!r} and not {other.text!r}: logit difference {token.logit - other.logit:+.4f} "
        f"(sum of the parts' differences {token.total - other.total:+.4f}); the parts that favour "
        f"{token.text!r} most: {favour}; most against: {against}"
    )
