"""`llamascope info`: what a checkpoint holds, checked against transformers and the files themselves;
and the `llamascope` logger: one DEBUG record per stage per step, nothing per token at INFO."""

from __future__ import annotations

import io
import json
import logging
import shutil
import struct

import pytest
import torch
from conftest import rewrite_json
from rich.console import Console

from llamascope.cache import KVCache
from llamascope.cli import main
from llamascope.generation import generate
from llamascope.info import describe, render_info
from llamascope.loading import default_model_path, load_model

CASES = {
    "gqa": {},
    "tied": dict(tie_word_embeddings=True),
    "bias": dict(attention_bias=True, mlp_bias=True),
    "sharded": dict(shard_size="60KB"),
}


def _safetensors_data_bytes(path) -> int:
    """Bytes after a safetensors file's header: exactly the tensors' data."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
    return path.stat().st_size - 8 - header_len


@pytest.mark.parametrize("name", list(CASES))
def test_parameters_and_bytes_match_transformers_and_files(model_factory, name):
    from transformers import LlamaForCausalLM

    folder = model_factory(name, **CASES[name])
    info = describe(folder)
    hf = LlamaForCausalLM.from_pretrained(folder)
    assert info.total_parameters == sum(p.numel() for p in hf.parameters())
    files = sorted(folder.glob("*.safetensors"))
    assert [name for name, _ in info.files] == [str(f) for f in files]
    assert info.total_bytes == sum(_safetensors_data_bytes(f) for f in files)
    assert sum(e["bytes"] for e in info.tensor_types.values()) == info.total_bytes
    assert info.memory["float32"] == 4 * info.total_parameters
    assert info.memory["int4"] == 2 * info.total_parameters // 4


def test_bin_checkpoint_bytes_equal_its_tensors(model_factory):
    folder = model_factory("bin", safe=False)
    info = describe(folder)
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    assert info.total_bytes == sum(t.numel() * t.element_size() for t in state.values())


def test_layer_table_rows(tiny_model):
    info = describe(tiny_model)
    names = [r.name for r in info.layers]
    assert names[0] == "model.embed_tokens" and names[-2:] == ["model.norm", "lm_head"]
    q = next(r for r in info.layers if r.name == "model.layers.0-1.self_attn.q_proj")
    assert (q.kind, q.count, q.tensors) == ("Linear", 2, [("weight", (64, 64), "float32")])
    assert q.parameters == 2 * 64 * 64 and q.nbytes == 4 * q.parameters
    k = next(r for r in info.layers if r.name.endswith("k_proj"))
    assert k.tensors[0][1] == (32, 64)  # 2 kv heads x head_dim 16


def test_every_config_key_appears_and_defaults_are_marked(model_factory, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(model_factory("gqa"), folder)
    rewrite_json(folder / "config.json", head_dim=None, num_key_value_heads=None, rms_norm_eps=None)
    info = describe(folder)
    read = json.loads((folder / "config.json").read_text())
    rows = {key: (value, source) for key, value, source in info.config_rows}
    for key, value in read.items():
        assert rows[key] == (value, "config.json"), key
    assert rows["head_dim"] == (16, "default: hidden_size / num_attention_heads")
    assert rows["num_key_value_heads"] == (4, "default: num_attention_heads")
    assert rows["rms_norm_eps"][1] == "default"
    assert info.derived["gqa_group_size"] == 1 and info.derived["attention"] == "multi-head (MHA)"
    assert info.derived["context_length"] == 256 and info.derived["rope_type"] == "default"
    out = info.to_json()
    assert {k["key"] for k in out["config"]["keys"]} >= set(read)


def test_derived_facts_and_kv_cache(tiny_model):
    info = describe(tiny_model)
    d = info.derived
    assert (d["head_dim"], d["query_heads"], d["kv_heads"], d["gqa_group_size"]) == (16, 4, 2, 2)
    # keys and values, 2 layers, 2 kv heads, head_dim 16, 256 positions
    assert info.kv_cache["float32"] == 2 * 2 * 2 * 16 * 256 * 4
    assert info.kv_cache["bfloat16"] == info.kv_cache["float32"] // 2
    # the engine's own cache for the full context, batch 1
    assert KVCache.for_model(load_model(tiny_model).model, 1, 256).nbytes() == info.kv_cache["float32"]


def test_tokenizer_and_generation_settings(tiny_model):
    info = describe(tiny_model)
    t = info.tokenizer
    assert t["type"] == "BPE" and t["vocab_size"] == 320
    assert t["special_tokens"]["bos"] == {"token": "<s>", "id": 1}
    assert t["special_tokens"]["eos"] == {"token": "</s>", "id": 2}
    assert t["adds_bos"] is True and t["adds_eos"] is False and t["chat_template"] is False
    assert info.generation.sources["eos_token_id"] == "generation_config.json"
    assert info.generation.sources["do_sample"] == "default"
    assert info.contradictions == []


def test_contradictions_are_reported(model_factory, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(model_factory("gqa"), folder)
    rewrite_json(folder / "generation_config.json", bos_token_id=0, eos_token_id=1, pad_token_id=-1)
    info = describe(folder)
    kinds = [c.kind for c in info.contradictions]
    messages = "\n".join(c.message for c in info.contradictions)
    assert {"bos", "eos", "pad"} <= set(kinds), messages
    assert "generation_config.json says 0" in messages and "BOS '<s>' is 1" in messages
    assert "EOS '</s>' is 2" in messages
    assert "pad_token_id=-1" in messages
    console = Console(file=io.StringIO(), width=200)
    render_info(info, console)
    assert messages.splitlines()[0][:40] in console.file.getvalue()


def test_vocabulary_larger_than_embedding(model_factory, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(model_factory("gqa"), folder)
    rewrite_json(folder / "config.json", vocab_size=300)
    info = describe(folder)
    assert any(c.kind == "vocab" and "320 tokens" in c.message for c in info.contradictions)


def test_cli_info_json_and_text(tiny_model, capsys):
    assert main(["info", "--model", str(tiny_model), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["totals"]["parameters"] == describe(tiny_model).total_parameters
    assert out["source"]["format"] == "safetensors"
    assert main(["info", "--model", str(tiny_model)]) == 0
    text = capsys.readouterr().out
    for section in ("source", "model config", "generation", "tokenizer", "contradictions", "layers", "memory"):
        assert section in text


def test_default_gguf_model():
    path = default_model_path()
    from gguf import GGUFReader
    from transformers import LlamaConfig, LlamaForCausalLM

    info = describe(path)
    assert info.format == "gguf" and info.files == [(str(path), path.stat().st_size)]
    # The gguf package's own reading of the file: the same tensor bytes.
    assert info.total_bytes == sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors)
    assert {"Q4_1", "Q8_0", "F32"} <= set(info.tensor_types)
    # transformers' model for this architecture (built without weights) has the same parameters.
    rows = {key: value for key, value, _ in info.config_rows}
    keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "tie_word_embeddings",
    )
    with torch.device("meta"):
        reference = LlamaForCausalLM(LlamaConfig(**{k: rows[k] for k in keys}))
    assert info.total_parameters == sum(p.numel() for p in reference.parameters()) == 134_515_008
    assert info.tokenizer is not None and info.tokenizer["vocab_size"] == 49152
    assert info.config_source == "GGUF metadata"


# ---- logging ------------------------------------------------------------------------------------


def test_debug_log_has_one_record_per_stage_per_step(tiny_model, caplog):
    loaded = load_model(tiny_model)
    ids = loaded.tokenizer.encode("Once upon a time")
    with caplog.at_level(logging.DEBUG, logger="llamascope"):
        generate(loaded.model, ids, max_new_tokens=2, eos_token_id=[])
    staged = [(r.step, r.stage) for r in caplog.records if hasattr(r, "stage")]
    stages = ["inputs", "forward", "choice"]
    assert staged == [(step, stage) for step in (0, 1) for stage in stages]
    inputs = [r.getMessage() for r in caplog.records if getattr(r, "stage", None) == "inputs"]
    n = len(ids)
    assert f"input_ids [1, {n}]" in inputs[0] and "holding 0 positions" in inputs[0]
    assert "input_ids [1, 1]" in inputs[1] and f"holding {n} positions" in inputs[1]
    assert all(r.levelno == logging.DEBUG for r in caplog.records if hasattr(r, "stage"))


def test_info_log_has_nothing_per_token(tiny_model, caplog):
    counts = []
    for new_tokens in (2, 6):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="llamascope"):
            loaded = load_model(tiny_model)
            ids = loaded.tokenizer.encode("Once upon a time")
            generate(loaded.model, ids, max_new_tokens=new_tokens, eos_token_id=[])
        records = [r for r in caplog.records if r.name.startswith("llamascope")]
        assert not any(r.levelno < logging.INFO for r in records)
        counts.append(len(records))
    assert counts[0] == counts[1]
    messages = " | ".join(r.getMessage() for r in records)
    assert "model.safetensors" in messages and "float32" in messages  # files read, dtype
    assert "loaded in" in messages and "tokens/s" in messages  # load time, speed at the end
