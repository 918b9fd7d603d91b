"""Tensor parallelism on torch.distributed: one model split over N processes started by torchrun.

    torchrun --nproc-per-node 2 -m llamascope generate --tp 2 --model PATH "Once upon a time"

Each rank holds 1/N of every layer (the Megatron-LM split):

- attention: rank r computes query heads [r*H/N, (r+1)*H/N) and the key/value heads they read,
  [r*KVH/N, (r+1)*KVH/N): q/k/v are split by output rows (column-parallel); o_proj takes the
  matching input columns (row-parallel) and an all-reduce sums the ranks' partial outputs;
- MLP: gate/up are split by output rows (intermediate units), down_proj by input columns, and an
  all-reduce sums the partial outputs;
- LM head: split by vocabulary rows; the logits are all-gathered so every rank holds all of them.

Embeddings and norms are replicated. Every rank runs the same generation loop on the same
(all-reduced, all-gathered) numbers, so all ranks choose the same tokens; only rank 0 prints.
Each rank reads only its slices of the weights (`TensorSource.read_slice`), so no rank ever holds
a whole matrix. The split works on the model's nn.Linear modules: a column-parallel layer is a
plain, narrower nn.Linear; `RowParallelLinear` and `VocabParallelHead` wrap whatever module
computes the local product, so a quantised layer put in its place keeps the collectives. GGUF
block weights (Q8_0, Q4_0, Q4_1, Q5_0 as Q8_0, and the K-quants) stay in their blocks: a rank
reads whole rows of blocks for a column-parallel layer and, for a row-parallel one, each row's
blocks over its input columns, which must start and stop on block boundaries (else that layer
is float on that rank; see `loading.build._kept_blocks`). `llamascope serve --tp N` keeps the ranks in
step through server/lockstep.py.

The process group is gloo on CPU and nccl on GPU, with a timeout: a rank that dies or stops
answering makes the others fail with a `ParallelError` instead of waiting forever (torchrun also
stops the remaining ranks as soon as one exits with an error).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .errors import LlamascopeError
from .layers import LocalPart

DEFAULT_TIMEOUT_S = 300.0


class ParallelError(LlamascopeError):
    """A collective failed: another rank stopped, cannot be reached, or did not answer in time."""


@dataclass(frozen=True)
class ParallelGroup:
    """This process's place in a tensor-parallel group."""

    rank: int
    world_size: int
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = "gloo"
    timeout_s: float = DEFAULT_TIMEOUT_S
    process_group: object = None  # a torch.distributed ProcessGroup; None: the default group

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints and serves."""
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world_size}"

    def failure(self, what: str, error: BaseException) -> ParallelError:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = (lines[0] if lines else type(error).__name__)[:300]
        return ParallelError(
            f"tensor parallel {self.describe()}: {what} failed: another rank has stopped, cannot be "
            f"reached, or did not answer within the {self.timeout_s:g} s timeout ({reason})"
        )


# ---- the process group --------------------------------------------------------------------------


def init_from_env(
    world_size: int = 1,
    device: str | torch.device | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    environ: Mapping[str, str] | None = None,
) -> ParallelGroup | None:
    """Join the process group torchrun set up (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    `world_size` is what the user asked for (`--tp N`); it must equal the number of processes
    torchrun started. Returns None for a single process. The backend follows the device: nccl on
    cuda (rank r uses cuda:LOCAL_RANK), gloo on cpu; `device=None` takes cuda when available.
    """
    env = os.environ if environ is None else environ
    launched = int(env.get("WORLD_SIZE", "1"))
    if world_size < 1:
        raise LlamascopeError(f"--tp {world_size}: expected a positive number of processes")
    if world_size == 1 and launched == 1:
        return None
    if "RANK" not in env or "WORLD_SIZE" not in env:
        raise LlamascopeError(
            f"--tp {world_size} needs {world_size} processes: start them with "
            f"torchrun --nproc-per-node {world_size} -m llamascope ... --tp {world_size}"
        )
    if launched != world_size:
        raise LlamascopeError(
            f"--tp {world_size} does not match the {launched} processes torchrun started "
            f"(WORLD_SIZE={launched}); pass --tp {launched} or start {world_size} processes"
        )
    rank, local_rank = int(env["RANK"]), int(env.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise LlamascopeError(f"tensor parallelism runs on cpu (gloo) or cuda (nccl), not {device.type!r}")
    group = ParallelGroup(rank, world_size, local_rank, device, backend, timeout_s)
    if not dist.is_initialized():
        try:
            dist.init_process_group(
                backend,
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=timeout_s),
                device_id=device if backend == "nccl" else None,
            )
        except (RuntimeError, ValueError) as e:
            where = f"{env.get('MASTER_ADDR', '?')}:{env.get('MASTER_PORT', '?')}"
            raise group.failure(f"joining the process group at {where}", e) from e
    return group


def finish(group: ParallelGroup | None) -> None:
    """Leave the process group after a clean run (after a failure, just exit)."""
    if group is not None and dist.is_initialized():
        dist.destroy_process_group()


# ---- how the weights are split ------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """Indices [start, stop) along `dim` of one weight."""

    dim: int
    start: int
    stop: int


def split(n: int, parts: int, index: int, granule: int = 1) -> tuple[int, int]:
    """[start, stop) of part `index` when n items are cut into `parts` nearly equal runs, each
    a whole number of `granule`s (which must divide n)."""
    base, extra = divmod(n // granule, parts)
    start = index * base + min(index, extra)
    return start * granule, (start + base + (1 if index < extra else 0)) * granule


def _granule(n: int, parts: int) -> int:
    """Cut on multiples of 256 (else 32) whenever n allows, so that each rank's columns hold whole
    quantisation blocks: ggml's K-quant super-blocks, formats.py's 32-weight blocks. The parts may
    then differ by one granule (Llama-2-7B's 11008 over 2 ranks: 5632 and 5376)."""
    if n % 256 == 0 and n >= 256 * parts:
        return 256
    return 32 if n % 32 == 0 and n >= 32 * parts else 1


def check_world_size(config: ModelConfig, world_size: int, source: str = "config") -> None:
    """Each rank gets whole attention heads: both head counts must be multiples of world_size."""
    counts = {"num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads}
    bad = [f"{name}={value}" for name, value in counts.items() if value % world_size]
    if bad:
        given = ", ".join(f"{name}={value}" for name, value in counts.items())
        raise LlamascopeError(
            f"{source}: cannot split the model over {world_size} ranks: {' and '.join(bad)} "
            f"{'is' if len(bad) == 1 else 'are'} not divisible by {world_size} (each rank takes whole "
            f"attention heads; use a --tp that divides both {given})"
        )
    for name in ("intermediate_size", "vocab_size"):
        if getattr(config, name) < world_size:
            raise LlamascopeError(
                f"{source}: {name}={getattr(config, name)} is smaller than the {world_size} ranks to split it over"
            )


def shard_plan(config: ModelConfig, rank: int, world_size: int) -> dict[str, Shard]:
    """This rank's slice of every split weight, by Hugging Face name; weights not listed are
    replicated. Biases of column-parallel layers follow their rows; row-parallel biases are whole."""
    d = config.head_dim
    q0, q1 = (i * d for i in split(config.num_attention_heads, world_size, rank))
    kv0, kv1 = (i * d for i in split(config.num_key_value_heads, world_size, rank))
    m0, m1 = split(config.intermediate_size, world_size, rank, _granule(config.intermediate_size, world_size))
    plan: dict[str, Shard] = {}
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        for name, shard in (
            ("self_attn.q_proj", Shard(0, q0, q1)),
            ("self_attn.k_proj", Shard(0, kv0, kv1)),
            ("self_attn.v_proj", Shard(0, kv0, kv1)),
            ("mlp.gate_proj", Shard(0, m0, m1)),
            ("mlp.up_proj", Shard(0, m0, m1)),
        ):
            plan[p + name + ".weight"] = plan[p + name + ".bias"] = shard
        plan[p + "self_attn.o_proj.weight"] = Shard(1, q0, q1)
        plan[p + "mlp.down_proj.weight"] = Shard(1, m0, m1)
    plan["lm_head.weight"] = Shard(0, *split(config.vocab_size, world_size, rank))
    return plan


def narrow_linears(model: nn.Module, plan: dict[str, Shard]) -> None:
    """Replace each split nn.Linear of a model built on the meta device by one of its local shape."""
    for name, shard in plan.items():
        module_name, _, kind = name.rpartition(".")
        if kind != "weight":
            continue
        old = model.get_submodule(module_name)
        if not isinstance(old, nn.Linear):
            raise LlamascopeError(f"tensor parallel: {module_name} is a {type(old).__name__}, expected nn.Linear")
        out_features, in_features = old.out_features, old.in_features
        if shard.dim == 0:
            out_features = shard.stop - shard.start
        else:
            in_features = shard.stop - shard.start
        new = nn.Linear(
            in_features, out_features, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
        )
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def attach_collectives(model: nn.Module, group: ParallelGroup) -> None:
    """Wrap the row-parallel projections and the LM head of a loaded, narrowed model."""
    for layer in model.model.layers:
        layer.self_attn.o_proj = RowParallelLinear(layer.self_attn.o_proj, group)
        layer.mlp.down_proj = RowParallelLinear(layer.mlp.down_proj, group)
    vocab = model.config.vocab_size
    model.lm_head = VocabParallelHead(
        model.lm_head, [split(vocab, group.world_size, r) for r in range(group.world_size)], group
    )


# ---- layers with collectives --------------------------------------------------------------------


class RowParallelLinear(LocalPart):
    """A linear layer whose input features are split across ranks: each rank multiplies its slice
    of the input by its columns of the weight, an all-reduce sums the partial products, and the
    bias (whole on every rank) is added once, after the sum."""

    def __init__(self, local: nn.Module, group: ParallelGroup):
        super().__init__()
        bias = local.bias  # (a Linear or QuantLinear: None or [out])
        if bias is not None:
            local.bias = None  # added here, once, after the sum
        self.local = local  # [.., in/N] -> [.., out], no bias
        self.bias = bias  # [out] or None
        self.group = group

    @property
    def in_features(self) -> int:  # this rank's share
        return self.local.in_features

    @property
    def out_features(self) -> int:
        return self.local.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [.., in/N] -> [.., out]
        y = self.local(x)  # [.., out] this rank's partial sum
        if y.dtype in (torch.bfloat16, torch.float16):
            total = y.float()  # sum the partial products in float32: one rounding, as without splitting
            all_reduce(total, self.group)
            y = total.to(y.dtype)
        else:
            all_reduce(y, self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelHead(LocalPart):
    """The LM head split by vocabulary rows: each rank computes its logits, an all-gather joins them."""

    def __init__(self, local: nn.Module, vocab_ranges: list[tuple[int, int]], group: ParallelGroup):
        super().__init__()
        self.local = local  # [.., hidden] -> [.., V_r]
        self.sizes = [stop - start for start, stop in vocab_ranges]
        self.group = group

    @property
    def in_features(self) -> int:
        return self.local.in_features

    @property
    def out_features(self) -> int:
        return sum(self.sizes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [.., hidden] -> [.., vocab]
        local = self.local(h)  # [.., V_r]
        width = max(self.sizes)
        if local.shape[-1] < width:  # uneven split: every rank sends the same size
            local = F.pad(local, (0, width - local.shape[-1]))
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in self.sizes]  # each [.., width]
        try:
            dist.all_gather(parts, local, group=self.group.process_group)
        except RuntimeError as e:
            raise self.group.failure("all-gather of the logits", e) from e
        return torch.cat([part[..., :n] for part, n in zip(parts, self.sizes)], dim=-1)  # [.., vocab]


def all_reduce(tensor: torch.Tensor, group: ParallelGroup) -> None:
    """Sum `tensor` over the ranks, in place, with a clear error when a rank is gone."""
    try:
        dist.all_reduce(tensor, group=group.process_group)
    except RuntimeError as e:
        raise group.failure("all-reduce", e) from e


def broadcast(tensor: torch.Tensor, group: ParallelGroup, what: str = "broadcast") -> None:
    """Rank 0's `tensor` into every rank's `tensor` (same shape and dtype), in place."""
    try:
        dist.broadcast(tensor, src=0, group=group.process_group)
    except RuntimeError as e:
        raise group.failure(what, e) from e


def shared_seed(group: ParallelGroup) -> int:
    """A random seed chosen by rank 0 and given to all ranks, so that sampling agrees."""
    seed = int.from_bytes(os.urandom(8), "little") >> 1 if group.is_main else 0
    value = torch.tensor([seed], dtype=torch.int64, device=group.device)
    try:
        dist.broadcast(value, src=0, group=group.process_group)
    except RuntimeError as e:
        raise group.failure("broadcast of the sampling seed", e) from e
    return int(value.item())
