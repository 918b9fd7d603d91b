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

from llamascope import cli
from llamascope.errors import LlamascopeError
from llamascope.loading import load_model, open_checkpoint
from llamascope.loading.tensorfiles import SafetensorsFile
from llamascope.parallel import ParallelGroup, init_from_env, shard_plan, split
from gguf_fixtures import write_tiny_llama
from parallel_worker import run_model

WORKER = Path(__file__).with_name("parallel_worker.py")
TOLERANCE = 1e-4  # float32 logits: max abs difference from the single-process model

MODELS = {
    "tp_mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "tp_gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "tp_gqa8": dict(num_attention_heads=8, num_key_value_heads=4),
    # Tied head, biases, and vocabulary / MLP sizes that do not divide evenly by 2 or 4.
    "tp_tied_bias": dict(num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True,
                         attention_bias=True, mlp_bias=True, intermediate_size=150, vocab_size=321),
}
# A GGUF (gguf_fixtures.write_tiny_llama): every stored type, Q/K rows permuted as llama.cpp does.
GGUF = "tp_gguf"
RUNS = {2: ["tp_mha", "tp_gqa", "tp_tied_bias", GGUF], 4: ["tp_mha", "tp_gqa8", "tp_tied_bias"]}


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def torchrun(n: int, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_env())


def _folder(model_factory, name: str) -> Path:
    return model_factory(name, **MODELS[name])


@pytest.fixture(scope="module")
def model_path(model_factory, tmp_path_factory):
    """name -> a Hugging Face folder (MODELS) or the GGUF file."""
    def path(name: str) -> Path:
        if name != GGUF:
            return _folder(model_factory, name)
        file = tmp_path_factory.getbasetemp() / "tp_tiny.gguf"
        if not file.exists():
            write_tiny_llama(file)
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
            done[n] = {name: [torch.load(out / f"model{i}.rank{r}.pt") for r in range(n)]
                       for i, name in enumerate(RUNS[n])}
        return done[n]

    return run


@pytest.fixture(scope="module")
def reference(model_path):
    cache: dict[str, dict] = {}

    def ref(name: str) -> dict:
        if name not in cache:
            # GGUF: tensor parallelism dequantises the blocks, so compare with quant="none"
            cache[name] = run_model(load_model(model_path(name), quant="none" if name == GGUF else None).model)
        return cache[name]

    return ref


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max())


# ---- the sharded model computes what the whole model computes ---------------------------------

@pytest.mark.parametrize("n, name", [(n, name) for n, names in RUNS.items() for name in names])
def test_logits_and_greedy_tokens_match_single_process(n, name, tp_results, reference):
    ref = reference(name)
    for rank, got in enumerate(tp_results(n)[name]):
        assert _max_diff(got["forward"], ref["forward"]) <= TOLERANCE, f"rank {rank}: forward logits"
        for key in ("cache", "no_cache"):
            assert got[f"tokens_{key}"] == ref[f"tokens_{key}"], f"rank {rank}: greedy tokens ({key})"
            assert _max_diff(got[f"logits_{key}"], ref[f"logits_{key}"]) <= TOLERANCE, f"rank {rank}: {key}"


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
    folder = model_factory("tp_rss", hidden_size=1024, intermediate_size=2816, num_hidden_layers=3,
                           num_attention_heads=8, num_key_value_heads=8)  # ~157 MB of float32
    checkpoint = open_checkpoint(folder)
    total = sum(s.nbytes for s in checkpoint.tensors.values())
    proc = torchrun(n, str(WORKER), "rss", str(tmp_path), str(folder))
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in range(n):
        plan = shard_plan(checkpoint.config, rank, n)
        expected = sum(s.nbytes * (plan[name].stop - plan[name].start) // s.shape[plan[name].dim]
                       if name in plan else s.nbytes
                       for name, s in checkpoint.tensors.items())  # this rank's slices + replicated weights
        assert expected < 0.55 * total
        report = json.loads((tmp_path / f"rss.rank{rank}.json").read_text())
        rise = report["after"] - report["before"]  # peak RSS (VmHWM) over loading
        # slack for the tokenizer and the allocator, far below the other half of the weights
        assert rise <= expected + 32 * 2**20, (rank, rise, expected, total)
        assert rise < 0.75 * total
        assert abs(report["held"] - expected) < 0.01 * expected


def test_safetensors_slices_read_only_their_part(tmp_path):
    from safetensors.torch import save_file

    tensors = {"m": torch.randn(37, 300), "b": torch.randn(1000, 3).to(torch.bfloat16),
               "v": torch.randn(50), "cube": torch.randn(4, 6, 5)}
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
            cuts = {(0, size), (0, size // 2), (size // 2, size), (size // 4, size // 2), (head_dim, 3 * head_dim),
                    (1, 3)}
            for start, stop in sorted(c for c in cuts if c[1] <= size):
                got = source.read_slice(dim, start, stop)
                assert torch.equal(got, full.narrow(dim, start, stop - start)), (name, dim, start, stop)


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
    with pytest.raises(LlamascopeError, match=r"num_attention_heads=4 and num_key_value_heads=2 are not divisible by 3"):
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
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(WORKER), "loop", str(tmp_path), folder, "60"]
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
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, str(WORKER), "loop", str(out), folder, str(timeout_s)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
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
