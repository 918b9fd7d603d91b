"""GGUF -> Hugging Face folder: transformers loads the folder as the same model and tokenizer.

The reference is transformers itself (LlamaForCausalLM and AutoTokenizer on the written folder),
compared with llamascope on the GGUF and with llamascope on the folder.
"""

from __future__ import annotations

import json

import pytest
import torch
from gguf_fixtures import (  # noqa: F401
    TinySpec,
    llama_cpp_cases,
    tiny_vocabulary,
    vocab_dir,
    write_tiny_llama,
    write_vocab_gguf,
)

from llamascope.convert import convert_gguf, convert_gguf_tokenizer
from llamascope.errors import LlamascopeError
from llamascope.loading import default_model_path, load_model
from llamascope.tokenizer import Tokenizer

PROMPT_IDS = [6403, 1980, 253, 655]  # "Once upon a time"
GOLDEN_NEW_TOKENS = [28, 260, 2240, 282, 23324, 27108, 436, 253, 15114, 39228, 28, 351, 25854, 41658, 284, 14055]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("convert") / "tiny.gguf", TinySpec(layers=2))


def _hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _logits(model, tokens):
    positions = torch.arange(tokens.shape[1])[None]
    with torch.inference_mode():
        if hasattr(model, "generation_config"):
            return model(input_ids=tokens, position_ids=positions).logits
        return model(tokens, positions)


@pytest.mark.slow
def test_converted_default_model_runs_the_same_in_transformers(tmp_path):
    from transformers import AutoTokenizer

    folder = convert_gguf(default_model_path(), tmp_path / "smollm2", dtype="float32")
    names = {p.name for p in folder.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    } <= names
    config = json.loads((folder / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["torch_dtype"] == "float32"

    hf_tokenizer = AutoTokenizer.from_pretrained(folder)
    assert hf_tokenizer.encode("Once upon a time") == PROMPT_IDS
    hf_model = _hf_model(folder)
    assert type(hf_model).__name__ == "LlamaForCausalLM"
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([PROMPT_IDS]), max_new_tokens=16, do_sample=False)
    assert out[0, len(PROMPT_IDS) :].tolist() == GOLDEN_NEW_TOKENS  # = llamascope on the GGUF (test_gguf)

    from llamascope.generation import generate

    ours = load_model(folder, dtype="float32")
    assert ours.tokenizer.encode("Once upon a time") == PROMPT_IDS
    assert generate(ours.model, PROMPT_IDS, max_new_tokens=16).output_ids[0] == GOLDEN_NEW_TOKENS
    assert ours.tokenizer.apply_chat_template(MESSAGES) == hf_tokenizer.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True
    )


def test_converted_tiny_model_matches(tiny, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    folder = convert_gguf(tiny.path, tmp_path / "tiny")
    tokens = torch.tensor([[1, 300, 301, 5, 310, 2, 7, 288]])  # [1, T]
    from_gguf = _logits(load_model(tiny.path, dtype="float32", quant="none").model, tokens)
    torch.testing.assert_close(_logits(_hf_model(folder), tokens), from_gguf, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        _logits(load_model(folder, dtype="float32").model, tokens), from_gguf, rtol=1e-4, atol=1e-4
    )

    ours = Tokenizer.from_file(tiny.path)
    theirs = AutoTokenizer.from_pretrained(folder)
    for text in ("the cat", " the  cat\n", "é", "</s>the<s>"):
        assert theirs.encode(text) == ours.encode(text)
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text, add_special_tokens=False)
    assert theirs.apply_chat_template(MESSAGES, tokenize=False) == ours.apply_chat_template(MESSAGES)
    generation = GenerationConfig.from_pretrained(folder)
    assert (generation.bos_token_id, generation.eos_token_id) == (1, 2)


def test_bfloat16_in_shards(tiny, tmp_path):
    folder = convert_gguf(tiny.path, tmp_path / "bf16", dtype="bfloat16", max_shard_bytes=400_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((folder / s).is_file() for s in shards)
    assert set(index["weight_map"]) == set(tiny.expected)
    model = _hf_model(folder)
    state = model.state_dict()
    for name, values in tiny.expected.items():
        assert torch.equal(state[name], torch.from_numpy(values).to(torch.bfloat16).float()), name
    assert load_model(folder).config.torch_dtype == "bfloat16"


def test_vocabulary_only_and_bad_arguments(tmp_path, tiny):
    tokens, scores, types = tiny_vocabulary()
    vocab = write_vocab_gguf(
        tmp_path / "vocab.gguf",
        {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types,
        },
    )
    with pytest.raises(LlamascopeError, match="no tensors"):
        convert_gguf(vocab, tmp_path / "v")
    folder = convert_gguf_tokenizer(vocab, tmp_path / "v")
    assert Tokenizer.from_file(folder).encode("the") == [1, 316]
    with pytest.raises(LlamascopeError, match="dtype 'int3'"):
        convert_gguf(tiny.path, tmp_path / "x", dtype="int3")
    (tmp_path / "file").write_text("")
    with pytest.raises(LlamascopeError, match="not a folder"):
        convert_gguf(tiny.path, tmp_path / "file")


def test_refuses_what_is_not_a_gguf_file_and_reports_progress(tiny, tmp_path):
    for source, message in (
        (tmp_path, "is a folder; convert takes a .gguf file"),
        (tmp_path / "model.safetensors", "no such file"),
        (tiny.path.with_suffix(".txt"), "no such file"),
    ):
        with pytest.raises(LlamascopeError, match=f"^{source}: {message}"):
            convert_gguf(source, tmp_path / "out")
    renamed = tmp_path / "tiny.bin"
    renamed.write_bytes(tiny.path.read_bytes())
    with pytest.raises(LlamascopeError, match=f"^{renamed}: not a .gguf file"):
        convert_gguf(renamed, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    calls = []
    convert_gguf(tiny.path, tmp_path / "out", progress=lambda done, total: calls.append((done, total)))
    total = len(tiny.expected)  # every tensor the folder holds
    assert calls == [(k, total) for k in range(1, total + 1)]


def test_converted_llama2_tokenizer_loads_in_transformers(vocab_dir, tmp_path):  # noqa: F811
    from transformers import AutoTokenizer

    folder = convert_gguf_tokenizer(vocab_dir / "ggml-vocab-llama-spm.gguf", tmp_path / "spm")
    theirs = AutoTokenizer.from_pretrained(folder)
    for text, expected in llama_cpp_cases(vocab_dir, "ggml-vocab-llama-spm.gguf"):
        assert theirs.encode(text, add_special_tokens=False) == expected, repr(text)
        assert theirs.encode(text) == [1] + expected
    assert Tokenizer.from_file(folder).encode("Hello</s>") == [1, 15043, 2]


@pytest.mark.slow
def test_converted_llama3_tokenizer_loads_in_transformers(vocab_dir, tmp_path):  # noqa: F811
    from transformers import AutoTokenizer

    gguf_path = vocab_dir / "ggml-vocab-llama-bpe.gguf"
    ours = Tokenizer.from_gguf(gguf_path)
    folder = tmp_path / "bpe"
    from llamascope.convert import write_tokenizer

    write_tokenizer(ours, folder)
    theirs = AutoTokenizer.from_pretrained(folder)
    for text, expected in llama_cpp_cases(vocab_dir, "ggml-vocab-llama-bpe.gguf"):
        assert theirs.encode(text, add_special_tokens=False) == expected, repr(text)
        assert theirs.encode(text) == [128000] + expected
