"""Assisted decoding: the default model's Q4_1 file drafting for its float32 weights (the same
model converted once to a Hugging Face folder), llamascope against transformers' own assisted
generation (`assistant_model`). transformers runs no Q4 weights: it would load the GGUF
dequantised to float32, which is the float32 folder itself, so its assistant is a second copy of
that folder (every draft right, each as costly as the target: what the method gives it here).

    .venv/bin/python benchmarks/assisted.py                     # 3 repeats, K = 20 (transformers' default)
    .venv/bin/python benchmarks/assisted.py --k 20 6 --repeats 1

Tasks: the three chat turns about a passage of benchmarks/sample.txt that prompt_lookup.py uses,
and a free story. Greedy search, end of text suppressed, --new-tokens tokens; decode tokens/s over
the steps after the first, medians of the repeats, systems alternating within a repeat; "same
tokens" compares each system's tokens with and without the assistant, and llamascope's with
transformers'. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse

import torch
from prompt_lookup import TASKS, float32_folder, print_table, transformers_run

TASKS = {**TASKS, "story": "Write a short story about a lighthouse keeper and a storm."}


def llamascope_run(model, ids: list[int], new_tokens: int, assistant, k: int | None) -> tuple[list[int], float]:
    from llamascope.generation import generate

    settings = {} if assistant is None else dict(assistant=assistant, num_assistant_tokens=k)
    out = generate(model, ids, max_new_tokens=new_tokens, eos_token_id=[], **settings)
    return out.output_ids[0], (len(out.output_ids[0]) - 1) / out.decode_seconds


def transformers_assisted(model, ids: list[int], new_tokens: int, assistant, k: int | None) -> tuple[list[int], float]:
    """After the first token (its first processor call: both prefills done, as in llamascope)."""
    if assistant is None:
        return transformers_run(model, ids, new_tokens, None)
    assistant.generation_config.num_assistant_tokens = k
    return transformers_run(model, ids, new_tokens, None, assistant_model=assistant)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, nargs="+", default=[20], help="num_assistant_tokens")
    parser.add_argument("--new-tokens", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--systems", nargs="+", default=["llamascope", "transformers"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from llamascope import Engine
    from llamascope.loading import default_model_path

    folder, gguf = float32_folder(), default_model_path()
    systems = {}  # name -> (run(ids, new_tokens, k: None without the assistant), the twin whose tokens it must give)
    if "llamascope" in args.systems:
        target, helper = Engine.load(folder).model, Engine.load(gguf).model
        systems["llamascope fp32"] = (
            lambda ids, n, k: llamascope_run(target, ids, n, helper if k else None, k),
            "transformers fp32",
        )
    if "transformers" in args.systems:
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        hf_helper = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        systems["transformers fp32"] = (
            lambda ids, n, k: transformers_assisted(hf, ids, n, hf_helper if k else None, k),
            None,
        )
    print_table(systems, TASKS, [None, *args.k], args)


if __name__ == "__main__":
    main()
