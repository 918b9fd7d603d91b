"""What a checkpoint is, before any weight is read: `describe(path) -> ModelInfo`.

    from llamascope.info import describe, render_info
    info = describe("path/to/folder-or.gguf")      # None: the default SmolLM2 model
    info.total_parameters, info.contradictions
    render_info(info)                               # rich tables on the terminal
    info.to_json()

It reports the source (files, sizes, format, tensor types), the model config as read with the
defaults that filled the missing keys, derived facts (head_dim, GQA group size, rope, context),
the generation settings in force with where each came from, the tokenizer, every contradiction
between config.json, generation_config.json and the tokenizer, a layer table with parameter
counts and bytes, and the memory the weights and a full-context KV cache need.
Everything comes from `loading.open_checkpoint` (headers and metadata) and the tokenizer files.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.rule import Rule
from rich.table import Table

from .config import GenerationConfig, ModelConfig, as_id_list
from .loading import open_checkpoint
from .loading.checkpoint import IGNORED_SUFFIXES, expected_shapes

BYTES_PER_PARAMETER = {"float32": 4.0, "bfloat16": 2.0, "int8": 1.0, "int4": 0.5}
KV_DTYPES = {"float32": 4, "bfloat16": 2}
RULE_WIDTH = 100  # the widest section rule in output that is not a terminal


# ---- contradictions ---------------------------------------------------------------------------


@dataclass
class Contradiction:
    kind: str  # "bos", "eos", "pad" or "vocab"
    message: str

    def to_json(self) -> dict:
        return {"kind": self.kind, "message": self.message}


def _token_name(tokenizer, token_id: int) -> str:
    if tokenizer is None or token_id < 0 or token_id >= tokenizer.vocab_size:
        return ""
    return f" ({tokenizer.tokens([token_id])[0]!r})"


def source_labels(checkpoint_format: str) -> tuple[str, str]:
    """Names, for messages, of where the model config and the generation settings were read."""
    if checkpoint_format == "gguf":
        return "GGUF metadata", "GGUF metadata"
    return "config.json", "generation_config.json"


def find_contradictions(
    config: ModelConfig,
    config_dict: dict | None,
    generation_json: dict | None,
    tokenizer=None,
    generation: GenerationConfig | None = None,
    config_label: str = "config.json",
    generation_label: str = "generation_config.json",
) -> list[Contradiction]:
    """Where config.json, generation_config.json, the settings in force and the tokenizer disagree
    about special token ids, and where ids do not fit the embedding.

    `generation` (the settings in force) adds what a call overrode. transformers takes bos/eos/pad
    from generation_config.json when it exists, and from config.json only when it does not.
    """
    config_dict = config_dict or {}
    labels = (config_label, generation_label)
    bos, eos, pad = (
        _claims(key, config_dict, generation_json, generation, labels)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id")
    )
    in_force = generation_label if generation_json is not None else config_label
    vocab = config.vocab_size
    return [
        *_bos_contradictions(bos, tokenizer),
        *_eos_contradictions(eos, tokenizer, in_force),
        *_pad_contradictions(pad, tokenizer, vocab),
        *_vocab_contradictions(bos, eos, tokenizer, vocab, config_label),
    ]


def _claims(
    key: str,
    config_dict: dict,
    generation_json: dict | None,
    generation: GenerationConfig | None,
    labels: tuple[str, str],
) -> dict[str, list[int]]:
    """What each source says the token id setting `key` is: {source label: ids}, in precedence order."""
    config_label, generation_label = labels
    out: dict[str, list[int]] = {}
    if config_dict.get(key) is not None:
        out[config_label] = as_id_list(config_dict[key])
    if generation_json and generation_json.get(key) is not None:
        out[generation_label] = as_id_list(generation_json[key])
    if generation is not None and generation.sources.get(key) == "call":
        out["the call"] = as_id_list(getattr(generation, key))
    return out


def _said(sources: dict[str, list[int]]) -> str:
    """The claims as one phrase: "config.json says 1, generation_config.json says [1, 2]"."""
    return ", ".join(f"{src} says {ids[0] if len(ids) == 1 else ids}" for src, ids in sources.items())


def _bos_contradictions(bos: dict[str, list[int]], tokenizer) -> list[Contradiction]:
    """BOS: every source that names one should name the same id as the tokenizer."""
    tok_bos = tokenizer.bos_id if tokenizer is not None else None
    distinct = {tuple(v) for v in bos.values()} | ({(tok_bos,)} if tok_bos is not None else set())
    if len(distinct) <= 1:
        return []
    tail = f"; the tokenizer's BOS {tokenizer.bos_token!r} is {tok_bos}" if tok_bos is not None else ""
    adds = ""
    if tokenizer is not None and tokenizer.adds_bos:
        adds = f" (prompts start with {tok_bos}, which is what the model sees)"
    return [Contradiction("bos", f"BOS token id differs: {_said(bos)}{tail}{adds}")]


def _eos_contradictions(eos: dict[str, list[int]], tokenizer, in_force: str) -> list[Contradiction]:
    """EOS: the tokenizer's EOS should be among the ids generation stops at; sources should agree."""
    found: list[Contradiction] = []
    tok_eos = tokenizer.eos_id if tokenizer is not None else None
    if len({tuple(sorted(v)) for v in eos.values()}) > 1:
        found.append(Contradiction("eos", f"EOS token ids differ: {_said(eos)} (transformers uses {in_force}'s)"))
    stop_ids = eos.get("the call", eos.get(in_force, []))
    if tok_eos is not None and eos and tok_eos not in stop_ids:
        names = ", ".join(f"{i}{_token_name(tokenizer, i)}" for i in stop_ids) or "none"
        found.append(
            Contradiction(
                "eos",
                f"generation stops at EOS id(s) {names} but the tokenizer's EOS {tokenizer.eos_token!r} "
                f"is {tok_eos}: generation will run past the tokenizer's end-of-text",
            )
        )
    return found


def _pad_contradictions(pad: dict[str, list[int]], tokenizer, vocab: int) -> list[Contradiction]:
    """PAD: must be a real token id; sources should agree with each other and with the tokenizer."""
    found = [
        Contradiction("pad", f"pad_token_id={i} in {src} is not a token id (the embedding has rows 0..{vocab - 1})")
        for src, ids in pad.items()
        for i in ids
        if i < 0 or i >= vocab
    ]
    tok_pad = tokenizer.pad_id if tokenizer is not None else None
    distinct = {tuple(v) for v in pad.values()} | ({(tok_pad,)} if tok_pad is not None else set())
    if len(distinct) > 1:
        tail = f"; the tokenizer's pad {tokenizer.pad_token!r} is {tok_pad}" if tok_pad is not None else ""
        found.append(Contradiction("pad", f"pad token id differs: {_said(pad)}{tail}"))
    return found


def _vocab_contradictions(
    bos: dict[str, list[int]], eos: dict[str, list[int]], tokenizer, vocab: int, config_label: str
) -> list[Contradiction]:
    """Vocabulary: every id the tokenizer can produce needs an embedding row."""
    found = [
        Contradiction("vocab", f"{key}={i} in {src} is outside the embedding (vocab_size={vocab})")
        for key, sources in (("bos_token_id", bos), ("eos_token_id", eos))
        for src, ids in sources.items()
        for i in ids
        if i < 0 or i >= vocab
    ]
    if tokenizer is not None and tokenizer.vocab_size > vocab:
        found.append(
            Contradiction(
                "vocab",
                f"the tokenizer has {tokenizer.vocab_size} tokens but the embedding has {vocab} rows "
                f"({config_label} vocab_size): ids {vocab}..{tokenizer.vocab_size - 1} cannot be fed",
            )
        )
    return found


# ---- the layer table --------------------------------------------------------------------------


@dataclass
class ModuleRow:
    """One module of the model (or a run of identical decoder layers' modules)."""

    name: str  # "model.layers.0-29.self_attn.q_proj"
    kind: str  # "Embedding", "Linear", "RMSNorm", ...
    tensors: list[tuple[str, tuple[int, ...], str]]  # (weight|bias, shape, stored type)
    count: int  # how many modules this row stands for
    parameters: int  # over all `count` modules; 0 for tensors the model does not use
    nbytes: int  # bytes in the checkpoint's files, over all `count` modules
    note: str = ""

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "count": self.count,
            "parameters": self.parameters,
            "bytes": self.nbytes,
            "note": self.note,
            "tensors": [{"name": n, "shape": list(s), "type": t} for n, s, t in self.tensors],
        }


def _module_kind(module: str) -> str:
    leaf = module.rsplit(".", 1)[-1]
    if leaf == "embed_tokens":
        return "Embedding"
    if leaf.endswith("norm"):
        return "RMSNorm"
    if leaf.endswith("_proj") or leaf == "lm_head":
        return "Linear"
    return "Tensor"


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_SUB_ORDER = (  # a decoder layer's sub-modules in the order they compute
    "input_layernorm",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "post_attention_layernorm",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)

_Tensors = list[tuple[str, tuple[int, ...], str, int, bool]]  # [(leaf, shape, type, nbytes, used)]


def layer_table(checkpoint) -> list[ModuleRow]:
    """Rows in model order; consecutive decoder layers with identical tensors share rows."""
    config = checkpoint.config
    tied = config.tie_word_embeddings
    modules = _tensors_by_module(checkpoint)
    layers, top = _split_layers(modules)
    head = ["model.embed_tokens"] + sorted(m for m in top if m not in ("model.embed_tokens", "model.norm", "lm_head"))
    rows = [_module_row(module, [modules[module]], tied) for module in head if module in modules]
    for run in _identical_runs(layers, modules):
        rows.extend(_run_rows(run, layers, modules, tied))
    rows.extend(
        _module_row(module, [modules[module]], tied) for module in ("model.norm", "lm_head") if module in modules
    )
    if tied and "lm_head" not in modules:
        rows.append(ModuleRow("lm_head", "Linear", [], 1, 0, 0, "tied: shares model.embed_tokens.weight"))
    return rows


def _tensors_by_module(checkpoint) -> dict[str, _Tensors]:
    """The checkpoint's tensors grouped by module, each marked whether the model uses it."""
    used = set(expected_shapes(checkpoint.config))
    modules: dict[str, _Tensors] = {}  # module -> [(leaf, shape, type, nbytes, used)]
    for name, source in checkpoint.tensors.items():
        module, _, leaf = name.rpartition(".")
        modules.setdefault(module, []).append(
            (leaf, tuple(source.shape), source.stored_type, int(source.nbytes), name in used)
        )
    return modules


def _split_layers(modules: dict[str, _Tensors]) -> tuple[dict[int, dict[str, str]], list[str]]:
    """The decoder layers' modules ({layer: {sub-module: full module name}}) and the others."""
    layers: dict[int, dict[str, str]] = {}  # layer -> {sub-module: full module name}
    top: list[str] = []
    for module in modules:
        match = _LAYER.match(module)
        if match:
            layers.setdefault(int(match.group(1)), {})[match.group(2)] = module
        else:
            top.append(module)
    return layers, top


def _identical_runs(layers: dict[int, dict[str, str]], modules: dict[str, _Tensors]) -> list[list[int]]:
    """The layer indices in runs of consecutive layers whose tensors (names, shapes, types) agree."""

    def signature(index: int) -> tuple:
        return tuple(
            sorted((sub, tuple((l, s, t) for l, s, t, _, _ in modules[m])) for sub, m in layers[index].items())
        )

    runs: list[list[int]] = []
    for i in sorted(layers):
        if runs and i == runs[-1][-1] + 1 and signature(i) == signature(runs[-1][0]):
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _run_rows(
    run: list[int], layers: dict[int, dict[str, str]], modules: dict[str, _Tensors], tied: bool
) -> list[ModuleRow]:
    """One row per sub-module of a run of identical layers ("model.layers.0-29.self_attn.q_proj")."""
    label = f"{run[0]}" if len(run) == 1 else f"{run[0]}-{run[-1]}"
    subs = sorted(layers[run[0]], key=lambda s: (_SUB_ORDER.index(s) if s in _SUB_ORDER else 99, s))
    return [_module_row(f"model.layers.{label}.{sub}", [modules[layers[j][sub]] for j in run], tied) for sub in subs]


def _module_row(name: str, tensors: list[_Tensors], tied: bool) -> ModuleRow:
    """The row `name` for one module, or for the same module of several layers (one entry each)."""
    first = tensors[0]
    params = sum(math.prod(s) for module in tensors for _, s, _, _, u in module if u)
    nbytes = sum(b for module in tensors for _, _, _, b, _ in module)
    note = ""
    if not any(u for _, _, _, _, u in first):
        note = "not used by the model"
        if name == "lm_head" and tied:
            note = "saved, but tied: the model uses model.embed_tokens"
        elif name.endswith(IGNORED_SUFFIXES[0].rsplit(".", 1)[0]):
            note = "derived by the model; not a parameter"
    return ModuleRow(
        name, _module_kind(name), [(leaf, s, t) for leaf, s, t, _, _ in first], len(tensors), params, nbytes, note
    )


# ---- the whole picture ------------------------------------------------------------------------


@dataclass
class ModelInfo:
    path: str
    format: str
    files: list[tuple[str, int]]
    tensor_types: dict[str, dict]  # stored type -> {"tensors": n, "parameters": n, "bytes": n}
    config_source: str  # "config.json" or "GGUF metadata"
    config_rows: list[tuple[str, Any, str]]  # (key, value, "config.json" | "default" | "default, derived")
    derived: dict[str, Any]
    generation: GenerationConfig
    tokenizer: dict | None
    contradictions: list[Contradiction]
    layers: list[ModuleRow]
    total_parameters: int
    total_bytes: int
    memory: dict[str, int]
    kv_cache: dict[str, int]
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "source": {
                "path": self.path,
                "format": self.format,
                "files": [{"name": n, "bytes": b} for n, b in self.files],
                "tensor_types": self.tensor_types,
            },
            "config": {
                "source": self.config_source,
                "keys": [{"key": k, "value": _jsonable(v), "from": s} for k, v, s in self.config_rows],
            },
            "derived": _jsonable(self.derived),
            "generation": generation_rows_json(self.generation),
            "tokenizer": self.tokenizer,
            "contradictions": [c.to_json() for c in self.contradictions],
            "layers": [r.to_json() for r in self.layers],
            "totals": {"parameters": self.total_parameters, "bytes": self.total_bytes},
            "memory": {"weights": self.memory, "kv_cache_full_context": self.kv_cache},
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def generation_rows(generation: GenerationConfig) -> list[tuple[str, Any, str]]:
    """(setting, value, source) for every generation setting, in the dataclass's order."""
    return [
        (f.name, getattr(generation, f.name), generation.sources.get(f.name, "default"))
        for f in dataclasses.fields(generation)
        if f.name != "sources"
    ]


def generation_rows_json(generation: GenerationConfig) -> list[dict]:
    return [{"name": n, "value": _jsonable(v), "source": s} for n, v, s in generation_rows(generation)]


def tokenizer_facts(tokenizer) -> dict:
    backend = tokenizer.backend
    pre = backend.pre_tokenizer
    return {
        "source": tokenizer.source,
        "type": type(backend.model).__name__,
        "pre_tokenizer": type(pre).__name__ if pre is not None else None,
        "decoder": type(backend.decoder).__name__ if backend.decoder is not None else None,
        "vocab_size": tokenizer.vocab_size,
        "special_tokens": {role: {"token": t, "id": i} for role, (t, i) in tokenizer.special_tokens().items()},
        "adds_bos": tokenizer.adds_bos,
        "adds_eos": tokenizer.adds_eos,
        "chat_template": bool(tokenizer.chat_template),
        "chat_template_chars": len(tokenizer.chat_template or ""),
    }


def derived_facts(config: ModelConfig) -> dict[str, Any]:
    group = config.gqa_group_size
    attention = (
        "multi-head (MHA)"
        if group == 1
        else ("multi-query (MQA)" if config.num_key_value_heads == 1 else "grouped-query (GQA)")
    )
    arch = config.architecture
    windows = [config.layer_window(i) for i in range(config.num_hidden_layers)]
    facts: dict[str, Any] = {
        "architecture": f"{arch.hf_class} (model_type {arch.model_type})",
        "differs_from_llama": arch.differs,
        "head_dim": config.head_dim,
        "head_dim_from": _head_dim_source(config),
        "query_heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "gqa_group_size": group,
        "attention": attention,
        "rope_type": config.rope_type,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "context_length": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
    }
    if config.rope_scaling and "original_max_position_embeddings" in config.rope_scaling:
        facts["trained_context_length"] = config.rope_scaling["original_max_position_embeddings"]
    if config.qkv_bias or config.attention_bias:
        facts["attention_biases"] = "q, k, v and o" if config.attention_bias else "q, k and v (not o)"
    if config.qk_norm:
        facts["qk_norm"] = "RMSNorm over each head's queries and keys before RoPE"
    if any(w is not None for w in windows):
        sliding = [i for i, w in enumerate(windows) if w is not None]
        facts["sliding_window"] = config.sliding_window
        facts["sliding_layers"] = "all" if len(sliding) == len(windows) else sliding
    return facts


def _head_dim_source(config: ModelConfig) -> str:
    if "head_dim" not in config.defaulted:
        return "config"
    if dict(config.architecture.defaults).get("head_dim") is not None:
        return f"{config.architecture.hf_class}'s default"
    return "hidden_size / num_attention_heads"


def kv_cache_bytes(config: ModelConfig, positions: int, bytes_per_element: int, batch: int = 1) -> int:
    """Keys and values of every layer: 2 * layers * kv_heads * head_dim * positions * bytes."""
    return (
        2
        * config.num_hidden_layers
        * config.num_key_value_heads
        * config.head_dim
        * positions
        * bytes_per_element
        * batch
    )


def describe(path: str | Path | None = None) -> ModelInfo:
    """Everything `llamascope info` shows, from headers and metadata (no weights are read)."""
    checkpoint = open_checkpoint(path)
    config = checkpoint.config
    config_source, generation_source = source_labels(checkpoint.format)
    config_rows = _config_rows(checkpoint, config_source)
    tensor_types = _tensor_types(checkpoint)
    tokenizer = checkpoint.tokenizer_factory() if checkpoint.tokenizer_factory is not None else None
    generation = GenerationConfig.resolve(config, checkpoint.generation_json, generation_source=generation_source)
    contradictions = find_contradictions(
        config,
        checkpoint.config_dict,
        checkpoint.generation_json,
        tokenizer,
        config_label=config_source,
        generation_label=generation_source,
    )
    rows = layer_table(checkpoint)
    total_parameters = sum(r.parameters for r in rows)
    return ModelInfo(
        path=str(checkpoint.path),
        format=checkpoint.format,
        files=[(str(p), int(size)) for p, size in checkpoint.files],
        tensor_types=tensor_types,
        config_source=config_source,
        config_rows=config_rows,
        derived=derived_facts(config),
        generation=generation,
        tokenizer=tokenizer_facts(tokenizer) if tokenizer is not None else None,
        contradictions=contradictions,
        layers=rows,
        total_parameters=total_parameters,
        total_bytes=sum(r.nbytes for r in rows),
        memory={name: int(total_parameters * b) for name, b in BYTES_PER_PARAMETER.items()},
        kv_cache=_full_context_kv_cache(config),
    )


def _config_rows(checkpoint, config_source: str) -> list[tuple[str, Any, str]]:
    """Each key as read, then each key the config filled in with a default (and which default)."""
    config = checkpoint.config
    config_rows: list[tuple[str, Any, str]] = [(k, v, config_source) for k, v in checkpoint.config_dict.items()]
    for name in config.defaulted:
        how = "default"
        if name == "head_dim":
            how = "default: " + _head_dim_source(config)
        elif name == "num_key_value_heads":
            how = "default: num_attention_heads"
        config_rows.append((name, getattr(config, name), how))
    return config_rows


def _tensor_types(checkpoint) -> dict[str, dict]:
    """Stored type -> {"tensors": n, "parameters": n, "bytes": n} over the checkpoint's tensors."""
    tensor_types: dict[str, dict] = {}
    for source in checkpoint.tensors.values():
        entry = tensor_types.setdefault(source.stored_type, {"tensors": 0, "parameters": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["parameters"] += math.prod(source.shape)
        entry["bytes"] += int(source.nbytes)
    return tensor_types


def _full_context_kv_cache(config: ModelConfig) -> dict[str, int]:
    """The KV cache's bytes for the full context at each cache dtype, batch 1, and the positions."""
    context = config.max_position_embeddings
    kv = {name: kv_cache_bytes(config, context, b) for name, b in KV_DTYPES.items()}
    kv["positions"] = context
    return kv


# ---- rendering --------------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def section(console, title: str) -> None:
    """A section's title in a rule across the terminal; where output is not a terminal (piped
    output is laid out wide, so that tables do not wrap), the rule is at most RULE_WIDTH columns."""
    console.print(Rule(title), width=None if console.is_terminal else min(console.width, RULE_WIDTH))


def settings_table(generation: GenerationConfig, title: str = "generation settings in force"):
    table = Table(title=title, title_justify="left")
    table.add_column("setting")
    table.add_column("value")
    table.add_column("from")
    for name, value, source in generation_rows(generation):
        style = None if source == "default" else "bold"
        table.add_row(name, repr(value), source, style=style)
    return table


def render_info(info: ModelInfo, console=None) -> None:
    """Print `info` as rich tables (to `console`, default: a new Console on stdout)."""
    console = console or Console()
    for step in (
        _render_source,
        _render_config,
        _render_generation,
        _render_tokenizer,
        _render_contradictions,
        _render_layers,
        _render_memory,
    ):
        step(info, console)


def _render_source(info: ModelInfo, console) -> None:
    """The path and format, the files with their sizes, and the tensor types stored."""
    section(console, "source")
    console.print(f"{info.path}  [bold]format[/bold] {info.format}")
    table = Table(title="files", title_justify="left")
    table.add_column("file")
    table.add_column("bytes", justify="right")
    table.add_column("size", justify="right")
    for name, size in info.files:
        table.add_row(name, str(size), human_bytes(size))
    console.print(table)
    table = Table(title="tensor types", title_justify="left")
    for column in ("type", "tensors", "parameters", "bytes"):
        table.add_column(column, justify="left" if column == "type" else "right")
    for kind, entry in sorted(info.tensor_types.items()):
        table.add_row(kind, str(entry["tensors"]), f"{entry['parameters']:,}", human_bytes(entry["bytes"]))
    console.print(table)


def _render_config(info: ModelInfo, console) -> None:
    """The config as read (defaults dimmed), then the facts derived from it."""
    section(console, f"model config ({info.config_source}, defaults filled in)")
    table = Table()
    table.add_column("key")
    table.add_column("value", overflow="fold")
    table.add_column("from")
    for key, value, source in info.config_rows:
        table.add_row(key, repr(value), source, style="dim" if source.startswith("default") else None)
    console.print(table)
    table = Table(title="derived", title_justify="left")
    table.add_column("fact")
    table.add_column("value", overflow="fold")
    for key, value in info.derived.items():
        table.add_row(key, repr(value) if not isinstance(value, str) else value)
    console.print(table)


def _render_generation(info: ModelInfo, console) -> None:
    section(console, "generation")
    console.print(settings_table(info.generation))


def _render_tokenizer(info: ModelInfo, console) -> None:
    """The tokenizer's model, pipeline and special tokens."""
    section(console, "tokenizer")
    if info.tokenizer is None:
        console.print("no tokenizer in this checkpoint")
        return
    t = info.tokenizer
    console.print(
        f"{t['type']} (pre-tokenizer {t['pre_tokenizer']}, decoder {t['decoder']}), "
        f"{t['vocab_size']} tokens, from {t['source']}"
    )
    console.print(
        f"adds BOS: {t['adds_bos']}   adds EOS: {t['adds_eos']}   chat template: "
        + (f"yes ({t['chat_template_chars']} characters)" if t["chat_template"] else "no")
    )
    table = Table(title="special tokens", title_justify="left")
    table.add_column("role")
    table.add_column("token")
    table.add_column("id", justify="right")
    for role, entry in t["special_tokens"].items():
        table.add_row(role, repr(entry["token"]), str(entry["id"]))
    console.print(table)


def _render_contradictions(info: ModelInfo, console) -> None:
    section(console, "contradictions")
    if not info.contradictions:
        console.print("none: config, generation settings and tokenizer agree on special tokens")
    for c in info.contradictions:
        console.print(f"[yellow]warning[/yellow] ({c.kind}): {c.message}", highlight=False)


def _render_layers(info: ModelInfo, console) -> None:
    """One row per module (runs of identical layers together), with the totals."""
    section(console, "layers")
    notes = any(r.note for r in info.layers)
    table = Table(show_footer=True)
    table.add_column("module", footer="total", overflow="fold")
    table.add_column("type")
    table.add_column("tensors: shape, stored type", overflow="fold")
    table.add_column("×", justify="right")
    table.add_column("parameters", justify="right", footer=f"{info.total_parameters:,}", no_wrap=True)
    table.add_column("bytes", justify="right", footer=f"{info.total_bytes:,}", no_wrap=True)
    if notes:
        table.add_column("note", overflow="fold")
    for r in info.layers:
        tensors = ", ".join(f"{n} {list(s)} {t}" for n, s, t in r.tensors)
        cells = [r.name, r.kind, tensors, str(r.count), f"{r.parameters:,}", f"{r.nbytes:,}"]
        table.add_row(*cells + ([r.note] if notes else []))
    console.print(table)
    console.print(
        f"{info.total_parameters:,} parameters ({human_count(info.total_parameters)}), "
        f"{human_bytes(info.total_bytes)} of tensors in the files"
    )


def _render_memory(info: ModelInfo, console) -> None:
    """The weights at each storage type, and a full-context KV cache."""
    section(console, "memory")
    console.print(_bytes_table("weights as", info.memory))
    console.print("(weights only: int8 / int4 block scales and activations come on top)")
    console.print(f"KV cache for the full context ({info.kv_cache['positions']} positions, batch 1):")
    console.print(_bytes_table("dtype", {name: info.kv_cache[name] for name in KV_DTYPES}))


def _bytes_table(what: str, sizes: dict[str, int]):
    table = Table()
    table.add_column(what)
    table.add_column("bytes", justify="right")
    table.add_column("size", justify="right")
    for name, n in sizes.items():
        table.add_row(name, f"{n:,}", human_bytes(n))
    return table
