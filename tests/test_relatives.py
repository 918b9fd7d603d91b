"""LLaMA's relatives (Mistral, Qwen2, Qwen3, Phi-3) against transformers' own classes on random
checkpoints that cover each variant: greedy tokens, logits, cache on and off, batches, each
backend."""

from __future__ import annotations

import pytest
import torch
from hf_reference import hf_generate
from transformers import AutoModelForCausalLM

from llamascope.config import ModelConfig
from llamascope.errors import LlamascopeError
from llamascope.generation import generate
from llamascope.loading import LoadOptions, load_model

PROMPTS = ["My name is Mariama, my favorite", "Once upon a time", "def forward(self, x): return 42"]

# Each case: the architecture and the settings it covers. Prompts are 7-13 tokens and runs add 24,
# so a window of 5 or 6 is shorter than prompt plus generation, and longrope's trained context of
# 16 is passed during generation (its long factors take over, as in transformers).
CASES = {
    "mistral_window_gqa": dict(architecture="mistral", sliding_window=5),
    "mistral_mha_tied": dict(
        architecture="mistral", num_key_value_heads=4, tie_word_embeddings=True, sliding_window=None
    ),
    "qwen2_bias_tied": dict(architecture="qwen2", tie_word_embeddings=True),
    "qwen2_window_layers": dict(architecture="qwen2", use_sliding_window=True, sliding_window=6, max_window_layers=1),
    "qwen3_head_dim": dict(architecture="qwen3", head_dim=24),
    "qwen3_mha_bias_tied": dict(
        architecture="qwen3", head_dim=16, num_key_value_heads=4, attention_bias=True, tie_word_embeddings=True
    ),
    "phi3_longrope": dict(
        architecture="phi3",
        pad_token_id=None,
        max_position_embeddings=64,
        original_max_position_embeddings=16,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0 + 0.1 * i for i in range(8)],
            "long_factor": [1.5 + 0.5 * i for i in range(8)],
        },
    ),
    "phi3_window_mha": dict(architecture="phi3", pad_token_id=None, num_key_value_heads=4, sliding_window=6),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, model_factory):
    return request.param, model_factory(request.param, **CASES[request.param])


def _hf(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("backend", ["native", "plain"])
def test_greedy_tokens_match_transformers_with_the_cache_on_and_off(case, backend):
    name, folder = case
    ours = load_model(folder, LoadOptions(backend=backend))
    hf = _hf(folder)
    for prompt in PROMPTS[:2]:
        ids = ours.tokenizer.encode(prompt)
        expected = hf_generate(hf, ids, max_new_tokens=24, do_sample=False, eos_token_id=None)[0, len(ids) :].tolist()
        for use_cache in (True, False):
            found = generate(ours.model, ids, max_new_tokens=24, eos_token_id=[], use_cache=use_cache)
            assert found.output_ids[0] == expected, f"{name}, {prompt!r}, use_cache={use_cache}"


def test_logits_of_every_position_match_transformers(case):
    name, folder = case
    ours = load_model(folder)
    ids = torch.tensor([ours.tokenizer.encode(PROMPTS[2] + " " + PROMPTS[0])])  # past every window
    with torch.no_grad():
        expected = _hf(folder)(ids).logits
        found = ours.model(ids, torch.arange(ids.shape[1])[None]).float()
    assert (found - expected).abs().max().item() <= 1e-4 * max(1.0, expected.abs().max().item())


def test_left_padded_batch_matches_transformers(case):
    """Padding counts in a sliding window as transformers counts it (cache columns, not positions)."""
    from transformers import AutoTokenizer

    name, folder = case
    if "longrope" in name:
        pytest.skip("longrope picks its factors by the batch's longest sequence: see the alone test")
    ours = load_model(folder)
    hf = _hf(folder)
    ref = AutoTokenizer.from_pretrained(folder)
    ref.pad_token, ref.padding_side = "</s>", "left"
    enc = ref(PROMPTS, return_tensors="pt", padding=True)
    prompts = [ours.tokenizer.encode(p) for p in PROMPTS]
    batch = generate(ours.model, prompts, max_new_tokens=16, eos_token_id=[], pad_token_id=2)
    if ours.config.model_type == "qwen2":
        # transformers 5.23's Qwen2 generate() gives the unpadded row of this batch other tokens than
        # the same prompt alone (its forward over the batch does not: same logits), so each row is
        # compared with transformers on its prompt alone.
        for row, ids in enumerate(prompts):
            alone = hf_generate(hf, ids, max_new_tokens=16, do_sample=False, eos_token_id=None)
            assert batch.output_ids[row] == alone[0, len(ids) :].tolist(), f"prompt {row}"
        return
    with torch.no_grad():
        expected = hf.generate(**enc, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=2)
    assert batch.output_ids == expected[:, enc.input_ids.shape[1] :].tolist()


def test_the_native_decode_step_runs_where_it_applies_and_equals_the_modules(case):
    """The one-call native step serves these models where every query sees its whole past (no
    window reached, no per-head norm), and gives the modules' tokens."""
    name, folder = case
    ours = load_model(folder)
    ids = ours.tokenizer.encode(PROMPTS[1])
    step = ours.model.decode_step
    if ours.config.qk_norm:
        assert step is None
    else:
        assert step is not None
        window = step.window
        assert window == min(
            (w for w in map(ours.config.layer_window, range(ours.config.num_hidden_layers)) if w is not None),
            default=None,
        )
    plain = load_model(folder, LoadOptions(backend="plain"))
    native_tokens = generate(ours.model, ids, max_new_tokens=24, eos_token_id=[]).output_ids
    plain_tokens = generate(plain.model, ids, max_new_tokens=24, eos_token_id=[]).output_ids
    assert native_tokens == plain_tokens


def test_phi3_fused_projections_are_read_as_the_separate_ones(model_factory):
    from safetensors.torch import load_file

    from llamascope.loading import open_checkpoint

    folder = model_factory("phi3_longrope", **CASES["phi3_longrope"])
    checkpoint = open_checkpoint(folder)
    stored = load_file(folder / "model.safetensors")
    qkv = stored["model.layers.1.self_attn.qkv_proj.weight"]  # [(H + 2 KVH) D, hidden]
    q, k, v = (checkpoint.tensors[f"model.layers.1.self_attn.{p}_proj.weight"].read() for p in "qkv")
    assert torch.equal(torch.cat([q, k, v]), qkv)
    assert torch.equal(checkpoint.tensors["model.layers.1.self_attn.k_proj.weight"].read_slice(0, 3, 9), k[3:9])
    assert torch.equal(checkpoint.tensors["model.layers.1.self_attn.v_proj.weight"].read_slice(1, 8, 24), v[:, 8:24])
    gate_up = stored["model.layers.0.mlp.gate_up_proj.weight"]
    gate, up = (checkpoint.tensors[f"model.layers.0.mlp.{p}_proj.weight"].read() for p in ("gate", "up"))
    assert torch.equal(torch.cat([gate, up]), gate_up)


BASE = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(model_type="gemma"), "unsupported architecture model_type='gemma'.*llama, mistral, qwen2, qwen3, phi3"),
        (dict(architectures=["GPT2LMHeadModel"]), "missing key 'model_type' \\(expected one of llama, mistral"),
        (dict(model_type="mistral", sliding_window=0), "'sliding_window' must be a positive integer or null"),
        (dict(model_type="qwen2", layer_types=["full_attention"]), "'layer_types' must list"),
        (dict(model_type="phi3", partial_rotary_factor=0.75), "partial_rotary_factor 0.75 is not supported"),
        (
            dict(model_type="phi3", rope_scaling={"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.0]}),
            "rope_scaling 'long_factor' must be a list of 4 positive numbers",
        ),
    ],
)
def test_bad_relative_configs_are_refused_by_key(settings, message):
    with pytest.raises(LlamascopeError, match=message):
        ModelConfig.from_dict({**BASE, **settings})


def test_each_architecture_reads_transformers_defaults_for_keys_left_out():
    mistral = ModelConfig.from_dict({**BASE, "model_type": "mistral"})
    assert [mistral.layer_window(i) for i in range(2)] == [4096, 4096]  # MistralConfig's default
    qwen2 = ModelConfig.from_dict({**BASE, "model_type": "qwen2", "attention_bias": True})
    assert qwen2.qkv_bias and not qwen2.attention_bias  # q, k, v always; o never (the key is not read)
    assert [qwen2.layer_window(i) for i in range(2)] == [None, None]  # use_sliding_window is false
    qwen3 = ModelConfig.from_dict({**BASE, "model_type": "qwen3"})
    assert qwen3.head_dim == 128 and qwen3.qk_norm
    phi3 = ModelConfig.from_dict({**BASE, "architectures": ["Phi3ForCausalLM"]})
    assert phi3.model_type == "phi3" and phi3.rms_norm_eps == 1e-5
    legacy = ModelConfig.from_dict(
        {
            **BASE,
            "model_type": "phi3",
            "rope_scaling": {"type": "su", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4},
            "original_max_position_embeddings": 512,
        }
    )
    assert legacy.rope_type == "longrope" and legacy.rope_scaling["original_max_position_embeddings"] == 512


def test_info_names_the_architecture_and_what_differs_from_llama(model_factory):
    from llamascope.info import describe

    folder = model_factory("qwen2_window_layers", **CASES["qwen2_window_layers"])
    derived = describe(folder).derived
    assert derived["architecture"] == "Qwen2ForCausalLM (model_type qwen2)"
    assert derived["differs_from_llama"] == "biases on q, k and v (not o)"
    assert derived["attention_biases"] == "q, k and v (not o)"
    assert derived["sliding_window"] == 6 and derived["sliding_layers"] == [1]
    folder = model_factory("qwen3_head_dim", **CASES["qwen3_head_dim"])
    derived = describe(folder).derived
    assert derived["head_dim"] == 24 and derived["head_dim_from"] == "config" and "qk_norm" in derived
