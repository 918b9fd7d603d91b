"""Direct logit attribution (`trace --attribution`): the parts sum to the logit, on float32 and on
GGUF weights; each part equals transformers' own tensors decomposed by hand; and a part's value is
what removing it from the residual stream takes off the logit, where that path is direct."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from llamascope.activations import Capture
from llamascope.attribution import POINTS, attribute
from llamascope.cli import main
from llamascope.engine import Engine
from llamascope.errors import LlamascopeError
from llamascope.trace import render_html, trace

PROMPT = "My name is Mariama, my favorite"


@pytest.fixture(scope="module")
def gqa(tiny_model):
    return Engine.load(tiny_model)  # 4 query heads sharing 2 key/value heads


@pytest.fixture(scope="module")
def biased_folder(model_factory):
    return model_factory("gqa-attention-bias", attention_bias=True)  # o_proj has a bias


@pytest.fixture(scope="module")
def biased(biased_folder):
    return Engine.load(biased_folder)


@pytest.fixture(scope="module")
def gguf():
    return Engine.load()  # the default model: SmolLM2-135M, Q4_1 projections, Q8_0 LM head


def _attributed(engine, ids: list[int], token_ids=None, edits=None):
    """One forward pass over `ids` with every layer detailed -> (Attribution at the last position
    of `token_ids` (default: the argmax and the runner-up), the capture, the last logits [V])."""
    L = engine.config.num_hidden_layers
    acts = Capture(names=[*POINTS, "layers.*.attn_out"], detail=range(L), edits=edits)
    tokens = torch.tensor([ids])  # [1, T]
    with torch.inference_mode():
        logits = engine.model(tokens, torch.arange(len(ids))[None], capture=acts)[0, -1].float()  # [V]
        token_ids = token_ids or logits.topk(2).indices.tolist()
        return attribute(engine.model, acts, len(ids) - 1, token_ids, logits), acts, logits


# ---- the parts sum to the logit --------------------------------------------------------------


@pytest.mark.parametrize("which", ["gqa", "biased"])
def test_parts_sum_to_the_logit_on_float32_weights_at_every_step(which, request):
    engine = request.getfixturevalue(which)
    t = trace(engine, PROMPT, max_new_tokens=3, attribution="all", top=2)
    config = engine.config
    per_layer = config.num_attention_heads + (1 if which == "biased" else 0) + 1
    for s in t.steps:
        a = s.attribution
        assert len(a.parts) == 1 + config.num_hidden_layers * per_layer and a.parts[0] == "embed"
        assert ("layers.1.attn.bias" in a.parts) == (which == "biased") and "layers.1.attn.head 3" in a.parts
        assert not a.quantised and "float weights" in a.basis
        assert a.token.id == s.chosen.id and a.token.logit == s.chosen.logit and a.token.text == s.chosen.text
        assert a.runner_up.id == next(c.id for c in s.top if c.id != s.chosen.id)
        for token in (a.token, a.runner_up):
            assert sum(token.values) == pytest.approx(token.total, abs=1e-9)
            assert token.total == pytest.approx(token.logit, abs=1e-4)  # float32 rounding only
        assert a.position == len(s.input_ids[0]) - 1  # the prompt's last position, then each step's one


def test_parts_sum_to_the_logit_on_gguf_weights(gguf):
    """Q4_1 projections and a Q8_0 head: the parts (o_proj's and the head's blocks dequantised)
    sum to the logit recomputed independently from the same tensors, and the model's own logit
    is near it (its kernels quantise activations to 8 bits); the trace says which it is."""
    ids = gguf.encode(PROMPT)
    a, acts, _ = _attributed(gguf, ids)
    model, position = gguf.model, len(ids) - 1
    stream = acts["embed"][0, position].float()  # [hidden], rebuilt from the parts' tensors
    for layer in model.model.layers:
        o_proj, i = layer.self_attn.o_proj, layer.index
        heads = acts[f"layers.{i}.self_attn.heads"][0, position].float().flatten()  # [H*D]
        stream = stream + F.linear(heads, o_proj.dequantized(), o_proj.bias) + acts[f"layers.{i}.mlp_out"][0, position]
    x = acts[f"layers.{len(model.model.layers) - 1}.output"][0, position].float()  # [hidden]
    rms = torch.sqrt(x.pow(2).mean() + model.model.norm.eps)
    assert float(rms) == pytest.approx(a.scale, rel=1e-6)
    assert (stream - x).abs().max() < 1e-2 * x.abs().max()  # the model's own sums, near
    head = model.lm_head.dequantized()  # [V, hidden]
    for token in (a.token, a.runner_up):
        recomputed = float(head[token.id] @ (model.model.norm.weight * stream / rms))
        assert token.total == pytest.approx(recomputed, abs=1e-3)
        assert abs(token.logit - token.total) < 0.1  # measured: 0.01 and under
    assert a.quantised and "dequantised" in a.basis
    t = trace(gguf, PROMPT, max_new_tokens=2, attribution="all")
    for s in t.steps:
        assert s.attribution.quantised and abs(s.attribution.token.logit - s.attribution.token.total) < 0.1
        assert sum(s.attribution.token.values) == pytest.approx(s.attribution.token.total, abs=1e-6)


# ---- against transformers ------------------------------------------------------------------------


def _transformers_parts(folder, ids: list[int], token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' LlamaForCausalLM on the same checkpoint, its tensors taken by forward hooks
    (the embeddings, each o_proj's input, each MLP's output, the final norm's input) and the
    decomposition done by hand, head by head -> values [n, parts], the last position's logits [V]."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(folder).eval()
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str, pre: bool):
        return (lambda m, args: seen.update({name: args[0]})) if pre else (lambda m, a, out: seen.update({name: out}))

    hooks = [hf.model.embed_tokens.register_forward_hook(keep("embed", False))]
    hooks.append(hf.model.norm.register_forward_pre_hook(keep("x", True)))
    for i, layer in enumerate(hf.model.layers):
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(keep(f"z{i}", True)))
        hooks.append(layer.mlp.register_forward_hook(keep(f"mlp{i}", False)))
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, -1]  # [V]
        x = seen["x"][0, -1]  # [hidden]
        rms = torch.sqrt(x.pow(2).mean() + hf.config.rms_norm_eps)
        read = hf.lm_head.weight[token_ids] * hf.model.norm.weight / rms  # [n, hidden]
        values = [read @ seen["embed"][0, -1]]
        for i, layer in enumerate(hf.model.layers):
            o_proj, D = layer.self_attn.o_proj, layer.self_attn.head_dim
            z = seen[f"z{i}"][0, -1]  # [H*D]
            for h in range(z.shape[0] // D):
                values.append(read @ (o_proj.weight[:, h * D : (h + 1) * D] @ z[h * D : (h + 1) * D]))
            if o_proj.bias is not None:
                values.append(read @ o_proj.bias)
            values.append(read @ seen[f"mlp{i}"][0, -1])
    for hook in hooks:
        hook.remove()
    return torch.stack(values, dim=1), logits


def test_each_part_equals_transformers_decomposed_by_hand(biased, biased_folder):
    ids = biased.encode(PROMPT)
    a, _, _ = _attributed(biased, ids)
    token_ids = [a.token.id, a.runner_up.id]
    reference, logits = _transformers_parts(biased_folder, ids, token_ids)
    ours = torch.tensor([a.token.values, a.runner_up.values])  # [2, parts]
    assert ours.shape == reference.shape
    assert torch.allclose(ours, reference, atol=1e-4), (ours - reference).abs().max()
    assert [a.token.total, a.runner_up.total] == pytest.approx(logits[token_ids].tolist(), abs=1e-4)


# ---- a part's value is what removing it takes off, on the direct path ---------------------------


def test_removing_a_part_takes_its_value_off_the_logit(biased):
    """Zero the last layer's MLP output: the residual stream loses exactly that part, so the new
    logit times the new rms over the old equals the sum of the parts less the part's value. Zero
    a head of the last layer: the same, once the change it makes to that layer's MLP is added."""
    ids = biased.encode(PROMPT)
    last = biased.config.num_hidden_layers - 1
    a, before, _ = _attributed(biased, ids)
    token = a.token.id
    value = dict(zip(a.parts, a.token.values))

    def rescaled(acts, logits) -> float:  # the new logit at the old rms
        x = acts[f"layers.{last}.output"][0, -1]
        return float(logits[token]) * float(torch.sqrt(x.pow(2).mean() + biased.model.model.norm.eps)) / a.scale

    mlp = f"layers.{last}.mlp_out"
    _, acts, logits = _attributed(biased, ids, [token], {mlp: torch.zeros_like})
    assert rescaled(acts, logits) == pytest.approx(a.token.total - value[f"layers.{last}.mlp"], abs=1e-4)

    head = max(range(biased.config.num_attention_heads), key=lambda h: abs(value[f"layers.{last}.attn.head {h}"]))
    assert abs(value[f"layers.{last}.attn.head {head}"]) > 1e-2  # (a head that matters)

    def drop_head(z: torch.Tensor) -> torch.Tensor:  # [B, T, H, D]
        z = z.clone()
        z[:, :, head] = 0
        return z

    edited, acts, logits = _attributed(biased, ids, [token], {f"layers.{last}.self_attn.heads": drop_head})
    mlp_after = dict(zip(edited.parts, edited.token.values))[f"layers.{last}.mlp"] * edited.scale / a.scale
    mlp_change = mlp_after - value[f"layers.{last}.mlp"]  # (both at the old rms)
    expected = a.token.total - value[f"layers.{last}.attn.head {head}"] + mlp_change
    assert rescaled(acts, logits) == pytest.approx(expected, abs=1e-4)


# ---- in the trace: steps, speculative rounds, the CLI, bad input ----------------------------------


def test_only_the_asked_steps_are_attributed_and_tokens_do_not_change(gqa):
    plain = trace(gqa, PROMPT, max_new_tokens=4)
    first = trace(gqa, PROMPT, max_new_tokens=4, attribution=True)
    some = trace(gqa, PROMPT, max_new_tokens=4, attribution=[1, 3])
    assert plain.output_ids == first.output_ids == some.output_ids
    assert [s.attribution is not None for s in plain.steps] == [False] * 4
    assert [s.attribution is not None for s in first.steps] == [True, False, False, False]
    assert [s.attribution is not None for s in some.steps] == [False, True, False, True]
    with pytest.raises(LlamascopeError, match="attribution='some'"):
        trace(gqa, PROMPT, max_new_tokens=1, attribution="some")
    with pytest.raises(LlamascopeError, match="layers.0.self_attn.heads"):
        acts = Capture(names=POINTS)  # no layer detailed: no heads
        gqa.model(torch.tensor([[1, 2]]), torch.arange(2)[None], capture=acts)
        attribute(gqa.model, acts, 1, [3], torch.zeros(gqa.config.vocab_size))


def test_speculative_steps_are_attributed_at_their_own_position(gqa):
    prompt = "one two three four one two three four one two"
    plain = trace(gqa, prompt, max_new_tokens=8)
    drafted = trace(gqa, prompt, max_new_tokens=8, prompt_lookup_num_tokens=3, attribution="all")
    assert drafted.output_ids == plain.output_ids
    assert any(s.speculation.draft for s in drafted.steps[1:])  # (rounds of several positions)
    for s in drafted.steps:
        assert s.attribution.token.total == pytest.approx(s.chosen.logit, abs=1e-4)


def test_cli_attribution_prints_the_table_and_saves_it(tiny_model, tmp_path, capsys):
    out_json, out_html = tmp_path / "t.json", tmp_path / "t.html"
    args = ["trace", "--model", str(tiny_model), "--max-new-tokens", "2", "--attribution"]
    assert main(args + ["--json-file", str(out_json), "--html", str(out_html), PROMPT]) == 0
    text = capsys.readouterr().out
    data = json.loads(out_json.read_text())
    steps = data["steps"]
    a = steps[0]["attribution"]
    assert steps[1]["attribution"] is None  # (--steps first: the first step's)
    assert a["parts"][0] == "embed" and len(a["token"]["values"]) == len(a["parts"])
    assert a["token"]["id"] == steps[0]["chosen"]["id"]
    assert a["token"]["sum"] == pytest.approx(a["token"]["logit"], abs=1e-4)
    assert a["runner_up"]["id"] != a["token"]["id"] and not a["quantised"]
    assert f"why {a['token']['text']!r}: its logit part by part" in text
    for row in ("sum of parts", "logit (the model's)", "layers.1.mlp", "embed", "rms"):
        assert row in text
    assert f"and not {a['runner_up']['text']!r}: logit difference" in text
    page = out_html.read_text()
    assert page.count('<tr class="part"') == len(a["parts"]) and 'data-part="sum of parts"' in page
    assert 'class="bar pos"' in page and 'class="bar neg"' in page
    assert main(args + ["--steps", "all", "--json", PROMPT]) == 0
    assert all(s["attribution"] is not None for s in json.loads(capsys.readouterr().out)["steps"])


def test_a_long_list_of_parts_shows_the_extremes(gqa):
    """More parts than the table's rows: the ten most positive, the ten most negative, the rest
    counted; the HTML draws thirty bars and sums the rest in one row."""
    t = trace(gqa, PROMPT, max_new_tokens=1, attribution=True)
    a = t.steps[0].attribution
    many = 40
    a.parts = [f"part {k}" for k in range(many)]
    a.token.values = [float(k - 20) for k in range(many)]
    a.runner_up.values = [0.0] * many
    page = render_html(t)
    assert page.count('<tr class="part"') == 30 and 'data-part="10 other parts"' in page
    assert 'data-part="part 39"' in page and 'data-part="part 0"' in page and 'data-part="part 20"' not in page
