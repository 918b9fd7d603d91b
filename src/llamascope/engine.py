"""The Python API in one object: a loaded model with its tokenizer and generation settings.

    from llamascope import Engine
    engine = Engine.load("path/to/hf-folder-or.gguf")       # None: the default SmolLM2 model
    print(engine.generate("Once upon a time", max_new_tokens=16).text)
    for delta in engine.stream("Once upon a time", max_new_tokens=16):
        print(delta, end="")
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from .config import GenerationConfig
from .errors import LlamascopeError
from .generation import GenerationResult, generate, stream
from .loading import LoadedModel, load_model
from .parallel import ParallelGroup, shared_seed


@dataclass
class Completion:
    prompt: str
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    finish_reason: str
    # output_logprobs=N: per new token {"token", "id", "logprob", "top": [...N]} (see GenerationResult)
    logprobs: list[dict] | None = None
    score: float | None = None  # beam search: the sequence's score
    # num_return_sequences > 1: all the prompt's sequences, best (this one) first
    sequences: list["Completion"] | None = None

    def to_json(self) -> dict:
        out = {"prompt": self.prompt, "prompt_ids": self.prompt_ids, "output_ids": self.output_ids,
               "text": self.text, "finish_reason": self.finish_reason}
        out.update(self._extras())
        if self.sequences is not None:
            out["sequences"] = [{"output_ids": c.output_ids, "text": c.text, "finish_reason": c.finish_reason,
                                 **c._extras()} for c in self.sequences]
        return out

    def _extras(self) -> dict:
        extras: dict = {}
        if self.score is not None:
            extras["score"] = self.score
        if self.logprobs is not None:
            extras["logprobs"] = self.logprobs
        return extras


# End-of-turn markers of widespread chat templates (ChatML, LLaMA-3, Phi-3, LLaMA-2).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>")


class Engine:
    def __init__(self, loaded: LoadedModel, parallel: ParallelGroup | None = None):
        self.loaded = loaded
        self.model = loaded.model
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.generation_json = loaded.generation_json
        # Tensor parallelism: every rank holds an Engine and makes the same calls in the same order.
        self.parallel = parallel

    @classmethod
    def load(cls, path: str | Path | None = None, dtype: str | torch.dtype = "auto", device: str = "cpu",
             progress: Callable[[int, int], None] | None = None,
             parallel: ParallelGroup | None = None, quant: str | None = None, fast: bool = True,
             huge_pages: bool = False, compile: bool = False) -> "Engine":
        """`parallel` (from `parallel.init_from_env`): load this rank's shard; the device is the group's.
        `quant`: "int8" or "int4" weight-only quantisation; `fast=False`: plain PyTorch layers only;
        `compile`: plain layers with a decode step compiled by torch.compile (for a GPU)."""
        if parallel is not None:
            device = parallel.device
        return cls(load_model(path, dtype=dtype, device=device, progress=progress, parallel=parallel,
                              quant=quant, fast=fast, huge_pages=huge_pages, compile=compile), parallel)

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise LlamascopeError(f"{self.loaded.checkpoint.path}: this checkpoint has no tokenizer")
        return self.tokenizer

    def generation_config(self, **call) -> GenerationConfig:
        """Settings in force: call arguments over generation_config.json over config.json."""
        config = self.local_generation_config(**call)
        if self.parallel is not None:
            # Ranks must choose the same tokens at the same steps.
            if config.max_time is not None:
                raise LlamascopeError("max_time is not supported with tensor parallelism "
                                      "(each rank's clock would stop it at a different step)")
            if config.do_sample and config.seed is None:
                config.seed = shared_seed(self.parallel)
                config.sources["seed"] = "rank 0"
        return config

    def local_generation_config(self, **call) -> GenerationConfig:
        """`generation_config` for tokens chosen in this process alone (the tensor-parallel server
        samples on rank 0 only): no seed is shared with the other ranks, no collective runs."""
        source = "GGUF metadata" if self.loaded.checkpoint.format == "gguf" else "generation_config.json"
        return GenerationConfig.resolve(self.config, self.generation_json, generation_source=source, **call)

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
        n = len(result.output_ids) // len(texts)  # sequences per prompt (num_return_sequences)
        completions = []
        for i, (text, p) in enumerate(zip(texts, ids)):
            rows = [
                Completion(text, p, result.output_ids[r], self.tokenizer.decode(result.output_ids[r],
                           skip_special_tokens=True), result.finish_reasons[r],
                           result.logprobs[r] if result.logprobs is not None else None,
                           result.sequence_scores[r] if result.sequence_scores is not None else None)
                for r in range(i * n, (i + 1) * n)
            ]
            if n > 1:
                rows[0] = dataclasses.replace(rows[0], sequences=list(rows))
            completions.append(rows[0])
        return completions[0] if single else completions

    def generate_ids(self, prompts: list[list[int]] | list[int], **settings) -> GenerationResult:
        config = self.generation_config(**settings)
        self._check_length(prompts if prompts and isinstance(prompts[0], list) else [prompts])
        return generate(self.model, prompts, config, tokenizer=self.tokenizer)

    def stream(self, prompt: str | list[int], chat: bool = False, **settings) -> Iterator[str]:
        """Text deltas as tokens are chosen (greedy or sampled; one prompt)."""
        ids = self.encode(prompt, chat=chat) if isinstance(prompt, str) else list(prompt)
        self._check_length([ids])
        config = self.generation_config(**settings)
        if config.num_beams > 1 or config.num_return_sequences > 1:
            # beam search and several sequences finish together: the text comes at the end
            result = generate(self.model, [ids], config, tokenizer=self._need_tokenizer())
            yield "\n".join(self.tokenizer.decode(out, skip_special_tokens=True) for out in result.output_ids)
            return
        for _, delta in stream(self.model, self._need_tokenizer(), ids, config):
            if delta:
                yield delta

    def end_of_turn_ids(self) -> list[int]:
        """Tokens that end an assistant turn in common chat templates, where the vocabulary has them."""
        tokenizer = self._need_tokenizer()
        ids = [tokenizer.token_to_id(t) for t in END_OF_TURN_TOKENS if t in (tokenizer.chat_template or "")]
        return [i for i in ids if i is not None]

    def chat(self, messages: list[dict], **settings) -> Iterator[str]:
        """Stream the assistant's reply to `messages` (chat template applied, no double BOS); the
        reply ends at an eos id or at the template's end-of-turn token."""
        tokenizer = self._need_tokenizer()
        ids = tokenizer.encode_chat(messages)
        config = self.generation_config(**settings)
        extra = [i for i in self.end_of_turn_ids() if i not in config.eos_token_id]
        if extra:
            config.eos_token_id = config.eos_token_id + extra
        self._check_length([ids])
        for _, delta in stream(self.model, tokenizer, ids, config):
            if delta:
                yield delta

    def _check_length(self, prompts: list[list[int]]) -> None:
        context = self.config.max_position_embeddings
        for p in prompts:
            if len(p) >= context and self.config.rope_type != "dynamic":
                raise LlamascopeError(
                    f"prompt of {len(p)} tokens does not fit the model's context of {context} positions")

