"""Interventions: ablated heads, patched activations and steering vectors change the forward pass
exactly as the same change made by hand (in transformers, or at another point of our own model),
and without any the engine generates the same tokens on its native decode step."""

from __future__ import annotations

import pytest
import torch

from llamascope.engine import Engine
from llamascope.errors import LlamascopeError
from llamascope.interventions import AblateHeads, Edit, Patch, Steer, mean_activation
from llamascope.trace import capture_activations

PROMPT_A = "My name is Mariama, my favorite color"
PROMPT_B = "Once upon a time there was a little"


@pytest.fixture(scope="module")
def folder(model_factory):
    return model_factory("gqa")  # float32, 2 layers, 4 query heads over 2 KV heads, no attention bias


@pytest.fixture(scope="module")
def engine(folder):
    return Engine.load(folder)


@pytest.fixture(scope="module")
def reference(folder):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder).eval()


def same_length(engine, a: str, b: str) -> tuple[list[int], list[int]]:
    ids_a, ids_b = engine.encode(a), engine.encode(b)
    n = min(len(ids_a), len(ids_b))
    return ids_a[:n], ids_b[:n]


def hf_logits(model, ids: list[int], module: torch.nn.Module, hook, pre: bool = False) -> torch.Tensor:
    """transformers' logits [T, V] with `hook` on `module` for the pass."""
    handle = module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0]
    finally:
        handle.remove()


def without_attention(engine, ids: list[int], layer: int) -> torch.Tensor:
    """Our logits [1, T, V] with block `layer`'s attention output left out of the residual stream
    by hand: its `mid` (input + attention output) replaced by its input."""
    block_input = engine.record(ids, [f"layers.{layer}.input"])[f"layers.{layer}.input"]  # [1, T, hidden]
    return engine.record(ids, ["logits"], interventions=[Edit(f"layers.{layer}.mid", lambda x: block_input)])["logits"]


# ---- the identities --------------------------------------------------------------------


@pytest.mark.parametrize("layer", [0, 1])
def test_ablating_every_head_equals_removing_the_attention_output(engine, reference, layer):
    ids = engine.encode(PROMPT_A)
    ablated = engine.record(ids, ["logits"], interventions=[AblateHeads(layer)])["logits"][0]  # [T, V]
    # by hand in our model: nothing added to the residual stream (`mid` = the block's input)
    assert torch.equal(ablated, without_attention(engine, ids, layer)[0])

    # by hand in transformers: layer `layer`'s self_attn returns zeros
    def zero_attention(module, args, output):
        return (torch.zeros_like(output[0]), *output[1:])

    expected = hf_logits(reference, ids, reference.model.layers[layer].self_attn, zero_attention)
    torch.testing.assert_close(ablated.cpu(), expected, atol=1e-4, rtol=1e-4)
    plain = engine.record(ids, ["logits"])["logits"][0]
    assert (plain - ablated).abs().max() > 0.1  # (the ablation changed something)


@pytest.mark.parametrize("layer", [0, 1])
def test_patching_a_layers_output_at_every_position_gives_the_source_prompts_logits(engine, layer):
    a, b = same_length(engine, PROMPT_A, PROMPT_B)
    name = f"layers.{layer}.output"
    clean = engine.record(a, [name, "logits"])
    patched = engine.record(b, ["logits"], interventions=[Patch(name, clean[name])])
    assert torch.equal(patched["logits"], clean["logits"])  # every position, the same operations: exactly
    assert not torch.equal(engine.record(b, ["logits"])["logits"], clean["logits"])
    # generating from B with the patch: the first token is A's
    result = engine.generate_ids(b, max_new_tokens=1, interventions=[Patch(name, clean[name])])
    assert result.output_ids[0] == [int(clean["logits"][0, -1].argmax())]


def test_no_intervention_keeps_the_tokens_and_the_native_decode_step(engine, monkeypatch):
    step = engine.model.decode_step
    assert step is not None, "the native decode step should be on for a float32 checkpoint"
    calls = []
    native_call = type(step).__call__

    def counting(self, *args, **kwargs):
        calls.append(1)
        return native_call(self, *args, **kwargs)

    monkeypatch.setattr(type(step), "__call__", counting)
    runs = {}
    for label, interventions in (("none", None), ("empty", []), ("steer 0", [Steer(0, torch.zeros(64))])):
        calls.clear()
        runs[label] = engine.generate(PROMPT_A, max_new_tokens=6, interventions=interventions).output_ids
        runs[label + " calls"] = len(calls)
    assert runs["none"] == runs["empty"] == runs["steer 0"] and len(runs["none"]) == 6
    assert runs["none calls"] == runs["empty calls"] == 5  # every decode step on the native step
    assert runs["steer 0 calls"] == 0  # with an intervention every pass runs the layers


# ---- each kind, against a hand computation -----------------------------------------------------


def test_mean_ablation_equals_transformers_with_those_heads_replaced_by_their_means(engine, reference):
    name = "layers.1.self_attn.heads"
    recordings = [engine.record(p, [name]) for p in (PROMPT_A, PROMPT_B)]
    mean = mean_activation(recordings, name)  # [H, D]
    stacked = torch.cat([r[name][0] for r in recordings])  # [T_A + T_B, H, D]
    torch.testing.assert_close(mean, stacked.mean(0))
    torch.testing.assert_close(recordings[0].mean(name), recordings[0][name][0].mean(0))
    heads, D = [1, 3], engine.config.head_dim
    ids = engine.encode(PROMPT_A)
    ablated = engine.record(ids, ["logits"], interventions=[AblateHeads(1, heads, how="mean", mean=mean)])

    def replace_heads(module, args):  # o_proj's input [1, T, H*D]: head h at columns h*D .. h*D + D
        x = args[0].clone()
        for h in heads:
            x[..., h * D : (h + 1) * D] = mean[h]
        return (x,)

    expected = hf_logits(reference, ids, reference.model.layers[1].self_attn.o_proj, replace_heads, pre=True)
    torch.testing.assert_close(ablated["logits"][0].cpu(), expected, atol=1e-4, rtol=1e-4)


def test_steering_towards_a_tokens_unembedding_makes_it_every_choice(engine, reference):
    unembed = reference.lm_head.weight.detach()  # [V, hidden]
    norm = reference.model.norm.weight.detach()  # [hidden]
    token = int(unembed.norm(dim=-1).argmax())  # the longest row: its own dot product is the largest
    steer = Steer(1, unembed[token] / norm, scale=1000.0)  # after the final norm: along that row
    logits = engine.record(PROMPT_A, ["logits"], interventions=[steer])["logits"][0]  # [T, V]
    assert logits.argmax(-1).tolist() == [token] * logits.shape[0]
    assert engine.generate(PROMPT_A, max_new_tokens=4, interventions=[steer]).output_ids == [token] * 4
    plain = engine.generate(PROMPT_A, max_new_tokens=4).output_ids
    assert plain != [token] * 4


def test_steering_at_each_point_adds_the_vector_to_the_residual_stream(engine):
    vector = torch.linspace(-1, 1, 64)
    names = ["layers.0.input", "layers.0.attn_out", "layers.0.mid", "layers.0.output"]
    plain = engine.record(PROMPT_B, names)
    for point in ("input", "attn_out", "mid", "mlp_out", "output"):
        steered = engine.record(PROMPT_B, names, interventions=[Steer(0, vector, scale=2.0, point=point)])
        if point == "output":
            torch.testing.assert_close(steered["layers.0.output"], plain["layers.0.output"] + 2 * vector)
        elif point == "input":
            torch.testing.assert_close(steered["layers.0.input"], plain["layers.0.input"] + 2 * vector)
        else:  # what comes after changes
            assert not torch.allclose(steered["layers.0.output"], plain["layers.0.output"])


def test_patching_some_positions_leaves_the_positions_before_them(engine):
    a, b = same_length(engine, PROMPT_A, PROMPT_B)
    name = "layers.0.output"
    clean, plain = engine.record(a, [name, "logits"]), engine.record(b, ["logits"])
    patched = engine.record(b, ["logits"], interventions=[Patch(name, clean[name], positions=[3])])
    assert torch.equal(patched["logits"][0, :3], plain["logits"][0, :3])  # causal: before 3 untouched
    assert not torch.allclose(patched["logits"][0, 3], plain["logits"][0, 3])


def test_patch_and_steer_give_the_same_tokens_with_and_without_the_kv_cache(engine):
    a, b = same_length(engine, PROMPT_A, PROMPT_B)
    clean = engine.record(a, ["layers.0.output"])
    interventions = [
        Patch("layers.0.output", clean["layers.0.output"], positions=[1, 2, 4]),
        Steer(1, torch.linspace(-3, 3, 64), point="mid"),
        AblateHeads(0, [2]),
    ]
    cached = engine.generate_ids(b, max_new_tokens=6, interventions=interventions).output_ids
    whole = engine.generate_ids(b, max_new_tokens=6, use_cache=False, interventions=interventions).output_ids
    assert cached == whole
    assert cached != engine.generate_ids(b, max_new_tokens=6).output_ids


def test_a_batch_gets_what_each_prompt_gets_alone(engine):
    clean = engine.record(PROMPT_A, ["layers.1.input"])
    interventions = [
        Patch("layers.1.input", clean["layers.1.input"], positions=[0, 1, 2]),
        Steer(0, torch.linspace(2, -2, 64)),
    ]
    prompts = [PROMPT_B, "Once upon"]  # of different lengths: the second is left-padded
    batch = engine.generate(prompts, max_new_tokens=5, interventions=interventions)
    alone = [engine.generate(p, max_new_tokens=5, interventions=interventions) for p in prompts]
    assert [c.output_ids for c in batch] == [c.output_ids for c in alone]


def test_stream_takes_interventions(engine):
    steer = [Steer(1, torch.linspace(-4, 4, 64))]
    streamed = "".join(engine.stream(PROMPT_A, max_new_tokens=5, interventions=steer))
    assert streamed == engine.generate(PROMPT_A, max_new_tokens=5, interventions=steer).text
    assert streamed != engine.generate(PROMPT_A, max_new_tokens=5).text


def test_record_returns_the_points_named_inside_and_outside_the_layers(engine):
    ids = engine.encode(PROMPT_A)
    T = len(ids)
    names = ["layers.1.self_attn.heads", "layers.0.attn_weights", "layers.*.output", "norm"]
    rec = engine.record(ids, names)
    assert set(rec) == {
        "layers.1.self_attn.heads",
        "layers.0.attn_weights",
        "layers.0.output",
        "layers.1.output",
        "norm",
    }
    assert rec["layers.1.self_attn.heads"].shape == (1, T, 4, 16)
    assert rec["layers.0.attn_weights"].shape == (1, 4, T, T) and rec.prompt_ids == ids
    torch.testing.assert_close(rec["layers.0.attn_weights"].sum(-1), torch.ones(1, 4, T))
    # the trace's capture_activations is the same recording
    acts = capture_activations(engine.model, ids, names)
    assert acts.keys() == rec.keys() and all(torch.equal(acts[n], rec[n]) for n in rec)


# ---- what cannot work is refused, by name ----------------------------------------------------------


def test_bad_interventions_are_refused_naming_what_is_wrong(engine):
    ids = engine.encode(PROMPT_A)
    hidden = torch.zeros(1, len(ids), 64)
    cases = [
        ([AblateHeads(2)], "layer 2 of 'layers.2.self_attn.heads' is not in 0..1"),
        ([AblateHeads(0, [1, 4])], "head 4 of layer 0 is not in 0..3"),
        ([AblateHeads(0, how="mean", mean=torch.zeros(4, 8))], r"mean has shape \[4, 8\]"),
        ([Steer(0, torch.zeros(32))], r"vector has shape \[32\], not \[hidden_size\] \[64\]"),
        ([Patch("layers.0.output", torch.zeros(1, len(ids), 32))], r"values of shape \[1, \d+, 32\] do not fit"),
        ([Patch("layers.0.output", torch.zeros(1, len(ids) + 2, 64))], f"position {len(ids) + 1} is past the end"),
        ([Patch("layers.0.sideways", hidden)], "no point named 'layers.0.sideways'"),
        ([Patch("layers.0.self_attn.q_norm", hidden)], "only in models with q_norm"),
        ([Edit("logits", torch.zeros_like)], "'logits' cannot be edited"),
        ([Edit("norm", lambda x: x[:, :1])], r"Edit at norm returned \[1, 1, 64\]"),
        (["layers.0.output"], r"interventions\[0\] is a str, not an Intervention"),
    ]
    for interventions, message in cases:
        with pytest.raises(LlamascopeError, match=message):
            engine.record(ids, ["logits"], interventions=interventions)
    with pytest.raises(LlamascopeError, match="how='half'"):
        AblateHeads(0, how="half")
    with pytest.raises(LlamascopeError, match="needs mean="):
        AblateHeads(0, how="mean")
    with pytest.raises(LlamascopeError, match="point='logits'"):
        Steer(0, torch.zeros(64), point="logits")
    with pytest.raises(LlamascopeError, match="position 9 is outside the values' positions 0..3"):
        Patch("layers.0.output", torch.zeros(1, 4, 64), positions=[9])
    steer = [Steer(0, torch.zeros(64))]
    with pytest.raises(LlamascopeError, match="not with beam search"):
        engine.generate(PROMPT_A, max_new_tokens=2, num_beams=2, interventions=steer)
    with pytest.raises(LlamascopeError, match="not with speculative decoding"):
        engine.generate(PROMPT_A, max_new_tokens=2, prompt_lookup_num_tokens=2, interventions=steer)
    with pytest.raises(LlamascopeError, match="past the end of prompt 0"):  # checked before any pass
        engine.generate("Once", max_new_tokens=2, interventions=[Patch("layers.0.output", hidden)])


# ---- the default model (SmolLM2-135M, Q4_1 GGUF) -----------------------------------------------


def test_default_model_ablation_and_patching_identities():
    engine = Engine.load()
    a, b = same_length(engine, "The capital of France is Paris", "The capital of Italy is Rome")
    name = "layers.20.output"
    clean = engine.record(a, [name, "logits"])
    patched = engine.record(b, ["logits"], interventions=[Patch(name, clean[name])])
    assert torch.equal(patched["logits"], clean["logits"])
    ablated = engine.record(a, ["logits"], interventions=[AblateHeads(5)])
    assert torch.equal(ablated["logits"], without_attention(engine, a, 5))
    assert not torch.equal(ablated["logits"], clean["logits"])


def test_one_intervention_and_one_name_need_no_list(engine):
    steer = Steer(1, torch.linspace(-4, 4, 64))
    one = engine.record(PROMPT_A, "logits", interventions=steer)
    assert set(one) == {"logits"}
    assert torch.equal(one["logits"], engine.record(PROMPT_A, ["logits"], interventions=[steer])["logits"])
