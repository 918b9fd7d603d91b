"""Tensor parallelism (parallel.py): N processes on localhost over gloo, started by torchrun (or
as torchrun would start them), against the single-process model.

The ranks run tests/parallel_worker.py or `python -m llamascope`; with 2 cores and 4 processes
each rank uses one thread.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from gguf_fixtures import TinySpec, write_tiny_llama
from parallel_worker import run_model

from llamascope import cli
from llamascope.errors import LlamascopeError
from llamascope.loading import load_model, open_checkpoint
from llamascope.loading.tensorfiles import SafetensorsFile
from llamascope.parallel import ParallelGroup, init_from_env, shard_plan, split

WORKER = Path(__file__).with_name("parallel_worker.py")
TOLERANCE = 1e-4  # float32 logits: max abs difference from the single-process model
# GGUF with kept blocks: max abs logit difference as a share of the largest logit. Two roundings in
# the quantised layers are not continuous in their inputs, so the split's float32 reordering (1e-7)
# can move a value by a whole step: decode quantises the activations to 8 bits per block, and a
# value on a rounding boundary moves by 1/127 of its block's peak. That is the format's own
# precision (the single-process model's own distance from float32 arithmetic, quant="none", is 1-9%
# on these fixtures). Prefill runs in float32 here (parallel_worker.run_model): its bfloat16 product
# rounds each rank's partial sum of a row-parallel layer, one bf16 step (2^-8) that random tiny
# models amplify; test_gguf_split_layers_compute_the_whole_layers checks it layer by layer.
GGUF_TOLERANCE = 0.03

MODELS = {
    "tp_mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "tp_gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "tp_gqa8": dict(num_attention_heads=8, num_key_value_heads=4),
    # Tied head, biases, and vocabulary / MLP sizes that do not divide evenly by 2 or 4.
    "tp_tied_bias": dict(
        num_attention_heads=8,
        num_key_value_heads=4,
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
        intermediate_size=150,
        vocab_size=321,
    ),
    # LLaMA's relatives: per-head q/k norms (replicated), Qwen2's q/k/v biases with a sliding layer,
    # Phi-3's fused projections (split at loading) under a window shorter than the run.
    "tp_qwen3": dict(architecture="qwen3", num_attention_heads=4, num_key_value_heads=2, head_dim=24),
    "tp_qwen2_window": dict(
        architecture="qwen2", num_key_value_heads=2, use_sliding_window=True, sliding_window=6, max_window_layers=1
    ),
    "tp_phi3_window": dict(architecture="phi3", pad_token_id=None, num_key_value_heads=2, sliding_window=6),
}
RELATIVES = ["tp_qwen3", "tp_qwen2_window", "tp_phi3_window"]
# GGUF files (gguf_fixtures.write_tiny_llama), Q/K rows permuted as llama.cpp does: every stored
# type (the kept Q8_0 / Q4_0 / Q4_1 blocks among them); all Q8_0, with its own LM head or tied to
# the embedding; Q4_0 and Q4_1 as column- and as row-parallel layers, with a tied Q4_0 embedding.
# A tied LM head keeps this rank's vocabulary rows of the (replicated) embedding's blocks.
GGUF = "tp_gguf"
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
GGUF_MODELS = {
    # Every supported type (K-quants on most projections): wide enough that each rank's share of a
    # row-parallel layer's input is whole 256-weight super-blocks, so K-quant layers stay kept.
    GGUF: dict(spec=TinySpec(hidden=512, intermediate=1024, heads=8, kv_heads=4)),
    "tp_gguf_q8": dict(
        types={"output.weight": "Q8_0", **{f"blk.{n}.{p}.weight": "Q8_0" for n in range(2) for p in PROJECTIONS}}
    ),
    "tp_gguf_q8_tied": dict(
        spec=TinySpec(tied=True), types={f"blk.{n}.{p}.weight": "Q8_0" for n in range(2) for p in PROJECTIONS}
    ),
    "tp_gguf_q4": dict(
        spec=TinySpec(tied=True),
        types={
            "token_embd.weight": "Q4_0",
            **{
                f"blk.{n}.{p}.weight": ("Q4_0" if (p in ("attn_output", "ffn_down")) == (n == 1) else "Q4_1")
                for n in range(2)
                for p in PROJECTIONS
            },
        },
    ),
}
RUNS = {2: ["tp_mha", "tp_gqa", "tp_tied_bias", *RELATIVES, *GGUF_MODELS], 4: ["tp_mha", "tp_gqa8", "tp_tied_bias"]}


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def torchrun(n: int, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_env())


def _folder(model_factory, name: str) -> Path:
    return model_factory(name, **MODELS[name])


@pytest.fixture(scope="module")
def model_path(model_factory, tmp_path_factory):
    """name -> a Hugging Face folder (MODELS) or a GGUF file (GGUF_MODELS)."""

    def path(name: str) -> Path:
        if name not in GGUF_MODELS:
            return _folder(model_factory, name)
        file = tmp_path_factory.getbasetemp() / f"{name}.gguf"
        if not file.exists():
            write_tiny_llama(file, **GGUF_MODELS[name])
        return file

    return path


@pytest.fixture(scope="module")
def tp_results(model_path, tmp_path_factory):
    """n -> {model name: [results of rank 0, rank 1, ...]}: one torchrun launch per n."""
    done: dict[int, dict] = {}

    def run(n: int) -> dict:
        if n not in done:
            out = tmp_path_factory.mktemp(f"tp{n}")
            folders = [str(model_path(name)) for name in RUNS[n]]
            proc = torchrun(n, str(WORKER), "compare", str(out), *folders)
            assert proc.returncode == 0, proc.stderr[-4000:]
            done[n] = {
                name: [torch.load(out / f"model{i}.rank{r}.pt") for r in range(n)] for i, name in enumerate(RUNS[n])
            }
        return done[n]

    return run


@pytest.fixture(scope="module")
def reference(model_path):
    cache: dict[str, dict] = {}

    def ref(name: str) -> dict:
        if name not in cache:
            # GGUF: both keep the Q8_0 / Q4_0 / Q4_1 blocks as stored
            cache[name] = run_model(load_model(model_path(name)).model)
        return cache[name]

    return ref


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max())


# ---- the sharded model computes what the whole model computes ---------------------------------


@pytest.mark.parametrize("n, name", [(n, name) for n, names in RUNS.items() for name in names])
def test_logits_and_greedy_tokens_match_single_process(n, name, tp_results, reference):
    ref = reference(name)
    tolerance = TOLERANCE
    if name in GGUF_MODELS:
        tolerance = GGUF_TOLERANCE * float(ref["forward"].abs().max())
    for rank, got in enumerate(tp_results(n)[name]):
        assert _max_diff(got["forward"], ref["forward"]) <= tolerance, f"rank {rank}: forward logits"
        for key in ("cache", "no_cache"):
            assert got[f"tokens_{key}"] == ref[f"tokens_{key}"], f"rank {rank}: greedy tokens ({key})"
            assert _max_diff(got[f"logits_{key}"], ref[f"logits_{key}"]) <= tolerance, f"rank {rank}: {key}"


def test_cli_generate_prints_once_and_matches_single_process(model_factory, capsys):
    folder = str(_folder(model_factory, "tp_gqa"))
    args = ["generate", "--model", folder, "--max-new-tokens", "8", "--json", "Once upon a time"]
    assert cli.main(args) == 0
    single = capsys.readouterr().out
    proc = torchrun(2, "-m", "llamascope", *args, "--tp", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout == single  # one JSON line: rank 0 prints, rank 1 does not
    assert len(proc.stdout.splitlines()) == 1


# ---- each rank reads and holds only its part ---------------------------------------------------


def test_each_rank_holds_about_one_nth_of_the_weights(model_factory, tmp_path):
    n = 2
    folder = model_factory(
        "tp_rss",
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=8,
    )  # ~157 MB of float32
    checkpoint = open_checkpoint(folder)
    total = sum(s.nbytes for s in checkpoint.tensors.values())
    proc = torchrun(n, str(WORKER), "rss", str(tmp_path), str(folder))
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in range(n):
        plan = shard_plan(checkpoint.config, rank, n)
        expected = sum(
            s.nbytes * (plan[name].stop - plan[name].start) // s.shape[plan[name].dim] if name in plan else s.nbytes
            for name, s in checkpoint.tensors.items()
        )  # this rank's slices + replicated weights
        assert expected < 0.55 * total
        report = json.loads((tmp_path / f"rss.rank{rank}.json").read_text())
        rise = report["after"] - report["before"]  # peak RSS (VmHWM) over loading
        # slack for the tokenizer and the allocator, far below the other half of the weights
        assert rise <= expected + 32 * 2**20, (rank, rise, expected, total)
        assert rise < 0.75 * total
        assert abs(report["held"] - expected) < 0.01 * expected


def test_safetensors_slices_read_only_their_part(tmp_path):
    from safetensors.torch import save_file

    tensors = {
        "m": torch.randn(37, 300),
        "b": torch.randn(1000, 3).to(torch.bfloat16),
        "v": torch.randn(50),
        "cube": torch.randn(4, 6, 5),
    }
    save_file(tensors, tmp_path / "t.safetensors")
    st = SafetensorsFile(tmp_path / "t.safetensors")
    for name, full in tensors.items():
        for dim in range(full.dim()):
            size = full.shape[dim]
            for start, stop in ((0, size), (0, size // 2), (size // 3, size), (1, 1), (size - 1, size)):
                got = st.read_slice(name, dim, start, stop)
                assert torch.equal(got, full.narrow(dim, start, stop - start)), (name, dim, start, stop)
                assert got.is_contiguous()
    with pytest.raises(LlamascopeError, match="no slice"):
        st.read_slice("m", 1, 10, 301)


def test_gguf_slices_match_the_whole_weight(model_path):
    """Rows (Q/K at whole heads, un-permuted), block-aligned columns, and the fallback otherwise."""
    checkpoint = open_checkpoint(model_path(GGUF))
    head_dim = checkpoint.config.head_dim
    for name, source in checkpoint.tensors.items():
        full = source.read()
        for dim in range(full.dim()):
            size = full.shape[dim]
            cuts = {
                (0, size),
                (0, size // 2),
                (size // 2, size),
                (size // 4, size // 2),
                (head_dim, 3 * head_dim),
                (1, 3),
            }
            for start, stop in sorted(c for c in cuts if c[1] <= size):
                got = source.read_slice(dim, start, stop)
                assert torch.equal(got, full.narrow(dim, start, stop - start)), (name, dim, start, stop)


def test_gguf_block_slices_match_the_whole_blocks(model_path):
    """Kept blocks: rows (Q/K at whole heads, un-permuted) and columns on block boundaries read on
    their own equal the same part of all the blocks; other cuts are refused, naming the tensor."""
    from llamascope.formats import block_layout

    checkpoint = open_checkpoint(model_path(GGUF))
    head_dim = checkpoint.config.head_dim
    checked = set()
    for name, source in checkpoint.tensors.items():
        if source.read_blocks is None:
            continue
        blocks = source.read_blocks()
        QK, size = block_layout(source.stored_type)  # 32 weights a block, 256 a K-quant super-block
        rows, cols = source.shape
        for start, stop in ((0, rows), (head_dim, min(3 * head_dim, rows)), (rows - head_dim, rows)):
            assert torch.equal(source.read_blocks_slice(0, start, stop), blocks[start:stop]), (name, start, stop)
        for start, stop in ((0, cols), (QK, min(3 * QK, cols)), (cols // 2 // QK * QK, cols)):
            assert torch.equal(
                source.read_blocks_slice(1, start, stop), blocks[:, start // QK * size : stop // QK * size]
            ), (name, start, stop)
        with pytest.raises(LlamascopeError, match=r"tensor '.*': columns \[16, 64\) do not fall on"):
            source.read_blocks_slice(1, 16, 64)
        if "q_proj" in name or "k_proj" in name:
            with pytest.raises(LlamascopeError, match=r"rows \[1, 64\) are not whole heads"):
                source.read_blocks_slice(0, 1, 64)
        checked.add(source.stored_type)
    assert checked == {"Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"}


# ---- GGUF blocks stay quantised under tensor parallelism ------------------------------------------


def _rank_models(path: Path, n: int = 2) -> list:
    """Each rank's model, loaded in this process (loading needs no process group; the collectives
    run only in forward, which these tests do not call on the wrapped layers)."""
    return [load_model(path, parallel=ParallelGroup(rank=r, world_size=n)).model for r in range(n)]


def _projections(model, layer: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The column-parallel projections' outputs for input x, through fused layers where fused."""
    attn, mlp = model.model.layers[layer].self_attn, model.model.layers[layer].mlp
    out = {}
    if attn.qkv_proj is not None:
        out.update(zip(("q_proj", "k_proj", "v_proj"), attn.qkv_proj(x).split(attn.qkv_sizes, dim=-1)))
    else:
        out.update({name: getattr(attn, name)(x) for name in ("q_proj", "k_proj", "v_proj")})
    if mlp.gate_up_proj is not None:
        out.update(zip(("gate_proj", "up_proj"), mlp.gate_up_proj(x).chunk(2, dim=-1)))
    else:
        out.update({name: getattr(mlp, name)(x) for name in ("gate_proj", "up_proj")})
    return out


@pytest.mark.parametrize("name", list(GGUF_MODELS))
def test_gguf_split_layers_compute_the_whole_layers(name, model_path):
    """Each rank keeps its slice of the blocks, and its layers give the whole layer's numbers:
    column-parallel rows exactly, row-parallel partial sums up to float32 reordering on decode rows
    (the 8-bit activation blocks are the same on each rank) and one bf16 step on prefill rows."""
    from llamascope.layers import QuantLinear

    single = load_model(model_path(name)).model
    ranks = _rank_models(model_path(name))
    kept = 0
    torch.manual_seed(0)
    for layer in range(len(single.model.layers)):
        for rows in (1, 14):  # decode kernels (8-bit activations) and prefill (bfloat16 product)
            x = torch.randn(1, rows, single.config.hidden_size)
            whole = _projections(single, layer, x)
            for module, value in whole.items():
                parts = [_projections(m, layer, x)[module] for m in ranks]
                assert torch.equal(torch.cat(parts, dim=-1), value), (name, layer, module, rows)
            for module in ("self_attn.o_proj", "mlp.down_proj"):
                full = single.get_submodule(f"model.layers.{layer}.{module}")
                locals_ = [m.get_submodule(f"model.layers.{layer}.{module}").local for m in ranks]
                kept += all(isinstance(m, QuantLinear) for m in locals_)
                assert type(locals_[0]) is type(full), (name, layer, module)  # blocks kept where stored
                x = torch.randn(1, rows, full.in_features)
                y = full(x)
                cuts = torch.cumsum(torch.tensor([0] + [m.in_features for m in locals_]), 0).tolist()
                total = sum(m(x[..., a:b]) for m, a, b in zip(locals_, cuts, cuts[1:]))
                bound = (1e-6 if rows == 1 or not isinstance(full, QuantLinear) else 2**-7) * float(y.abs().max())
                assert _max_diff(total, y) <= bound, (name, layer, module, rows)
    assert kept > 0
    h = torch.randn(1, 1, single.config.hidden_size)
    assert torch.equal(torch.cat([m.lm_head.local(h) for m in ranks], dim=-1), single.lm_head(h))
    assert isinstance(ranks[0].lm_head.local, QuantLinear) == isinstance(single.lm_head, QuantLinear)


def _held_bytes(modules) -> int:
    """Bytes of the distinct storages behind the modules' parameters and buffers."""
    storages = {}
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("name", ["tp_gguf_q8", "tp_gguf_q8_tied", "tp_gguf_q4"])
def test_gguf_ranks_read_and_hold_their_own_blocks(name, model_path, monkeypatch):
    """Per-rank weight memory is the replicated part plus 1/N of the rest, the split weights'
    blocks are read as slices (never whole), and the kernels are the quantised ones."""
    from llamascope.layers import QuantLinear
    from llamascope.loading import gguf

    single = load_model(model_path(name), mmap=False).model  # (mapped norms would share the file's storage)
    replicated = [single.model.embed_tokens, single.model.norm, single.model.rotary_emb] + [
        m for layer in single.model.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)
    ]
    shared = _held_bytes(replicated)
    split_part = _held_bytes([single]) - shared
    whole_reads: list[str] = []
    for method in ("read", "read_blocks"):
        original = getattr(gguf.GGUFWeight, method)

        def recording(self, _original=original):
            whole_reads.append(self.tensor.name)
            return _original(self)

        monkeypatch.setattr(gguf.GGUFWeight, method, recording)
    ranks = _rank_models(model_path(name))
    assert set(whole_reads) <= {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{n}.{norm}.weight" for n in range(2) for norm in ("attn_norm", "ffn_norm")
    }, whole_reads
    for model in ranks:
        assert abs(_held_bytes([model]) - shared - split_part / 2) <= 0.01 * split_part
        projections = [
            model.get_submodule(f"model.layers.{n}.{p}")
            for n in range(2)
            for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
        ]
        projections += [
            model.get_submodule(f"model.layers.{n}.{p}").local
            for n in range(2)
            for p in ("self_attn.o_proj", "mlp.down_proj")
        ]
        assert all(isinstance(m, QuantLinear) for m in projections + [model.lm_head.local])


def test_gguf_row_parallel_layer_off_block_boundaries_is_held_as_float(tmp_path, caplog):
    """head_dim 48: o_proj's share of the input, 48 columns, is not whole 32-weight blocks, so each
    rank holds it as float (the same values) and says so; every other layer keeps its blocks."""
    import logging

    from llamascope.layers import QuantLinear

    file = tmp_path / "hd48.gguf"
    write_tiny_llama(
        file,
        TinySpec(hidden=96, intermediate=192, heads=2, kv_heads=2, layers=1),
        types={"output.weight": "Q8_0", **{f"blk.0.{p}.weight": "Q8_0" for p in PROJECTIONS}},
        reference=False,
    )
    single = load_model(file, quant="none").model
    caplog.set_level(logging.INFO, logger="llamascope")
    ranks = _rank_models(file)
    messages = [r.getMessage() for r in caplog.records if "held as float" in r.getMessage()]
    assert len(messages) == 2 and all("model.layers.0.self_attn.o_proj.weight (Q8_0)" in m for m in messages)
    assert "columns [48, 96)" in messages[1]
    for r, model in enumerate(ranks):
        attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
        assert not isinstance(attn.o_proj.local, QuantLinear)
        whole = single.model.layers[0].self_attn.o_proj.weight  # [96, 96] float
        assert torch.equal(attn.o_proj.local.weight, whole[:, 48 * r : 48 * (r + 1)])
        assert all(isinstance(m, QuantLinear) for m in (attn.q_proj, attn.k_proj, mlp.up_proj, mlp.down_proj.local))


def test_mlp_splits_fall_on_k_quant_super_blocks():
    """Each rank's share of the MLP units is whole 256-weight super-blocks wherever the size allows
    (so a K-quant down_proj stays quantised on every rank), else whole 32-weight blocks."""
    from llamascope.parallel import _granule

    assert [_granule(n, parts) for n, parts in ((11008, 2), (5632, 4), (2816, 2), (14336, 8))] == [256] * 4
    assert [_granule(n, parts) for n, parts in ((1376, 2), (2048 + 32, 2), (256, 2), (48, 2), (100, 2))] == [
        32,
        32,
        32,
        1,
        1,
    ]


def test_split_covers_every_index_once():
    for n, granule in ((1, 1), (5, 1), (150, 1), (321, 1), (11008, 256), (2816, 32)):
        for parts in (1, 2, 3, 4):
            ranges = [split(n, parts, i, granule) for i in range(parts)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert all(a % granule == 0 for a, _ in ranges)
            assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= granule


# ---- refusals and failures are quick and clear -------------------------------------------------


def test_world_size_that_does_not_divide_the_heads_is_refused_before_loading(model_factory, monkeypatch):
    folder = _folder(model_factory, "tp_gqa")  # 4 heads, 2 KV heads

    def no_reading(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(SafetensorsFile, "read", no_reading)
    monkeypatch.setattr(SafetensorsFile, "read_slice", no_reading)
    with pytest.raises(LlamascopeError, match=r"num_key_value_heads=2 is not divisible by 4"):
        load_model(folder, parallel=ParallelGroup(rank=0, world_size=4))
    with pytest.raises(
        LlamascopeError, match=r"num_attention_heads=4 and num_key_value_heads=2 are not divisible by 3"
    ):
        load_model(folder, parallel=ParallelGroup(rank=1, world_size=3))


def test_bad_world_size_under_torchrun_stops_every_rank_quickly(model_factory):
    folder = str(_folder(model_factory, "tp_gqa"))
    start = time.monotonic()
    proc = torchrun(3, "-m", "llamascope", "generate", "--tp", "3", "--model", folder, "hello", timeout=60)
    assert proc.returncode != 0
    assert time.monotonic() - start < 45
    assert "num_attention_heads=4 and num_key_value_heads=2 are not divisible by 3" in proc.stderr
    assert proc.stdout == ""


def test_tp_without_torchrun_or_with_another_process_count_is_refused(monkeypatch, capsys):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert cli.main(["generate", "--tp", "2", "--model", "unused", "hi"]) == 1
    assert "torchrun --nproc-per-node 2" in capsys.readouterr().err
    with pytest.raises(LlamascopeError, match=r"--tp 4 does not match the 2 processes"):
        init_from_env(4, environ={"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(LlamascopeError, match=r"--tp 1 does not match the 2 processes"):
        init_from_env(1, environ={"RANK": "0", "WORLD_SIZE": "2"})
    assert init_from_env(1, environ={}) is None


def _wait_for(paths: list[Path], procs, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"a process ended early: {proc.communicate()}")
        assert time.monotonic() < deadline, "ranks did not get ready in time"
        time.sleep(0.1)
    time.sleep(0.1)
    return [int(p.read_text()) for p in paths]


def test_killing_one_rank_under_torchrun_ends_the_others(model_factory, tmp_path):
    folder = str(_folder(model_factory, "tp_gqa"))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(WORKER),
        "loop",
        str(tmp_path),
        folder,
        "60",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        pids = _wait_for([tmp_path / "ready.rank0", tmp_path / "ready.rank1"], [proc], 90)
        os.kill(pids[1], signal.SIGKILL)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - killed < 30
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert "FAILED" in err and "Signal 9 (SIGKILL)" in err  # torchrun's summary names the dead rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_ranks(folder: str, out: Path, n: int, timeout_s: float) -> list[subprocess.Popen]:
    """n ranks as torchrun would start them, with no supervisor (like ranks on different machines)."""
    port = str(_free_port())
    procs = []
    for rank in range(n):
        env = _env(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(n),
            LOCAL_WORLD_SIZE=str(n),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), "loop", str(out), folder, str(timeout_s)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        )
    return procs


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_a_dead_or_silent_rank_makes_the_others_fail_with_a_clear_error(model_factory, tmp_path, how):
    """Without torchrun's supervision: a killed peer breaks the connection at once; a stopped one
    (SIGSTOP) is noticed by the process group's timeout."""
    folder = str(_folder(model_factory, "tp_gqa"))
    procs = _start_ranks(folder, tmp_path, 2, timeout_s=8)
    try:
        pids = _wait_for([tmp_path / "ready.rank0", tmp_path / "ready.rank1"], procs, 90)
        os.kill(pids[1], signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        start = time.monotonic()
        _, err = procs[0].communicate(timeout=40)
        assert time.monotonic() - start < 40
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate()
    assert procs[0].returncode == 1, err[-4000:]
    assert "llamascope: error: tensor parallel rank 0 of 2:" in err
    assert "another rank has stopped, cannot be reached, or did not answer within the 8 s timeout" in err


# ---- serving: rank 0 serves HTTP, the other ranks repeat its model calls ------------------------

SERVE_PROMPTS = ["Once upon a time", "My name is Mariama, my favorite", "def forward(self, x):"]


def test_lockstep_messages_round_trip_and_garbage_is_refused():
    pytest.importorskip("fastapi")
    from llamascope.server.lockstep import HEADER, decode_message, encode

    calls = [
        ("start", 4, 256, 1 << 20),
        ("free", 3),
        ("move", 5, 3),
        ("begin_prefill", 7, [1, 2, 3]),
        ("prefill", 7, 3),
        ("place", 7, 2),
        ("drop", 8),
        ("decode", [0, 1], [7, 8], [4, 5]),
        ("stop",),
    ]
    assert decode_message(encode(calls)) == calls
    assert decode_message(encode([])) == []
    long = [("begin_prefill", 9, list(range(3 * HEADER)))]
    assert decode_message(encode(long)) == long
    for bad in ([], [0], [0, 5], [1, 1, 5], [1, 1, 1, 1, 0, 99], encode(calls) + [0, 1]):
        with pytest.raises(LlamascopeError, match="a message from rank 0 is malformed"):
            decode_message(bad)


def test_lockstep_follower_cache_tracks_rank_0(model_factory, monkeypatch):
    """In one process: rank 0's scheduler with its LeaderRunner, and a Follower on a second copy of
    the model that gets each message as rank 0 sends it (through the wire format). Before each of
    rank 0's model calls the follower's cache (slots, lengths, keys and values) equals rank 0's;
    the answers equal Engine.generate; sequences that end free and move slots under the others."""
    pytest.importorskip("fastapi")
    import asyncio

    from llamascope import Engine
    from llamascope.server import lockstep
    from llamascope.server.scheduler import Delta, Done, Request, Scheduler, SequenceSpec

    folder = _folder(model_factory, "tp_gqa")
    engine = Engine.load(folder)
    follower = lockstep.Follower(Engine.load(folder).model, ParallelGroup(rank=1, world_size=2))
    scheduler = Scheduler(
        engine.model,
        engine.tokenizer,
        max_batch=3,
        max_queue=8,
        slot_capacity=128,
        runner=lockstep.leader_runner(ParallelGroup(rank=0, world_size=2, timeout_s=0.4)),
    )
    seen: list[str] = []
    compared = []

    def same_cache(a, b) -> None:
        compared.append(1)
        assert (a.lengths, a.in_use, a.rows, a.columns) == (b.lengths, b.in_use, b.rows, b.columns)
        for slot in (s for s, used in enumerate(a.in_use) if used):
            for mine, theirs in zip(a.keys + a.values, b.keys + b.values):
                assert torch.equal(mine[slot, :, : a.lengths[slot]], theirs[slot, :, : a.lengths[slot]])

    def send(calls: list[tuple], group) -> None:
        calls = lockstep.decode_message(lockstep.encode(calls))
        seen.extend(name for name, *_ in calls)
        waiting = 0  # cache calls rank 0 has made already travel first
        while waiting < len(calls) and calls[waiting][0] in ("free", "move", "drop"):
            waiting += 1
        assert follower.apply(calls[:waiting])
        if follower.runner is not None:
            same_cache(scheduler.runner.cache, follower.runner.cache)
        if not follower.apply(calls[waiting:]):
            seen.append("stopped")

    monkeypatch.setattr(lockstep, "send", send)
    cases = [(SERVE_PROMPTS[0], 1, 3), (SERVE_PROMPTS[1], 2, 9), (SERVE_PROMPTS[2], 1, 5), (SERVE_PROMPTS[0], 1, 12)]

    async def run_all() -> list[list[str]]:
        loop = asyncio.get_running_loop()
        requests = []
        for i, (prompt, n, k) in enumerate(cases):
            spec = SequenceSpec(engine.encode(prompt), engine.local_generation_config(max_new_tokens=k))
            requests.append(Request(f"r{i}", [spec] * n, loop))
            scheduler.submit(requests[-1])
        texts = []
        for request in requests:
            parts = [""] * len(request.sequences)
            while not isinstance(event := await asyncio.wait_for(request.events.get(), 60), Done):
                assert isinstance(event, Delta), event
                parts[event.index] += event.text
            texts.append(parts)
        return texts

    scheduler.start()
    try:
        texts = asyncio.run(run_all())
        time.sleep(0.3)  # idle: keepalives
    finally:
        scheduler.stop()
    assert texts == [[engine.generate(prompt, max_new_tokens=k).text] * n for prompt, n, k in cases]
    assert {"start", "begin_prefill", "prefill", "place", "decode", "free", "move"} <= set(seen)
    assert len(compared) > seen.count("decode") + seen.count("prefill")
    assert seen[-2:] == ["stop", "stopped"] and scheduler.error is None
    assert follower.runner.cache.in_use == scheduler.cache.in_use  # every slot freed on both ranks


def test_lockstep_failed_model_call_on_rank_0_stops_the_server(model_factory, monkeypatch):
    """A model call that fails on rank 0 after it was sent may leave the ranks in different places:
    every request fails with one line, the server is told to stop, and no "stop" is sent (the
    followers' next collective fails instead)."""
    pytest.importorskip("fastapi")
    import asyncio

    from llamascope import Engine
    from llamascope.server import lockstep
    from llamascope.server.scheduler import Failed, ModelRunner, Request, Scheduler, SequenceSpec

    engine = Engine.load(_folder(model_factory, "tp_gqa"))
    sent: list[str] = []
    monkeypatch.setattr(lockstep, "send", lambda calls, group: sent.extend(name for name, *_ in calls))

    def broken(self, slots, tokens):
        raise RuntimeError("boom\n(a long torch explanation)")

    monkeypatch.setattr(ModelRunner, "decode", broken)
    scheduler = Scheduler(
        engine.model,
        engine.tokenizer,
        max_batch=2,
        slot_capacity=64,
        runner=lockstep.leader_runner(ParallelGroup(rank=0, world_size=2)),
    )
    told = []
    scheduler.on_fatal = told.append

    async def one() -> object:
        spec = SequenceSpec(engine.encode(SERVE_PROMPTS[0]), engine.local_generation_config(max_new_tokens=4))
        request = Request("r", [spec], asyncio.get_running_loop())
        scheduler.submit(request)
        while True:
            event = await asyncio.wait_for(request.events.get(), 30)
            if isinstance(event, Failed):
                return event

    scheduler.start()
    try:
        failed = asyncio.run(one())
        scheduler._thread.join(10)
        assert not scheduler._thread.is_alive()  # the worker stopped by itself
    finally:
        scheduler.stop()
    assert str(scheduler.error) == (
        "the server stopped: a model call failed on this rank, so the tensor-parallel "
        "ranks may no longer agree (RuntimeError: boom)"
    )
    assert told == [scheduler.error] and str(scheduler.error) in failed.message
    assert sent[:5] == ["start", "begin_prefill", "prefill", "place", "decode"] and "stop" not in sent


def _serve_args(folder: Path, port: int, timeout_s: float) -> list[str]:
    return [
        "-m",
        "llamascope",
        "serve",
        "--tp",
        "2",
        "--tp-timeout",
        str(timeout_s),
        "--model",
        str(folder),
        "--port",
        str(port),
        "--served-model-name",
        "tp",
        "--max-batch",
        "4",
    ]


def _wait_for_health(httpx, url: str, procs, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        for proc in procs:
            assert proc.poll() is None, f"a process ended early (status {proc.returncode})"
        try:
            return httpx.get(url + "/health", timeout=2).raise_for_status().json()
        except httpx.HTTPError:
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)


def _children(pid: int) -> list[int]:
    return [int(child) for path in Path(f"/proc/{pid}/task").glob("*/children") for child in path.read_text().split()]


def _running(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_serve_tp_answers_like_one_process_and_stops_on_sigterm(model_factory, tmp_path):
    """`torchrun ... serve --tp 2`: rank 0 alone serves; greedy completions (one alone, two decoded
    together) equal Engine.generate in one process; an idle spell longer than --tp-timeout does no
    harm (rank 0's keepalives); SIGTERM to torchrun ends every process cleanly and soon."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from concurrent.futures import ThreadPoolExecutor

    from llamascope import Engine

    folder = _folder(model_factory, "tp_gqa")
    engine = Engine.load(folder)
    lengths = {SERVE_PROMPTS[0]: 8, SERVE_PROMPTS[1]: 64, SERVE_PROMPTS[2]: 8}
    expected = {p: engine.generate(p, max_new_tokens=n).text for p, n in lengths.items()}
    port, timeout_s = _free_port(), 4
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node=2",
                *_serve_args(folder, port, timeout_s),
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=_env(),
        )
        try:
            _wait_for_health(httpx, url, [proc], 90)
            ranks = _children(proc.pid)
            assert len(ranks) == 2

            def complete(prompt: str) -> str:
                body = {"model": "tp", "prompt": prompt, "max_tokens": lengths[prompt], "temperature": 0}
                response = httpx.post(url + "/v1/completions", json=body, timeout=60)
                assert response.status_code == 200, response.text
                return response.json()["choices"][0]["text"]

            assert complete(SERVE_PROMPTS[0]) == expected[SERVE_PROMPTS[0]]
            with ThreadPoolExecutor(2) as pool:  # the short request joins the long one's batch
                long = pool.submit(complete, SERVE_PROMPTS[1])
                deadline = time.monotonic() + 30
                while httpx.get(url + "/health", timeout=5).json()["active"] == 0 and not long.done():
                    assert time.monotonic() < deadline
                    time.sleep(0.005)
                short = pool.submit(complete, SERVE_PROMPTS[2])
                assert short.result() == expected[SERVE_PROMPTS[2]]
                assert long.result() == expected[SERVE_PROMPTS[1]]
            assert httpx.get(url + "/health", timeout=5).json()["peak_batch"] == 2
            time.sleep(timeout_s + 1.5)  # idle past the process group's timeout
            assert complete(SERVE_PROMPTS[0]) == expected[SERVE_PROMPTS[0]]
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            proc.wait(timeout=40)
            assert time.monotonic() - signalled < 15
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    output = log_path.read_text()
    assert "Application shutdown complete" in output, output[-4000:]
    assert "llamascope: error" not in output and "forcefully" not in output, output[-4000:]
    assert output.count("Uvicorn running on") == 1  # only rank 0 serves
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in ranks):
        assert time.monotonic() < deadline, "a rank is still running"
        time.sleep(0.1)


def test_serve_tp_stops_with_a_clear_error_when_a_follower_dies(model_factory, tmp_path):
    """Ranks as torchrun would start them, without its supervision: killing rank 1 while the server
    idles makes rank 0's next keepalive fail, and rank 0 stops serving with one clear line."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    folder = _folder(model_factory, "tp_gqa")
    port, master = _free_port(), str(_free_port())
    procs = []
    for rank in range(2):
        env = _env(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=master,
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, *_serve_args(folder, port, 4)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        )
    try:
        _wait_for_health(httpx, f"http://127.0.0.1:{port}", procs, 90)
        procs[1].kill()
        killed = time.monotonic()
        _, err = procs[0].communicate(timeout=30)
        assert time.monotonic() - killed < 15
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    assert procs[0].returncode == 1, err[-4000:]
    assert (
        "llamascope: error: [rank 0/2] tensor parallel rank 0 of 2: broadcast of the server's next step failed" in err
    ), err[-4000:]
