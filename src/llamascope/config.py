"""Model and generation settings, with Hugging Face key names and precedence rules.

`ModelConfig` reads config.json in both layouts found in the wild: transformers 4.x
(`rope_theta` + `rope_scaling`) and transformers 5.x (`rope_parameters`). Keys it does not
know are kept in `extra`. `GenerationConfig` resolves call arguments over generation_config.json
over config.json, and records where each value came from.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import LlamascopeError

log = logging.getLogger("llamascope")

# How many new tokens an entry point generates when its caller does not say, one number per kind:
#   "cli"                `llamascope generate` (and the other one-shot commands)
#   "chat"               `llamascope chat`: one assistant turn
#   "server_completion"  the server's /v1/completions without max_tokens (OpenAI's 16), clipped to
#                        the room the context leaves (`room_for_new_tokens`)
# Not listed, because their rule is not a number: the Python API (`Engine.generate`, `generate`)
# follows transformers - generation_config.json's max_new_tokens / max_length, else max_length 20
# capped at the context (`GenerationConfig.max_length_for`); the server's /v1/chat/completions
# without max_tokens generates up to the end of the context (OpenAI's rule).
DEFAULT_MAX_NEW_TOKENS = {"cli": 32, "chat": 256, "server_completion": 16}


@dataclass(frozen=True)
class Architecture:
    """What one of LLaMA's relatives changes in the decoder, as transformers' class for it does.

    The decoder (model.py) is one model; these are its options. Biases: LLaMA and Qwen3 read
    `attention_bias` (q, k, v and o) and LLaMA `mlp_bias`; Qwen2 always biases q, k and v (not o);
    Mistral and Phi-3 have none. `sliding`: how `sliding_window` reaches the layers ("none", "all"
    layers, or by "layer_types"). `fused`: the checkpoint stores qkv_proj and gate_up_proj, which
    loading splits into the separate projections. `defaults`: transformers' values for keys a
    config.json may leave out, where they differ from LLaMA's."""

    model_type: str
    hf_class: str
    gguf_name: str  # general.architecture of its GGUF files
    config_biases: tuple[str, ...] = ()  # which of attention_bias and mlp_bias it reads
    qkv_bias: bool = False  # q, k and v always biased
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before RoPE
    sliding: str = "none"
    fused: bool = False
    # transformers' Phi-3 generate(): the first step past longrope's trained context recomputes the
    # whole sequence, its cached keys being rotated with the short factors (`longrope_restarts`)
    longrope_restart: bool = False
    defaults: tuple[tuple[str, Any], ...] = ()
    differs: str = ""  # one line for `info`: what it changes from LLaMA


ARCHITECTURES = {
    arch.model_type: arch
    for arch in (
        Architecture(
            "llama",
            "LlamaForCausalLM",
            "llama",
            config_biases=("attention_bias", "mlp_bias"),
            differs="the reference decoder",
        ),
        Architecture(
            "mistral",
            "MistralForCausalLM",
            "llama",
            sliding="all",
            defaults=(("sliding_window", 4096),),
            differs="sliding-window attention (sliding_window), no biases",
        ),
        Architecture(
            "qwen2",
            "Qwen2ForCausalLM",
            "qwen2",
            qkv_bias=True,
            sliding="layer_types",
            defaults=(("use_sliding_window", False), ("sliding_window", 4096), ("max_window_layers", 28)),
            differs="biases on q, k and v (not o)",
        ),
        Architecture(
            "qwen3",
            "Qwen3ForCausalLM",
            "qwen3",
            config_biases=("attention_bias",),
            qk_norm=True,
            sliding="layer_types",
            defaults=(
                ("head_dim", 128),
                ("use_sliding_window", False),
                ("sliding_window", 4096),
                ("max_window_layers", 28),
            ),
            differs="RMSNorm over each head's queries and keys (q_norm, k_norm), explicit head_dim",
        ),
        Architecture(
            "phi3",
            "Phi3ForCausalLM",
            "phi3",
            sliding="all",
            fused=True,
            longrope_restart=True,
            defaults=(("rms_norm_eps", 1e-5),),
            differs="fused qkv_proj and gate_up_proj, longrope scaling, sliding_window",
        ),
    )
}
# The rope_scaling keys each rope_type needs; model.py's ROPE_INIT computes each type's frequencies
# (tests/test_loading.py checks both list the same types). Keys in ROPE_FACTOR_LISTS are lists of
# head_dim / 2 positive numbers, the others positive numbers.
ROPE_TYPES = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
}
ROPE_FACTOR_LISTS = ("short_factor", "long_factor")
# rope_types whose frequencies depend on the sequence's length (the largest position of a call)
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")
# Legacy rope_type names transformers reads as another type (Phi-3's "su" and "yarn": longrope).
ROPE_TYPE_ALIASES = {"phi3": {"su": "longrope", "yarn": "longrope"}}
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def read_json(path: Path) -> dict:
    """Read a JSON object from `path`, with an error naming the file when it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise LlamascopeError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlamascopeError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise LlamascopeError(f"{path}: JSON nested too deeply to read") from None
    except OSError as e:  # a folder where a file should be, no permission to read it, ...
        raise LlamascopeError(f"{path}: cannot read it ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise LlamascopeError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def as_id_list(value: Any) -> list:
    """A token id setting (one id, a list, or none) as a list: eos may be any of the three. The
    items are kept as they are; the setting's rule checks that they are ids."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


@dataclass
class ModelConfig:
    """A LLaMA-family architecture, keyed like Hugging Face's configs (LlamaConfig, and the keys its
    relatives add: see `Architecture`)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # keys this many positions back and nearer (the query's own included)
    use_sliding_window: bool = False  # (Qwen2, Qwen3: whether sliding_window applies at all)
    max_window_layers: int | None = None  # (Qwen2, Qwen3: layers from this index on slide, without layer_types)
    layer_types: list[str] | None = None  # "full_attention" / "sliding_attention" per layer
    partial_rotary_factor: float = 1.0
    torch_dtype: str | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    model_type: str = "llama"
    extra: dict = field(default_factory=dict)
    # Keys that the source did not give and that were filled with the default.
    defaulted: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and _is_int(self.hidden_size) and _is_int(self.num_attention_heads):
            if self.num_attention_heads > 0:  # (validate() refuses the others by key)
                self.head_dim = self.hidden_size // self.num_attention_heads

    # ---- derived facts -------------------------------------------------------------------
    @property
    def architecture(self) -> Architecture:
        return ARCHITECTURES[self.model_type]

    @property
    def qkv_bias(self) -> bool:
        """Whether q_proj, k_proj and v_proj have biases (o_proj's is `attention_bias` alone)."""
        return self.attention_bias or self.architecture.qkv_bias

    @property
    def qk_norm(self) -> bool:
        return self.architecture.qk_norm

    def layer_window(self, index: int) -> int | None:
        """How far back layer `index` attends (None: the whole sequence), as transformers' masks do:
        a query at cache column c sees columns c - window + 1 .. c."""
        sliding = self.architecture.sliding
        if sliding == "all":
            return self.sliding_window
        if sliding == "layer_types" and self.use_sliding_window and self.sliding_window is not None:
            if self.layer_types is not None:
                return self.sliding_window if self.layer_types[index] == "sliding_attention" else None
            return self.sliding_window if index >= (self.max_window_layers or 0) else None
        return None

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    def longrope_restarts(self, columns: int, cached: int) -> bool:
        """Whether a step over `columns` columns, `cached` of them in the KV cache, recomputes them
        all instead (Architecture.longrope_restart): the first step that passes the trained context."""
        if not (self.architecture.longrope_restart and self.rope_type == "longrope"):
            return False
        trained = self.rope_scaling["original_max_position_embeddings"]
        return columns > trained >= cached

    @property
    def rope_varies_with_length(self) -> bool:
        """Whether RoPE's frequencies depend on the largest position of a call (LENGTH_DEPENDENT_ROPE)."""
        return self.rope_type in LENGTH_DEPENDENT_ROPE

    @property
    def context_limit(self) -> int | None:
        """Positions a sequence may use (see `room_for_new_tokens`): max_position_embeddings, or
        None for rope_type "dynamic", whose RoPE stretches to any length."""
        return None if self.rope_type == "dynamic" else self.max_position_embeddings

    @property
    def gqa_group_size(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict, source: str = "config.json") -> ModelConfig:
        data = dict(data)
        given = set(data)
        arch = _architecture_of(data, source)
        data["model_type"] = arch.model_type
        for key in REQUIRED_KEYS:
            if key not in data or data[key] is None:
                raise LlamascopeError(f"{source}: missing required key {key!r}")
        for key, value in arch.defaults:
            data.setdefault(key, value)
        for key in ("attention_bias", "mlp_bias"):  # read by transformers' LLaMA (and Qwen3) only
            if key not in arch.config_biases:
                data.pop(key, None)

        # transformers 5.x writes rope_parameters = {"rope_type": ..., "rope_theta": ..., ...}.
        rope_parameters = data.pop("rope_parameters", None)
        if rope_parameters is not None:
            if not isinstance(rope_parameters, dict):
                raise LlamascopeError(f"{source}: 'rope_parameters' must be an object")
            rope = dict(rope_parameters)
            if "rope_theta" in rope:
                data.setdefault("rope_theta", rope.pop("rope_theta"))
            if "partial_rotary_factor" in rope:
                data.setdefault("partial_rotary_factor", rope.pop("partial_rotary_factor"))
            if rope.get("rope_type", "default") != "default":
                data["rope_scaling"] = rope
            else:
                data.setdefault("rope_scaling", None)
        if isinstance(data.get("rope_scaling"), dict):
            data["rope_scaling"] = _rope_scaling(data, arch)
        if data.get("dtype") is not None and data.get("torch_dtype") is None:
            data["torch_dtype"] = data["dtype"]

        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "defaulted"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        defaulted = tuple(sorted(n for n in names if n not in given))
        try:
            config = cls(**known, extra=extra, defaulted=defaulted)
        except TypeError as e:
            raise LlamascopeError(f"{source}: {e}") from None
        config.validate(source)
        return config

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        return cls.from_dict(read_json(path), source=str(path))

    def validate(self, source: str = "config") -> None:
        for key in REQUIRED_KEYS + ("num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise LlamascopeError(f"{source}: {key!r} must be a positive integer, found {value!r}")
        for key in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, key)
            if not _is_number(value) or value <= 0:
                raise LlamascopeError(f"{source}: {key!r} must be a positive finite number, found {value!r}")
        for key in ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window"):
            if not isinstance(getattr(self, key), bool):
                raise LlamascopeError(f"{source}: {key!r} must be true or false, found {getattr(self, key)!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise LlamascopeError(
                f"{source}: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.hidden_act != "silu":
            raise LlamascopeError(f"{source}: hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        self._validate_window(source)
        self._validate_rope(source)

    def _validate_window(self, source: str) -> None:
        for key in ("sliding_window", "max_window_layers"):
            value = getattr(self, key)
            if value is not None and not (_is_int(value) and value >= (1 if key == "sliding_window" else 0)):
                raise LlamascopeError(f"{source}: {key!r} must be a positive integer or null, found {value!r}")
        kinds = ("full_attention", "sliding_attention")
        if self.layer_types is not None and not (
            isinstance(self.layer_types, list)
            and len(self.layer_types) == self.num_hidden_layers
            and all(kind in kinds for kind in self.layer_types)
        ):
            raise LlamascopeError(
                f"{source}: 'layer_types' must list {' or '.join(map(repr, kinds))} for each of the "
                f"{self.num_hidden_layers} layers, found {self.layer_types!r}"
            )

    def _validate_rope(self, source: str) -> None:
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise LlamascopeError(f"{source}: 'rope_scaling' must be an object or null, found {self.rope_scaling!r}")
        if self.partial_rotary_factor != 1.0:
            raise LlamascopeError(
                f"{source}: partial_rotary_factor {self.partial_rotary_factor!r} is not supported "
                "(llamascope rotates the whole head: 1.0)"
            )
        if not isinstance(self.rope_type, str) or self.rope_type not in ROPE_TYPES:
            raise LlamascopeError(
                f"{source}: rope_scaling rope_type {self.rope_type!r} is not supported "
                f"(supported: {', '.join(ROPE_TYPES)})"
            )
        optional = ("factor", "attention_factor") if self.rope_type == "longrope" else ()
        for key in ROPE_TYPES[self.rope_type] + optional:
            value = self.rope_scaling.get(key)
            if value is None and key in optional:
                continue
            if key not in self.rope_scaling:
                raise LlamascopeError(f"{source}: rope_scaling of type {self.rope_type!r} needs key {key!r}")
            if key in ROPE_FACTOR_LISTS:
                if not (
                    isinstance(value, list)
                    and len(value) == self.head_dim // 2
                    and all(_is_number(v) and v > 0 for v in value)
                ):
                    raise LlamascopeError(
                        f"{source}: rope_scaling {key!r} must be a list of {self.head_dim // 2} positive numbers "
                        f"(head_dim / 2), found {_short(value)}"
                    )
            elif not _is_number(value) or value <= 0:
                raise LlamascopeError(
                    f"{source}: rope_scaling {key!r} must be a positive finite number, found {value!r}"
                )

    def to_hf_dict(self) -> dict:
        """A config.json (transformers 4.x layout, which 5.x also reads)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("extra", "defaulted")}
        out.update(self.extra)
        out.setdefault("architectures", [self.architecture.hf_class])
        return out

    def weight_bytes(self, bytes_per_param: float) -> int:
        return int(self.num_parameters() * bytes_per_param)

    def num_parameters(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.qkv_bias else 0) + (h if self.attention_bias else 0)
        attn += 2 * d if self.qk_norm else 0
        mlp = 3 * h * i + (2 * i + h if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * h
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return embed + self.num_hidden_layers * per_layer + h + head


def longrope_attention_factor(factor: float, trained: int) -> float:
    """LongRoPE's default attention factor (cos and sin are scaled by it) for a context `factor`
    times the `trained` one: sqrt(1 + ln(factor) / ln(trained)), or 1 where factor <= 1
    (transformers' rule; factor is rope_scaling's, else context / trained)."""
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(trained))


def _architecture_of(data: dict, source: str) -> Architecture:
    """The Architecture a config.json names by model_type (or, without one, by its class name)."""
    model_type = data.get("model_type")
    archs = data.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise LlamascopeError(f"{source}: 'architectures' must be a list of class names, found {archs!r}")
    if model_type is not None and not isinstance(model_type, str):
        raise LlamascopeError(f"{source}: 'model_type' must be a name, found {model_type!r}")
    supported = ", ".join(ARCHITECTURES)
    if model_type is None:
        by_class = [arch for arch in ARCHITECTURES.values() if arch.hf_class in archs]
        if by_class:
            return by_class[0]
        if any("Llama" in a for a in archs):
            return ARCHITECTURES["llama"]
        raise LlamascopeError(f"{source}: missing key 'model_type' (expected one of {supported})")
    if model_type not in ARCHITECTURES:
        raise LlamascopeError(
            f"{source}: unsupported architecture model_type={model_type!r} "
            f"(llamascope runs LLaMA and its relatives: model_type {supported})"
        )
    return ARCHITECTURES[model_type]


def _rope_scaling(data: dict, arch: Architecture) -> dict:
    """rope_scaling as transformers reads it for `arch`: legacy type names mapped, and longrope's
    trained context from the top-level original_max_position_embeddings where the class has that key
    (Phi-3: its value, else 4096), else from max_position_embeddings."""
    scaling = dict(data["rope_scaling"])
    kind = scaling.get("rope_type", scaling.get("type"))
    alias = ROPE_TYPE_ALIASES.get(arch.model_type, {}).get(kind)
    if alias is not None:
        scaling.pop("type", None)
        scaling["rope_type"] = kind = alias
    if kind == "longrope":
        if arch.model_type == "phi3":
            scaling["original_max_position_embeddings"] = data.get("original_max_position_embeddings", 4096)
        else:
            scaling.setdefault("original_max_position_embeddings", data.get("max_position_embeddings"))
    return scaling


# ---- the context-length rule ----------------------------------------------------------------


class ContextLengthError(LlamascopeError):
    """A prompt leaves no room for a new token in the context (see `room_for_new_tokens`)."""


def room_for_new_tokens(prompt_length: int, context: int | None) -> int | None:
    """The context-length rule, the one every entry point uses: how many new tokens fit after a
    prompt of `prompt_length` tokens in a context of `context` positions (None: no limit).

    Every token of a finished sequence, the prompt's and each new one (the last included), takes
    one position below `context`, so `context - prompt_length` new tokens fit, and a prompt must
    leave room for at least one: prompt_length <= context - 1, else ContextLengthError. This is
    transformers' cap for its default length (max_length <= max_position_embeddings).

    The limit: `ModelConfig.context_limit` for the Python API (`generate`, `Engine`, so the CLI),
    which is None for rope_type "dynamic"; the slot capacity for the server (the context, or less
    where the KV budget is smaller). Asking for more new tokens than the room: the Python API
    warns and goes on past the context, as transformers does (RoPE takes any position; quality may
    drop); the server refuses a max_tokens the client gave (400, context_length_exceeded) and clips
    its own default to the room, since its KV slots hold no more.
    """
    if context is None:
        return None
    if prompt_length >= context:
        raise ContextLengthError(
            f"prompt of {prompt_length} tokens leaves no room for a new token in the model's context of "
            f"{context} positions (at most {context - 1} prompt tokens)"
        )
    return context - prompt_length


# ---- generation settings --------------------------------------------------------------------

# Settings that only matter when sampling, and their transformers defaults (a greedy or beam
# search run ignores other values with a warning, as transformers does).
SAMPLING_ONLY = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": None, "typical_p": 1.0}
# Settings that only matter for beam search.
BEAM_ONLY = {"length_penalty": 1.0, "early_stopping": False}


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int_at_least(low: int):
    return lambda value: _is_int(value) and value >= low


def _number_in(low: float, high: float, include_low: bool = True):
    return lambda value: _is_number(value) and (low <= value if include_low else low < value) and value <= high


def _optional(check):
    return lambda value: value is None or check(value)


def _token_ids(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(_is_int(t) and t >= 0 for t in value)


def _bad_words(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(_token_ids(w) and w for w in value)


def _stop_strings(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(s, str) and s for s in value)


# Output constraints (constraints.py): each "type" and the key that holds its schema, pattern,
# choices or grammar text (None: nothing more).
CONSTRAINT_KINDS = {
    "json_object": None,
    "json_schema": "schema",
    "regex": "pattern",
    "choice": "choices",
    "grammar": "grammar",
}


def _constraint(value: Any) -> bool:
    kind = value.get("type") if isinstance(value, dict) else None
    return kind in CONSTRAINT_KINDS and (CONSTRAINT_KINDS[kind] is None or CONSTRAINT_KINDS[kind] in value)


# How an assistant model's draft size changes (transformers' num_assistant_tokens_schedule): "constant"
# keeps it; the heuristic ones add 2 after a draft kept whole and take 1 off after one cut short
# (here both start each call at num_assistant_tokens).
ASSISTANT_SCHEDULES = ("constant", "heuristic", "heuristic_transient")

# The rules `GenerationConfig.validate` checks, each (setting, test of its value, what a good value
# is), in this order; the first that fails is reported.
SETTING_RULES = (
    ("max_new_tokens", _optional(_int_at_least(0)), "must be an integer >= 0"),
    ("max_length", _optional(_int_at_least(1)), "must be a positive integer"),
    ("min_new_tokens", _optional(_int_at_least(0)), "must be an integer >= 0"),
    ("min_length", _optional(_int_at_least(0)), "must be an integer >= 0"),
    ("max_time", _optional(lambda v: _is_number(v) and v >= 0), "must be a number of seconds >= 0"),
    ("do_sample", lambda v: isinstance(v, bool), "must be true or false"),
    ("num_beams", _int_at_least(1), "must be an integer >= 1"),
    ("num_return_sequences", _int_at_least(1), "must be an integer >= 1"),
    ("early_stopping", lambda v: isinstance(v, bool) or v == "never", "must be true, false or 'never'"),
    ("length_penalty", _is_number, "must be a finite number"),
    ("repetition_penalty", lambda v: _is_number(v) and v > 0, "must be > 0 (1.0: no penalty)"),
    ("no_repeat_ngram_size", _int_at_least(0), "must be an integer >= 0 (0: off)"),
    ("bad_words_ids", _optional(_bad_words), "must be a non-empty list of non-empty lists of token ids"),
    ("suppress_tokens", _optional(_token_ids), "must be a list of token ids"),
    ("stop_strings", _optional(_stop_strings), "must be a list of non-empty strings"),
    ("output_logprobs", _optional(_int_at_least(0)), "must be an integer >= 0 (the number of alternatives per token)"),
    ("seed", _optional(lambda v: _is_int(v) and -(2**63) <= v < 2**64), "must be an integer from -2**63 to 2**64 - 1"),
    # (pad_token_id -1 is common in LLaMA-1 files: no padding id; padding then takes eos's)
    ("bos_token_id", _optional(_is_int), "must be a token id"),
    ("pad_token_id", _optional(_is_int), "must be a token id"),
    ("eos_token_id", _token_ids, "must be a token id or a list of them"),
    ("use_cache", lambda v: isinstance(v, bool), "must be true or false"),
    ("prompt_lookup_num_tokens", _optional(_int_at_least(1)), "must be an integer >= 1 (or none: off)"),
    ("max_matching_ngram_size", _optional(_int_at_least(1)), "must be an integer >= 1"),
    ("num_assistant_tokens", _int_at_least(1), "must be an integer >= 1"),
    (
        "num_assistant_tokens_schedule",
        lambda v: v in ASSISTANT_SCHEDULES,
        "must be one of " + ", ".join(ASSISTANT_SCHEDULES),
    ),
    ("assistant_confidence_threshold", _number_in(0, 1), "must be in [0, 1] (0: no early end)"),
    ("constraint", _optional(_constraint), "must be an output constraint (constraints.constraint_from makes them)"),
)
# Settings that must agree with others, each (setting, test of the whole config, why), checked
# after SETTING_RULES; `why` may name other settings as {config.name}.
AGREEMENT_RULES = (
    (
        "min_new_tokens",
        lambda c: c.min_new_tokens is None or c.max_new_tokens is None or c.min_new_tokens <= c.max_new_tokens,
        "cannot exceed max_new_tokens={config.max_new_tokens}",
    ),
    (
        "num_return_sequences",
        lambda c: not (c.num_beams == 1 and not c.do_sample and c.num_return_sequences > 1),
        "greedy search returns one sequence: use do_sample=True or num_beams >= num_return_sequences",
    ),
    (
        "num_return_sequences",
        lambda c: not (c.num_beams > 1 and c.num_return_sequences > c.num_beams),
        "cannot exceed num_beams={config.num_beams}",
    ),
    (
        "prompt_lookup_num_tokens",
        lambda c: c.prompt_lookup_num_tokens is None or (c.num_beams == 1 and c.use_cache),
        "works with greedy search or sampling and the KV cache (num_beams=1, use_cache=True); "
        "beams are not speculative here yet",
    ),
)
# Checked only when sampling; otherwise these settings are ignored (with a warning, see SAMPLING_ONLY).
SAMPLING_RULES = (
    (
        "temperature",
        lambda v: _is_number(v) and v > 0,
        "must be a positive number when sampling (for greedy search use do_sample=False)",
    ),
    ("top_k", _optional(_int_at_least(0)), "must be an integer >= 0 (0: off)"),
    ("top_p", _number_in(0, 1, include_low=False), "must be in (0, 1]"),
    ("min_p", _optional(_number_in(0, 1)), "must be in [0, 1]"),
    ("typical_p", _number_in(0, 1, include_low=False), "must be in (0, 1]"),
)


@dataclass
class GenerationConfig:
    """Settings of one generate() call, with transformers' meanings and defaults.

    Lengths: `max_new_tokens` wins over `max_length` (prompt included); with neither, 20 new
    tokens, capped at the model's context (transformers 5.x). `min_new_tokens` wins over
    `min_length` (prompt included). `early_stopping` is True, False or "never" (beam search).
    `stop_strings` end a sequence once its text contains one of them (finish reason "stop").
    `output_logprobs=N` records each chosen token's log-probability and the N most likely
    tokens (log_softmax of the processed scores). `seed` makes sampling reproducible.
    """

    max_new_tokens: int | None = None
    max_length: int | None = None
    min_new_tokens: int | None = None
    min_length: int | None = None
    do_sample: bool = False
    num_beams: int = 1
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    min_p: float | None = None
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    bad_words_ids: list | None = None
    suppress_tokens: list | None = None
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    stop_strings: list[str] | None = None
    max_time: float | None = None
    seed: int | None = None
    output_logprobs: int | None = None
    # prompt lookup decoding (transformers' names): up to this many tokens drafted from n-gram matches
    # in the sequence so far (speculative.py), checked in one pass; None: off
    prompt_lookup_num_tokens: int | None = None
    max_matching_ngram_size: int | None = None  # (None: transformers' 2)
    # assisted decoding (an assistant model drafts; speculative.AssistantDraft), transformers' names and defaults
    num_assistant_tokens: int = 20
    num_assistant_tokens_schedule: str = "constant"
    assistant_confidence_threshold: float = 0.4
    # constrained output (constraints.py): {"type": "json_schema", "schema": {...}}, json_object,
    # regex, choice or grammar; the Engine, the CLI and the server make it from their own fields
    constraint: dict | None = None
    # Where each value came from: "default", "config.json", "generation_config.json" or "call".
    sources: dict = field(default_factory=dict)

    def max_length_for(self, prompt_length: int, context: int | None = None) -> int:
        """Total length (prompt included) at which generation stops, by transformers' rule:
        max_new_tokens wins; then an explicit max_length; else prompt + 20, capped at `context`."""
        if self.max_new_tokens is not None:
            return prompt_length + self.max_new_tokens
        if self.max_length is not None:
            return self.max_length
        default = prompt_length + 20
        return min(default, context) if context is not None else default

    @classmethod
    def resolve(
        cls,
        model_config: ModelConfig | None = None,
        generation_json: dict | None = None,
        generation_source: str = "generation_config.json",
        defaults: dict | None = None,
        **call: Any,
    ) -> GenerationConfig:
        """The settings in force, each from the first of: the call's arguments, generation_config.json,
        config.json, `defaults`, transformers' defaults (the dataclass's). This is the one place
        where that precedence is written: the Python API, the CLI and the server all come here.

        transformers reads generation settings from config.json (bos/eos/pad ids and any
        generation keys such as `max_length` or `temperature` found there) only when there is no
        generation_config.json. Arguments passed as None are treated as not given. `defaults`:
        an entry point's own defaults where they differ from transformers' (the server's OpenAI
        ones); their source is recorded as "default".
        """
        names = {f.name for f in dataclasses.fields(cls)} - {"sources"}
        for key in list(defaults or {}) + list(call):
            if key not in names:
                raise LlamascopeError(f"unknown generation setting {key!r}")
        values: dict[str, Any] = {k: v for k, v in (defaults or {}).items() if v is not None}
        sources: dict[str, str] = {}
        if generation_json is None and model_config is not None:
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                value = getattr(model_config, key)
                if value is not None:
                    values[key], sources[key] = value, "config.json"
            for key, value in (model_config.extra or {}).items():
                if key in names and value is not None:
                    values[key], sources[key] = value, "config.json"
        if generation_json:
            for key, value in generation_json.items():
                if key in names and value is not None:
                    values[key], sources[key] = value, generation_source
        for key, value in call.items():
            if value is not None:
                values[key], sources[key] = value, "call"
        if "eos_token_id" in values:
            values["eos_token_id"] = as_id_list(values["eos_token_id"])
        if isinstance(values.get("stop_strings"), str):
            values["stop_strings"] = [values["stop_strings"]]
        config = cls(**values)
        config.sources = {name: sources.get(name, "default") for name in names}
        config.validate()
        return config

    def validate(self) -> None:
        """Refuse bad settings (LlamascopeError naming the setting) before any compute, by the rules
        of SETTING_RULES, SAMPLING_RULES (when sampling) and AGREEMENT_RULES, in that order; warn
        about settings the chosen decoding mode ignores."""
        for name, check, why in SETTING_RULES + (SAMPLING_RULES if self.do_sample is True else ()):
            if not check(getattr(self, name)):
                raise self._refusal(name, why)
        for name, holds, why in AGREEMENT_RULES:
            if not holds(self):
                raise self._refusal(name, why.format(config=self))
        if not self.do_sample:
            self._warn_ignored("do_sample", SAMPLING_ONLY, "only used when sampling (do_sample=True)")
        if self.num_beams == 1:
            self._warn_ignored("num_beams", BEAM_ONLY, "only used in beam search (num_beams > 1)")

    def _refusal(self, name: str, why: str) -> LlamascopeError:
        return LlamascopeError(f"generation setting {name}={getattr(self, name)!r}: {why}")

    def _warn_ignored(self, mode_name: str, settings: dict, why: str) -> None:
        """transformers' rule: warn about a setting the mode ignores, unless the call chose the
        mode and the setting came from the model's files; a default (`resolve`'s `defaults`
        included) is never worth a warning."""
        mode_from_call = self.sources.get(mode_name) == "call"
        ignored = [
            name
            for name, default in settings.items()
            if getattr(self, name) != default
            and self.sources.get(name) != "default"
            and not (mode_from_call and self.sources.get(name) != "call")
        ]
        if ignored:
            listed = ", ".join(f"{name}={getattr(self, name)!r}" for name in ignored)
            log.warning("generation settings %s are ignored: %s", listed, why)
