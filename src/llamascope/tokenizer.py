"""One tokenizer over `tokenizers.Tokenizer`: encoding, special tokens, chat templates, streaming.

Sources: a Hugging Face folder (tokenizer.json, or tokenizer.model for SentencePiece LLaMA-1/2
folders, plus tokenizer_config.json), or GGUF metadata (see `loading/gguf_tokenizer.py`).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import tokenizers
from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from tokenizers import processors

from .config import read_json
from .errors import LlamascopeError, library_call
from .loading.gguf_tokenizer import tokenizer_settings_from_gguf
from .loading.spm import tokenizer_from_sentencepiece


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        add_bos: bool | None = None,
        add_eos: bool | None = None,
        chat_template: str | None = None,
        source: str = "",
    ):
        """`add_bos` / `add_eos`: None keeps the backend's post-processor as it is; True or False
        replaces it with one that adds exactly those tokens (transformers' add_bos_token rule)."""
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.chat_template = chat_template
        self.source = source
        if add_bos is not None or add_eos is not None:
            where = f"{source or 'tokenizer'}: cannot add the special tokens it names"
            library_call(lambda: self._set_post_processor(bool(add_bos), bool(add_eos)), where)
        probe = self.encode("a", add_special_tokens=True)
        bare = self.encode("a", add_special_tokens=False)
        self.adds_bos = self.bos_id is not None and len(probe) > len(bare) and probe[0] == self.bos_id
        self.adds_eos = self.eos_id is not None and len(probe) > len(bare) and probe[-1] == self.eos_id

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        bos = [(self.bos_token, self.token_to_id(self.bos_token))] if add_bos and self.bos_token else []
        eos = [(self.eos_token, self.token_to_id(self.eos_token))] if add_eos and self.eos_token else []
        single = " ".join([t for t, _ in bos] + ["$A:0"] + [t for t, _ in eos])
        pair = " ".join(
            [t for t, _ in bos]
            + ["$A:0"]
            + [t for t, _ in eos]
            + [t + ":1" for t, _ in bos]
            + ["$B:1"]
            + [t + ":1" for t, _ in eos]
        )
        self.backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=bos + eos)

    # ---- ids of special tokens -----------------------------------------------------------
    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self.token_to_id(self.pad_token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def special_tokens(self) -> dict[str, tuple[str, int | None]]:
        out = {}
        for role in ("bos", "eos", "pad", "unk"):
            token = getattr(self, f"{role}_token")
            if token is not None:
                out[role] = (token, self.token_to_id(token))
        return out

    # ---- encode / decode -----------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        check_text(text, "text to encode")
        where = f"{self.source or 'tokenizer'}: cannot encode the text"
        return library_call(lambda: self.backend.encode(text, add_special_tokens=add_special_tokens).ids, where)

    def tokens(self, ids: Iterable[int]) -> list[str]:
        return [self.backend.id_to_token(int(i)) for i in ids]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        where = f"{self.source or 'tokenizer'}: cannot decode the ids"
        return library_call(lambda: self.backend.decode(ids, skip_special_tokens=skip_special_tokens), where)

    def stream_decoder(self, prompt_ids: list[int] | None = None, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, prompt_ids or [], skip_special_tokens)

    # ---- chat ----------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        """Render messages the way transformers' apply_chat_template does (sandboxed jinja2)."""
        if not self.chat_template:
            raise LlamascopeError(f"{self.source or 'tokenizer'}: this model has no chat template")

        def raise_exception(message: str):
            raise TemplateError(message)

        env = _TemplateSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, separators=None, sort_keys=False: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys
        )
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        where = f"{self.source or 'tokenizer'}: chat template"
        try:
            template = env.from_string(self.chat_template)
            chunks = template.generate(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                pad_token=self.pad_token or "",
                unk_token=self.unk_token or "",
                **extra,
            )
            return _bounded_text(chunks, where)
        except LlamascopeError:
            raise
        except TemplateError as e:
            raise LlamascopeError(f"{where}: {e}") from None
        except Exception as e:  # noqa: BLE001 - the template is the file's code: any failure is its own
            raise LlamascopeError(f"{where} failed: {type(e).__name__}: {e}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> list[int]:
        """The template writes any BOS itself, so no special tokens are added (no double BOS).
        `extra`: more template variables (`tools`)."""
        text = self.apply_chat_template(messages, add_generation_prompt, **extra)
        return self.encode(text, add_special_tokens=False)

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_hf_folder(cls, folder: Path, config=None) -> Tokenizer:
        folder = Path(folder)
        settings: dict = {}
        if (folder / "special_tokens_map.json").is_file():
            settings.update(read_json(folder / "special_tokens_map.json"))
        if (folder / "tokenizer_config.json").is_file():
            settings.update(read_json(folder / "tokenizer_config.json"))
        if (folder / "tokenizer.json").is_file():
            path = str(folder / "tokenizer.json")
            backend = library_call(lambda: tokenizers.Tokenizer.from_file(path), f"{path}: not a readable tokenizer")
        elif (folder / "tokenizer.model").is_file():
            backend, defaults = tokenizer_from_sentencepiece(folder / "tokenizer.model")
            for key, value in defaults.items():
                settings.setdefault(key, value)
        else:
            raise LlamascopeError(f"{folder}: no tokenizer.json or tokenizer.model")
        if (folder / "chat_template.jinja").is_file():
            settings["chat_template"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        return cls.from_settings(backend, settings, source=str(folder))

    @classmethod
    def from_settings(cls, backend: tokenizers.Tokenizer, settings: dict, source: str) -> Tokenizer:
        """Special tokens, add-BOS/EOS flags and the chat template, keyed as in tokenizer_config.json."""
        chat_template = settings.get("chat_template")
        if isinstance(chat_template, list):  # several named templates: take "default"
            chat_template = next((t["template"] for t in chat_template if t.get("name") == "default"), None)
        return cls(
            backend,
            bos_token=_token_text(settings.get("bos_token")),
            eos_token=_token_text(settings.get("eos_token")),
            pad_token=_token_text(settings.get("pad_token")),
            unk_token=_token_text(settings.get("unk_token")),
            add_bos=settings.get("add_bos_token"),
            add_eos=settings.get("add_eos_token"),
            chat_template=chat_template,
            source=source,
        )

    @classmethod
    def from_gguf(cls, path_or_reader) -> Tokenizer:
        """The tokenizer a GGUF file describes (a model or a vocabulary-only file), from its path or
        its parsed header (loading.gguf_file.GGUFFile)."""
        backend, settings, source = tokenizer_settings_from_gguf(path_or_reader)
        return cls.from_settings(backend, settings, source=source)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """A --tokenizer argument: a folder, a tokenizer.json, a tokenizer.model or a GGUF file."""
        path = Path(path)
        if not path.exists():
            raise LlamascopeError(f"{path}: no such file or folder")
        if path.is_dir():
            return cls.from_hf_folder(path)
        if path.name.endswith(".json"):
            return cls.from_hf_folder_files(path)
        if path.suffix == ".gguf" or path.read_bytes()[:4] == b"GGUF":
            return cls.from_gguf(path)
        if path.suffix == ".model":
            backend, defaults = tokenizer_from_sentencepiece(path)
            return cls.from_settings(backend, defaults, source=str(path))
        raise LlamascopeError(f"{path}: not a tokenizer (expected a folder, tokenizer.json, tokenizer.model or .gguf)")

    @classmethod
    def from_hf_folder_files(cls, tokenizer_json: Path) -> Tokenizer:
        """A lone tokenizer.json: its sibling tokenizer_config.json is used when present."""
        folder = tokenizer_json.parent
        if tokenizer_json.name == "tokenizer.json":
            return cls.from_hf_folder(folder)
        backend = library_call(
            lambda: tokenizers.Tokenizer.from_file(str(tokenizer_json)), f"{tokenizer_json}: not a readable tokenizer"
        )
        return cls(backend, source=str(tokenizer_json))


def vocabulary_difference(a: Tokenizer | None, b: Tokenizer | None, a_config=None, b_config=None) -> str | None:
    """How two models' vocabularies differ, in a few words, or None where they agree: the same
    token for every id of their tokenizers (added tokens included). Without both tokenizers, the
    models' vocab_size (from their configs) must agree instead."""
    if a is None or b is None:
        sizes = (a_config.vocab_size, b_config.vocab_size) if a_config and b_config else (None, None)
        return None if sizes[0] == sizes[1] else f"vocab_size {sizes[0]} against {sizes[1]}"
    va, vb = a.backend.get_vocab(with_added_tokens=True), b.backend.get_vocab(with_added_tokens=True)
    if len(va) != len(vb):
        return f"{len(va)} tokens against {len(vb)}"
    for token, token_id in sorted(va.items(), key=lambda item: item[1]):
        if vb.get(token) != token_id:
            other = "absent" if token not in vb else f"id {vb[token]}"
            return f"token {token!r} is id {token_id} in the first, {other} in the second"
    return None


def check_text(text: str, where: str) -> None:
    """Refuse text that is not valid Unicode, naming where it came from: a lone surrogate, which is
    what invalid UTF-8 bytes in argv become, or an unpaired \\ud800-\\udfff escape in JSON."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise LlamascopeError(
            f"{where}: not valid text: character {e.start} is a lone surrogate ({text[e.start]!r}; invalid UTF-8 "
            f"bytes, or an unpaired surrogate escape)"
        ) from None


# Limits on what a chat template may do (its code comes with the model file): the rendered text's
# length, the time it takes, and any one string or list it builds by repetition.
TEMPLATE_MAX_CHARS = 4 << 20
TEMPLATE_MAX_SECONDS = 10.0


class _TemplateSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox (no attributes of Python internals, nothing changed in place;
    its ranges are bounded already), where `*` may not build a string or list of more than
    TEMPLATE_MAX_CHARS items and `**` no number of more than a few thousand digits."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if (
                    isinstance(seq, (str, list, tuple))
                    and isinstance(times, int)
                    and len(seq) * times > TEMPLATE_MAX_CHARS
                ):
                    raise SecurityError(f"repeats {len(seq)} items {times} times (limit {TEMPLATE_MAX_CHARS})")
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(right) > 1000:
            raise SecurityError(f"raises a number to the power {right} (limit 1000)")
        return super().call_binop(context, operator, left, right)


def _bounded_text(chunks: Iterator[str], where: str) -> str:
    """A template's output, refused once longer than TEMPLATE_MAX_CHARS or slower than
    TEMPLATE_MAX_SECONDS. The time is checked on every line the template's compiled code runs (a
    trace on this thread while it renders), so a loop that writes nothing is stopped too."""
    deadline = time.monotonic() + TEMPLATE_MAX_SECONDS

    def each_line(frame, event, arg):
        if time.monotonic() > deadline:
            raise LlamascopeError(f"{where}: rendering took over {TEMPLATE_MAX_SECONDS:g} s")
        return each_line

    def on_call(frame, event, arg):
        return each_line if frame.f_code.co_filename == "<template>" else None

    out, size, previous = [], 0, sys.gettrace()
    sys.settrace(on_call)
    try:
        for chunk in chunks:
            out.append(chunk)
            size += len(chunk)
            if size > TEMPLATE_MAX_CHARS:
                raise LlamascopeError(f"{where}: its output passes {TEMPLATE_MAX_CHARS} characters")
    finally:
        sys.settrace(previous)
    return "".join(out)


class StreamDecoder:
    """Turns a stream of token ids into text deltas that never split a character or lose a space.

    Each delta is the difference between decoding a short window with and without the newest
    tokens; text that ends in an incomplete UTF-8 sequence is held back until it completes.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_ids)
        self.read_offset = len(self.ids)
        self.prefix_offset = max(0, self.read_offset - 6)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            delta = text[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :] if text.startswith(prefix) else ""
