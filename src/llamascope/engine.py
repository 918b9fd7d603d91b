"""The Python API in one object: a loaded model with its tokenizer and generation settings.

from llamascope import Engine
engine = Engine.load("path/to/hf-folder-or.gguf")       # None: the default SmolLM2 model
print(engine.generate("Once upon a time", max_new_tokens=16).text)
for delta in engine.stream("Once upon a time", max_new_tokens=16):
    print(delta, end="")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .batch import GenerationResult
from .config import GenerationConfig
from .constraints import constraint_from
from .errors import LlamascopeError
from .generation import generate, stream
from .interventions import Intervention, Recording, record
from .loading import LoadedModel, LoadOptions, load_model
from .parallel import ParallelGroup, shared_seed
from .tokenizer import vocabulary_difference

# The ways a call may give an output constraint (constraints.constraint_from): one of them at most.
CONSTRAINT_FORMS = ("response_format", "json_schema", "regex", "choice", "grammar")


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
    sequences: list[Completion] | None = None

    def to_json(self) -> dict:
        out = {
            "prompt": self.prompt,
            "prompt_ids": self.prompt_ids,
            "output_ids": self.output_ids,
            "text": self.text,
            "finish_reason": self.finish_reason,
        }
        out.update(self._extras())
        if self.sequences is not None:
            out["sequences"] = [
                {"output_ids": c.output_ids, "text": c.text, "finish_reason": c.finish_reason, **c._extras()}
                for c in self.sequences
            ]
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
        self._assistants: dict[str, Engine] = {}  # assistant models loaded by path, kept for later calls

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        options: LoadOptions | None = None,
        *,
        progress: Callable[[int, int], None] | None = None,
        parallel: ParallelGroup | None = None,
        **option_fields,
    ) -> Engine:
        """Load `path` (None: the default model) as `options` says (a LoadOptions; keyword
        arguments set its fields: `Engine.load(path, dtype="bfloat16", quant="int8")`).
        `parallel` (from `parallel.init_from_env`): load this rank's shard on the group's device."""
        return cls(load_model(path, options, progress=progress, parallel=parallel, **option_fields), parallel)

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise LlamascopeError(f"{self.loaded.checkpoint.path}: this checkpoint has no tokenizer")
        return self.tokenizer

    def generation_config(self, chat: bool = False, defaults: dict | None = None, **call) -> GenerationConfig:
        """Settings in force: call arguments over generation_config.json over config.json over
        `defaults` (see `GenerationConfig.resolve`). `chat`: for a reply to a chat prompt, which also
        ends at the chat template's end-of-turn tokens (`end_of_turn_ids`)."""
        config = self.local_generation_config(chat, defaults, **call)
        if self.parallel is not None:
            # Ranks must choose the same tokens at the same steps.
            if config.max_time is not None:
                raise LlamascopeError(
                    "max_time is not supported with tensor parallelism "
                    "(each rank's clock would stop it at a different step)"
                )
            if config.do_sample and config.seed is None:
                config.seed = shared_seed(self.parallel)
                config.sources["seed"] = "rank 0"
        return config

    def local_generation_config(self, chat: bool = False, defaults: dict | None = None, **call) -> GenerationConfig:
        """`generation_config` for tokens chosen in this process alone (the tensor-parallel server
        samples on rank 0 only): no seed is shared with the other ranks, no collective runs."""
        source = "GGUF metadata" if self.loaded.checkpoint.format == "gguf" else "generation_config.json"
        forms = {name: call.pop(name, None) for name in CONSTRAINT_FORMS}
        if any(value is not None for value in forms.values()):
            call["constraint"] = constraint_from(**forms)
        config = GenerationConfig.resolve(
            self.config, self.generation_json, generation_source=source, defaults=defaults, **call
        )
        extra = [i for i in self.end_of_turn_ids() if i not in config.eos_token_id] if chat else []
        if extra:
            config.eos_token_id = config.eos_token_id + extra
            config.sources["eos_token_id"] += " + chat template"
        return config

    def end_of_turn_ids(self) -> list[int]:
        """Tokens that end an assistant turn in common chat templates, where the template writes
        them and the vocabulary has them. Every chat reply (`chat`, `generate(chat=True)`, the
        server's chat completions) ends at these as at an eos id."""
        tokenizer = self._need_tokenizer()
        ids = [tokenizer.token_to_id(t) for t in END_OF_TURN_TOKENS if t in (tokenizer.chat_template or "")]
        return [i for i in ids if i is not None]

    def assistant(self, assistant_model: str | Path | Engine | None) -> torch.nn.Module | None:
        """The model that drafts tokens for this one (speculative decoding): an Engine's, or that of
        the checkpoint at a path (loaded once, as stored, and kept). Refused, naming both, unless the
        two tokenizers have the same vocabulary (the same ids for the same tokens)."""
        if assistant_model is None:
            return None
        if self.parallel is not None:
            raise LlamascopeError("assistant_model is not supported with tensor parallelism")
        if isinstance(assistant_model, Engine):
            helper = assistant_model
        else:
            key = str(assistant_model)
            if key not in self._assistants:
                self._assistants[key] = Engine.load(assistant_model)
            helper = self._assistants[key]
        difference = vocabulary_difference(self.tokenizer, helper.tokenizer, self.config, helper.config)
        if difference is not None:
            raise LlamascopeError(
                f"assistant model {helper.loaded.checkpoint.path} cannot draft for {self.loaded.checkpoint.path}: "
                f"their vocabularies differ ({difference})"
            )
        return helper.model

    def encode(self, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
        tokenizer = self._need_tokenizer()
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}
            ]
            return tokenizer.encode_chat(messages)
        return tokenizer.encode(prompt)

    def generate(
        self,
        prompts: str | list[str],
        chat: bool = False,
        assistant_model=None,
        interventions: Sequence[Intervention] | None = None,
        **settings,
    ) -> Completion | list[Completion]:
        """Generate for one prompt or a batch (left-padded, same tokens as each alone). `chat`:
        each prompt is a user message in the chat template, and the reply ends at its end of turn.
        `assistant_model` (an Engine or a checkpoint's path): drafts tokens that the model checks
        (speculative decoding, greedy search: the same tokens). `interventions` (AblateHeads,
        Patch, Steer, Edit from llamascope.interventions): change activations in every pass."""
        single = isinstance(prompts, str)
        texts = [prompts] if single else list(prompts)
        ids = [self.encode(t, chat=chat) for t in texts]
        result = self._generate(ids, self.generation_config(chat, **settings), assistant_model, interventions)
        n = len(result.output_ids) // len(texts)  # sequences per prompt (num_return_sequences)
        completions = [
            self._completion(text, p, result, range(i * n, (i + 1) * n)) for i, (text, p) in enumerate(zip(texts, ids))
        ]
        return completions[0] if single else completions

    def _completion(self, text: str, prompt_ids: list[int], result: GenerationResult, rows: range) -> Completion:
        """A prompt's Completion from its rows of `result`: the best, with all of them when there are several."""
        completions = [
            Completion(
                text,
                prompt_ids,
                result.output_ids[r],
                self.tokenizer.decode(result.output_ids[r], skip_special_tokens=True),
                result.finish_reasons[r],
                result.logprobs[r] if result.logprobs is not None else None,
                result.sequence_scores[r] if result.sequence_scores is not None else None,
            )
            for r in rows
        ]
        if len(completions) > 1:
            return dataclasses.replace(completions[0], sequences=list(completions))
        return completions[0]

    def generate_ids(
        self,
        prompts: list[list[int]] | list[int],
        assistant_model=None,
        interventions: Sequence[Intervention] | None = None,
        **settings,
    ) -> GenerationResult:
        return self._generate(prompts, self.generation_config(**settings), assistant_model, interventions)

    def _generate(
        self,
        prompts: list[list[int]] | list[int],
        config: GenerationConfig,
        assistant_model,
        interventions: Sequence[Intervention] | None,
    ) -> GenerationResult:
        """generation.generate on this engine's model, with the call's assistant and interventions."""
        helper, edits = self.assistant(assistant_model), self._interventions(interventions)
        return generate(self.model, prompts, config, tokenizer=self.tokenizer, assistant=helper, interventions=edits)

    def stream(
        self,
        prompt: str | list[int],
        chat: bool = False,
        assistant_model=None,
        interventions: Sequence[Intervention] | None = None,
        **settings,
    ) -> Iterator[str]:
        """Text deltas as tokens are chosen (greedy or sampled; one prompt). `chat`, `assistant_model`,
        `interventions`: as in `generate`."""
        ids = self.encode(prompt, chat=chat) if isinstance(prompt, str) else list(prompt)
        config, edits = self.generation_config(chat, **settings), self._interventions(interventions)
        yield from self._stream(ids, config, self.assistant(assistant_model), edits)

    def chat(
        self,
        messages: list[dict],
        assistant_model=None,
        interventions: Sequence[Intervention] | None = None,
        **settings,
    ) -> Iterator[str]:
        """Stream the assistant's reply to `messages` (chat template applied, no double BOS); the
        reply ends at an eos id or at the template's end-of-turn token. `assistant_model`,
        `interventions`: as in `generate`."""
        ids = self._need_tokenizer().encode_chat(messages)
        config, edits = self.generation_config(chat=True, **settings), self._interventions(interventions)
        yield from self._stream(ids, config, self.assistant(assistant_model), edits)

    def record(
        self,
        prompt: str | list[int],
        names: Iterable[str] = ("*",),
        chat: bool = False,
        interventions: Sequence[Intervention] | None = None,
    ) -> Recording:
        """One forward pass over `prompt` (text, or token ids), with the `interventions`: the
        activations whose names match the glob patterns `names` (activations.NAMES), each
        [1, T, ...]. See interventions.record."""
        ids = self.encode(prompt, chat=chat) if isinstance(prompt, str) else list(prompt)
        return record(self.model, ids, names, self._interventions(interventions))

    def _interventions(self, interventions: Sequence[Intervention] | Intervention | None) -> list[Intervention]:
        """The call's interventions as a list (none: every fast path stays on; one: a list of it)."""
        if isinstance(interventions, Intervention):
            interventions = [interventions]
        if interventions and self.parallel is not None:
            raise LlamascopeError("interventions are not supported with tensor parallelism")
        return list(interventions or ())

    def _stream(
        self,
        ids: list[int],
        config: GenerationConfig,
        assistant: torch.nn.Module | None,
        interventions: list[Intervention],
    ) -> Iterator[str]:
        tokenizer = self._need_tokenizer()
        if config.num_beams > 1 or config.num_return_sequences > 1:
            # beam search and several sequences finish together: the text comes at the end
            result = generate(
                self.model, [ids], config, tokenizer=tokenizer, assistant=assistant, interventions=interventions
            )
            yield "\n".join(tokenizer.decode(out, skip_special_tokens=True) for out in result.output_ids)
            return
        for _, delta in stream(self.model, tokenizer, ids, config, assistant=assistant, interventions=interventions):
            if delta:
                yield delta
