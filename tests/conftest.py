"""Shared fixtures: small random LLaMA checkpoints written by `transformers` itself, with a small
byte-level BPE tokenizer trained here, so every test compares llamascope with the reference
implementation on the same files."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from browser import find_chromium

CORPUS = [
    "My name is Mariama, my favorite color is blue and my friends call me Mari.",
    "Once upon a time there was a little robot who liked to count: 1, 2, 3, 42, 1000.",
    "The quick brown fox jumps over the lazy dog. Ça va? Größe, 東京, naïve café — ok!",
    "def forward(self, x):\n    return self.linear(x)  # tensors [batch, seq, hidden]\n",
] * 20

TOKENIZER_VOCAB = 320


def build_tokenizer(folder: Path) -> None:
    """Train a byte-level BPE tokenizer and save it the way transformers does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)


# transformers' classes for each model_type the tests write (config class, model class)
HF_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
}


# Phi-3 with LongRoPE trained on 16 positions (8 factors each: head_dim 16), the short factors
# within them and the long ones past them; runs of a few tokens cross it.
PHI3_LONGROPE = dict(
    architecture="phi3",
    pad_token_id=None,
    original_max_position_embeddings=16,
    rope_parameters={
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0 + 0.1 * i for i in range(8)],
        "long_factor": [1.5 + 0.5 * i for i in range(8)],
    },
)


def make_model(
    folder: Path,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    shard_size: str | None = None,
    safe: bool = True,
    architecture: str = "llama",
    **overrides,
) -> Path:
    """Write a random model of `architecture` (a model_type: LlamaForCausalLM, or a relative's
    class) and the test tokenizer to `folder`; returns the folder."""
    import transformers

    config_class, model_class = (getattr(transformers, name) for name in HF_CLASSES[architecture])

    settings = dict(
        vocab_size=TOKENIZER_VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    )
    settings.update(copy.deepcopy(overrides))  # (transformers' configs may fill in nested dicts)
    config = config_class(**settings)
    torch.manual_seed(seed)
    model = model_class(config)
    # Random init is small; widen it so logits are far from uniform and greedy paths are varied.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
            elif name.endswith(".bias"):
                p.normal_(0, 0.2)
            else:
                p.uniform_(0.5, 1.5)
    model = model.to(dtype)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(folder, **kwargs)
    if not safe:  # transformers 5 writes only safetensors: write the classic pytorch_model.bin by hand
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    build_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """make(name, **overrides) -> folder; each distinct name is written once per session."""
    made: dict[str, Path] = {}

    def make(name: str, **overrides) -> Path:
        if name not in made:
            made[name] = make_model(tmp_path_factory.mktemp(name), **overrides)
        return made[name]

    return make


@pytest.fixture(scope="session")
def tiny_model(model_factory) -> Path:
    return model_factory("gqa")


def rewrite_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data, indent=2))


@pytest.fixture(scope="session")
def chromium() -> str:
    """Headless Chromium for the HTML reports' tests (browser.py), or the test is skipped."""
    path = find_chromium()
    if path is None:
        pytest.skip(
            "headless Chromium is not installed (Debian package `chromium`; the tests install it with "
            "apt-get only when running as root)"
        )
    return path
