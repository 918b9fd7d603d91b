"""The fuzz targets (run them through fuzz/run.py): `python fuzz/targets.py TARGET CORPUS [libFuzzer flags]`,
or `python fuzz/targets.py TARGET CORPUS FILE` to replay one input.

Each target writes libFuzzer's bytes where llamascope reads a file it did not make and reads it
the way a user's command would. Reading it, or refusing it with a LlamascopeError, is right;
any other exception is a finding (atheris reports it with the input).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import atheris
import numpy as np

with atheris.instrument_imports(include=["llamascope"]):
    from llamascope.config import ModelConfig
    from llamascope.errors import LlamascopeError
    from llamascope.loading import expected_shapes, load_model, open_checkpoint
    from llamascope.loading.gguf import gguf_tensor_name
    from llamascope.tokenizer import Tokenizer

WORK = Path(os.environ.get("LLAMASCOPE_FUZZ_WORK") or "/tmp/llamascope-fuzz")
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, CONTEXT = 32, 64, 1, 4, 2, 64
PIECES = ["<unk>", "<s>", "</s>", "▁", "a", "b", "c", "d", "e", "h", "l", "o", "r", "w", "▁h", "▁w", "ll", "he"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, world"}]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# ---- small valid files to start from ---------------------------------------------------------


def _weights() -> dict[str, np.ndarray]:
    """Every tensor the config implies (the loader's own list), small random values."""
    rng = np.random.default_rng(0)
    shapes = expected_shapes(ModelConfig.from_dict(_config()))
    return {name: (rng.standard_normal(shape) * 0.1).astype(np.float32) for name, shape in shapes.items()}


def _config() -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": len(PIECES),
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": CONTEXT,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def seed_gguf(path: Path) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_block_count(LAYERS)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(PIECES)
    writer.add_token_scores([-float(i) for i in range(len(PIECES))])
    writer.add_token_types([2, 3, 3] + [1] * (len(PIECES) - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, array in _weights().items():  # (Q and K rows left unpermuted: a seed needs no meaning)
        gguf_name = gguf_tensor_name(name)
        if array.ndim == 2 and gguf_name.split(".")[-2].startswith("ffn"):
            quantised = gguf.quants.quantize(array, q8)
            writer.add_tensor(gguf_name, quantised, raw_shape=quantised.shape, raw_dtype=q8)
        else:
            writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def seed_safetensors(path: Path) -> None:
    from safetensors.numpy import save_file

    save_file(_weights(), str(path))


def seed_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    vocab = {piece: i for i, piece in enumerate(PIECES)}
    merges = [("▁", "h"), ("▁", "w"), ("l", "l"), ("h", "e")]
    backend = Backend(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    path.write_text(backend.to_str())


SEEDS = {
    "gguf": lambda p: seed_gguf(p),
    "safetensors": lambda p: seed_safetensors(p),
    "config": lambda p: p.write_text(json.dumps(_config(), indent=1)),
    "tokenizer": lambda p: seed_tokenizer(p),
    "template": lambda p: p.write_text(CHAT_TEMPLATE),
}


# ---- the targets -----------------------------------------------------------------------------


def _folder(name: str) -> Path:
    """A model folder in WORK: a valid config.json and model.safetensors, for one file to be replaced."""
    folder = WORK / name
    if not folder.is_dir():
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(_config()))
        seed_safetensors(folder / "model.safetensors")
    return folder


def _load_and_run(path: Path) -> None:
    """What `llamascope generate` does with a model, on the plain backend: load, one forward pass."""
    import torch

    loaded = load_model(path, backend="plain")
    with torch.inference_mode():
        loaded.model(torch.tensor([[1, 4, 5]]), torch.arange(3)[None])


def target_gguf(data: bytes) -> None:
    path = WORK / "model.gguf"
    path.write_bytes(data)
    open_checkpoint(path)
    tokenizer = Tokenizer.from_file(path)
    tokenizer.decode(tokenizer.encode("hello world"))
    if tokenizer.chat_template:
        tokenizer.apply_chat_template(MESSAGES)
    _load_and_run(path)


def target_safetensors(data: bytes) -> None:
    folder = _folder("safetensors")
    (folder / "model.safetensors").write_bytes(data)
    _load_and_run(folder)


def target_config(data: bytes) -> None:
    folder = _folder("config")
    (folder / "config.json").write_bytes(data)
    _load_and_run(folder)


def target_tokenizer(data: bytes) -> None:
    folder = WORK / "tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_bytes(data)
    tokenizer = Tokenizer.from_hf_folder(folder)
    tokenizer.decode(tokenizer.encode("hello world"))


def target_template(data: bytes) -> None:
    tokenizer = Tokenizer.from_hf_folder(WORK / "template-tokenizer")
    tokenizer.chat_template = data.decode("utf-8", "replace")
    tokenizer.apply_chat_template(MESSAGES)


TARGETS = {
    "gguf": target_gguf,
    "safetensors": target_safetensors,
    "config": target_config,
    "tokenizer": target_tokenizer,
    "template": target_template,
}


def held_to_the_rule(target):
    def one_input(data: bytes) -> None:
        try:
            target(data)
        except LlamascopeError:
            pass  # refused by name: right

    return one_input


def main() -> None:
    name, corpus, rest = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "template-tokenizer").mkdir(exist_ok=True)
    seed_tokenizer(WORK / "template-tokenizer" / "tokenizer.json")
    target = held_to_the_rule(TARGETS[name])
    if rest and not rest[0].startswith("-"):  # replay saved inputs
        for file in rest:
            try:
                target(Path(file).read_bytes())
                print(f"{file}: read or refused by name")
            except Exception:  # noqa: BLE001
                traceback.print_exc()
                sys.exit(1)
        return
    corpus.mkdir(parents=True, exist_ok=True)
    SEEDS[name](corpus / f"seed.{name}")
    atheris.Setup([sys.argv[0], str(corpus), *rest], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
