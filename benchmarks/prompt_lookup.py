"""Prompt lookup decoding on input-grounded tasks: llamascope against transformers' own
`prompt_lookup_num_tokens`, on the same float32 weights (the default model's, converted once to a
Hugging Face folder), and llamascope on the default model's Q4_1 file.

    .venv/bin/python benchmarks/prompt_lookup.py                  # K = 4, 3 repeats
    .venv/bin/python benchmarks/prompt_lookup.py --k 4 7 --repeats 1

Each task is a chat turn about a passage of benchmarks/sample.txt; greedy search, end of text
suppressed, --new-tokens tokens. Decode tokens/s over the steps after the first, medians of the
repeats, each system and setting alternating within a repeat; "same tokens" compares each
system's tokens with and without drafts (they must agree) and llamascope's float32 tokens with
transformers' on the same weights.
Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work"
PASSAGE = (HERE / "sample.txt").read_text()[:1500]
TASKS = {
    "repeat": "Repeat the following text exactly:\n\n" + PASSAGE,
    "rewrite": "Rewrite the following text in the first person:\n\n" + PASSAGE,
    "answer": PASSAGE + "\n\nWho arrived at the lighthouse, and what did she bring? Quote the text.",
}


def llamascope_run(model, ids: list[int], new_tokens: int, k: int | None) -> tuple[list[int], float]:
    from llamascope.generation import generate

    out = generate(model, ids, max_new_tokens=new_tokens, eos_token_id=[], prompt_lookup_num_tokens=k)
    return out.output_ids[0], (len(out.output_ids[0]) - 1) / out.decode_seconds


def transformers_run(model, ids: list[int], new_tokens: int, k: int | None, **extra) -> tuple[list[int], float]:
    """transformers' generate, with prompt_lookup_num_tokens=k where k is given, and `extra` settings
    (assistant_model): its tokens, and tokens/s after the first (the first processor call)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):  # called once per step (speculative: once per round, then per token)
        times: list[float] = []

        def __call__(self, input_ids, scores):
            Stamp.times.append(time.perf_counter())
            return scores

    Stamp.times = []
    if k:
        extra["prompt_lookup_num_tokens"] = k
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            logits_processor=LogitsProcessorList([Stamp()]),
            **extra,
        )
        end = time.perf_counter()
    first = Stamp.times[0] if Stamp.times else start  # the prefill's end
    tokens = out[0, len(ids) :].tolist()
    return tokens, (len(tokens) - 1) / (end - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, nargs="+", default=[4], help="draft sizes (prompt_lookup_num_tokens)")
    parser.add_argument("--new-tokens", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from llamascope import Engine

    folder = float32_folder()
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    q4, fp32 = Engine.load(None).model, Engine.load(folder).model
    systems = {  # name -> (run(ids, new_tokens, k), the system whose tokens it must give: same weights)
        "llamascope Q4_1": (lambda ids, n, k: llamascope_run(q4, ids, n, k), None),
        "llamascope fp32": (lambda ids, n, k: llamascope_run(fp32, ids, n, k), "transformers fp32"),
        "transformers fp32": (lambda ids, n, k: transformers_run(reference, ids, n, k), None),
    }
    print_table(systems, TASKS, [None, *args.k], args)


def float32_folder() -> Path:
    """The default model's GGUF converted once to a float32 Hugging Face folder (the same weights)."""
    from llamascope.convert import convert_gguf
    from llamascope.loading import default_model_path

    folder = WORK / "smollm2-hf"
    if not (folder / "config.json").exists():
        convert_gguf(default_model_path(), folder, dtype="float32")
    return folder


def print_table(systems: dict, tasks: dict, settings: list, args) -> None:
    """For each task (a chat turn), each system's decode tokens/s at each setting (None: without
    drafts), medians of args.repeats runs with the systems and settings alternating within a repeat;
    and whether its tokens are the same at every setting, and the same as its twin's without."""
    from llamascope import Engine

    tokenizer = Engine.load(None).tokenizer
    print(f"{args.new_tokens} new tokens, greedy, {args.threads} threads, medians of {args.repeats}", file=sys.stderr)
    print("| task | system | " + " | ".join(f"K={k}" if k else "without" for k in settings) + " | same tokens |")
    print("|---|---|" + "---|" * len(settings) + "---|")
    for task, content in tasks.items():
        ids = tokenizer.encode_chat([{"role": "user", "content": content}])
        rates = {(s, k): [] for s in systems for k in settings}
        tokens: dict = {}
        for _ in range(args.repeats):
            for name, (run, _) in systems.items():
                for k in settings:
                    tokens[name, k], rate = run(ids, args.new_tokens, k)
                    rates[name, k].append(rate)
        for name, (_, twin) in systems.items():
            same = all(tokens[name, k] == tokens[name, None] for k in settings)
            agree = "yes" if same else "NO"
            if twin is not None and twin in systems:
                agree += f"; as {twin}: {'yes' if tokens[name, None] == tokens[twin, None] else 'no'}"
            cells = " | ".join(f"{statistics.median(rates[name, k]):.1f}" for k in settings)
            print(f"| {task} | {name} | {cells} | {agree} |", flush=True)


if __name__ == "__main__":
    main()
