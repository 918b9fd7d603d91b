"""One rank of a tensor-parallel test run, started by torchrun (or as torchrun would) from
test_parallel.py. Not a test module itself.

    worker.py compare OUT_DIR FOLDER...   save logits and greedy tokens of each model (model{i}.rank{r}.pt)
    worker.py rss OUT_DIR FOLDER          save peak RSS before and after loading
    worker.py loop OUT_DIR FOLDER TIMEOUT generate until killed (tests of a rank dying)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from llamascope.engine import Engine
from llamascope.errors import LlamascopeError
from llamascope.generation import generate
from llamascope.layers import QuantLinear
from llamascope.loading import load_model, open_checkpoint
from llamascope.model import Transformer
from llamascope.parallel import finish, init_from_env

# Left-padded batch of two prompts (ids below the test tokenizer's 320).
PROMPTS = [[1, 298, 307, 223, 87, 82, 81, 80, 269, 259, 75], [1, 44, 120, 5, 77]]
FORWARD_IDS = [[1, 17, 250, 3, 99, 180, 64, 31, 300, 12, 8, 140, 141, 7]]
NEW_TOKENS = 6


def run_model(model) -> dict:
    """What test_parallel compares: full logits of one forward, and greedy generation with and
    without the KV cache (tokens and each step's last-position logits)."""
    # Kept blocks' prefill in float32, in the ranks and in the reference alike: the bfloat16 product
    # (CPUs with AVX512-BF16) rounds each rank's partial sum of a row-parallel layer before the
    # all-reduce where one process rounds the whole sum, a legitimate bfloat16 step that a random
    # tiny model can amplify into another greedy token (test_gguf_split_layers_compute_the_whole_layers
    # checks that step layer by layer).
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.long_inputs_in_bf16 = False
    out = {}
    ids = torch.tensor(FORWARD_IDS)
    positions = torch.arange(ids.shape[1])[None]
    with torch.inference_mode():
        out["forward"] = model(ids, positions).float()  # [1, T, V]
    for use_cache in (True, False):
        logits = []
        result = generate(
            model,
            PROMPTS,
            max_new_tokens=NEW_TOKENS,
            use_cache=use_cache,
            on_step=lambda step, logits=logits: logits.append(step.logits.clone()),
        )
        key = "cache" if use_cache else "no_cache"
        out[f"tokens_{key}"] = result.output_ids
        out[f"logits_{key}"] = torch.stack(logits)  # [steps, B, V]
    return out


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    mode, out_dir = argv[0], Path(argv[1])
    world = int(os.environ["WORLD_SIZE"])
    timeout = float(argv[3]) if mode == "loop" else 60.0
    group = init_from_env(world, timeout_s=timeout)
    rank = group.rank
    try:
        if mode == "compare":
            for index, folder in enumerate(argv[2:]):
                results = run_model(load_model(folder, parallel=group).model)
                torch.save(results, out_dir / f"model{index}.rank{rank}.pt")
        elif mode == "rss":
            # Building a model on the meta device costs a fixed ~80 MB once per process (torch
            # imports its meta kernels): pay it before the baseline, so the rise is the weights.
            with torch.device("meta"):
                Transformer(open_checkpoint(argv[2]).config)
            before = peak_rss_bytes()
            loaded = load_model(argv[2], parallel=group)
            after = peak_rss_bytes()
            held = sum(
                t.numel() * t.element_size() for t in {p.data_ptr(): p for p in loaded.model.parameters()}.values()
            )
            (out_dir / f"rss.rank{rank}.json").write_text(json.dumps({"before": before, "after": after, "held": held}))
        elif mode == "loop":
            engine = Engine.load(argv[2], parallel=group)
            engine.generate_ids(PROMPTS, max_new_tokens=2)
            (out_dir / f"ready.rank{rank}").write_text(str(os.getpid()))
            while True:
                engine.generate_ids(PROMPTS, max_new_tokens=NEW_TOKENS)
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    except LlamascopeError as e:
        print(f"llamascope: error: {e}", file=sys.stderr, flush=True)
        # As llamascope's CLI does: leave without tearing down a process group whose collective failed
        # (its threads may still wait, and destroying it under them aborts the process).
        os._exit(1)
    finish(group)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
