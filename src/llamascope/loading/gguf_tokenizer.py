"""The tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata.

`tokenizer.ggml.model` says which kind:
- `llama`: a SentencePiece BPE vocabulary (tokens, scores, token types), built by `spm.py`'s
  builder exactly as for a LLaMA-1/2 tokenizer.model;
- `gpt2`: a byte-level BPE with the file's merges, split into words by the pre-tokenizer that
  `tokenizer.ggml.pre` names (see `PRE_TOKENIZERS`).
Special tokens, add-BOS/EOS flags and the chat template go through `Tokenizer.from_settings`.
A vocabulary-only GGUF (no tensors) is a valid source.
"""

from __future__ import annotations

from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from ..errors import LlamascopeError, library_call
from .gguf_metadata import GGUFMetadata, read_gguf, token_id
from .spm import BYTE, CONTROL, UNKNOWN, USER_DEFINED, SpmVocabulary, spm_tokenizer

# LLaMA-3's word split, as in its tokenizer.json.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2's (and Qwen2.5's, Qwen3's): LLaMA-3's with every digit on its own.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_pre(add_prefix_space: bool) -> pre_tokenizers.PreTokenizer:
    """GPT-2's byte-level split (its own regex)."""
    return pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, trim_offsets=True, use_regex=True)


def _smollm_pre(add_prefix_space: bool) -> pre_tokenizers.PreTokenizer:
    """SmolLM / SmolLM2: every digit on its own, then GPT-2's byte-level split."""
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_pre(add_prefix_space)])


def _regex_then_bytes(split: str, add_prefix_space: bool) -> pre_tokenizers.PreTokenizer:
    """A regex split, then bytes to the byte-level alphabet without a second regex."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, trim_offsets=True, use_regex=False),
        ]
    )


def _llama3_pre(add_prefix_space: bool) -> pre_tokenizers.PreTokenizer:
    return _regex_then_bytes(LLAMA3_SPLIT, add_prefix_space)


def _qwen2_pre(add_prefix_space: bool) -> pre_tokenizers.PreTokenizer:
    return _regex_then_bytes(QWEN2_SPLIT, add_prefix_space)


# tokenizer.ggml.pre -> (pre-tokenizer, ignore_merges, adds BOS when the file does not say,
# NFC normalisation first: Qwen2's tokenizer.json has it)
PRE_TOKENIZERS = {
    "default": (_gpt2_pre, False, False, False),
    "gpt2": (_gpt2_pre, False, False, False),
    "gpt-2": (_gpt2_pre, False, False, False),
    "smollm": (_smollm_pre, False, False, False),
    "llama-bpe": (_llama3_pre, True, True, False),
    "llama3": (_llama3_pre, True, True, False),
    "llama-v3": (_llama3_pre, True, True, False),
    "qwen2": (_qwen2_pre, False, False, True),
}


def _added_tokens(tokens: list[str], types: list[int] | None) -> tuple[list[AddedToken], list[AddedToken]]:
    """(special, plain): unknown and control tokens are special, user-defined ones plain."""
    if types is None:
        return [], []
    special = [
        AddedToken(t, normalized=False, special=True) for t, kind in zip(tokens, types) if kind in (UNKNOWN, CONTROL)
    ]
    plain = [AddedToken(t, normalized=False, special=False) for t, kind in zip(tokens, types) if kind == USER_DEFINED]
    return special, plain


def _token_types(meta: GGUFMetadata, count: int) -> list[int] | None:
    types = meta.array("tokenizer.ggml.token_type", None)
    if types is not None and len(types) != count:
        raise LlamascopeError(
            f"{meta.path}: metadata key 'tokenizer.ggml.token_type' has {len(types)} entries for {count} tokens"
        )
    return types


def _spm_backend(meta: GGUFMetadata, tokens: list[str]) -> tokenizers.Tokenizer:
    scores = meta.array("tokenizer.ggml.scores")
    if len(scores) != len(tokens):
        raise LlamascopeError(
            f"{meta.path}: metadata key 'tokenizer.ggml.scores' has {len(scores)} entries for {len(tokens)} tokens"
        )
    types = _token_types(meta, len(tokens)) or [1] * len(tokens)
    vocab = SpmVocabulary(
        pieces=tokens,
        scores=[float(s) for s in scores],
        types=types,
        add_prefix_space=meta.flag("tokenizer.ggml.add_space_prefix", True),
        byte_fallback=BYTE in types,
        source=str(meta.path),
    )
    return spm_tokenizer(vocab)


def _merges(meta: GGUFMetadata) -> list[tuple[str, str]]:
    """`tokenizer.ggml.merges` entries "left right", cut at the first space after the first character."""
    merges = []
    for index, merge in enumerate(meta.array("tokenizer.ggml.merges")):
        cut = merge.find(" ", 1)
        if cut < 0:
            raise LlamascopeError(
                f"{meta.path}: metadata key 'tokenizer.ggml.merges' entry {index} "
                f"({merge!r}) is not two tokens separated by a space"
            )
        merges.append((merge[:cut], merge[cut + 1 :]))
    return merges


def _bpe_backend(meta: GGUFMetadata, tokens: list[str], pre: str) -> tokenizers.Tokenizer:
    if pre not in PRE_TOKENIZERS:
        raise LlamascopeError(
            f"{meta.path}: metadata key 'tokenizer.ggml.pre' = {pre!r} names a pre-tokenizer llamascope does "
            f"not know (known: {', '.join(sorted(PRE_TOKENIZERS))})"
        )
    make_pre, ignore_merges, _, nfc = PRE_TOKENIZERS[pre]
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    merges = _merges(meta)
    where = f"{meta.path}: metadata key 'tokenizer.ggml.merges' is not usable"
    try:
        model = library_call(lambda: models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges), where)
    except LlamascopeError:  # name the entry
        for index, (left, right) in enumerate(merges):
            missing = next((t for t in (left, right, left + right) if t not in vocab), None)
            if missing is not None:
                raise LlamascopeError(
                    f"{meta.path}: metadata key 'tokenizer.ggml.merges' entry {index} ({left!r} {right!r}) needs "
                    f"the token {missing!r}, which 'tokenizer.ggml.tokens' does not have"
                ) from None
        raise
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = make_pre(bool(meta.flag("tokenizer.ggml.add_space_prefix", False)))
    if nfc:
        backend.normalizer = normalizers.NFC()
    backend.decoder = decoders.ByteLevel()
    special, plain = _added_tokens(tokens, _token_types(meta, len(tokens)))
    backend.add_special_tokens(special)
    backend.add_tokens(plain)
    return backend


def _settings(meta: GGUFMetadata, tokens: list[str], kind: str, pre: str | None) -> dict:
    """tokenizer_config.json-style settings: special tokens, add-BOS/EOS, chat template."""
    settings: dict = {}
    # llama.cpp's defaults when a SentencePiece file names no ids: unk 0, bos 1, eos 2.
    defaults = {"unk_token": 0, "bos_token": 1, "eos_token": 2} if kind == "llama" else {}
    for role, key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ):
        index = token_id(meta, f"tokenizer.ggml.{key}", defaults.get(role))
        if index is None:
            continue
        if not 0 <= index < len(tokens):
            raise LlamascopeError(
                f"{meta.path}: metadata key 'tokenizer.ggml.{key}' = {index} is outside the "
                f"vocabulary of {len(tokens)} tokens"
            )
        settings[role] = tokens[index]
    adds_bos_by_default = kind == "llama" or (pre in PRE_TOKENIZERS and PRE_TOKENIZERS[pre][2])
    settings["add_bos_token"] = meta.flag("tokenizer.ggml.add_bos_token", adds_bos_by_default)
    settings["add_eos_token"] = meta.flag("tokenizer.ggml.add_eos_token", False)
    if "bos_token" not in settings:
        settings["add_bos_token"] = False
    if "eos_token" not in settings:
        settings["add_eos_token"] = False
    template = meta.string("tokenizer.chat_template", None)
    if template is not None:
        settings["chat_template"] = template
    return settings


def tokenizer_backend_from_gguf(meta: GGUFMetadata) -> tuple[tokenizers.Tokenizer, dict]:
    """(backend, settings) for the tokenizer in a GGUF file's metadata."""
    kind = meta.string("tokenizer.ggml.model", None)
    if kind is None:
        raise LlamascopeError(f"{meta.path}: no tokenizer in this GGUF (missing metadata key 'tokenizer.ggml.model')")
    tokens = meta.array("tokenizer.ggml.tokens")
    pre = meta.string("tokenizer.ggml.pre", None)
    if kind == "llama":
        backend = _spm_backend(meta, tokens)
    elif kind == "gpt2":
        backend = _bpe_backend(meta, tokens, pre or "default")
    else:
        raise LlamascopeError(
            f"{meta.path}: metadata key 'tokenizer.ggml.model' = {kind!r} is not supported (supported: llama, gpt2)"
        )
    return backend, _settings(meta, tokens, kind, pre)


def tokenizer_settings_from_gguf(path_or_reader) -> tuple[tokenizers.Tokenizer, dict, str]:
    """(backend, settings keyed as in tokenizer_config.json, source) from a GGUF path (model or
    vocabulary-only) or its parsed header (gguf_file.GGUFFile): what `Tokenizer.from_gguf` builds on."""
    if isinstance(path_or_reader, (str, Path)):
        path = Path(path_or_reader)
        reader = read_gguf(path)
    else:
        reader = path_or_reader
        path = reader.path
    backend, settings = tokenizer_backend_from_gguf(GGUFMetadata(reader, path))
    return backend, settings, str(path)
