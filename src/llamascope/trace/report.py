"""A trace as a self-contained HTML report: the lens heat map, the attention patterns, the layer
view, predictions and steps."""

from __future__ import annotations

import html
import json

from .attention import AttentionMap
from .layer import LayerView
from .record import Lens, StepTrace, Trace, max_length_rule, shape_of
from .text import tensor_text, why_not

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
table.dla td.left { text-align: right; width: 150px; border-right: 1px solid #888; }
table.dla td.right { width: 150px; } table.dla tr.total td { font-weight: bold; }
table.dla .bar { display: inline-block; height: 10px; } table.dla tr.rest td { color: #777; }
table.dla .bar.pos { background: #2b6cb0; } table.dla .bar.neg { background: #c53030; }
table.attnmap td.acell { width: 16px; height: 16px; padding: 0; border: 1px solid #fff; cursor: default; }
table.attnmap td.acell:hover { outline: 2px solid #222; outline-offset: -2px; }
table.attnmap th { font-weight: normal; font-family: ui-monospace, monospace; white-space: pre; font-size: 11px; }
table.attnmap thead th { writing-mode: vertical-rl; transform: rotate(180deg); text-align: left; padding: 2px 0; }
table.attnmap tbody th { text-align: right; }
table.attnmap .first-generated { border-left: 3px solid #c00 !important; }
table.attnmap tr.first-generated td, table.attnmap tr.first-generated th { border-top: 3px solid #c00; }
#attn-hover { font-family: ui-monospace, monospace; white-space: pre; min-height: 1.3em; }
"""


def _heat(p: float) -> str:
    """White (p = 0) to deep blue (p = 1)."""
    lightness = 97 - 62 * max(0.0, min(1.0, p))
    return f"hsl(215, 80%, {lightness:.0f}%)"


def render_html(t: Trace) -> str:
    """A self-contained HTML report (inline CSS, no network; no scripts but the attention view's,
    with --attention): the lens heat map (layer x position, hover for the top-K), the attention
    patterns, the layer view, the per-position predictions and the steps."""
    parts = _html_summary(t)
    if t.lens is not None:
        parts += _html_lens(t.lens, t.top, t.prompt_length)
    if t.attention is not None:
        parts += _html_attention(t.attention)
    if t.layer is not None:
        parts += _html_layer(t.layer)
    if t.predictions:
        parts += _html_predictions(t)
    parts += _html_steps(t)
    parts += _html_attribution(t)
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


# ---- the attention view (--attention) and the layer view (--layer) ------------------------------

# Draws the chosen layer's and head's weights from the JSON beside it: rows = query positions,
# columns = key positions, the masked (future) columns blank; hovering a cell shows its weight and
# the two tokens.
_ATTENTION_JS = """
(function () {
  const data = JSON.parse(document.getElementById('attention-data').textContent);
  const layerPick = document.getElementById('attn-layer'), headPick = document.getElementById('attn-head');
  const table = document.getElementById('attention'), hover = document.getElementById('attn-hover');
  const label = k => data.positions[k] + ' ' + JSON.stringify(data.tokens[k]);
  const heat = w => 'hsl(215, 80%, ' + (97 - 62 * Math.max(0, Math.min(1, w))).toFixed(0) + '%)';
  function cell(tag, text, cls) {
    const c = document.createElement(tag);
    c.textContent = text;
    if (cls) c.className = cls;
    return c;
  }
  function draw() {
    const layer = +layerPick.value, head = +headPick.value, rows = data.weights[layer][head];
    const first = data.positions.indexOf(data.prompt_length);
    table.replaceChildren();
    const top = table.createTHead().insertRow();
    top.appendChild(cell('th', ''));
    data.positions.forEach((p, k) => top.appendChild(cell('th', label(k), k === first ? 'first-generated' : '')));
    const body = table.createTBody();
    rows.forEach((row, q) => {
      const tr = body.insertRow();
      if (q === first) tr.className = 'first-generated';
      tr.appendChild(cell('th', label(q)));
      data.positions.forEach((p, k) => {
        const td = cell('td', '', 'acell' + (k === first ? ' first-generated' : ''));
        if (k < row.length) {
          td.style.background = heat(row[k]);
          td.dataset.weight = row[k].toFixed(4);
          td.title = 'layer ' + layer + ', head ' + head + ': query ' + label(q) + ' -> key ' + label(k)
            + ': ' + row[k].toFixed(4);
        } else {
          td.classList.add('masked');
        }
        tr.appendChild(td);
      });
    });
  }
  table.addEventListener('mouseover', e => {
    const td = e.target.closest('td.acell');
    hover.textContent = td && td.title ? td.title : (td ? 'masked: a query never sees later keys' : '');
  });
  layerPick.addEventListener('change', draw);
  headPick.addEventListener('change', draw);
  draw();
})();
"""


def _html_attention(a: AttentionMap) -> list[str]:
    """Pickers for the layer and the head (query heads grouped by the key/value head they share),
    a heat map of that head's weights, and the weights as JSON for the page's script to draw."""
    e = html.escape
    layers = "".join(f'<option value="{i}">{i}</option>' for i in range(a.layers))
    heads = "".join(
        f'<optgroup label="kv head {j}">'
        + "".join(f'<option value="{h}">q head {h}</option>' for h in group)
        + "</optgroup>"
        for j, group in enumerate(a.groups())
    )
    data = {
        "positions": a.positions,
        "tokens": a.tokens,
        "prompt_length": a.prompt_length,
        "weights": [[a.weights(i, h) for h in range(a.heads)] for i in range(a.layers)],
    }
    blob = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")  # (no "</script>" inside)
    return [
        "<h2>attention</h2>",
        f"<p>The attention weights of each layer and head: a row per query position, a column per key "
        f"position (the prompt's rows from the prefill, each generated token's from its own step); a query "
        f"never sees later keys, so the upper triangle is blank. {a.heads} query heads share {a.kv_heads} "
        f"key/value heads: the head picker groups them by the key/value head they share. Hover a cell for "
        f"its weight and the two tokens; the red lines mark the first generated position.</p>",
        f'<p><label>layer <select id="attn-layer">{layers}</select></label> '
        f'<label>head <select id="attn-head">{heads}</select></label></p>',
        f'<p id="attn-hover">{e("hover a cell for its weight")}</p>',
        '<table class="attnmap" id="attention"></table>',
        f'<script type="application/json" id="attention-data">{blob}</script>',
        f"<script>{_ATTENTION_JS}</script>",
    ]


def _html_layer(view: LayerView) -> list[str]:
    """Every tensor of one layer at the prefill: transformers' name, shape, dtype, what it is."""
    e = html.escape
    parts = [
        f"<h2>inside layer {view.layer} at step 0</h2>",
        '<table class="grid" id="layer"><tr><th>tensor</th><th>shape</th><th>dtype</th><th>what</th></tr>',
    ]
    for r in view.rows:
        parts.append(
            f"<tr><td><code>{e(r.name)}</code></td><td><code>{e(str(r.shape))}</code></td>"
            f"<td>{e(r.dtype)}</td><td>{e(r.what)}</td></tr>"
        )
    parts.append("</table>")
    return parts


# ---- why this token (--attribution) --------------------------------------------------------------

ATTRIBUTION_BARS = 15  # the parts drawn each way: the most positive, the most negative
BAR_PX = 150  # the longest bar's length


def _html_attribution(t: Trace) -> list[str]:
    """Each attributed step's token: a bar per part of its logit (positive right, negative left)."""
    parts = []
    for s in t.steps:
        if s.attribution is not None:
            parts += _html_attribution_step(s)
    return parts


def _html_attribution_step(s: StepTrace) -> list[str]:
    """One step's attribution: the parts ranked, the rest summed in one row, the sum and the logit."""
    e = html.escape
    a, token, other = s.attribution, s.attribution.token, s.attribution.runner_up
    position = s.position_ids[0][a.position]
    order = sorted(range(len(a.parts)), key=lambda k: -token.values[k])
    many = len(order) > 2 * ATTRIBUTION_BARS
    longest = max(abs(v) for v in token.values) or 1.0
    them = f"<th>to {e(repr(other.text))}</th><th>difference</th>" if other else ""
    parts = [
        f'<h2 id="attribution-{s.index}">why {e(repr(token.text))}: step {s.index}, position {position}</h2>',
        "<p>Direct logit attribution: the token's logit split into what each part wrote into the residual "
        "stream, each read through the final norm (its weight, and this position's rms held fixed) and "
        f"the LM head's row of the token. The rms here is {a.scale:.4f}.</p>",
        f'<table class="grid dla"><tr><th>part</th><th colspan="2">to {e(repr(token.text))}</th>'
        f"<th>value</th>{them}</tr>",
    ]
    for n, k in enumerate(order[:ATTRIBUTION_BARS] + order[-ATTRIBUTION_BARS:] if many else order):
        if many and n == ATTRIBUTION_BARS:
            rest = order[ATTRIBUTION_BARS:-ATTRIBUTION_BARS]
            mine = sum(token.values[j] for j in rest)
            theirs = sum(other.values[j] for j in rest) if other else None
            parts.append(_html_bar_row(f"{len(rest)} other parts", mine, theirs, longest, "rest"))
        parts.append(_html_bar_row(a.parts[k], token.values[k], other.values[k] if other else None, longest))
    parts.append(_html_bar_row("sum of parts", token.total, other.total if other else None, None, "total"))
    parts.append(_html_bar_row("logit (the model's)", token.logit, other.logit if other else None, None, "total"))
    parts.append("</table>")
    parts.append(f"<p>{e(a.basis)} (logit − sum of parts = {token.logit - token.total:+.2e}).</p>")
    if other is not None:
        parts.append(f"<p>{e(why_not(a))}</p>")
    return parts


def _html_bar_row(name: str, mine: float, theirs: float | None, longest: float | None, kind: str = "part") -> str:
    """A row: the part's name, its bar (left of the axis when negative; none where `longest` is
    None), its value, and the runner-up's value and the difference."""
    width = 0 if longest is None else round(BAR_PX * abs(mine) / longest)
    bar = f'<span class="bar {"pos" if mine >= 0 else "neg"}" style="width:{width}px"></span>' if width else ""
    left, right = ("", bar) if mine >= 0 else (bar, "")
    them = f"<td>{theirs:+.4f}</td><td>{mine - theirs:+.4f}</td>" if theirs is not None else ""
    return (
        f'<tr class="{kind}" data-part="{html.escape(name)}" data-value="{mine:.6f}"><td class="tok">'
        f'{html.escape(name)}</td><td class="left">{left}</td><td class="right">{right}</td>'
        f"<td>{mine:+.4f}</td>{them}</tr>"
    )
