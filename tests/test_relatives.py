"""LLaMA's relatives (Mistral, Qwen2, Qwen3, Phi-3) against transformers' own classes on random
checkpoints that cover each variant: greedy tokens, logits, cache on and off, batches, each
backend."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PHI3_LONGROPE
from gguf_fixtures import llama_cpp_cases, llama_cpp_converter, vocab_dir  # noqa: F401 (fixtures)
from hf_reference import hf_generate
from transformers import AutoModelForCausalLM

from llamascope.cache import KVCache
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
    "phi3_longrope": dict(PHI3_LONGROPE, max_position_embeddings=64),
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_native_decode_step_runs_the_relatives_and_gives_the_modules_tokens(case, dtype):
    """The one-call native step runs biases, per-head norms and sliding windows (past the window
    too: the runs are longer than every window here) and gives the modules' tokens; in bfloat16
    it rounds where PyTorch does, so the tokens agree until a near tie."""
    from test_parity import assert_equal_until_near_tie

    name, folder = case
    ours = load_model(folder, LoadOptions(dtype=dtype))
    assert ours.model.decode_step is not None
    plain = load_model(folder, LoadOptions(backend="plain", dtype=dtype))
    for prompt in PROMPTS:
        ids = ours.tokenizer.encode(prompt)
        native = generate(ours.model, ids, max_new_tokens=24, eos_token_id=[]).output_ids[0]
        logits = []
        reference = generate(
            plain.model,
            ids,
            max_new_tokens=24,
            eos_token_id=[],
            on_step=lambda step, logits=logits: logits.append(step.logits[0]),
        ).output_ids[0]
        if dtype == torch.float32:
            assert native == reference, f"{name}: {prompt!r}"
        else:
            assert_equal_until_near_tie(reference, native, logits)


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


# ---- GGUF files written by llama.cpp's own converter ---------------------------------------------

CONVERTER = Path(__file__).with_name("llama_cpp_convert.py")
# Folders whose every setting a GGUF keeps (llama.cpp stores no window for Qwen2 or Mistral layers).
GGUF_CASES = ["qwen2_bias_tied", "qwen3_head_dim", "qwen3_mha_bias_tied", "phi3_longrope", "phi3_window_mha"]
IDS = [1, 298, 307, 223, 87, 82, 81, 80, 269, 259, 75]


@pytest.fixture(scope="module")
def converted(model_factory, llama_cpp_converter, tmp_path_factory):  # noqa: F811
    """convert(case, outtype) -> the folder of `case` and llama.cpp's GGUF of it (made once each)."""
    made: dict[tuple[str, str], Path] = {}

    def convert(name: str, outtype: str) -> tuple[Path, Path]:
        folder = model_factory(name, **CASES[name])
        if (name, outtype) not in made:
            out = tmp_path_factory.mktemp("gguf") / f"{name}-{outtype}.gguf"
            command = [sys.executable, str(CONVERTER), str(llama_cpp_converter), str(folder)]
            proc = subprocess.run(
                command + ["--outfile", str(out), "--outtype", outtype], capture_output=True, text=True, timeout=600
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
            made[name, outtype] = out
        return folder, made[name, outtype]

    return convert


@pytest.mark.parametrize("name", GGUF_CASES)
def test_a_float32_gguf_from_llama_cpp_gives_the_folders_tokens(name, converted):
    folder, gguf = converted(name, "f32")
    reference = load_model(folder)
    expected = generate(reference.model, IDS, max_new_tokens=24, eos_token_id=[]).output_ids
    for backend in ("native", "plain"):
        ours = load_model(gguf, LoadOptions(backend=backend))
        assert ours.config.model_type == reference.config.model_type
        assert ours.config.layer_window(0) == reference.config.layer_window(0)
        assert _float32_values(ours.config.rope_scaling) == _float32_values(reference.config.rope_scaling)
        assert generate(ours.model, IDS, max_new_tokens=24, eos_token_id=[]).output_ids == expected, backend


def _float32_values(scaling: dict | None) -> dict | None:
    """rope_scaling with its factor lists as the float32 numbers RoPE computes with (GGUF stores them so)."""
    if scaling is None:
        return None
    return {k: torch.tensor(v, dtype=torch.float32).tolist() if isinstance(v, list) else v for k, v in scaling.items()}


@pytest.mark.parametrize("outtype", ["q8_0", "bf16"])
@pytest.mark.parametrize("name", ["qwen2_bias_tied", "qwen3_head_dim", "phi3_longrope"])
def test_quantised_and_bfloat16_ggufs_give_the_folders_logits_within_their_rounding(name, outtype, converted):
    """Q8_0 blocks stay kept (Phi-3's fused ones split by rows), BF16 computes in bfloat16: the
    logits differ from the float32 folder's by the format's rounding, which random tiny models
    amplify to a few percent of the largest logit (the LLaMA GGUF tests see the same)."""
    folder, gguf = converted(name, outtype)
    ours, reference = load_model(gguf), load_model(folder)
    ids = torch.tensor([IDS])
    with torch.no_grad():
        expected = reference.model(ids, torch.arange(len(IDS))[None]).float()
        found = ours.model(ids, torch.arange(len(IDS))[None]).float()
    assert (found - expected).abs().max().item() <= 0.06 * expected.abs().max().item()


@pytest.mark.parametrize("name", ["ggml-vocab-qwen2.gguf", "ggml-vocab-phi-3.gguf"])
def test_qwen2_and_phi3_tokenizers_from_gguf_metadata_match_llama_cpps_cases(name, vocab_dir):  # noqa: F811
    """llama.cpp's reference cases (made with the models' own Hugging Face tokenizers): the qwen2
    pre-tokenizer (digits one by one, NFC) and Phi-3's SentencePiece vocabulary."""
    from llamascope.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(vocab_dir / name)
    for text, expected in llama_cpp_cases(vocab_dir, name):
        assert tokenizer.encode(text, add_special_tokens=False) == expected, repr(text)


@pytest.mark.parametrize("name", ["qwen2_bias_tied", "qwen3_head_dim", "phi3_longrope"])
def test_convert_writes_a_relatives_gguf_as_a_folder_transformers_loads(name, converted, tmp_path):
    """`llamascope convert`: the folder holds the architecture's own layout (Phi-3's fused
    projections fused again) and config, and transformers computes the original folder's logits."""
    from llamascope.convert import convert_gguf

    folder, gguf = converted(name, "f32")
    out = convert_gguf(gguf, tmp_path / "out")
    ids = torch.tensor([IDS * 2])  # 22 positions: past Phi-3's trained context of 16
    with torch.no_grad():
        expected = _hf(folder)(ids).logits
        found = _hf(out)(ids).logits
    assert type(_hf(out)).__name__ == CONVERT_CLASSES[name]
    assert (found - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


CONVERT_CLASSES = {
    "qwen2_bias_tied": "Qwen2ForCausalLM",
    "qwen3_head_dim": "Qwen3ForCausalLM",
    "phi3_longrope": "Phi3ForCausalLM",
}


@pytest.mark.parametrize("name", ["ggml-vocab-qwen2.gguf", "ggml-vocab-phi-3.gguf"])
def test_qwen2_and_phi3_chat_templates_render_and_tokenize_as_transformers_does(name, vocab_dir, tmp_path):  # noqa: F811
    """The chat templates these GGUF files carry (Qwen2's ChatML with its default system message,
    Phi-3's <|user|> / <|end|> turns with a leading BOS): llamascope's prompt text and ids against
    transformers' apply_chat_template over the same tokenizer, written as a folder."""
    from transformers import AutoTokenizer

    from llamascope.convert import convert_gguf_tokenizer
    from llamascope.tokenizer import Tokenizer

    ours = Tokenizer.from_gguf(vocab_dir / name)
    reference = AutoTokenizer.from_pretrained(convert_gguf_tokenizer(vocab_dir / name, tmp_path / "tokenizer"))
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Capital of Japan? 東京 or 京都"},
            {"role": "assistant", "content": "Tokyo"},
            {"role": "user", "content": "And 12345 + 678?"},
        ],
    ]
    for messages in conversations:
        text = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(messages) == text
        expected = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected
        assert ours.encode_chat(messages) == list(expected)


def test_a_prompt_past_a_sliding_window_runs_its_attention_natively(model_factory):
    """The native prompt attention starts each query's columns `window - 1` back (here 5), in one
    call and over cached columns, and gives the plain model's logits to float32 rounding."""
    from test_decode_step import assert_prompt_attention_runs_natively

    folder = model_factory("mistral_window_gqa", **CASES["mistral_window_gqa"])
    fast, plain = load_model(folder).model, load_model(folder, LoadOptions(backend="plain")).model
    assert fast.model.layers[1].self_attn.window == 5
    assert_prompt_attention_runs_natively(fast, plain, 1)


def test_beam_search_past_longropes_trained_context_matches_transformers(model_factory):
    """Beam search recomputes the sequence at the first step past the trained context, as
    transformers' Phi-3 does for every decoding strategy."""
    folder = model_factory("phi3_longrope", **CASES["phi3_longrope"])
    ours, hf = load_model(folder), _hf(folder)
    ids = IDS[:9]  # 9 + 16 new tokens: past 16
    with torch.no_grad():
        expected = hf.generate(
            torch.tensor([ids]), max_new_tokens=16, num_beams=3, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    found = generate(ours.model, ids, max_new_tokens=16, num_beams=3, eos_token_id=[])
    assert found.output_ids[0] == expected[0, len(ids) :].tolist()


def test_the_server_recomputes_a_sequence_that_passes_longropes_trained_context(model_factory):
    """Sequences that cross the trained context (16) while they decode beside others are recomputed
    at that step, as generate() does, and get their tokens and log-probabilities alone."""
    import asyncio

    from test_batch_invariance import _alone, _config, _serve

    from llamascope import Engine
    from llamascope.server.scheduler import ModelRunner, Scheduler, SequenceSpec

    engine = Engine.load(model_factory("invariance-phi3", max_position_embeddings=1024, **PHI3_LONGROPE))
    restarts = []

    class Runner(ModelRunner):
        def restart(self, slot, tokens):
            restarts.append(len(tokens))
            return super().restart(slot, tokens)

    scheduler = Scheduler(engine.model, engine.tokenizer, max_batch=4, slot_capacity=1024, runner=Runner)
    scheduler.start()
    try:
        prompts = [[5 + i for i in range(n)] for n in (3, 10, 15, 16, 30)]
        specs = [[SequenceSpec(p, _config(engine, 12, seed), logprobs=1)] for p, seed in zip(prompts, [None, 7] * 3)]
        got = asyncio.run(_serve(scheduler, specs, staggered=False))
    finally:
        assert scheduler.stop()
    for prompt, spec, choices in zip(prompts, specs, got):
        seed = spec[0].config.seed if spec[0].config.do_sample else None
        assert choices == [_alone(engine, prompt, 12, seed)], len(prompt)
    assert sorted(restarts) == [17, 17, 17]  # the prompts of 10, 15 and 16 cross it; 3 + 12 and 30 do not


@pytest.mark.parametrize("name", ["phi3_long_prompt", "llama_dynamic"])
def test_a_prompt_longer_than_a_piece_takes_length_dependent_rope_from_its_whole_length(name, model_factory):
    """A 300-token prompt goes through the model in pieces of 256; RoPE whose frequencies depend on
    the call's length (longrope, dynamic) must take them from all 300 positions, as transformers'
    one call does, not from each piece's."""
    settings = {
        # trained context 280: the first piece (256) is within it, the whole prompt (300) past it
        "phi3_long_prompt": dict(
            CASES["phi3_longrope"], max_position_embeddings=512, original_max_position_embeddings=280
        ),
        "llama_dynamic": dict(
            max_position_embeddings=24, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
        ),
    }[name]
    folder = model_factory(name, **settings)
    ours = load_model(folder)
    ids = torch.tensor([[3 + (7 * i) % 300 for i in range(300)]])
    with torch.no_grad():
        expected = _hf(folder)(ids).logits[:, -1]
        found = ours.model(ids, torch.arange(300)[None], KVCache.for_model(ours.model, 1, 300), last_only=True)[:, -1]
    assert (found.float() - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()


# ---- a cache bounded by the window -----------------------------------------------------------


def _run(model, prompts):
    """Tokens and each step's logits of a greedy run of 30 new tokens."""
    logits = []
    found = generate(model, prompts, max_new_tokens=30, eos_token_id=[], pad_token_id=2, on_step=logits.append)
    return found.output_ids, torch.stack([step.logits for step in logits])


@pytest.mark.parametrize("backend", ["native", "plain"])
@pytest.mark.parametrize("slack", [1, 3])
def test_a_windowed_cache_holds_the_window_and_gives_transformers_tokens(model_factory, monkeypatch, backend, slack):
    """Mistral (one window of 5 in every layer): generate's cache holds the prompt or the last 4
    positions plus `slack` columns, moves them to the front when full (many times over 30 new
    tokens), and gives transformers' tokens and the full cache's; alone, and in a left-padded
    batch, where the padding mask is cut with the dropped columns."""
    import llamascope.cache as cache_module

    folder = model_factory("mistral_window_gqa", **CASES["mistral_window_gqa"])
    ours, hf = load_model(folder, LoadOptions(backend=backend)), _hf(folder)
    prompts = [ours.tokenizer.encode(p) for p in PROMPTS]
    runs = [prompts[:1], prompts[1:2], prompts[2:], prompts]  # each alone, then the padded batch
    full = [_run(ours.model, run) for run in runs]  # (WINDOW_SLACK columns outlast 30 tokens: no drop)
    monkeypatch.setattr(cache_module, "WINDOW_SLACK", slack)
    dropped = []
    make_room = KVCache.make_room
    monkeypatch.setattr(KVCache, "make_room", lambda c, T: (make_room(c, T), dropped.append(c.dropped))[0])
    for run, (ids, logits) in zip(runs, full):
        first = max(map(len, run))
        cache = KVCache.for_model(ours.model, len(run), first + 30, first_pass=first)
        assert cache.window == 5 and cache.capacity == max(first, 4) + slack < first + 30
        found, found_logits = _run(ours.model, run)
        assert found == ids
        assert torch.allclose(found_logits, logits, atol=1e-5, rtol=0)
    assert sum(b > a for a, b in zip(dropped, dropped[1:])) >= 2 * len(runs)  # dropped again and again
    for ids, (found, _) in zip(prompts, full):
        expected = hf_generate(hf, ids, max_new_tokens=30, do_sample=False, eos_token_id=None)
        assert found[0] == expected[0, len(ids) :].tolist()


def test_no_window_or_mixed_windows_or_longrope_keep_every_position(model_factory):
    """A cache drops columns only where every layer shares one window and RoPE does not restart."""
    for name in ("qwen2_window_layers", "phi3_longrope"):
        model = load_model(model_factory(name, **CASES[name])).model
        cache = KVCache.for_model(model, 1, 40, first_pass=10)
        assert cache.window is None and cache.capacity == 40, name


def test_the_compiled_step_reads_a_windowed_cache_that_moved(model_factory, monkeypatch):
    """The compiled decode step (its capacity rounded up to 256 columns) over a windowed cache
    that moves its columns: 300 new tokens give the plain modules' tokens."""
    import llamascope.cache as cache_module

    folder = model_factory("mistral_window_gqa", **CASES["mistral_window_gqa"])
    plain = load_model(folder, LoadOptions(backend="plain"))
    compiled = load_model(folder, LoadOptions(backend="compiled"))
    if compiled.model.decode_step is None:
        pytest.skip("no compiled decode step here (torch.compile needs a C++ compiler)")
    monkeypatch.setattr(cache_module, "WINDOW_SLACK", 1)
    ids = plain.tokenizer.encode(PROMPTS[0])
    moves = []
    make_room = KVCache.make_room
    monkeypatch.setattr(KVCache, "make_room", lambda c, T: (make_room(c, T), moves.append(c.dropped))[0])
    expected = generate(plain.model, ids, max_new_tokens=300, eos_token_id=[]).output_ids
    moves.clear()
    assert generate(compiled.model, ids, max_new_tokens=300, eos_token_id=[]).output_ids == expected
    assert max(moves) > 0  # the compiled run's cache moved its columns too
