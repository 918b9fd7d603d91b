"""Perplexity against transformers' loss, and the bench command's report."""

from __future__ import annotations

import json
import math

import torch
from transformers import LlamaForCausalLM

from llamascope import kernels
from llamascope.cli import main
from llamascope.loading import load_model
from llamascope.perplexity import perplexity

TEXT = (
    "Once upon a time there was a little robot who liked to count: 1, 2, 3, 42, 1000. "
    "The quick brown fox jumps over the lazy dog. My name is Mariama, my favorite color is blue. "
) * 3


def reference_sliding_nll(hf, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """Hugging Face's perplexity guide: labels -100 for the context a window shares with the previous one."""
    total, count, previous_end = 0.0, 0, 0
    for start in range(0, len(ids), stride):
        end = min(start + window, len(ids))
        chunk = torch.tensor([ids[start:end]])
        labels = chunk.clone()
        labels[:, : chunk.shape[1] - (end - previous_end)] = -100
        with torch.no_grad():
            loss = hf(chunk, labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())
        total += loss.item() * n
        count += n
        previous_end = end
        if end == len(ids):
            break
    return total, count


def test_perplexity_matches_transformers(tiny_model):
    ours = load_model(tiny_model, backend="plain")
    ids = ours.tokenizer.encode(TEXT)[:200]  # within the test model's 256 positions
    hf = LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    # One window: exp of transformers' mean loss.
    with torch.no_grad():
        expected = math.exp(hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item())
    value, scored = perplexity(ours.model, ids, window=len(ids), stride=len(ids))
    assert scored == len(ids) - 1
    assert math.isclose(value, expected, rel_tol=1e-4)
    # Several overlapping windows.
    total, count = reference_sliding_nll(hf, ids, window=24, stride=10)
    value, scored = perplexity(ours.model, ids, window=24, stride=10)
    assert scored == count
    assert math.isclose(value, math.exp(total / count), rel_tol=1e-4)


def test_perplexity_cli_and_quantisation_cost(tiny_model, tmp_path, capsys):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    values = {}
    for quant in ("none", "int8", "int4"):
        assert main(["perplexity", "--model", str(tiny_model), "--quant", quant, "--json", str(path)]) == 0
        values[quant] = json.loads(capsys.readouterr().out)["perplexity"]
    assert values["none"] > 1
    assert values["int8"] != values["none"]  # the quantised weights are really used
    assert abs(values["int8"] / values["none"] - 1) < abs(values["int4"] / values["none"] - 1) + 0.05


def test_bench_json_report(tiny_model, capsys):
    assert (
        main(
            [
                "bench",
                "--model",
                str(tiny_model),
                "--new-tokens",
                "8",
                "--prefill-tokens",
                "32",
                "--repeats",
                "1",
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["decode_tokens_per_s"] > 0 and report["prefill_tokens_per_s"] > 0
    assert report["prefill_tokens"] == 32 and report["decode_tokens"] == 8
    assert report["other_cores"] >= 0 and isinstance(report["machine_busy"], bool)
    files = sum(path.stat().st_size for path in tiny_model.iterdir() if path.suffix == ".safetensors")
    assert report["file_bytes"] == files  # the weights' files, which loading reads
    assert report["load_bytes_per_s"] == files / report["load_seconds"]
    model = load_model(tiny_model).model
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())  # RoPE frequencies
    assert report["weight_bytes"] == weights + buffers
    assert 0 < report["decode_share_of_limit"]
    assert report["peak_rss_bytes"] > weights
    # the runtime's share, measured as loading began: PyTorch is imported by then
    # (the kernel updates VmHWM lazily: it can trail an RSS read a moment earlier by a little)
    assert 50 * 2**20 < report["rss_before_load_bytes"] < report["peak_rss_bytes"] + 16 * 2**20
    # pytest's own earlier peak is usually above this load's: then what loading added is not known
    added = report["load_added_rss_bytes"]
    assert added is None or added == report["peak_rss_bytes"] - report["rss_before_load_bytes"]
    assert report["load_rss_per_weight_byte"] == (None if added is None else added / report["weight_bytes"])
    lib = kernels.load()
    assert report["kernels"] == (lib.build if lib is not None else "none")
    assert (
        main(
            [
                "bench",
                "--model",
                str(tiny_model),
                "--new-tokens",
                "2",
                "--prefill-tokens",
                "8",
                "--repeats",
                "1",
                "--json",
                "--backend",
                "plain",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["kernels"] == "none"


def test_load_added_rss_only_when_the_peak_is_loadings():
    """Peak RSS is a high-water mark: what loading added is known only if loading set it, or the
    process had never been above its RSS when loading began."""
    from types import SimpleNamespace

    from llamascope.bench import load_added_rss

    mb = 2**20

    def loaded(before, peak_before):
        return SimpleNamespace(rss_before_bytes=before, peak_rss_before_bytes=peak_before)

    assert load_added_rss(loaded(200 * mb, 200 * mb), 500 * mb) == 300 * mb  # fresh process
    assert load_added_rss(loaded(200 * mb, 900 * mb), 950 * mb) == 750 * mb  # loading passed the old peak
    assert load_added_rss(loaded(200 * mb, 900 * mb), 900 * mb) is None  # the old peak may hide loading's
    assert load_added_rss(loaded(None, None), 500 * mb) is None  # no /proc


def test_bench_runs_on_weights_without_a_tokenizer(tiny_model, tmp_path, capsys):
    """Benchmark checkpoints often ship no tokenizer: bench feeds ids spread over the vocabulary."""
    import shutil

    folder = tmp_path / "weights-only"
    folder.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(tiny_model / name, folder / name)
    assert (
        main(
            ["bench", "--model", str(folder), "--new-tokens", "4", "--prefill-tokens", "16", "--repeats", "1", "--json"]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["prefill_tokens"] == 16 and report["decode_tokens_per_s"] > 0


def test_bench_counts_other_processes_busy_time_and_not_its_own():
    """A child process spinning for a second is one busy core; this process spinning is none."""
    import subprocess
    import sys
    import time

    from llamascope.bench import BUSY_CORES, OtherLoad

    spin = "import time\nend = time.perf_counter() + 1.0\nwhile time.perf_counter() < end: pass"
    with OtherLoad() as busy:
        subprocess.run([sys.executable, "-c", spin], check=True)
    with OtherLoad() as own:
        end = time.perf_counter() + 1.0
        while time.perf_counter() < end:
            pass
    assert busy.cores > 0.6 and own.cores < BUSY_CORES


def test_bench_reports_speculative_decoding_beside_the_plain_decode(tiny_model, capsys):
    """--assistant-model (the model itself: every draft kept) and --prompt-lookup-num-tokens:
    tokens/s with drafts, the acceptance rate and the draft tokens kept per pass, in the table and JSON."""
    command = ["bench", "--model", str(tiny_model), "--new-tokens", "24", "--prefill-tokens", "16", "--repeats", "1"]
    assert main([*command, "--assistant-model", str(tiny_model), "--num-assistant-tokens", "4", "--json"]) == 0
    spec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["speculative"]
    assert spec["method"] == f"assistant {tiny_model.name}, K = 4"
    assert spec["tokens"] == 23 and spec["decode_tokens_per_s"] > 0 and spec["speedup"] > 0
    assert spec["drafted"] >= 8 and spec["accepted"] <= spec["drafted"]
    assert spec["rounds"] + spec["accepted"] == spec["tokens"]  # each pass: its kept drafts and one token of its own
    assert spec["mean_accepted_length"] == spec["accepted"] / spec["rounds"]
    assert spec["acceptance_rate"] == spec["accepted"] / spec["drafted"]
    assert main([*command, "--prompt-lookup-num-tokens", "3"]) == 0
    table = capsys.readouterr().out
    assert "decode with drafts (prompt lookup, K = 3)" in table and "drafted tokens kept" in table
