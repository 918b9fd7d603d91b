"""Measure what users pick an engine by: load time, peak memory, prefill and decode tokens/s, and
decode speed as a share of the memory-bandwidth limit (weight bytes per token over a read
bandwidth measured here). It also says how busy the machine was meanwhile: the cores that other
processes kept busy while decode and prefill were measured (/proc/stat's busy time less this
process's own), since on a small machine any other work lowers the figures."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from . import kernels
from .generation import generate
from .memory import load_added_rss, peak_rss_bytes
from .native import native_modules

SAMPLE_TEXT = (
    "The history of the printing press begins in the fifteenth century, when movable type made books "
    "cheaper and faster to produce than ever before. Within a few decades presses spread across Europe, "
    "and ideas travelled further than they had in centuries. "
)


@dataclass
class BenchResult:
    load_seconds: float
    peak_rss_bytes: int
    weight_bytes: int
    bytes_per_token: int
    prefill_tokens: int
    prefill_tokens_per_s: float
    decode_tokens: int
    decode_tokens_per_s: float
    bandwidth_bytes_per_s: float
    threads: int
    device: str = "cpu"
    kernels: str = "none"  # the native kernel build the model runs ("avx512", "avx2"), or "none"
    rss_before_load_bytes: int | None = None  # RSS when loading began: Python, PyTorch and llamascope's modules
    # what loading raised resident memory to, over the RSS before it; None where that is not known (no
    # /proc, weights on a GPU, or the process had a higher peak before loading than since)
    load_added_rss_bytes: int | None = None
    # cores other processes kept busy, on average, while decode and prefill were measured (None: no /proc)
    other_cores: float | None = None
    cores: int = 1  # the machine's (os.cpu_count())
    file_bytes: int = 0  # the checkpoint's files on disk (what loading read)
    speculative: SpeculativeResult | None = None  # decode with drafts, where asked for

    @property
    def load_bytes_per_s(self) -> float:
        """How fast loading went through the checkpoint's files (bytes on disk per second of loading)."""
        return self.file_bytes / self.load_seconds if self.load_seconds > 0 else 0.0

    @property
    def machine_busy(self) -> bool:
        """Other work took a quarter of a core or more while measuring: the figures are below the machine's own."""
        return self.other_cores is not None and self.other_cores >= BUSY_CORES

    @property
    def load_rss_per_weight_byte(self) -> float | None:
        """What loading added to the peak, per byte of weights in memory (the runtime left out)."""
        if self.load_added_rss_bytes is None:
            return None
        return self.load_added_rss_bytes / self.weight_bytes

    @property
    def bandwidth_limit_tokens_per_s(self) -> float:
        return self.bandwidth_bytes_per_s / self.bytes_per_token

    @property
    def decode_share_of_limit(self) -> float:
        return self.decode_tokens_per_s / self.bandwidth_limit_tokens_per_s

    def to_json(self) -> dict:
        out = asdict(self)
        out["bandwidth_limit_tokens_per_s"] = self.bandwidth_limit_tokens_per_s
        out["decode_share_of_limit"] = self.decode_share_of_limit
        out["load_rss_per_weight_byte"] = self.load_rss_per_weight_byte
        out["machine_busy"] = self.machine_busy
        out["load_bytes_per_s"] = self.load_bytes_per_s
        if self.speculative is not None:
            out["speculative"] = self.speculative.to_json()
            out["speculative"]["speedup"] = self.speculative.decode_tokens_per_s / self.decode_tokens_per_s
        return out


BUSY_CORES = 0.25


@dataclass
class SpeculativeResult:
    """Decode with drafts (prompt lookup or an assistant model) on the same prompt as the plain
    decode: its speed, and how the drafts fared over the last run."""

    method: str  # "prompt lookup, K = 4" or "assistant PATH, K = 20"
    decode_tokens_per_s: float
    tokens: int  # decode steps (new tokens after the first)
    rounds: int  # passes of the model over drafts (verifications), plain steps included
    drafted: int
    accepted: int

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Draft tokens kept per pass of the model (each pass adds one token of its own)."""
        return self.accepted / self.rounds if self.rounds else 0.0

    def to_json(self) -> dict:
        out = asdict(self)
        out.update(acceptance_rate=self.acceptance_rate, mean_accepted_length=self.mean_accepted_length)
        return out


def _machine_cpu_seconds() -> float | None:
    """CPU seconds every process has run since boot (/proc/stat's first line, time stolen by a
    hypervisor included); None without /proc."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields)
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """`with OtherLoad() as load:` ... then `load.cores`: the cores other processes kept busy on
    average meanwhile (None without /proc)."""

    def __enter__(self) -> OtherLoad:
        self.cores: float | None = None
        self._machine, self._own, self._wall = _machine_cpu_seconds(), _own_cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        machine, wall = _machine_cpu_seconds(), time.perf_counter() - self._wall
        if machine is None or self._machine is None or wall <= 0:
            return
        others = (machine - self._machine) - (_own_cpu_seconds() - self._own)
        self.cores = max(0.0, others / wall)


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def kernel_build(model: nn.Module) -> str:
    """The native kernel build this model's layers call, or "none" (plain PyTorch throughout)."""
    lib = kernels.load()
    return lib.build if lib is not None and next(native_modules(model), None) is not None else "none"


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer the model holds (shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def bytes_read_per_token(model: nn.Module) -> int:
    """Weight bytes one decode step reads: every projection, the norms and the LM head (one
    embedding row is negligible; a tied LM head reads the whole table)."""
    total = 0
    for name, module in model.named_modules():
        if name.endswith("embed_tokens"):
            continue
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if t.dtype.is_floating_point or t.dtype == torch.uint8:
                total += t.numel() * t.element_size()
    return total


def measure_read_bandwidth(megabytes: int = 512, repeats: int = 5, device: torch.device | str = "cpu") -> float:
    """Bytes/s of a threaded sum over a buffer much larger than the caches (best of a few runs),
    in the memory the model's weights live in (a GPU's own, for a model on a GPU)."""
    device = torch.device(device)
    buffer = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        buffer.sum()
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prompt_ids(tokenizer, n: int, vocab_size: int = 32000) -> list[int]:
    """n tokens of ordinary English text; without a tokenizer (a folder of weights only), n ids
    spread over the vocabulary."""
    if tokenizer is None:
        return [(1 + 7919 * i) % vocab_size for i in range(n)]
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(SAMPLE_TEXT, add_special_tokens=False)
    return ids[:n]


def time_decode(
    model: nn.Module, ids: list[int], new_tokens: int, steps: list | None = None, assistant=None, **settings
) -> tuple[float, float]:
    """-> (prefill seconds, decode tokens/s over the steps after the first). `steps`: gets each
    step's speculation record (speculative settings or `assistant` given) and chosen token."""
    stamps: list[float] = []

    def on_step(step) -> None:
        stamps.append(time.perf_counter())
        if steps is not None:
            steps.append((step.speculation, int(step.next_tokens[0])))

    start = time.perf_counter()
    generate(model, ids, max_new_tokens=new_tokens, eos_token_id=[], on_step=on_step, assistant=assistant, **settings)
    prefill = stamps[0] - start
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return prefill, decode


def run_speculative(
    model: nn.Module, ids: list[int], new_tokens: int, repeats: int, method: str, assistant=None, **settings
) -> SpeculativeResult:
    """Median decode tokens/s of `repeats` runs with drafts (`settings`: prompt_lookup_num_tokens,
    or num_assistant_tokens... with `assistant`), after one warm-up; the drafts' counts of the last."""
    time_decode(model, ids, 4, assistant=assistant, **settings)
    rates, steps = [], []
    for _ in range(repeats):
        steps = []
        rates.append(time_decode(model, ids, new_tokens, steps, assistant, **settings)[1])
    later = steps[1:]  # (the first token comes from the prompt's pass)
    return SpeculativeResult(
        method=method,
        decode_tokens_per_s=statistics.median(rates),
        tokens=len(later),
        rounds=sum(1 for spec, _ in later if spec.index == 0),
        drafted=sum(len(spec.draft) for spec, _ in later if spec.index == 0),
        accepted=sum(spec.accepts(token) for spec, token in later),
    )


def run(
    engine,
    prompt_tokens: int = 10,
    new_tokens: int = 128,
    prefill_tokens: int = 512,
    repeats: int = 3,
    progress: Callable[[str, int, int], None] | None = None,
    speculative: dict | None = None,
) -> BenchResult:
    """Median of `repeats` runs of each measurement, after one warm-up. `speculative`: settings of
    a decode with drafts to measure beside the plain one (prompt_lookup_num_tokens, or
    assistant_model with num_assistant_tokens ...), on the same prompt."""
    model, tokenizer = engine.model, engine.tokenizer
    rss_after_load = peak_rss_bytes()  # before the benchmark's own buffers
    steps = 2 + 2 * repeats + (1 if speculative else 0)
    done = 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(what, done, steps)

    vocab = engine.config.vocab_size
    decode_ids = prompt_ids(tokenizer, prompt_tokens, vocab)
    long_ids = prompt_ids(tokenizer, min(prefill_tokens, engine.config.max_position_embeddings - 2), vocab)
    time_decode(model, decode_ids, 4)  # warm-up: kernel build, allocator, caches
    tick("warm-up")
    bandwidth = measure_read_bandwidth(device=model.device)
    tick("bandwidth")
    decode_rates, prefill_rates = [], []
    with OtherLoad() as load:
        for _ in range(repeats):
            decode_rates.append(time_decode(model, decode_ids, new_tokens)[1])
            tick("decode")
            prefill_seconds, _ = time_decode(model, long_ids, 1)
            prefill_rates.append(len(long_ids) / prefill_seconds)
            tick("prefill")
        drafts = _speculative(engine, decode_ids, new_tokens, repeats, speculative) if speculative else None
        if drafts is not None:
            tick("speculative decode")
    return BenchResult(
        load_seconds=engine.loaded.load_seconds,
        peak_rss_bytes=rss_after_load,
        weight_bytes=tensor_bytes(model),
        bytes_per_token=bytes_read_per_token(model),
        prefill_tokens=len(long_ids),
        prefill_tokens_per_s=statistics.median(prefill_rates),
        decode_tokens=new_tokens,
        decode_tokens_per_s=statistics.median(decode_rates),
        bandwidth_bytes_per_s=bandwidth,
        threads=torch.get_num_threads(),
        device=str(model.device),
        kernels=kernel_build(model),
        rss_before_load_bytes=engine.loaded.rss_before_bytes,
        load_added_rss_bytes=load_added_rss(engine.loaded, rss_after_load) if model.device.type == "cpu" else None,
        other_cores=load.cores,
        cores=os.cpu_count() or 1,
        file_bytes=sum(size for _, size in engine.loaded.checkpoint.files),
        speculative=drafts,
    )


def _speculative(engine, ids: list[int], new_tokens: int, repeats: int, settings: dict) -> SpeculativeResult:
    """The speculative decode that `settings` ask for, named for the table."""
    settings = dict(settings)
    path = settings.pop("assistant_model", None)
    assistant = engine.assistant(path)
    if assistant is not None:
        k = settings.get("num_assistant_tokens", engine.generation_config().num_assistant_tokens)
        method = f"assistant {Path(str(path)).name}, K = {k}"
    else:
        method = f"prompt lookup, K = {settings['prompt_lookup_num_tokens']}"
    return run_speculative(engine.model, ids, new_tokens, repeats, method, assistant, **settings)
