"""A trace as a self-contained HTML report: the lens heat map, predictions and steps."""

from __future__ import annotations

import html

from .record import Lens, Trace, max_length_rule, shape_of
from .text import tensor_text

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
    parts.append(f"<p>input_ids <code>{e(tensor_text([t.prompt_ids]))}</code> shape [1, {t.prompt_length}]</p>")
    parts.append(f"<p>decoding: <b>{e(t.strategy)}</b> — {e(t.strategy_reason)}. {e(max_length_rule(t))}</p>")
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
            f"<tr><td>{s.index}</td><td><code>{e(str(shape_of(s.input_ids)))}</code></td>"
            f"<td><code>{e(str(s.position_ids[0]))}</code></td><td>{e(s.cache_state)}</td>"
            f"<td><code>{e(str(s.shapes['logits']))}</code></td>"
            f"<td class=tok>{e(repr(s.chosen.text))} ({s.chosen.id})</td><td>{s.chosen.prob:.4f}</td></tr>"
        )
    parts.append("</table>")
    return parts
