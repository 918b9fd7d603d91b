"""`llamascope trace`: records what generation computed, and what it records agrees with a full
forward pass, with transformers, with generation without the trace, and with golden numbers for
the default model made by transformers from the same GGUF file."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from browser import probe
from conftest import rewrite_json
from rich.console import Console

from llamascope.cli import main
from llamascope.engine import Engine
from llamascope.errors import LlamascopeError
from llamascope.generation import generate
from llamascope.trace import ActivationRecorder, capture_activations, lens_logits, render_html, render_trace, trace

PROMPT = "My name is Mariama, my favorite"
GOLDEN = Path(__file__).parent / "golden" / "trace_smollm2.json"


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine.load(tiny_model)


@pytest.fixture(scope="module")
def traced(engine):
    return trace(engine, PROMPT, max_new_tokens=4, lens=True, top=3)


def _render(t, width=160, steps=(0,)) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    render_trace(t, console, steps=steps)
    return console.file.getvalue()


# ---- the numbers ----------------------------------------------------------------------------------


def test_per_position_predictions_equal_full_forward_and_transformers(engine, traced, tiny_model):
    from transformers import LlamaForCausalLM

    ids = torch.tensor([traced.prompt_ids])
    with torch.no_grad():
        ours = engine.model(ids, torch.arange(ids.shape[1])[None])[0].float()  # [T, V]
        reference = LlamaForCausalLM.from_pretrained(tiny_model).eval()(ids).logits[0].float()
    predicted = [p.predicted_id for p in traced.predictions]
    assert predicted == ours.argmax(-1).tolist() == reference.argmax(-1).tolist()
    probs = torch.tensor([p.prob for p in traced.predictions])
    assert torch.allclose(probs, reference.softmax(-1).max(-1).values, atol=1e-5)
    # each position is lined up with the prompt token that follows it
    assert [p.next_id for p in traced.predictions] == traced.prompt_ids[1:] + [None]
    # the last position's prediction is the first generated token
    assert traced.predictions[-1].predicted_id == traced.output_ids[0]


def test_lens_at_the_last_layer_equals_the_models_logits_exactly(engine, traced):
    lens = traced.lens
    L = engine.config.num_hidden_layers
    assert lens.layers == ["embed"] + [str(i) for i in range(L)]
    assert lens.final_layer_max_abs_diff == 0.0
    # prompt positions, then one position per decode step (the last token is never fed)
    assert lens.positions == list(range(traced.prompt_length + len(traced.output_ids) - 1))
    for row in lens.cells:
        assert len(row) == len(lens.positions)
    top_at_last_layer = [cell[0][0] for cell in lens.cells[L][: traced.prompt_length]]
    assert top_at_last_layer == [p.predicted_id for p in traced.predictions]
    for s in traced.steps:
        assert lens.cells[L][traced.prompt_length - 1 + s.index][0][0] == s.chosen.id
    # the same through the public pieces: captured residual stream -> lens == captured logits, bit for bit
    acts = capture_activations(engine.model, traced.prompt_ids, ["layers.*.output", "logits"])
    assert torch.equal(lens_logits(engine.model, acts[f"layers.{L - 1}.output"]), acts["logits"].float())


def test_trace_on_and_off_give_the_same_tokens(engine):
    ids = engine.encode(PROMPT)
    for settings in (
        dict(max_new_tokens=8),
        dict(max_new_tokens=8, use_cache=False),
        dict(max_new_tokens=8, do_sample=True, seed=7, top_k=20, temperature=0.8),
    ):
        plain = generate(engine.model, ids, engine.generation_config(**settings)).output_ids[0]
        traced = trace(engine, PROMPT, lens=True, **settings)
        assert traced.output_ids == plain, settings
        assert [s.chosen.id for s in traced.steps] == plain


def test_steps_record_inputs_cache_and_shapes(engine, traced):
    T, V, H = traced.prompt_length, engine.config.vocab_size, engine.config.hidden_size
    first, second = traced.steps[0], traced.steps[1]
    assert first.input_ids == [traced.prompt_ids] and first.position_ids == [list(range(T))]
    assert first.cache_length == 0 and first.cache_state == "empty (0 positions)"
    assert first.shapes["embed"] == first.shapes["decoder_output"] == first.shapes["norm"] == [1, T, H]
    assert first.shapes["logits"] == [1, 1, V] and first.shapes["all_position_logits"] == [1, T, V]
    assert second.input_ids == [[traced.output_ids[0]]] and second.position_ids == [[T]]
    assert second.cache_length == T and second.cache_state == f"holding {T} positions"
    assert len(second.attention_mask[0]) == T + 1 and second.shapes["embed"] == [1, 1, H]
    assert len(first.top) == 3 and first.top[0].id == first.chosen.id
    nocache = trace(engine, PROMPT, max_new_tokens=2, use_cache=False)
    assert nocache.steps[1].cache_length is None and "no cache" in nocache.steps[1].cache_state
    assert nocache.steps[1].input_ids[0] == nocache.prompt_ids + nocache.output_ids[:1]


def test_settings_sources_max_length_and_strategy(engine, traced):
    s = traced.settings
    assert s.sources["max_new_tokens"] == "call" and s.sources["eos_token_id"] == "generation_config.json"
    assert s.sources["do_sample"] == "default"
    assert traced.max_length == traced.prompt_length + 4
    assert traced.strategy == "greedy search" and "do_sample=False (default)" in traced.strategy_reason
    sampled = trace(engine, PROMPT, max_new_tokens=1, do_sample=True, seed=1, temperature=0.5)
    assert sampled.strategy == "sampling" and "do_sample=True (call)" in sampled.strategy_reason
    assert any(p.startswith("Temperature") for p in sampled.processors)
    with pytest.raises(LlamascopeError, match="beam search"):
        trace(engine, PROMPT, max_new_tokens=1, num_beams=2)


def test_warns_when_settings_contradict_the_tokenizer(model_factory, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(model_factory("gqa"), folder)
    rewrite_json(folder / "generation_config.json", bos_token_id=0, eos_token_id=1, pad_token_id=-1)
    t = trace(Engine.load(folder), PROMPT, max_new_tokens=1)
    assert {"bos", "eos", "pad"} <= {w.kind for w in t.warnings}
    assert t.settings.sources["bos_token_id"] == "generation_config.json"
    text = _render(t)
    assert "warning (eos): generation stops at EOS id(s) 1" in text and "EOS '</s>' is 2" in text


def test_activation_recorder(engine):
    recorder = ActivationRecorder(
        ["layers.*.input", "layers.*.attn_out", "layers.*.mlp_out", "layers.*.output", "layers.0.attn_weights"]
    )
    ids = engine.encode(PROMPT)
    generate(engine.model, ids, max_new_tokens=2, capture=recorder)
    first, second = recorder.steps
    T = len(ids)
    assert set(first) == {f"layers.{i}.{n}" for i in range(2) for n in ("input", "attn_out", "mlp_out", "output")} | {
        "layers.0.attn_weights"
    }
    assert first["layers.0.attn_weights"].shape == (1, 4, T, T)
    assert second["layers.0.attn_weights"].shape == (1, 4, 1, T + 1)
    assert torch.allclose(first["layers.0.attn_weights"].sum(-1), torch.ones(1, 4, T))
    for i in range(2):  # the residual stream: output = input + attention output + MLP output
        a = first[f"layers.{i}.input"] + first[f"layers.{i}.attn_out"] + first[f"layers.{i}.mlp_out"]
        assert torch.equal(a, first[f"layers.{i}.output"])
    assert torch.equal(first["layers.0.output"], first["layers.1.input"])
    assert ActivationRecorder().new_capture().all_logits
    assert not ActivationRecorder(["layers.*.output"]).new_capture().all_logits  # off unless asked for


# ---- rendering --------------------------------------------------------------------------------


def test_the_default_text_reads_in_one_screen(traced):
    """The first step in full, then one row per step (fed ids, positions, cache, the choice and the
    runner-up), then the per-position predictions, the result and the lens."""
    text = _render(traced)
    order = ["1. tokenization", "3. decoding strategy", "step 0 (prefill", "steps (4; one row each)"]
    order += ["per-position predictions", "result", "logit lens"]
    positions = [text.index(heading) for heading in order]
    assert positions == sorted(positions) and "step 1 (decode" not in text
    table = text[text.index("steps (4; one row each)") : text.index("per-position predictions")]
    for s in traced.steps:
        runner_up = next(c for c in s.top if c.id != s.chosen.id)
        row = next(line for line in table.splitlines() if line.startswith(f"│ {s.index:>4} │"))
        assert f"({s.chosen.id})" in row and f"{s.chosen.prob:.3f}" in row and repr(runner_up.text) in row
    assert len(text.splitlines()) < len(_render(traced, steps=None).splitlines())


def test_text_rendering_order_and_content(traced):
    text = _render(traced, steps=None)
    order = [
        "1. tokenization",
        "2. generation settings",
        "3. decoding strategy",
        "step 0 (prefill",
        "step 1 (decode",
        "step 3 (decode",
        "steps (4; one row each)",
        "per-position predictions",
        "result",
        "logit lens",
    ]
    positions = [text.index(heading) for heading in order]
    assert positions == sorted(positions)
    T = traced.prompt_length
    assert f"input_ids      = tensor([[{', '.join(map(str, traced.prompt_ids))}]])  shape [1, {T}]" in text
    assert f"max_length = prompt length {T} + max_new_tokens 4 (call) = {T + 4}" in text
    assert "greedy search" in text and "predicts the token that follows it" in text
    assert f"holding {T} positions" in text and "empty (0 positions)" in text
    assert f"[1, {T}, 64]" in text and "[1, 1, 320]" in text
    assert repr(traced.predictions_text) in text and repr(traced.text) in text


def test_json_holds_the_whole_trace(traced, tmp_path):
    data = json.loads(json.dumps(traced.to_json()))
    assert data["tokenization"]["input_ids"] == [traced.prompt_ids]
    assert data["tokenization"]["input_ids_shape"] == [1, traced.prompt_length]
    assert len(data["steps"]) == 4 and data["steps"][1]["cache_length"] == traced.prompt_length
    assert data["strategy"]["name"] == "greedy search"
    assert {s["name"] for s in data["settings"]} >= {"max_new_tokens", "do_sample", "eos_token_id"}
    assert [p["predicted_id"] for p in data["predictions"]] == [p.predicted_id for p in traced.predictions]
    assert len(data["lens"]["cells"]) == 3 and data["output_ids"] == traced.output_ids


def test_cli_trace_writes_json_and_html(tiny_model, tmp_path, capsys):
    out_json, out_html = tmp_path / "t.json", tmp_path / "t.html"
    args = ["trace", "--model", str(tiny_model), "--max-new-tokens", "2", "--top", "2", "--lens", PROMPT]
    assert main(args[:-1] + ["--json-file", str(out_json), "--html", str(out_html), PROMPT]) == 0
    text = capsys.readouterr().out
    assert "1. tokenization" in text and "logit lens" in text
    data = json.loads(out_json.read_text())
    assert len(data["output_ids"]) == 2 and len(data["steps"][0]["top"]) == 2
    assert out_html.read_text().count('<td class="cell') == 3 * (data["lens"]["positions"][-1] + 1)
    # --json: the same trace on stdout, and nothing else there
    assert main(args[:-1] + ["--json", PROMPT]) == 0
    assert json.loads(capsys.readouterr().out) == data
    assert main(["trace", "--model", str(tiny_model), "--max-new-tokens", "1", "--no-cache", "Hi"]) == 0
    assert "no cache (use_cache=False)" in capsys.readouterr().out
    # --steps: which steps are shown in full before the table of all of them
    assert main(args[:3] + ["--max-new-tokens", "3", "--steps", "0,2", PROMPT]) == 0
    text = capsys.readouterr().out
    assert "step 0 (prefill" in text and "step 2 (decode" in text and "step 1 (decode" not in text
    assert main(args[:3] + ["--steps", "some", PROMPT]) != 0
    assert "--steps 'some': expected first, all, or step numbers" in capsys.readouterr().err


# ---- the HTML report in a real browser ----------------------------------------------------------


PROBE = """<script>
const cells = [...document.querySelectorAll('#lens td.cell')];
const shown = cells.filter(c => { const r = c.getBoundingClientRect(); return r.width > 0 && r.height > 0; });
const tinted = cells.filter(c => getComputedStyle(c).backgroundColor !== 'rgba(0, 0, 0, 0)');
const tips = cells.filter(c => getComputedStyle(c.querySelector('.tip')).display === 'none');
const probe = document.createElement('pre');
probe.id = 'probe';
probe.textContent = JSON.stringify({cells: cells.length, shown: shown.length, tinted: tinted.length,
  hiddenTips: tips.length, rows: document.querySelectorAll('#lens tbody tr').length});
document.body.appendChild(probe);
</script>"""


def test_html_heat_map_in_headless_chromium(chromium, traced, tmp_path):
    page = render_html(traced)
    assert "http://" not in page and "https://" not in page and "<script" not in page  # self-contained
    found = probe(chromium, page, PROBE, tmp_path)
    expected = len(traced.lens.layers) * len(traced.lens.positions)
    assert found == {
        "cells": expected,
        "shown": expected,
        "tinted": expected,
        "hiddenTips": expected,
        "rows": len(traced.lens.layers),
    }


# ---- golden output on the default model ---------------------------------------------------------


@pytest.fixture(scope="module")
def default_engine():
    return Engine.load(quant="none")  # float32 dequantised weights, as transformers runs the GGUF


def test_golden_trace_on_the_default_model(default_engine):
    golden = json.loads(GOLDEN.read_text())
    t = trace(default_engine, golden["prompt"], max_new_tokens=golden["max_new_tokens"], lens=True)
    # numbers: transformers' own run on the same GGUF file (tests/golden/make_trace_golden.py)
    assert t.prompt_ids == golden["prompt_ids"]
    assert [p.predicted_id for p in t.predictions] == golden["predicted_ids"]
    # Same dequantised float32 weights as transformers: probabilities agree to float rounding.
    assert [p.prob for p in t.predictions] == pytest.approx(golden["predicted_probs"], abs=1e-4)
    assert t.predictions_text == golden["predictions_text"]
    assert t.output_ids == golden["output_ids"] and t.text == golden["text"]
    # the top 5 of the first step: the same tokens (close ones may swap places), the same probabilities
    top = {c.id: c.prob for c in t.steps[0].top}
    assert t.steps[0].top[0].id == golden["first_step_top_ids"][0] and set(top) == set(golden["first_step_top_ids"])
    assert [top[i] for i in golden["first_step_top_ids"]] == pytest.approx(golden["first_step_top_probs"], abs=3e-2)
    assert t.lens.final_layer_max_abs_diff == 0.0
    # structure
    T, H, V, L = len(t.prompt_ids), golden["hidden_size"], golden["vocab_size"], golden["num_hidden_layers"]
    assert len(t.steps) == golden["max_new_tokens"] and t.finish_reason == "length"
    assert t.steps[0].shapes == {
        "embed": [1, T, H],
        "decoder_output": [1, T, H],
        "norm": [1, T, H],
        "logits": [1, 1, V],
        "next_token_logits": [1, V],
        "all_position_logits": [1, T, V],
    }
    for k, s in enumerate(t.steps[1:], 1):
        assert s.cache_length == T + k - 1 and s.position_ids == [[T + k - 1]] and s.shapes["embed"] == [1, 1, H]
    assert t.settings.sources["eos_token_id"] == "GGUF metadata" and t.warnings == []
    assert len(t.lens.cells) == L + 1 and len(t.lens.positions) == T + golden["max_new_tokens"] - 1
    text = _render(t)
    for heading in ("1. tokenization", "greedy search", "step 0 (prefill", "steps (8; one row each)"):
        assert heading in text
    assert "per-position predictions" in text and "logit lens" in text and "step 7 (decode" not in text
    full = _render(t, steps=None)  # (every step in full: seven more blocks of some 30 lines)
    assert "step 7 (decode" in full and len(full.splitlines()) - len(text.splitlines()) > 150
    assert repr(golden["predictions_text"]) in text and repr(golden["text"]) in text


# ---- speculative decoding -------------------------------------------------------------------------


@pytest.mark.parametrize("drafts", ["prompt lookup", "assistant"])
def test_trace_shows_each_speculative_steps_draft_and_why_it_was_kept_or_refused(engine, model_factory, drafts):
    """The same tokens as without drafts; every step after the prompt names its round's draft and
    the token it checked; a refused draft token says what the model chose instead and where the
    draft's token ranked; the lens reads each step's own position of the round's pass."""
    small = model_factory("assistant-small", seed=7, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    prompt = "one two three four one two three four one two"
    extra = dict(prompt_lookup_num_tokens=3) if drafts == "prompt lookup" else dict(assistant_model=str(small))
    plain = trace(engine, prompt, max_new_tokens=12, lens=True)
    drafted = trace(engine, prompt, max_new_tokens=12, lens=True, **extra)
    assert drafted.output_ids == plain.output_ids
    assert drafted.lens.positions == plain.lens.positions
    assert drafted.lens.final_layer_max_abs_diff < 1e-3
    checks = [s.speculation for s in drafted.steps[1:]]
    assert all(c is not None and c.source == drafts for c in checks)
    checked = [c for c in checks if c.index < len(c.draft)]
    assert checked and all(c.kept == (c.why == "the model chose the drafted token") for c in checked)
    refused = [c for c in checked if not c.kept]
    assert refused and all(re.match(r"refused: the model chose .* not the draft's .*rank \d+", c.why) for c in refused)
    text = _render(drafted, steps=None)
    assert f"draft ({drafts}): [" in text and "refused: the model chose" in text
    assert f"{drafts} draft token 1 of" in _render(drafted)  # (the table of steps says it in a few words)
    step = drafted.to_json()["steps"][1]["speculation"]
    assert step["source"] == drafts and {"draft", "index", "kept", "why"} <= set(step)


def test_a_saved_trace_says_what_it_is(traced, tiny_model):
    """The JSON names the model, its file and format, the dtype and llamascope's version; the HTML
    names the model, has a colour legend, and a line before the first generated position."""
    from importlib.metadata import version

    model = traced.to_json()["model"]
    assert model["name"] == tiny_model.name and model["file"] == str(tiny_model) and model["format"] == "safetensors"
    assert (model["architecture"], model["dtype"], model["llamascope_version"]) == (
        "llama",
        "float32",
        version("llamascope"),
    )
    page = render_html(traced)
    assert f"<h1>llamascope trace: {tiny_model.name}</h1>" in page and 'id="legend"' in page
    first_generated = traced.prompt_length
    assert f'class="pos generated-start" title="position {first_generated}"' in page
    assert page.count("generated-start") == 2 + len(traced.lens.layers)  # its CSS rule, the header, each row


def test_the_walk_through_in_docs_is_the_real_output(capsys):
    """docs/trace.md's walk through quotes `llamascope trace` on the default model: every line it
    quotes is in what the command prints now (probabilities compared to their digits' shape, so a
    last-digit difference between kernel builds does not fail it)."""
    doc = (Path(__file__).parents[1] / "docs" / "trace.md").read_text()
    walk = doc[doc.index("## A walk through one trace") : doc.index("## What it prints")]
    quoted = [line for block in walk.split("```")[1::2] for line in block.strip("\n").splitlines()]
    assert len(quoted) > 20
    assert main(["trace", "My name is Mariama, my favorite", "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out

    def shape(text: str) -> str:
        return re.sub(r"\d+\.\d+", "#.#", text)

    missing = [line for line in quoted if shape(line) not in shape(printed)]
    assert missing == []


def test_the_kv_cache_is_described_as_generate_allocates_it(engine, traced):
    """Shape [layers, batch, kv_heads, capacity, head_dim] per key and value, and bytes: those of
    the KVCache generate() allocates for this prompt, and shown under the first step."""
    from llamascope.cache import KVCache

    c = traced.to_json()["kv_cache"]
    config = engine.config
    cache = KVCache.for_model(engine.model, 1, traced.max_length, first_pass=traced.prompt_length)
    assert c["shape"] == [config.num_hidden_layers, 1, config.num_key_value_heads, cache.capacity, config.head_dim]
    assert c["bytes"] == cache.nbytes() and c["bytes_per_position"] * cache.capacity == cache.nbytes()
    assert f"KV cache: keys and values, each {c['shape']} float32" in _render(traced)


def test_sampling_steps_show_each_processors_candidates_mass_and_the_drawn_rank(engine):
    """Each processor in turn: the candidates it leaves (the last, those generation drew from) and
    the model's probability on them, shrinking; the drawn token's rank among the processed scores."""
    settings = dict(max_new_tokens=5, do_sample=True, seed=3, temperature=0.8, top_k=12, top_p=0.9)
    traced = trace(engine, PROMPT, **settings)
    steps = []
    generate(engine.model, engine.encode(PROMPT), engine.generation_config(**settings), on_step=steps.append)
    for s, step in zip(traced.steps, steps):
        stages = s.sampling["stages"]
        assert [x["processor"] for x in stages] == traced.processors
        assert stages[-1]["kept"] == int(torch.isfinite(step.scores[0]).sum()) and stages[1]["kept"] == 12
        masses = [x["mass"] for x in stages]
        assert masses == sorted(masses, reverse=True) and masses[0] == pytest.approx(1.0)
        drawn = int(step.next_tokens[0])
        assert s.chosen.id == drawn and s.sampling["rank"] == int((step.scores[0] > step.scores[0, drawn]).sum()) + 1
    text = _render(traced)
    assert "sampling: the processors in turn" in text and "drawn: rank" in text
