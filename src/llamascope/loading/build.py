"""Build the model from a checkpoint: plain layers, each weight read once at its dtype, kept in
its block format or quantised as it is read, and only this rank's share under tensor parallelism.
(The backend comes after: native.attach or compiled.enable, in load.py.)"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch

from ..errors import LlamascopeError
from ..formats import (
    HIGH_QTYPE,
    HIGH_WEIGHTS,
    KEPT_FORMATS,
    PACKED_QTYPES,
    QUANTIZE_ROWS_BYTES,
    block_layout,
    pack_blocks,
    packed_row_bytes,
    quantize,
)
from ..layers import QuantEmbedding, QuantLinear
from ..model import ROPE_INIT, Transformer
from ..parallel import ParallelGroup, attach_collectives, check_world_size, narrow_linears, shard_plan
from .checkpoint import FUSED_PROJECTIONS, Checkpoint, TensorSource, check_tensors, expected_shapes
from .mapping import FileMaps
from .tensorfiles import Scratch

log = logging.getLogger("llamascope")


def build_model(
    checkpoint: Checkpoint,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
    parallel: ParallelGroup | None = None,
    keep_blocks: bool = False,
    quantize_to: str | None = None,
    pack_with=None,
    map_files: bool = False,
) -> torch.nn.Module:
    """The model with plain layers, each weight read once at `dtype`: create it without allocating,
    read the weights, place them.

    With `parallel` (a tensor-parallel group of more than one rank), this rank's model holds only
    its share of the heads, MLP units and vocabulary (see parallel.py) and reads only those slices.
    With `keep_blocks`, weights stored in a GGUF block format stay in it (layers.QuantLinear,
    layers.QuantEmbedding) instead of being dequantised. With `quantize_to` (a block format, from
    `--quant`), every other matrix is quantised as it is read, a slice of rows at a time, the LM
    head and embedding to formats.HIGH_QTYPE: the float weights are never held whole. With
    `pack_with` (the kernel library, for the native backend), kept Q8_0/Q4 projections of the
    layers are packed as they are read into the layout its kernels read (formats.pack_blocks), each
    layer's q/k/v and gate/up into one buffer, which fusing then takes whole. With `map_files`
    (on the CPU, in one process, without `quantize_to`), each float weight the file holds as it is
    used is a view of the mapped file instead of a copy (mapping.py; `_mapped_weights`).
    """
    check_tensors(checkpoint)
    plan = _shard_plan(checkpoint, parallel)
    with torch.device("meta"):
        model = Transformer(checkpoint.config)
        if plan:
            narrow_linears(model, plan)
    packed = _packed_buffers(checkpoint) if pack_with is not None and keep_blocks and not plan else {}
    maps = FileMaps() if map_files and not plan and not quantize_to and torch.device(device).type == "cpu" else None
    reading = _Reading(dtype, device, plan, parallel, keep_blocks, quantize_to, packed, pack_with, maps)
    state, kept = _read_weights(model, checkpoint, reading, progress)
    if maps is not None and maps.spans:
        seconds = maps.populate()
        megabytes = maps.nbytes / 1e6
        log.info("%.1f MB of weights used where they lie in the mapped file (resident in %.2f s)", megabytes, seconds)
    _place_weights(model, checkpoint, state, kept, dtype, plan, packed)
    if plan:
        attach_collectives(model, parallel)
    model.model.rotary_emb.inv_freq = ROPE_INIT[checkpoint.config.rope_type](checkpoint.config).to(device)
    return model.eval().requires_grad_(False)


def _shard_plan(checkpoint: Checkpoint, parallel: ParallelGroup | None) -> dict:
    """This rank's slice of each split weight (parallel.shard_plan), or {} in one process. (The
    device is the group's: load.py checks the one asked for.)"""
    if parallel is None or parallel.world_size == 1:
        return {}
    check_world_size(checkpoint.config, parallel.world_size, source=str(checkpoint.path))
    return shard_plan(checkpoint.config, parallel.rank, parallel.world_size)


@dataclass
class _Reading:
    """How build_model reads the weights (see its docstring)."""

    dtype: torch.dtype
    device: str | torch.device
    plan: dict
    parallel: ParallelGroup | None
    keep_blocks: bool
    quantize_to: str | None
    packed: dict[str, torch.Tensor]  # name -> its rows of a packed buffer (_packed_buffers)
    pack_with: object  # the kernel library that packs them
    maps: FileMaps | None  # the mapped files, where weights may be views of them
    scratch: Scratch = field(default_factory=Scratch)


def _read_weights(
    model, checkpoint: Checkpoint, reading: _Reading, progress
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[str, torch.Tensor]]]:
    """Read every weight once: float ones into the returned state dict (or views of the mapped
    file there, reading nothing); those kept in a block format (as stored, or quantised to
    `quantize_to` as read) into their layers at once where they can go there (so loading never
    holds the whole model twice), else into the returned `kept` (name -> (format, blocks)) with
    the names of those already installed mapped to None."""
    expected = expected_shapes(checkpoint.config)
    r = reading
    state: dict[str, torch.Tensor] = {}
    kept: dict = {}
    groups = _fused_groups(checkpoint)
    mapped = {} if r.maps is None else _mapped_weights(checkpoint, groups, r.dtype, r.maps)
    unmapped = [names for names in groups if names[0] not in mapped]
    on_cpu = torch.device(r.device).type == "cpu"
    in_place = {} if r.plan or r.quantize_to or not on_cpu else _fused_buffers(checkpoint, unmapped, r.dtype)
    for k, name in enumerate(expected):
        if name in mapped:
            state[name] = mapped[name]
        else:
            _read_weight(model, checkpoint, name, r, in_place, state, kept)
        if progress is not None:
            progress(k + 1, len(expected))
    return state, kept


def _read_weight(model, checkpoint: Checkpoint, name: str, r: _Reading, in_place: dict, state: dict, kept: dict):
    """Read weight `name` (see _read_weights) into `state`, into its place in a fused buffer
    (`in_place`), into its layer, or into `kept`."""
    source, shard = checkpoint.tensors[name], r.plan.get(name)
    qtype = source.blocks_type
    if name in r.packed:  # straight into the kernels' layout, through reused buffers
        pack_blocks(source.read_blocks(r.scratch), qtype, source.shape[1], r.pack_with, out=r.packed[name])
        blocks = r.packed[name]
    elif r.keep_blocks and name not in in_place:
        blocks = _kept_blocks(checkpoint, name, shard, r.parallel)
    else:
        blocks = None
    if blocks is None and r.quantize_to is not None and len(source.shape) == 2:
        qtype = HIGH_QTYPE if name in HIGH_WEIGHTS else r.quantize_to
        blocks = _read_quantized(source, qtype, shard, checkpoint.config.head_dim)
    if name in in_place:
        source.fill(in_place[name])
        state[name] = in_place[name]
    elif blocks is None:
        state[name] = _read_at(source, r.dtype, r.device, shard)
    elif _install_now(model, name, r.plan):
        install_block_weights(model, {name: (qtype, blocks.to(r.device))}, r.dtype, r.packed)
        kept[name] = None
    else:
        kept[name] = (qtype, blocks.to(r.device))


def _mapped_weights(
    checkpoint: Checkpoint, groups: list[list[str]], dtype: torch.dtype, maps: FileMaps
) -> dict[str, torch.Tensor]:
    """The weights that can be views of their mapped file: those it holds row-major as `dtype`
    (TensorSource.stored). A layer's q/k/v or gate/up (of `groups`, _fused_groups's) are taken only
    together and only where they lie one after another in one file, as one view that fusing takes
    whole (native._stacked); elsewhere they are read into one buffer (_fused_buffers) rather than
    copied together later. Every other weight is a group of its own."""
    grouped = {name for names in groups for name in names}
    alone = [[name] for name in expected_shapes(checkpoint.config) if name not in grouped]
    views: dict[str, torch.Tensor] = {}
    for names in groups + alone:
        sources = [checkpoint.tensors[name] for name in names]
        if _adjacent(sources, dtype):
            rows = [s.shape[0] for s in sources]
            shape = (sum(rows), *sources[0].shape[1:])  # [rows, in] (or [n])
            buffer = maps.tensor(sources[0].file, sources[0].stored[0], dtype, shape)
            if buffer is not None:
                views.update(zip(names, buffer.split(rows)))
    return views


def _adjacent(sources: list[TensorSource], dtype: torch.dtype) -> bool:
    """Whether tensors stored as `dtype`, of one row shape, lie one after another in one file."""
    first = sources[0]
    if any(s.stored is None or s.stored[1] != dtype for s in sources):
        return False
    if any(s.file != first.file or s.shape[1:] != first.shape[1:] for s in sources):
        return False
    return all(a.stored[0] + a.nbytes == b.stored[0] for a, b in zip(sources, sources[1:]))


def _packed_buffers(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """For each projection of the layers kept in a format the kernels pack (Q8_0, Q4_0, Q4_1), its
    rows of a uint8 buffer in the packed layout: one buffer for each layer's q/k/v and gate/up where
    the parts share a format and input width (fusing takes it whole), one of its own otherwise."""

    def layout(sources: list[TensorSource]) -> tuple[int, torch.dtype] | None:
        if not all(_packs(s) for s in sources) or len({(s.blocks_type, s.shape[1]) for s in sources}) != 1:
            return None
        return packed_row_bytes(sources[0].blocks_type, sources[0].shape[1]), torch.uint8

    fused = _fused_groups(checkpoint)
    grouped = {name for names in fused for name in names}
    alone = [[name] for name in expected_shapes(checkpoint.config) if name.startswith("model.layers.")]
    return _shared_buffers(checkpoint, fused + [g for g in alone if g[0] not in grouped], layout)


def _packs(source: TensorSource) -> bool:
    """Whether a weight is kept as blocks of a format the kernels read packed."""
    return (
        source.read_blocks is not None
        and source.blocks_type in PACKED_QTYPES
        and len(source.shape) == 2
        and source.shape[1] % block_layout(source.blocks_type)[0] == 0
    )


def _fused_buffers(checkpoint: Checkpoint, groups: list[list[str]], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """For each group of a layer's q/k/v or gate/up (of `groups`, _fused_groups's) stored as
    floats, one buffer of all their rows, and each
    part's rows of it by name: read in place, the parts lie one after another, and fusing them
    (native.fuse_projections) takes the buffer whole instead of copying them together."""

    def layout(sources: list[TensorSource]) -> tuple[int, torch.dtype] | None:
        if any(s.read_blocks is not None or len(s.shape) != 2 for s in sources):
            return None  # (block formats stay blocks)
        return (sources[0].shape[1], dtype) if len({s.shape[1] for s in sources}) == 1 else None

    return _shared_buffers(checkpoint, groups, layout)


def _fused_groups(checkpoint: Checkpoint) -> list[list[str]]:
    """The names of each layer's projections that fuse (q/k/v, gate/up), a list per fused layer."""
    layers = range(checkpoint.config.num_hidden_layers)
    return [[f"model.layers.{n}.{part}" for part in parts] for n in layers for _, parts in FUSED_PROJECTIONS]


def _shared_buffers(
    checkpoint: Checkpoint,
    groups: list[list[str]],
    layout: Callable[[list[TensorSource]], tuple[int, torch.dtype] | None],
) -> dict[str, torch.Tensor]:
    """For each group of weights that `layout` gives a row (width, dtype), one buffer of all their
    rows [sum of rows, width], and each weight's rows of it by name, one after another."""
    views: dict[str, torch.Tensor] = {}
    for names in groups:
        sources = [checkpoint.tensors[name] for name in names]
        row = layout(sources)
        if row is None:
            continue
        buffer = torch.empty(sum(s.shape[0] for s in sources), row[0], dtype=row[1])  # [rows, width]
        views.update(zip(names, buffer.split([s.shape[0] for s in sources])))
    return views


def _place_weights(
    model, checkpoint: Checkpoint, state: dict, kept: dict, dtype, plan: dict, packed: Collection[str] = ()
) -> None:
    """The float weights into their parameters, the kept blocks not yet installed into their layers,
    and the tie of the LM head to the embedding."""
    config = checkpoint.config
    tied_kept = config.tie_word_embeddings and "model.embed_tokens.weight" in kept
    if config.tie_word_embeddings and not tied_kept:
        head = plan.get("lm_head.weight")
        embed = state["model.embed_tokens.weight"]
        # A vocabulary shard of a tied head is a view of the (replicated) embedding: no copy.
        state["lm_head.weight"] = embed if head is None else embed.narrow(0, head.start, head.stop - head.start)
    missing, unexpected = model.load_state_dict(state, assign=True, strict=False)
    # Kept weights are not in `state`: their layers (installed or still to come) own them.
    owners = {name.removesuffix(".weight") for name in kept} | ({"lm_head"} if tied_kept else set())
    if unexpected or [key for key in missing if key.rpartition(".")[0] not in owners]:
        raise LlamascopeError(
            f"{checkpoint.path}: internal error placing weights: missing {missing}, unexpected {unexpected}"
        )
    blocks = {name: entry for name, entry in kept.items() if entry is not None}
    if blocks:
        # Under tensor parallelism a kept embedding is replicated but a tied head takes only this
        # rank's vocabulary rows: both are placed here rather than by install_block_weights.
        embedding = blocks.pop("model.embed_tokens.weight", None) if plan else None
        install_block_weights(model, blocks, dtype, packed)
        if embedding is not None:
            _install_sharded_embedding(model, *embedding, dtype, plan["lm_head.weight"])
    elif config.tie_word_embeddings and not plan:
        model.lm_head.weight = model.model.embed_tokens.weight


# Tensors larger than this that change element type on loading are converted a slice at a time.
CONVERT_CHUNK_BYTES = 32 * 2**20


def _read_at(source: TensorSource, dtype: torch.dtype, device, shard) -> torch.Tensor:
    """The weight (or this rank's shard of it) at `dtype` on `device`.

    Converting a whole tensor would hold it at both widths at once: a 1.1B model's float32
    embedding read as bfloat16 is 262 MB read plus 131 MB kept. A large tensor that changes type,
    read whole or in row shards, is instead read in slices of rows into the result."""
    start, stop = (0, source.shape[0]) if shard is None else (shard.start, shard.stop)
    chunked = (
        source.slice_reader is not None
        and len(source.shape) >= 1
        and source.shape[0] > 1
        and source.nbytes > CONVERT_CHUNK_BYTES
        and (shard is None or shard.dim == 0)
    )
    if chunked:
        first = source.read_slice(0, start, start + 1)  # [1, ...] as stored
        chunked = first.dtype != dtype or torch.device(device).type != "cpu"
    if not chunked:
        tensor = source.read() if shard is None else source.read_slice(shard.dim, shard.start, shard.stop)
        return tensor.to(device=device, dtype=dtype)
    rows = max(1, CONVERT_CHUNK_BYTES // max(1, source.nbytes // source.shape[0]))
    out = torch.empty((stop - start, *source.shape[1:]), dtype=dtype, device=device)
    for begin in range(start, stop, rows):
        end = min(stop, begin + rows)
        out[begin - start : end - start].copy_(source.read_slice(0, begin, end))
    return out


def _read_quantized(source: TensorSource, qtype: str, shard, head_dim: int) -> torch.Tensor:
    """The weight (or this rank's shard of it) quantised to `qtype`'s blocks, uint8 [rows, bytes],
    from slices of rows of the stored values: the float matrix is never held whole.

    Slices are whole heads (multiples of `head_dim` rows): a GGUF's q and k rows are stored in
    llama.cpp's order within each head, and only whole heads read as just their own bytes."""
    if shard is not None and shard.dim == 1:  # columns of every row: read as one (quantize slices it)
        return quantize(source.read_slice(1, shard.start, shard.stop), qtype)
    start, stop = (0, source.shape[0]) if shard is None else (shard.start, shard.stop)
    if source.slice_reader is None:
        return quantize(source.read_slice(0, start, stop), qtype)
    rows = QUANTIZE_ROWS_BYTES // max(1, source.nbytes // source.shape[0])  # (as stored)
    rows = max(head_dim, rows // head_dim * head_dim)
    size, nbytes = block_layout(qtype)
    out = torch.empty(stop - start, source.shape[1] // size * nbytes, dtype=torch.uint8)  # [rows, row bytes]
    for begin in range(start, stop, rows):
        end = min(stop, begin + rows)
        out[begin - start : end - start] = quantize(source.read_slice(0, begin, end), qtype)
    return out


def _install_now(model: torch.nn.Module, name: str, plan: dict) -> bool:
    """Whether a kept weight can go into its layer as soon as it is read: a projection without a
    bias (a bias is loaded with the float tensors, later), outside tensor parallelism (whose
    collectives wrap the layers afterwards) and not the embedding (whose tie is placed later)."""
    if plan or name == "model.embed_tokens.weight":
        return False
    return model.get_submodule(name.removesuffix(".weight")).bias is None


def _kept_blocks(checkpoint: Checkpoint, name: str, shard, parallel) -> torch.Tensor | None:
    """The weight's stored blocks (uint8 [rows, bytes]; under tensor parallelism only this rank's
    part, read on its own), or None where it is to be loaded as float.

    Column-parallel weights (shard along dim 0) take whole rows of blocks. Row-parallel ones (dim 1:
    o_proj, down_proj) take each row's blocks for this rank's input columns, which needs the columns
    to start and stop on block boundaries; where they do not, the layer is held as float on this
    rank (dequantised, same values) and a line says so.
    """
    source = checkpoint.tensors[name]
    if source.read_blocks is None or source.blocks_type not in KEPT_FORMATS or len(source.shape) != 2:
        return None
    QK, _ = block_layout(source.blocks_type)  # weights per block (256 for a K-quant's super-block)
    if source.shape[1] % QK:
        return None
    if shard is None:
        return source.read_blocks()
    if shard.dim == 0:
        return source.read_blocks_slice(0, shard.start, shard.stop)
    if shard.start % QK == 0 and shard.stop % QK == 0:
        return source.read_blocks_slice(1, shard.start, shard.stop)
    log.info(
        "%s: %s (%s) is held as float on %s: its share of the input, columns [%d, %d), does not fall "
        "on %d-weight block boundaries",
        checkpoint.path,
        name,
        source.stored_type,
        parallel.describe(),
        shard.start,
        shard.stop,
        QK,
    )
    return None


def _install_sharded_embedding(
    model: torch.nn.Module, qtype: str, data: torch.Tensor, dtype: torch.dtype, head
) -> None:
    """A kept (replicated) token embedding, and a tied LM head holding this rank's vocabulary rows
    of the same blocks (a view where the format allows)."""
    config = model.config
    model.model.embed_tokens = QuantEmbedding(data, qtype, config.hidden_size, dtype)
    if config.tie_word_embeddings:
        model.lm_head = QuantLinear(data[head.start : head.stop], qtype, config.hidden_size)


def install_block_weights(
    model: torch.nn.Module,
    blocks: dict[str, tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    packed: Collection[str] = (),
) -> None:
    """Put weights kept in a block format into the model: projections and the LM head become
    QuantLinear (in the kernels' packed layout where named in `packed`), the token embedding a
    QuantEmbedding (a tied LM head shares its blocks)."""
    config = model.config
    for name, (qtype, data) in blocks.items():
        path = name.removesuffix(".weight")
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if name == "model.embed_tokens.weight":
            parent.embed_tokens = QuantEmbedding(data, qtype, config.hidden_size, dtype)
            if config.tie_word_embeddings:
                model.lm_head = QuantLinear(data, qtype, config.hidden_size)
        else:
            old = getattr(parent, attr)  # (the Linear the model was built with)
            bias = None if old.bias is None or old.bias.is_meta else old.bias.detach().float()
            layout = "packed" if name in packed else "rows"
            setattr(parent, attr, QuantLinear(data, qtype, old.in_features, bias, layout=layout))
