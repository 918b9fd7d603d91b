"""`llamascope trace --layer N` and `--attention`: every tensor of one layer named and shaped as in
transformers (golden on the default model); the attention weights and the residual stream recorded
step by step equal transformers' own (eager attention, hidden states) on the same checkpoint; the
HTML attention view in a real browser; the command's options."""

from __future__ import annotations

import json

import pytest
import torch
from browser import probe

from llamascope.cli import main
from llamascope.engine import Engine
from llamascope.errors import LlamascopeError
from llamascope.trace import render_html, trace

PROMPT = "My name is Mariama, my favorite"


@pytest.fixture(scope="module")
def gqa_model(model_factory):
    """3 layers, 6 query heads sharing 2 key/value heads (3 each), float32."""
    return model_factory(
        "attention-gqa", hidden_size=96, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2
    )


@pytest.fixture(scope="module")
def gqa_engine(gqa_model):
    return Engine.load(gqa_model)


@pytest.fixture(scope="module")
def traced(gqa_engine):
    names = ["layers.*.input", "layers.*.output", "norm"]
    return trace(gqa_engine, PROMPT, max_new_tokens=5, attention=True, layer=1, activations=names)


# ---- the layer view on the default model ------------------------------------------------------


def test_the_layer_view_names_and_shapes_every_tensor_of_the_default_models_layer():
    """SmolLM2-135M: 8 prompt tokens, 9 query heads sharing 3 key/value heads of 64, hidden 576,
    MLP 1536; the names are transformers' modules and tensors, in the order the layer computes them."""
    engine = Engine.load()
    t = trace(engine, PROMPT, max_new_tokens=1, layer=0)
    view = t.layer
    assert view.layer == 0 and view.positions == list(range(8))
    capacity = t.kv_cache["shape"][3]
    expected = [
        ("model.layers.0 (input)", [1, 8, 576]),
        ("model.layers.0.input_layernorm", [1, 8, 576]),
        ("model.layers.0.self_attn.q_proj", [1, 8, 576]),
        ("model.layers.0.self_attn.k_proj", [1, 8, 192]),
        ("model.layers.0.self_attn.v_proj", [1, 8, 192]),
        ("model.layers.0.self_attn (query_states)", [1, 9, 8, 64]),
        ("model.layers.0.self_attn (key_states)", [1, 3, 8, 64]),
        ("past_key_values.layers[0].keys, .values", [1, 3, capacity, 64]),
        ("model.layers.0.self_attn (attn_weights)", [1, 9, 8, 8]),
        ("model.layers.0.self_attn (attn_output)", [1, 8, 9, 64]),
        ("model.layers.0.self_attn.o_proj", [1, 8, 576]),
        ("model.layers.0 (residual)", [1, 8, 576]),
        ("model.layers.0.post_attention_layernorm", [1, 8, 576]),
        ("model.layers.0.mlp.gate_proj", [1, 8, 1536]),
        ("model.layers.0.mlp.up_proj", [1, 8, 1536]),
        ("model.layers.0.mlp.act_fn(gate_proj) * up_proj", [1, 8, 1536]),
        ("model.layers.0.mlp.down_proj", [1, 8, 576]),
        ("model.layers.0 (output)", [1, 8, 576]),
    ]
    assert [(r.name, r.shape) for r in view.rows] == expected
    assert {r.dtype for r in view.rows} == {"float32"}
    what = {r.name.removeprefix("model.layers.0"): r.what for r in view.rows}
    assert "viewed as [1, 8, 9, 64] and transposed to [1, 9, 8, 64]" in what[".self_attn.q_proj"]
    assert (
        "viewed as [1, 3, 8, 64]" in what[".self_attn.k_proj"]
        and "each serves 3 query heads" in what[".self_attn.k_proj"]
    )
    assert "RoPE" in what[".self_attn (query_states)"] and "positions 0..7" in what[".self_attn (query_states)"]
    weights = what[".self_attn (attn_weights)"]
    assert "causal mask" in weights and "kv head 0: q heads 0, 1, 2; kv head 1: q heads 3, 4, 5" in weights
    cache = what["past_key_values.layers[0].keys, .values"]
    assert "columns 0..7" in cache and f"{2 * 3 * 64 * 4:,} bytes a position" in cache
    assert t.to_json()["layer"]["rows"][2] == {
        "name": "model.layers.0.self_attn.q_proj",
        "shape": [1, 8, 576],
        "dtype": "float32",
        "what": view.rows[2].what,
    }
    with pytest.raises(LlamascopeError, match=r"--layer 30: this model has 30 decoder layers, 0 to 29"):
        trace(engine, PROMPT, max_new_tokens=1, layer=30)


# ---- the numbers, against transformers ----------------------------------------------------------


@pytest.fixture(scope="module")
def reference(gqa_model, traced):
    """transformers on the same checkpoint, eager attention, over every position the trace fed."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(gqa_model, attn_implementation="eager").eval()
    ids = torch.tensor([traced.prompt_ids + traced.output_ids[:-1]])  # [1, N]
    with torch.no_grad():
        return model(ids, output_attentions=True, output_hidden_states=True)


def test_attention_weights_equal_transformers_eager_attention(traced, reference):
    """Every layer, head and position: the prompt's rows from the prefill, each generated token's
    row from its own decode step (with the KV cache), as transformers computes them in one pass."""
    a = traced.attention
    N = traced.prompt_length + len(traced.output_ids) - 1
    assert (a.layers, a.heads, a.kv_heads) == (3, 6, 2) and a.groups() == [[0, 1, 2], [3, 4, 5]]
    assert a.positions == list(range(N)) and len(reference.attentions) == 3
    for i, theirs in enumerate(reference.attentions):  # [1, H, N, N]
        ours = torch.zeros(a.heads, N, N)
        for p, row in enumerate(a.rows):  # [layers, heads, p + 1]
            ours[:, p, : p + 1] = row[i]
        torch.testing.assert_close(ours, theirs[0], atol=2e-6, rtol=1e-5)
    assert a.to_json()["weights"][2][4][N - 1] == pytest.approx(a.rows[N - 1][2, 4].tolist(), abs=5e-5)


@pytest.mark.parametrize("settings", [dict(use_cache=False), dict(prompt_lookup_num_tokens=3)])
def test_attention_rows_without_the_cache_and_with_drafts(gqa_engine, settings):
    """Each step's own row: the last of a pass over the whole sequence (no cache), the checked
    position of a speculative round's pass; the same weights as step by step with the cache."""
    prompt = "one two three four one two three four one two"
    plain = trace(gqa_engine, prompt, max_new_tokens=8, attention=True)
    other = trace(gqa_engine, prompt, max_new_tokens=8, attention=True, **settings)
    if "prompt_lookup_num_tokens" in settings:  # (some step checked a drafted token)
        assert any(s.speculation.index < len(s.speculation.draft) for s in other.steps[1:])
    assert other.output_ids == plain.output_ids and other.attention.positions == plain.attention.positions
    for ours, theirs in zip(other.attention.rows, plain.attention.rows):
        torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=1e-5)


def test_the_residual_stream_equals_transformers_hidden_states(traced, reference):
    """transformers' hidden_states[i] is layer i's input, the last one the final norm's output; the
    trace's residual stream at each layer, the prompt's positions at the prefill and each later
    position at its own step, is the same."""
    T, L = traced.prompt_length, 3
    states = reference.hidden_states  # L + 1 of [1, N, hidden]
    for k, step in enumerate(traced.steps):
        acts = step.activations
        rows = slice(0, T) if k == 0 else slice(T + k - 1, T + k)
        for i in range(L):
            torch.testing.assert_close(acts[f"layers.{i}.input"][0], states[i][0, rows], atol=1e-5, rtol=1e-5)
            if i + 1 < L:
                torch.testing.assert_close(acts[f"layers.{i}.output"][0], states[i + 1][0, rows], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(acts["norm"][0], states[L][0, rows], atol=1e-5, rtol=1e-5)


# ---- the HTML attention view in a real browser ----------------------------------------------------


# Picks layer 2 and query head 4, then hovers the cell of query 9 over key 2: what is drawn, the
# blank (masked) cells, the head picker's groups, and what the hover shows.
PROBE = """<script>
const layer = document.getElementById('attn-layer'), head = document.getElementById('attn-head');
layer.value = '2'; layer.dispatchEvent(new Event('change'));
head.value = '4'; head.dispatchEvent(new Event('change'));
const rows = [...document.querySelectorAll('#attention tbody tr')];
const cell = rows[9].querySelectorAll('td')[2];
cell.dispatchEvent(new MouseEvent('mouseover', {bubbles: true}));
const shown = [...document.querySelectorAll('#attention td.acell')].filter(c => c.getBoundingClientRect().width > 0);
const probe = document.createElement('pre');
probe.id = 'probe';
probe.textContent = JSON.stringify({
  rows: rows.length, cells: shown.length,
  masked: document.querySelectorAll('#attention td.acell.masked').length,
  tinted: shown.filter(c => !c.classList.contains('masked') && c.style.background !== '').length,
  weight: cell.dataset.weight, hover: document.getElementById('attn-hover').textContent,
  groups: [...head.querySelectorAll('optgroup')].map(g => g.label + ': ' + [...g.children].map(o => o.value).join(',')),
  layers: layer.options.length});
document.body.appendChild(probe);
</script>"""


def test_attention_view_in_headless_chromium(chromium, traced, tmp_path):
    page = render_html(traced)
    assert "http://" not in page and "https://" not in page  # self-contained: its one script is inline
    found = probe(chromium, page, PROBE, tmp_path)
    a = traced.attention
    N = len(a.positions)
    weight = a.rows[9][2, 4, 2].item()
    assert found["rows"] == N and found["cells"] == N * N and found["layers"] == a.layers
    assert found["masked"] == N * (N - 1) // 2 and found["tinted"] == N * (N + 1) // 2
    assert found["weight"] == f"{weight:.4f}"
    assert found["hover"] == (
        f"layer 2, head 4: query 9 {json.dumps(a.tokens[9])} -> key 2 {json.dumps(a.tokens[2])}: {weight:.4f}"
    )
    assert found["groups"] == ["kv head 0: 0,1,2", "kv head 1: 3,4,5"]


# ---- the command ------------------------------------------------------------------------------------


def test_cli_layer_and_attention(gqa_model, tmp_path, capsys):
    base = ["trace", "--model", str(gqa_model), "--max-new-tokens", "2"]
    assert main(base + ["--layer", "3", PROMPT]) != 0
    assert "--layer 3: this model has 3 decoder layers, 0 to 2" in capsys.readouterr().err
    assert main(base + ["--layer", "last", PROMPT]) != 0
    assert "--layer 'last': expected a layer number" in capsys.readouterr().err
    assert main(base + [PROMPT, "--layer"]) == 0  # --layer alone: the first
    text = capsys.readouterr().out
    assert "inside layer 0 at step 0" in text and "self_attn.q_proj" in text
    assert text.index("step 0 (prefill") < text.index("inside layer 0") < text.index("steps (2; one row each)")
    assert main(base + [PROMPT]) == 0
    assert "inside layer" not in capsys.readouterr().out  # off unless asked for
    page = tmp_path / "attention.html"
    assert main(base + ["--layer", "2", "--attention", "--html", str(page), PROMPT]) == 0
    text = capsys.readouterr().out
    assert "inside layer 2 at step 0" in text and "recorded 3 layers x 6 heads" in text
    written = page.read_text()
    assert written.count('<option value="') == 3 + 6 and 'id="attention-data"' in written and 'id="layer"' in written
    assert main(base + ["--json", PROMPT]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["attention"] is None and data["layer"] is None


def test_token_texts_cannot_break_out_of_the_attention_pages_script(gqa_engine):
    """Token texts go into the page's JSON with every "<" escaped and are shown through
    textContent: a prompt holding "</script>" and markup adds no element to the page."""
    hostile = "</script><img src=x onerror=alert(1)><script>alert(2)</script>"
    page = render_html(trace(gqa_engine, hostile, max_new_tokens=1, attention=True))
    assert page.count("<script") == 2  # the weights' JSON and the view's own script
    assert "<img" not in page and "alert(2)</script>" not in page
