"""GGUF loading: metadata to config, tensor names, dequantisation, the Q/K un-permutation,
the default model's golden values, and clear errors for files that are not right.

References: the default model's golden tokens; ggml-quants.c's dequantisers transcribed in
gguf_fixtures.py; llama.cpp's own Q/K permutation (applied when the tiny files are written);
transformers' LlamaForCausalLM holding the expected weights.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gguf_fixtures import (
    BLOCK_TYPES,
    TinySpec,
    greedy_tokens,
    hf_llama,
    hf_logits,
    permute_rows,
    random_blocks,
    reference_dequantize,
    tiny_vocabulary,
    write_tiny_llama,
    write_vocab_gguf,
)

from llamascope.errors import LlamascopeError
from llamascope.loading import default_model_path, load_model, open_checkpoint
from llamascope.loading.gguf import llama3_rope_scaling, unpermute_rows
from llamascope.tokenizer import Tokenizer

PROMPT = "Once upon a time"
PROMPT_IDS = [6403, 1980, 253, 655]
GOLDEN_NEW_TOKENS = [28, 260, 2240, 282, 23324, 27108, 436, 253, 15114, 39228, 28, 351, 25854, 41658, 284, 14055]


@pytest.fixture(scope="module")
def smollm():
    """The default model (SmolLM2-135M-Instruct Q4_1 GGUF) with float32 dequantised weights."""
    return load_model(None, dtype="float32", quant="none")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


# ---- the default model -------------------------------------------------------------------------


def test_default_model_config_comes_from_metadata(smollm):
    config = smollm.config
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (49152, 576, 1536)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert (config.head_dim, config.max_position_embeddings, config.rope_theta) == (64, 8192, 100000.0)
    assert config.rms_norm_eps == 1e-5  # stored as float32 9.99999974e-06, read back as written
    assert config.tie_word_embeddings and config.rope_scaling is None
    assert smollm.generation_json == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    checkpoint = smollm.checkpoint
    assert checkpoint.format == "gguf"
    assert checkpoint.files == [(default_model_path(), default_model_path().stat().st_size)]
    assert "lm_head.weight" not in checkpoint.tensors
    assert checkpoint.tensors["model.embed_tokens.weight"].stored_type == "Q8_0"
    assert checkpoint.tensors["model.layers.0.self_attn.q_proj.weight"].stored_type == "Q4_1"
    assert checkpoint.tensors["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)


def test_default_model_golden_tokens(smollm):
    ids = smollm.tokenizer.encode(PROMPT)
    assert ids == PROMPT_IDS  # SmolLM2 adds no BOS
    logits_of = lambda tokens, positions: smollm.model(tokens, positions)  # noqa: E731
    try:
        from llamascope.generation import generate
    except ImportError:
        new = greedy_tokens(logits_of, ids, 16)
    else:
        new = generate(smollm.model, ids, max_new_tokens=16).output_ids[0]
    assert new == GOLDEN_NEW_TOKENS


# ---- weights: dequantisation and the Q/K permutation -------------------------------------------


def test_every_weight_matches_the_ggml_reference(tiny):
    """Each stored type (F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q4_K Q5_K Q6_K) dequantises exactly as
    ggml-quants.c does, and Q/K rows come back in Hugging Face order."""
    assert set(tiny.types.values()) >= {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"}
    checkpoint = open_checkpoint(tiny.path)
    assert set(checkpoint.tensors) == set(tiny.expected)
    stored_dtypes = {"F16": torch.float16, "BF16": torch.bfloat16}  # float tensors read as stored; others float32
    for name, expected in tiny.expected.items():
        source = checkpoint.tensors[name]
        got = source.read()
        assert got.dtype == stored_dtypes.get(source.stored_type, torch.float32), name
        assert tuple(got.shape) == expected.shape, name
        np.testing.assert_array_equal(got.float().numpy(), expected, err_msg=name)


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_block_dequantisation_against_ggml(type_name):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    raw = random_blocks(np.random.default_rng(1), 8, 512, type_name)  # [8 rows, bytes]
    ours = dequantize(raw, GGMLQuantizationType[type_name])
    np.testing.assert_array_equal(ours, reference_dequantize(raw, type_name))


def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(0)
    for heads, head_dim in ((4, 64), (3, 8), (1, 2)):
        weight = rng.normal(size=(heads * head_dim, 5)).astype(np.float32)
        np.testing.assert_array_equal(unpermute_rows(permute_rows(weight, heads), heads), weight)
        bias = weight[:, 0].copy()
        np.testing.assert_array_equal(unpermute_rows(permute_rows(bias, heads), heads), bias)
    # Within one head, llama.cpp interleaves the two rotary halves: rows (0, D/2, 1, D/2+1, ...).
    rows = np.arange(8, dtype=np.float32)
    assert permute_rows(rows, 1).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_slices_and_blocks_agree_with_full_reads(tiny):
    from llamascope import formats

    checkpoint = open_checkpoint(tiny.path)
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.embed_tokens.weight",
        "model.norm.weight",
    ):
        source = checkpoint.tensors[name]
        full = source.read()
        for dim in range(full.dim()):
            n = full.shape[dim]
            for start, stop in ((0, n // 2), (n // 2, n), (3, 7)):
                assert torch.equal(source.read_slice(dim, start, stop), full.narrow(dim, start, stop - start))
        if source.read_blocks is not None:
            blocks = source.read_blocks()
            assert torch.equal(formats.dequantize(blocks, source.stored_type, full.shape[1]), full)


@pytest.mark.parametrize("stored", ["F32", "F16", "BF16"])
def test_float_tensors_read_from_the_file_not_the_map(tmp_path, stored):
    """Float-typed matrices (Q/K rows included, so un-permuted) come back exactly, in their stored
    dtype (the model converts once, to its own), whole and in slices, through plain file reads
    rather than gguf's dequantiser over the memory-mapped file (whose touched pages would stay
    resident: test_loading's peak-RSS test measures that)."""
    from gguf_fixtures import GGUF_BLOCK

    spec = TinySpec(layers=1)
    types = {f"blk.0.{short}.weight": stored for short in GGUF_BLOCK.values()}
    tiny = write_tiny_llama(tmp_path / f"{stored}.gguf", spec, types=types)
    checkpoint = open_checkpoint(tiny.path)
    for name, expected in tiny.expected.items():
        source = checkpoint.tensors[name]
        if source.stored_type != stored:
            continue
        got = source.read()
        assert got.dtype == {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[stored]
        np.testing.assert_array_equal(got.float().numpy(), expected, err_msg=name)
        if expected.ndim == 1:
            continue
        heads = 4 if "q_proj" in name else 2 if "k_proj" in name else 1
        head_rows = expected.shape[0] // heads
        for dim, start, stop in ((0, head_rows, expected.shape[0]), (1, 5, 77), (1, 0, expected.shape[1])):
            np.testing.assert_array_equal(
                source.read_slice(dim, start, stop).float().numpy(),
                expected.take(range(start, stop), axis=dim),
                err_msg=f"{name} {dim}",
            )
    import gguf.quants

    def no_dequantising(*args):
        raise AssertionError("a float tensor went through gguf's dequantize (a read of the mapped file)")

    original = gguf.quants.dequantize
    gguf.quants.dequantize = no_dequantising
    try:
        for name in tiny.expected:
            source = checkpoint.tensors[name]
            if source.stored_type == stored:
                source.read()
                source.read_slice(0, 0, source.shape[0])
    finally:
        gguf.quants.dequantize = original


def test_auto_dtype_of_a_gguf_is_bfloat16_only_for_bfloat16_matrices(tmp_path):
    """`--dtype auto` keeps a BF16 GGUF in bfloat16 (norms stored F32 do not count); any other
    GGUF (block formats, F16, F32, or a mix with BF16) computes in float32."""
    from gguf_fixtures import GGUF_BLOCK

    from llamascope.loading import resolve_dtype

    spec = TinySpec(layers=1)
    every = {f"blk.0.{short}.weight": "BF16" for short in GGUF_BLOCK.values()}
    every.update({"token_embd.weight": "BF16", "output.weight": "BF16"})
    cases = [
        (every, torch.bfloat16),
        ({**every, "output.weight": "Q8_0"}, torch.float32),
        ({name: "F16" for name in every}, torch.float32),
        ({}, torch.float32),
    ]
    for n, (types, dtype) in enumerate(cases):
        checkpoint = open_checkpoint(write_tiny_llama(tmp_path / f"{n}.gguf", spec, types=types).path)
        assert resolve_dtype("auto", checkpoint.config, checkpoint) == dtype, types
    loaded = load_model(tmp_path / "0.gguf")
    assert loaded.model.lm_head.weight.dtype == torch.bfloat16
    assert loaded.model.model.norm.weight.dtype == torch.bfloat16


def test_tiny_model_matches_transformers(tiny):
    """Same logits and greedy tokens as transformers holding the expected (HF-order) weights."""
    loaded = load_model(tiny.path, dtype="float32", quant="none")
    reference = hf_llama(tiny.expected, loaded.checkpoint.config_dict)
    tokens = torch.tensor([[1, 300, 301, 5, 310, 2, 7, 288]])  # [1, T]
    positions = torch.arange(tokens.shape[1])[None]
    with torch.inference_mode():
        ours = loaded.model(tokens, positions)
        theirs = reference(input_ids=tokens, position_ids=positions).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert greedy_tokens(lambda t, p: loaded.model(t, p), [1, 300], 10) == greedy_tokens(
        hf_logits(reference), [1, 300], 10
    )


def test_tied_embeddings_without_output_tensor(tmp_path):
    tiny = write_tiny_llama(tmp_path / "tied.gguf", TinySpec(tied=True, layers=1))
    checkpoint = open_checkpoint(tiny.path)
    assert checkpoint.config.tie_word_embeddings
    assert "lm_head.weight" not in checkpoint.tensors
    loaded = load_model(tiny.path, dtype="float32", quant="none")
    assert loaded.model.lm_head.weight.data_ptr() == loaded.model.model.embed_tokens.weight.data_ptr()


def test_attention_biases_are_unpermuted_too(tmp_path):
    spec = TinySpec(layers=1)
    rng = np.random.default_rng(5)
    q, kv = spec.heads * 64, spec.kv_heads * 64
    biases = {
        "q_proj": rng.normal(size=q),
        "k_proj": rng.normal(size=kv),
        "v_proj": rng.normal(size=kv),
        "o_proj": rng.normal(size=spec.hidden),
    }
    biases = {k: v.astype(np.float32) for k, v in biases.items()}
    stored = {
        "blk.0.attn_q.bias": permute_rows(biases["q_proj"], spec.heads),
        "blk.0.attn_k.bias": permute_rows(biases["k_proj"], spec.kv_heads),
        "blk.0.attn_v.bias": biases["v_proj"],
        "blk.0.attn_output.bias": biases["o_proj"],
    }
    tiny = write_tiny_llama(tmp_path / "bias.gguf", spec, extra_tensors=stored)
    expected = dict(tiny.expected)
    expected.update({f"model.layers.0.self_attn.{k}.bias": v for k, v in biases.items()})
    loaded = load_model(tiny.path, dtype="float32", quant="none")
    assert loaded.config.attention_bias
    for name in expected:
        np.testing.assert_array_equal(
            loaded.checkpoint.tensors[name].read().float().numpy(), expected[name], err_msg=name
        )
    reference = hf_llama(expected, loaded.checkpoint.config_dict)
    tokens = torch.tensor([[1, 300, 5, 310, 2]])
    positions = torch.arange(5)[None]
    with torch.inference_mode():
        torch.testing.assert_close(
            loaded.model(tokens, positions),
            reference(input_ids=tokens, position_ids=positions).logits,
            rtol=1e-4,
            atol=1e-4,
        )


def test_end_of_generation_ids(tmp_path):
    tiny = write_tiny_llama(
        tmp_path / "eot.gguf",
        TinySpec(layers=1),
        reference=False,
        metadata={"tokenizer.ggml.eot_token_id": 5, "tokenizer.ggml.padding_token_id": 0xFFFFFFFF},
    )
    checkpoint = open_checkpoint(tiny.path)
    assert checkpoint.generation_json == {"bos_token_id": 1, "eos_token_id": [2, 5]}
    assert (checkpoint.config.eos_token_id, checkpoint.config.pad_token_id) == (2, None)


# ---- rope scaling ------------------------------------------------------------------------------


def llama_cpp_rope_factors(head_dim: int, theta: float, factor: float, low: float, high: float, old: int):
    """conversion/llama.py's generate_extra_tensors: the rope_freqs.weight llama.cpp writes."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("head_dim, factor", [(128, 8.0), (64, 32.0)])
def test_llama3_rope_scaling_recovered_from_rope_freqs(head_dim, factor):
    factors = llama_cpp_rope_factors(head_dim, 500000.0, factor, 1.0, 4.0, 8192)
    assert llama3_rope_scaling(factors, head_dim, 500000.0, "f.gguf") == {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert llama3_rope_scaling(np.ones(head_dim // 2), head_dim, 500000.0, "f.gguf") is None
    with pytest.raises(LlamascopeError, match="rope_freqs.weight"):
        llama3_rope_scaling(np.linspace(1, 3, head_dim // 2) ** 2, head_dim, 500000.0, "f.gguf")


def test_llama3_rope_freqs_tensor_matches_transformers(tmp_path):
    spec = TinySpec(layers=1, rope_theta=500000.0, context=256)
    factors = llama_cpp_rope_factors(64, 500000.0, 8.0, 1.0, 4.0, 64)  # short old context: scaling matters
    tiny = write_tiny_llama(tmp_path / "l3.gguf", spec, extra_tensors={"rope_freqs.weight": factors})
    loaded = load_model(tiny.path, dtype="float32", quant="none")
    assert loaded.config.rope_type == "llama3"
    assert loaded.config.rope_scaling["original_max_position_embeddings"] == 64
    reference = hf_llama(tiny.expected, loaded.checkpoint.config_dict)
    tokens = torch.arange(3, 203)[None] % 320  # [1, 200], past the old context
    positions = torch.arange(200)[None]
    with torch.inference_mode():
        torch.testing.assert_close(
            loaded.model(tokens, positions),
            reference(input_ids=tokens, position_ids=positions).logits,
            rtol=1e-4,
            atol=1e-4,
        )


def test_linear_rope_scaling_from_metadata(tmp_path):
    tiny = write_tiny_llama(
        tmp_path / "lin.gguf",
        TinySpec(layers=1),
        reference=False,
        metadata={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0},
    )
    assert open_checkpoint(tiny.path).config.rope_scaling == {"rope_type": "linear", "factor": 2.0}


# ---- the tokenizer in the metadata -------------------------------------------------------------


def test_tokenizer_from_tiny_gguf(tiny):
    tokenizer = open_checkpoint(tiny.path).tokenizer_factory()
    assert tokenizer.special_tokens()["bos"] == ("<s>", 1)
    ids = tokenizer.encode("the cat")
    assert ids[0] == 1 and tokenizer.tokens(ids[1:]) == ["\u2581the", "\u2581c", "at"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the cat"
    assert tokenizer.tokens(tokenizer.encode("é", add_special_tokens=False)) == ["\u2581", "<0xC3>", "<0xA9>"]
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>user: hi</s>"


def test_vocabulary_only_gguf_is_a_tokenizer_not_a_model(tmp_path):
    tokens, scores, types = tiny_vocabulary()
    path = write_vocab_gguf(
        tmp_path / "vocab.gguf",
        {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.add_bos_token": False,
        },
    )
    with pytest.raises(LlamascopeError, match="no tensors"):
        open_checkpoint(path)
    tokenizer = Tokenizer.from_file(path)
    assert tokenizer.encode("the") == [316] and tokenizer.bos_token == "<s>" and not tokenizer.adds_bos


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"tokenizer.ggml.model": "bert"}, "'tokenizer.ggml.model' = 'bert'"),
        (
            {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "mystery", "tokenizer.ggml.merges": ["a b"]},
            "'tokenizer.ggml.pre' = 'mystery'",
        ),
        ({"tokenizer.ggml.bos_token_id": 5000}, "'tokenizer.ggml.bos_token_id' = 5000"),
        (  # a merge whose result is not a token: the tokenizers library's error, named by entry
            {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default", "tokenizer.ggml.merges": ["t h", "x y"]},
            "'tokenizer.ggml.merges' entry 0 ('t' 'h') needs the token 'th'",
        ),
        ({"tokenizer.ggml.scores": [0.0]}, "'tokenizer.ggml.scores' has 1 entries"),
    ],
)
def test_bad_tokenizer_metadata(tmp_path, keys, message):
    tokens, scores, types = tiny_vocabulary()
    base = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
    }
    path = write_vocab_gguf(tmp_path / "bad.gguf", {**base, **keys})
    with pytest.raises(LlamascopeError) as error:
        Tokenizer.from_file(path)
    assert message in str(error.value) and str(path) in str(error.value)


# ---- files that are not right ------------------------------------------------------------------


def _error(path) -> str:
    with pytest.raises(LlamascopeError) as error:
        open_checkpoint(path)
    assert str(path) in str(error.value)
    return str(error.value)


def test_truncated_files(tiny, tmp_path):
    data = tiny.path.read_bytes()
    for cut in (100, 2000, len(data) // 2, len(data) - 10):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        assert "truncated" in _error(path)


def test_wrong_magic_and_empty_file(tiny, tmp_path):
    path = tmp_path / "magic.gguf"
    path.write_bytes(b"GGML" + tiny.path.read_bytes()[4:])
    assert "not a GGUF file" in _error(path)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert "not a GGUF file" in _error(empty)


def test_unsupported_tensor_type(tmp_path):
    tiny = write_tiny_llama(
        tmp_path / "iq4.gguf", TinySpec(layers=1), types={"blk.0.ffn_up.weight": "IQ4_NL"}, reference=False
    )
    message = _error(tiny.path)
    assert "'blk.0.ffn_up.weight'" in message and "IQ4_NL" in message


def test_unsupported_architecture(tmp_path):
    tiny = write_tiny_llama(tmp_path / "arch.gguf", TinySpec(layers=1), arch="gpt2", reference=False)
    assert "general.architecture = 'gpt2' (llamascope reads GGUF files of: llama, qwen2, qwen3, phi3)" in _error(
        tiny.path
    )


@pytest.mark.parametrize(
    "metadata, drop, expected",
    [
        ({"llama.attention.head_count_kv": 4}, (), "'blk.0.attn_k.weight' has shape [128, 256]"),
        ({"llama.feed_forward_length": 500}, (), "feed_forward_length"),
        ({"llama.embedding_length": None}, (), "missing metadata key 'llama.embedding_length'"),
        ({"llama.vocab_size": 321}, (), "'llama.vocab_size' says 321 tokens"),
        ({"llama.block_count": 2}, ("blk.1.ffn_up.weight",), "missing tensor 'blk.1.ffn_up.weight'"),
        ({"llama.block_count": 1}, (), "unexpected tensor 'blk.1."),
        ({"llama.rope.scaling.type": "yarn"}, (), "'llama.rope.scaling.type' = 'yarn'"),
        ({"llama.attention.head_count": 3}, (), "'llama.attention.head_count' = 3 is not a multiple"),
    ],
)
def test_metadata_contradicting_tensors(tmp_path, metadata, drop, expected):
    tiny = write_tiny_llama(tmp_path / "bad.gguf", TinySpec(), metadata=metadata, drop=drop, reference=False)
    assert expected in _error(tiny.path)


def test_unknown_tensor_is_named(tmp_path):
    tiny = write_tiny_llama(
        tmp_path / "moe.gguf",
        TinySpec(layers=1),
        extra_tensors={"blk.0.ffn_gate_exps.weight": np.zeros((4, 32), np.float32)},
        reference=False,
    )
    assert "unexpected tensor 'blk.0.ffn_gate_exps.weight'" in _error(tiny.path)


def test_block_types_table_matches_gguf():
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    for name, (per_block, size, *_rest) in BLOCK_TYPES.items():
        assert GGML_QUANT_SIZES[GGMLQuantizationType[name]] == (per_block, size)


def test_parsed_metadata_is_let_go_once_the_tokenizer_is_built(tiny):
    """The parsed metadata (a real vocabulary's strings) is not kept while the weights load or
    after: no GGUFFile stays alive, and asking for the tokenizer again parses
    the file anew and gives the same ids."""
    import gc

    from llamascope.loading.gguf_file import GGUFFile

    loaded = load_model(tiny.path)
    gc.collect()
    assert not [o for o in gc.get_objects() if issubclass(type(o), GGUFFile)]  # (type: no __class__ lookups)
    again = loaded.checkpoint.tokenizer_factory()
    assert again.encode("the rain in spain") == loaded.tokenizer.encode("the rain in spain")


def test_without_native_kernels_blocks_are_dequantised_once_at_load(tiny, monkeypatch, caplog):
    """Where no native kernel reads block formats (a CPU without AVX2, a GPU), a GGUF's blocks
    become float weights at load instead of being dequantised whole for every product; the
    logits are transformers' on the independently dequantised weights."""
    import logging

    from llamascope import kernels
    from llamascope.layers import QuantEmbedding, QuantLinear

    monkeypatch.setattr(kernels, "load", lambda: None)
    with caplog.at_level(logging.INFO, logger="llamascope"):
        loaded = load_model(tiny.path)
    assert "weights dequantised to float32 at load" in caplog.text
    assert not [m for m in loaded.model.modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
    reference = hf_llama(tiny.expected, loaded.checkpoint.config_dict)
    tokens, positions = torch.tensor([[1, 17, 42, 99, 7]]), torch.arange(5)[None]
    with torch.inference_mode():
        got, expected = loaded.model(tokens, positions), hf_logits(reference)(tokens, positions)
    assert (got - expected).abs().max() < 1e-4 * expected.abs().max()


def test_plain_layers_dequantise_gguf_blocks_at_load(tiny, caplog):
    """--backend plain means no native kernel in the model: GGUF blocks become float weights
    at load rather than QuantLinear layers running their kernels."""
    import logging

    from llamascope.layers import QuantEmbedding, QuantLinear
    from llamascope.native import native_modules

    with caplog.at_level(logging.INFO, logger="llamascope"):
        loaded = load_model(tiny.path, backend="plain")
    assert "with --backend plain: weights dequantised to float32 at load" in caplog.text
    assert not [m for m in loaded.model.modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
    assert list(native_modules(loaded.model)) == []


def test_q5_0_is_kept_as_q8_0_and_q5_1_is_dequantised(tmp_path):
    """llama.cpp's Q4_K_M / Q5_K_M files store rows that are not whole 256-weight super-blocks (all
    of SmolLM2's 576-wide ones) as Q5_0 / Q5_1. Q5_0 (d * (q - 16), q < 32) is kept as Q8_0 blocks of
    the same numbers for the Q8_0 kernels, whole and in tensor-parallel slices; Q5_1 (with a
    minimum) becomes float at load. Every weight equals ggml's dequantisation (transcribed)."""
    from gguf_fixtures import GGUF_BLOCK

    from llamascope.layers import QuantLinear

    types = {f"blk.0.{block}.weight": "Q5_0" for block in GGUF_BLOCK.values()}
    types.update({f"blk.1.{block}.weight": "Q5_1" for block in GGUF_BLOCK.values()})
    tiny = write_tiny_llama(tmp_path / "q5.gguf", TinySpec(), types={**types, "output.weight": "Q5_0"})
    checkpoint = open_checkpoint(tiny.path)
    model = load_model(tiny.path).model
    kept = 0
    for name, expected in tiny.expected.items():
        source = checkpoint.tensors[name]
        np.testing.assert_array_equal(source.read().numpy(), expected, err_msg=name)
        if source.stored_type != "Q5_0":
            continue
        blocks = source.read_blocks()  # Q8_0: 34 bytes a block
        assert source.blocks_type == "Q8_0" and blocks.shape == (expected.shape[0], expected.shape[1] // 32 * 34)
        heads_rows = 64  # the tiny model's head_dim: Q/K row slices are whole heads
        assert torch.equal(source.read_blocks_slice(0, heads_rows, 2 * heads_rows), blocks[heads_rows : 2 * heads_rows])
        assert torch.equal(source.read_blocks_slice(1, 64, 192), blocks[:, 2 * 34 : 6 * 34])
        if any(part in name for part in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            continue  # fused: checked through the fused layer below
        module = model.get_submodule(name.removesuffix(".weight"))
        assert isinstance(module, QuantLinear) and module.qtype == "Q8_0", name
        np.testing.assert_array_equal(module.dequantized().numpy(), expected, err_msg=name)
        kept += 1
    assert kept >= 3  # o_proj, down_proj, the LM head
    attn = model.model.layers[0].self_attn
    fused = attn.qkv_proj.dequantized().numpy()
    q, k, v = (tiny.expected[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    np.testing.assert_array_equal(fused, np.concatenate([q, k, v]))
    assert not isinstance(model.model.layers[1].mlp.down_proj, QuantLinear)  # Q5_1: float
    reference = hf_llama(tiny.expected, checkpoint.config_dict)
    tokens = torch.tensor([[1, 300, 301, 5, 310, 2, 7, 288]])
    with torch.inference_mode():
        ours, theirs = model(tokens, torch.arange(8)[None]), reference(input_ids=tokens).logits
    assert (ours - theirs).abs().max() < 0.03 * theirs.abs().max()  # 8-bit activations on the Q8_0 layers
