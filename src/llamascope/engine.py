"""The Python API in one object: a loaded model with its tokenizer and generation settings.

    from llamascope import Engine
    engine = Engine.load("path/to/hf-folder-or.gguf")       # None: the default SmolLM2 model
    print(engine.generate("Once upon a time", max_new_tokens=16).text)
    for delta in engine.stream("Once upon a time", max_new_tokens=16):
        print(delta, end="")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from .config import GenerationConfig
from .errors import LlamascopeError
from .generation import GenerationResult, generate, stream
from .loading import LoadedModel, load_model


@dataclass
class Completion:
    prompt: str
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    finish_reason: str

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "prompt_ids": self.prompt_ids, "output_ids": self.output_ids,
                "text": self.text, "finish_reason": self.finish_reason}


class Engine:
    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.model = loaded.model
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.generation_json = loaded.generation_json

    @classmethod
    def load(cls, path: str | Path | None = None, dtype: str | torch.dtype = "auto", device: str = "cpu",
             progress: Callable[[int, int], None] | None = None) -> "Engine":
        return cls(load_model(path, dtype=dtype, device=device, progress=progress))

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise LlamascopeError(f"{self.loaded.checkpoint.path}: this checkpoint has no tokenizer")
        return self.tokenizer

    def generation_config(self, **call) -> GenerationConfig:
        """Settings in force: call arguments over generation_config.json over config.json."""
        return GenerationConfig.resolve(self.config, self.generation_json, **call)

    def encode(self, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
        tokenizer = self._need_tokenizer()
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
            return tokenizer.encode_chat(messages)
        return tokenizer.encode(prompt)

    def generate(self, prompts: str | list[str], chat: bool = False, **settings) -> Completion | list[Completion]:
        """Generate for one prompt or a batch (left-padded, same tokens as each alone)."""
        single = isinstance(prompts, str)
        texts = [prompts] if single else list(prompts)
        ids = [self.encode(t, chat=chat) for t in texts]
        result = self.generate_ids(ids, **settings)
        completions = [
            Completion(text, p, out, self.tokenizer.decode(out, skip_special_tokens=True), reason)
            for text, p, out, reason in zip(texts, ids, result.output_ids, result.finish_reasons)
        ]
        return completions[0] if single else completions

    def generate_ids(self, prompts: list[list[int]] | list[int], **settings) -> GenerationResult:
        config = self.generation_config(**settings)
        self._check_length(prompts if prompts and isinstance(prompts[0], list) else [prompts])
        return generate(self.model, prompts, config)

    def stream(self, prompt: str | list[int], chat: bool = False, **settings) -> Iterator[str]:
        """Text deltas as tokens are chosen (greedy or sampled; one prompt)."""
        ids = self.encode(prompt, chat=chat) if isinstance(prompt, str) else list(prompt)
        self._check_length([ids])
        config = self.generation_config(**settings)
        for _, delta in stream(self.model, self._need_tokenizer(), ids, config):
            if delta:
                yield delta

    def _check_length(self, prompts: list[list[int]]) -> None:
        context = self.config.max_position_embeddings
        for p in prompts:
            if len(p) >= context and self.config.rope_type != "dynamic":
                raise LlamascopeError(
                    f"prompt of {len(p)} tokens does not fit the model's context of {context} positions")

