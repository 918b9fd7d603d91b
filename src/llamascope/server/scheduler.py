"""Continuous batching: sequences join the running batch at the next step and leave when done.

One worker thread owns the model and a `SlotKVCache`, through a `ModelRunner` (every call that
runs the model or changes the cache). Each loop it
  1. drops the sequences of cancelled requests (their slots are free for the next admission),
  2. admits waiting sequences while slots are free: each new prompt (once for the n choices of
     one request) starts a prefill, the beginning it shares with an earlier prompt loaded from
     the prefix cache (prefix_cache.py),
  3. prefills: while sequences decode, one piece's worth of positions (chunked prefill: a long
     prompt holds the running streams up a piece at a time); with none decoding, whole prompts.
     A finished prompt's keys/values go into a free slot per choice and its first token is chosen,
  4. runs one decode forward over every active slot together: each row feeds its last token at
     its own position and sees only its own columns,
  5. chooses each row's next token with that row's own processors and generator, detokenises,
     stops it by `stopping.StopRules` (eos ids, stop strings, max_tokens: the rules generate()
     stops by) and hands the text to the request's asyncio queue, stop strings cut out.
A finished sequence frees its slot at once; the highest used slot moves into the hole so the
used slots stay packed [0, active) and the decode batch is a plain slice of the cache.

The asyncio side only calls `submit` and `cancel` and reads events; it never touches the model.

Tensor parallelism (`llamascope serve --tp N` under torchrun): rank 0 runs all of this with a
runner that first sends each of its calls to the other ranks, which repeat them (lockstep.py).
There a failed model call stops the server (the ranks may no longer agree), and an idle worker
wakes every `runner.keepalive_s` seconds to tell the other ranks that rank 0 is alive.

Seeds: choice i of a request with `seed` s draws from its own `torch.Generator` seeded s + i, so
with the same settings it gets the tokens a lone `Engine.generate(..., do_sample=True, seed=s + i)`
gets, whatever else is running. Without a seed each choice gets a generator with a fresh random seed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..cache import KVCache, SlotKVCache
from ..config import GenerationConfig
from ..decode_step import DecodeStep
from ..errors import LlamascopeError
from ..layers import KERNEL_MAX_ROWS
from ..prefill import PrefillRun, resume_rows
from ..sampling import apply_processors, build_processors, make_generator, select_next, token_logprobs
from ..speculative import PromptLookup
from ..stopping import StopRules, StopText
from .prefix_cache import PREFIX_BLOCK, PrefixCache

log = logging.getLogger("llamascope")

# While sequences decode, prompts are prefilled for about this share of a decode step's time
# between two steps (and at least PREFILL_FLOOR_S): the running streams' gaps grow by about that
# share (plus at most one stage), and a prompt gets about half the time while it waits. The floor
# keeps slices worth their overhead where steps take a millisecond (small models).
PREFILL_SHARE = 1.0
PREFILL_FLOOR_S = 0.005


class ShuttingDown(LlamascopeError):
    """The server is draining before it stops: it takes no new requests."""


class QueueFull(LlamascopeError):
    """More sequences wait than the queue holds; the client should retry later."""


# ---- OpenAI's additive settings, as processors -------------------------------------------------


class AdditivePenalties:
    """OpenAI's presence and frequency penalties over the tokens generated so far (not the prompt):
    score[j] -= presence * (count[j] > 0) + frequency * count[j]."""

    def __init__(self, presence: float, frequency: float, prompt_length: int):
        self.presence, self.frequency, self.prompt_length = float(presence), float(frequency), prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.prompt_length :]  # [B, G]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)  # [B, V]


class LogitBias:
    """OpenAI's logit_bias: a fixed number added to the scores of some token ids."""

    def __init__(self, bias: dict[int, float], vocab_size: int):
        self.bias = torch.zeros(vocab_size, dtype=torch.float32)  # [V]
        for token, value in bias.items():
            self.bias[token] = float(value)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.bias.device != scores.device:
            self.bias = self.bias.to(scores.device)
        return scores + self.bias


# ---- what the asyncio side submits and receives -----------------------------------------------


@dataclass
class SequenceSpec:
    """One choice to generate: its prompt and its own settings."""

    prompt_ids: list[int]
    # resolved; max_new_tokens = max_tokens, seed = this choice's seed, stop_strings = the request's stop
    config: GenerationConfig
    logprobs: int | None = None  # None: none; k: the chosen token's and the k most likely
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)


@dataclass
class Delta:
    """New output of one choice: text, token ids, log-probabilities, and the finish reason when done."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict] | None = None  # per token: {"id", "text", "logprob", "top": [{"id", "text", "logprob"}]}
    finish_reason: str | None = None  # "stop" (eos or a stop string) or "length"


@dataclass
class Done:
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    message: str


class Request:
    """A request's sequences and the asyncio queue its events go to."""

    def __init__(self, request_id: str, sequences: list[SequenceSpec], loop: asyncio.AbstractEventLoop):
        self.id = request_id
        self.sequences = sequences
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.failed = False
        # worker-side bookkeeping
        self.remaining = len(sequences)
        self.prompt_tokens = sum(len(p) for p in {tuple(s.prompt_ids) for s in sequences})
        self.completion_tokens = 0
        self.submitted = time.perf_counter()
        self.first_token: float | None = None
        self.finish_reasons: list[str] = []

    def push(self, event) -> None:
        """Thread-safe: hand an event to the request's asyncio queue."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled = True


# ---- worker-side state of one sequence ---------------------------------------------------------


class _Sequence:
    def __init__(
        self,
        request: Request,
        index: int,
        spec: SequenceSpec,
        tokenizer,
        vocab_size: int,
        device: torch.device,
    ):
        self.request, self.index, self.spec = request, index, spec
        self.last_delivery: float | None = None  # when its latest token went out (inter-token latency)
        config = spec.config
        P = len(spec.prompt_ids)
        self.max_tokens = int(config.max_new_tokens)
        self.ids = torch.zeros(1, P + self.max_tokens, dtype=torch.long, device=device)  # [1, P + max_tokens]
        self.ids[0, :P] = torch.tensor(spec.prompt_ids, dtype=torch.long)
        self.length = P  # filled columns of self.ids
        self.prompt_length = P
        self.sequence = list(spec.prompt_ids)  # the same tokens as a list, for the stop rules
        processors: list = []
        if spec.logit_bias:
            processors.append(LogitBias(spec.logit_bias, vocab_size))
        if spec.presence_penalty or spec.frequency_penalty:
            processors.append(AdditivePenalties(spec.presence_penalty, spec.frequency_penalty, P))
        self.processors = processors + build_processors(config, P, vocab_size=vocab_size, tokenizer=tokenizer)
        self.generator = None
        if config.do_sample:  # on the model's device, as generate() draws (same seed, same tokens)
            self.generator = make_generator(config, device) or torch.Generator(device=device).manual_seed(
                secrets.randbits(62)
            )
        self.rules = StopRules(config, tokenizer, self.max_tokens)
        self.tokenizer = tokenizer
        self.decoder = tokenizer.stream_decoder(spec.prompt_ids, skip_special_tokens=True)
        self.text = StopText(config.stop_strings)
        self.slot: int | None = None
        self.generated = 0
        self.done = False  # left the scheduler (finished, cancelled or failed)
        # prompt lookup decoding (the request's prompt_lookup_num_tokens): drafts checked in one pass
        self.drafter = PromptLookup(config) if config.prompt_lookup_num_tokens else None

    @property
    def last_token(self) -> int:
        return int(self.ids[0, self.length - 1])

    def choose(self, logits: torch.Tensor) -> Delta:
        """logits [1, V] float32 of the last position -> the next token, as a Delta."""
        scores = apply_processors(self.processors, self.ids[:, : self.length], logits)  # [1, V]
        token_tensor = select_next(scores, self.spec.config, self.generator)  # [1]
        token = int(token_tensor[0])
        self.ids[0, self.length] = token
        self.length += 1
        self.generated += 1
        self.sequence.append(token)
        reason = self.rules.reason(self.sequence, self.generated)
        if reason == "eos":  # the eos token's text is left out
            text = self.decoder.flush()
        else:
            text = self.decoder.push(token) + (self.decoder.flush() if reason is not None else "")
        finish = None if reason is None else "length" if reason == "length" else "stop"  # OpenAI's names
        return Delta(self.index, self.text.push(text, reason), [token], self._logprobs(scores, token_tensor), finish)

    def _logprobs(self, scores: torch.Tensor, token_tensor: torch.Tensor) -> list[dict] | None:
        """The chosen token's log-probability and the most likely alternatives, when asked for."""
        if self.spec.logprobs is None:
            return None
        entry = token_logprobs(scores, token_tensor, self.spec.logprobs)[0]
        decode = self.tokenizer.decode
        return [
            {
                "id": entry["id"],
                "text": decode([entry["id"]]),
                "logprob": entry["logprob"],
                "top": [dict(t, text=decode([t["id"]])) for t in entry["top"]],
            }
        ]


# ---- the model and its cache, as the scheduler uses them -----------------------------------------


@dataclass
class _PromptRun:
    """A prompt the runner is prefilling."""

    tokens: list[int]
    cached: int  # positions the prefix cache held
    run: PrefillRun  # over the rest, into its own KVCache (run.cache)


class ModelRunner:
    """Every call of the scheduler that runs the model or changes the KV caches.

    Each call's effect depends only on its arguments and on the caches' state, so a second runner
    over another rank's shard of the model that makes the same calls in the same order stays in
    step with this one (the tensor-parallel server, lockstep.py). Logits are float32 [B, V].

    A prompt is prefilled under a key the scheduler picks: `begin_prefill` (its cached prefix
    loaded), `prefill` a few stages at a time until it returns the logits, `place` into slots;
    `drop` forgets an unfinished one. Its numbers are generate()'s for that prompt alone in every
    case: the model takes a prompt in the same pieces however it arrives and however its stages
    are spread (`prefill.PrefillRun`), and prompts are never batched together (several rows take
    other numeric paths than one: the products' row blocking, padding, batched attention).

    The slots' storage is allocated whole when the runner is made (max_batch slots of
    slot_capacity positions, the server's KV budget) and kept: growing it while streams run would
    hold them up for the copy, and a server that has its memory at start-up cannot run out of it
    halfway through a request.
    """

    lockstep = False  # True where other processes repeat these calls: a failed call stops the server
    keepalive_s: float | None = None  # while idle, call keepalive() at least this often (None: no need)

    def __init__(
        self, model, max_batch: int, slot_capacity: int, prefix_cache_bytes: int = 0, measure_resume: bool = True
    ):
        """measure_resume: let prompts resume from the prefix cache mid-piece where
        `prefill.resume_rows` finds that exact (False under tensor parallelism: every rank must
        decide alike, and each measures its own shard)."""
        self.model = model
        self.cache = SlotKVCache.for_model(model, max_batch, slot_capacity)
        self.cache.reserve(max_batch, slot_capacity)
        if prefix_cache_bytes and model.config.rope_varies_with_length:
            # a piece's keys depend on the whole prompt's length (rope_type dynamic, longrope): a
            # piece cached from one prompt is not the piece another prompt computes
            log.info("prefix cache off: rope_type %s depends on each prompt's length", model.config.rope_type)
            prefix_cache_bytes = 0
        rows = resume_rows(model) if prefix_cache_bytes and measure_resume else None
        self.prefix_cache = PrefixCache(prefix_cache_bytes, resume_rows=rows)
        if prefix_cache_bytes:
            where = f"to within {PREFIX_BLOCK} positions (first pieces of {rows}+ rows)" if rows else "at cuts only"
            log.info("prefix cache: %d MB, prompts resume from it %s", prefix_cache_bytes >> 20, where)
        self.prefills: dict[int, _PromptRun] = {}

    def open(self) -> None:
        """The worker thread starts."""

    def close(self, clean: bool = True) -> None:
        """The worker thread ends (clean: not after a failed call)."""

    def keepalive(self) -> None:
        """Called while idle, at least every keepalive_s seconds."""

    def begin_prefill(self, key: int, prompt: list[int]) -> int:
        """Start prefilling `prompt` under `key` -> how many of its positions the prefix cache held."""
        cache = KVCache.for_model(self.model, 1, len(prompt))
        cached = self.prefix_cache.load(prompt, cache)
        device = self.model.device
        tokens = torch.tensor([prompt[cached:]], dtype=torch.long, device=device)  # [1, t]
        positions = torch.arange(cached, len(prompt), device=device)[None]  # [1, t]
        self.prefills[key] = _PromptRun(prompt, cached, PrefillRun(self.model, tokens, positions, cache))
        return cached

    def prefill(self, key: int, stages: int | None = None) -> torch.Tensor | None:
        """`key`'s prompt on by up to `stages` stages (`prefill.PrefillRun`; None or 0: to its
        end) -> the logits [1, V] of its last position once the prompt is done, else None."""
        prompt = self.prefills[key]
        if not prompt.run.advance(stages or None):
            return None
        self.prefix_cache.store(prompt.tokens, prompt.run.cache, prompt.run.spans)
        return prompt.run.logits[:, -1].float()  # [1, V]

    def place(self, key: int, copies: int) -> list[int]:
        """`key`'s prefilled prompt into `copies` free slots, which are returned; the key is done."""
        cache = self.prefills.pop(key).run.cache
        slots: list[int] = []
        try:
            for _ in range(copies):
                slots.append(self.cache.allocate())
                self.cache.load(slots[-1], cache)
        except Exception:
            for slot in slots:
                self.cache.free(slot)
            raise
        return slots

    def drop(self, key: int) -> None:
        """Forget `key`'s prefill (its request went away or failed)."""
        prompt = self.prefills.pop(key, None)
        if prompt is not None:
            prompt.run.close()

    def decode(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        """One decode step: row b feeds tokens[b] at the next position of slot slots[b] and sees
        only that slot's columns. Returns the logits [B, V].

        Rows go through the model KERNEL_MAX_ROWS at a time: up to that many, the native decode step
        gives each row bit for bit what it gets alone (one sequence's generate)."""
        return torch.cat(
            [
                self._decode_rows(slots[i : i + KERNEL_MAX_ROWS], tokens[i : i + KERNEL_MAX_ROWS])
                for i in range(0, len(slots), KERNEL_MAX_ROWS)
            ]
        )

    def _decode_rows(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        batch = self.cache.batch(slots, 1)
        ids = torch.tensor([[t] for t in tokens], dtype=torch.long, device=self.model.device)  # [B, 1]
        positions = batch.positions(1)  # [B, 1]
        mask = batch.mask(1)  # [B, 1, 1, S] or None when all rows have one length
        return self.model(ids, positions, batch, mask, last_only=True)[:, -1].float()  # [B, V]

    def verify(self, slot: int, tokens: list[int], start: int) -> torch.Tensor:
        """Prompt lookup's check of a draft: `slot` keeps its first `start` columns (those past them
        held a refused draft's), then takes `tokens` (the newest token, then the drafted ones) at
        the next positions -> logits [T, V], each row what a decode step of its own gives (the
        native step's rows of one slot; elsewhere one decode step a token)."""
        self.cache.lengths[slot] = start
        step = self.model.decode_step
        ids = torch.tensor([tokens], dtype=torch.long, device=self.model.device)  # [1, T]
        parts = []
        for i in range(0, len(tokens), KERNEL_MAX_ROWS):
            chunk = ids[:, i : i + KERNEL_MAX_ROWS]  # [1, t]
            if isinstance(step, DecodeStep) and step.verifies_slot(chunk, self.cache):
                parts.append(step.verify_slot(chunk, self.cache, slot).float())
            else:
                parts += [self._decode_rows([slot], [token]) for token in chunk[0].tolist()]
        return torch.cat(parts)  # [T, V]

    def restart(self, slot: int, tokens: list[int]) -> torch.Tensor:
        """Recompute `slot`'s sequence from its `tokens` (all of them, the one fed now last) and
        return the logits [1, V] of its last position: Phi-3's longrope restart
        (ModelConfig.longrope_restarts), the call generate() makes at that step, so the numbers are
        its numbers."""
        device = self.model.device
        cache = KVCache.for_model(self.model, 1, len(tokens))
        ids = torch.tensor([tokens], dtype=torch.long, device=device)  # [1, S]
        positions = torch.arange(len(tokens), device=device)[None]  # [1, S]
        logits = self.model(ids, positions, cache, last_only=True)[:, -1].float()  # [1, V]
        self.cache.load(slot, cache)
        return logits

    def free(self, slot: int) -> None:
        self.cache.free(slot)

    def move(self, source: int, target: int) -> None:
        self.cache.move(source, target)


# ---- the scheduler -----------------------------------------------------------------------------


@dataclass(eq=False)
class _Prefill:
    """A prompt being prefilled for its group: the n choices of one request."""

    key: int  # the runner's
    group: list[_Sequence]
    length: int  # prompt positions


class Scheduler:
    def __init__(
        self,
        model,
        tokenizer,
        max_batch: int = 8,
        max_queue: int = 64,
        slot_capacity: int | None = None,
        runner: Callable[[object, int, int, int], ModelRunner] = ModelRunner,
        prefix_cache_bytes: int = 0,
    ):
        """`runner(model, max_batch, slot_capacity, prefix_cache_bytes)` makes the ModelRunner the
        worker calls (prefix_cache_bytes 0: no prefix cache). Each sequence stops by its own
        settings (SequenceSpec.config, resolved as `Engine` resolves them)."""
        if max_batch < 1:
            raise LlamascopeError(f"max_batch must be >= 1, found {max_batch}")
        if max_queue < 0:
            raise LlamascopeError(f"max_queue must be >= 0, found {max_queue}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        context = model.config.max_position_embeddings
        self.slot_capacity = min(context, slot_capacity or context)
        self.runner = runner(model, max_batch, self.slot_capacity, prefix_cache_bytes)
        self.cache = self.runner.cache  # read-only here: changes go through the runner
        self.vocab_size = model.config.vocab_size
        self._cond = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._admitted = 0  # sequences taken from the queue and not yet finished (under _cond)
        self._active: list[_Sequence] = []  # worker only; ordered by slot
        self._prefilling: deque[_Prefill] = deque()  # worker only; admitted prompts not yet in slots
        self._keys = itertools.count()  # the runner's prefill keys
        self._stopping = False
        self._draining = False  # shutting down: no new requests (drain)
        self._thread: threading.Thread | None = None
        self.completed = self.cancelled = self.failed = 0
        self.peak_batch = 0  # the most sequences one decode step has run
        self._step_s = self._step_end = 0.0  # how long the last decode step took, and when it ended
        # told of first tokens, token gaps and ended requests (server/metrics.py; the app sets it)
        self.metrics = None
        # A model call failed where the server cannot go on (tensor parallelism): the error, and
        # who to tell (lockstep.serve_leader: it stops uvicorn).
        self.error: LlamascopeError | None = None
        self.on_fatal: Callable[[LlamascopeError], None] | None = None

    # ---- asyncio side ----------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="llamascope-scheduler", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the worker; False when it is still busy after `timeout` seconds (a model call that
        does not return, e.g. one waiting for another tensor-parallel rank)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
            self._thread = None
        return True

    def drain(self, grace_s: float) -> None:
        """Shutting down: take no new requests (ShuttingDown); the ones taken go on for up to
        `grace_s` seconds, then the scheduler stops and every unfinished one ends with an error
        event ("the server is shutting down")."""
        with self._cond:
            if self._draining or self._stopping:
                return
            self._draining = True
        log.info("shutting down: no new requests; those running have %g s to finish", grace_s)
        timer = threading.Timer(grace_s, self.stop)
        timer.daemon = True
        timer.start()

    def submit(self, request: Request) -> None:
        """Queue a request's sequences; QueueFull when more would wait than max_queue."""
        sequences = [
            _Sequence(request, i, spec, self.tokenizer, self.vocab_size, self.model.device)
            for i, spec in enumerate(request.sequences)
        ]
        with self._cond:
            if self._stopping or self._draining:
                raise ShuttingDown("the server is shutting down: it takes no new requests")
            free = self.max_batch - self._admitted
            if len(self._waiting) + len(sequences) > self.max_queue + free:
                raise QueueFull(
                    f"the queue is full ({len(self._waiting)} sequences wait, {self._admitted} generate); retry later"
                )
            self._waiting.extend(sequences)
            self._cond.notify_all()

    def cancel(self, request: Request) -> None:
        """The client went away: its sequences leave the queue now and their slots at the next step."""
        if request.cancelled:
            return
        request.cancelled = True
        with self._cond:
            self._cond.notify_all()

    def stats(self) -> dict:
        with self._cond:
            waiting, admitted = len(self._waiting), self._admitted
        return {
            "active": admitted,
            "waiting": waiting,
            "max_batch": self.max_batch,
            "max_queue": self.max_queue,
            "slot_capacity": self.slot_capacity,
            "kv_bytes": self.cache.nbytes(),
            "prefix_cache_bytes": self.runner.prefix_cache.nbytes,
            "prefix_cache_budget_bytes": self.runner.prefix_cache.max_bytes,
            "kv_budget_bytes": self.cache.max_bytes(),
            "completed": self.completed,
            "cancelled": self.cancelled,
            "failed": self.failed,
            "peak_batch": self.peak_batch,
        }

    # ---- worker ----------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            try:
                self.runner.open()
            except Exception as e:  # noqa: BLE001
                self._fatal(e, [])
            while not self._stopping:
                admit: list[_Sequence] = []
                try:
                    if self._idle():
                        continue
                    with self._cond:
                        self._drop_cancelled_waiting()
                        if self._stopping:
                            break
                        while self._waiting and self._admitted < self.max_batch:
                            admit.append(self._waiting.popleft())
                            self._admitted += 1
                    self._drop_cancelled_running()
                    self._admit(admit)
                    self._prefill_some()
                    if self._active:
                        self._decode_step()
                except Exception as e:  # noqa: BLE001 - a bug here must not leave requests hanging
                    if self.runner.lockstep:
                        self._fatal(e, admit)
                        break
                    log.exception("scheduler step failed")
                    for seq in self._in_hand(admit):
                        self._fail(seq, f"generation failed: {e}")
            self._shutdown()
            self.runner.close(clean=self.error is None)

    def _idle(self) -> bool:
        """With nothing waiting or running: sleep until a request comes, waking every
        runner.keepalive_s seconds for runner.keepalive(). False when there is work (or the
        scheduler stops)."""
        with self._cond:
            self._drop_cancelled_waiting()
            if self._waiting or self._active or self._prefilling or self._stopping:
                return False
            self._cond.wait(self.runner.keepalive_s)
        self.runner.keepalive()
        return True

    def _fatal(self, error: Exception, admit: list[_Sequence]) -> None:
        """A model call failed where the ranks may have parted ways: fail every request, stop."""
        if isinstance(error, LlamascopeError):
            self.error = error
        else:
            log.debug("model call failed", exc_info=True)  # the traceback with -vv; one line below
            reason = (str(error).strip().splitlines() or [""])[0][:300]
            self.error = LlamascopeError(
                f"the server stopped: a model call failed on this rank, so the tensor-"
                f"parallel ranks may no longer agree ({type(error).__name__}: {reason})"
            )
        log.error("%s", self.error)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for seq in self._in_hand(admit):
            self._fail(seq, f"generation failed: {self.error}")
        if self.on_fatal is not None:
            self.on_fatal(self.error)

    def _drop_cancelled_waiting(self) -> None:
        """Under _cond: cancelled requests' sequences leave the queue."""
        if any(seq.request.cancelled for seq in self._waiting):
            kept = deque()
            for seq in self._waiting:
                if seq.request.cancelled:
                    self._end_of_sequence(seq)
                else:
                    kept.append(seq)
            self._waiting = kept

    def _in_hand(self, admit: list[_Sequence]) -> list[_Sequence]:
        """The worker's unfinished sequences: running, being prefilled, just admitted."""
        prefilling = [seq for job in self._prefilling for seq in job.group]
        return [seq for seq in self._active + prefilling + admit if not seq.done]

    def _drop_cancelled_running(self) -> None:
        """Cancelled requests' sequences leave their slots and their unfinished prefills."""
        for seq in list(self._active):
            if seq.request.cancelled:
                self._leave(seq, None)
        for job in [job for job in self._prefilling if job.group[0].request.cancelled]:
            self._end_prefill(job)
            for seq in job.group:
                if not seq.done:  # (a failed request's sequences were released when they failed)
                    self._release_admitted(seq)

    def _admit(self, admit: list[_Sequence]) -> None:
        """Start a prefill for each new prompt, its cached prefix loaded; the n choices of one
        request share their prompt's prefill."""
        groups: list[list[_Sequence]] = []
        for seq in admit:
            if seq.request.cancelled:
                self._release_admitted(seq)
            elif (
                groups and groups[-1][0].request is seq.request and groups[-1][0].spec.prompt_ids == seq.spec.prompt_ids
            ):
                groups[-1].append(seq)
            else:
                groups.append([seq])
        for group in groups:
            prompt = list(group[0].spec.prompt_ids)
            job = _Prefill(next(self._keys), group, len(prompt))
            try:
                cached = self.runner.begin_prefill(job.key, prompt)
            except Exception as e:  # noqa: BLE001 - one bad request must not stop the others
                self._prefill_failed(job, e)
                continue
            if self.metrics is not None:
                self.metrics.prefix_cache(len(prompt), cached)
            self._prefilling.append(job)

    def _prefill_some(self) -> None:
        """Run the waiting prefills, first come first served. While sequences decode, a prompt goes
        on a stage at a time (one piece through one layer: `prefill.PrefillRun`) until about
        PREFILL_SHARE of a decode step's time (PREFILL_FLOOR_S at least) has passed since their
        last step (at least one stage), so that a long prompt delays their next token by
        milliseconds, not by its whole prefill; with none decoding a prompt runs to its end in one
        call (the same numbers either way)."""
        budget, stage_s = max(PREFILL_SHARE * self._step_s, PREFILL_FLOOR_S), None
        while self._prefilling:
            if stage_s is not None and self._active and time.perf_counter() - self._step_end + stage_s > budget:
                break  # (the next stage would likely take about as long as the last)
            job = self._prefilling[0]
            began = time.perf_counter()
            try:
                logits = self.runner.prefill(job.key, 1 if self._active else None)  # [1, V] once done
            except Exception as e:  # noqa: BLE001
                if self.runner.lockstep:
                    raise
                self._prefill_failed(job, e)
                logits = None
            stage_s = time.perf_counter() - began
            if logits is not None:
                log.debug("prefill of %s done (%d positions)", job.group[0].request.id, job.length)
                self._place(job, logits)

    def _place(self, job: _Prefill, logits: torch.Tensor) -> None:
        """A finished prefill: each choice gets a slot and its first token."""
        self._prefilling.popleft()
        try:
            slots = self.runner.place(job.key, len(job.group))
        except Exception as e:  # noqa: BLE001
            if self.runner.lockstep:
                raise
            self._prefill_failed(job, e)
            return
        for seq, slot in zip(job.group, slots):
            seq.slot = slot
            self._active.append(seq)
        for seq in job.group:
            self._choose_and_deliver(seq, logits)

    def _prefill_failed(self, job: _Prefill, error: Exception) -> None:
        log.exception("prefill of %s failed", job.group[0].request.id, exc_info=error)
        self._end_prefill(job)
        for seq in job.group:
            self._fail(seq, f"generation failed: {error}")

    def _end_prefill(self, job: _Prefill) -> None:
        if job in self._prefilling:
            self._prefilling.remove(job)
        self.runner.drop(job.key)

    def _decode_step(self) -> None:
        active = sorted(self._active, key=lambda s: s.slot)
        self.peak_batch = max(self.peak_batch, len(active))
        # Phi-3's longrope: a sequence whose step is the first past the trained context is recomputed
        # whole, as generate() does (ModelConfig.longrope_restarts); the others decode together.
        config = self.model.config
        restarting = [s for s in active if config.longrope_restarts(s.length, s.length - 1)]
        drafting = [s for s in active if s.drafter is not None and s not in restarting]
        decoding = [s for s in active if s not in restarting and s not in drafting]
        began = time.perf_counter()
        try:
            rows: dict[int, torch.Tensor] = {}
            drafts: dict[int, list[int]] = {}
            for seq in drafting:  # prompt lookup: the newest token and a draft, in one pass of its own
                drafts[id(seq)] = seq.drafter.draft(seq.sequence, max(0, seq.max_tokens - seq.generated - 1))
                fed = [seq.last_token, *drafts[id(seq)]]
                rows[id(seq)] = self.runner.verify(seq.slot, fed, seq.length - 1)  # [T, V]
            if decoding:
                logits = self.runner.decode([s.slot for s in decoding], [s.last_token for s in decoding])  # [B, V]
                rows.update({id(seq): logits[row : row + 1] for row, seq in enumerate(decoding)})
                self._step_end = time.perf_counter()
                self._step_s = self._step_end - began
            for seq in restarting:
                rows[id(seq)] = self.runner.restart(seq.slot, seq.ids[0, : seq.length].tolist())  # [1, V]
        except Exception as e:  # noqa: BLE001
            if self.runner.lockstep:
                raise
            log.exception("decode step failed")
            for seq in active:
                self._fail(seq, f"generation failed: {e}")
            return
        for seq in active:
            draft = drafts.get(id(seq), [])
            for t in range(len(draft) + 1):  # a draft's tokens while the model chooses them
                token = self._choose_and_deliver(seq, rows[id(seq)][t : t + 1])
                if seq.done or t == len(draft) or token != draft[t]:
                    break
            if seq.drafter is not None and not seq.done:
                seq.drafter.kept(len(draft), t)

    def _choose_and_deliver(self, seq: _Sequence, logits: torch.Tensor) -> int | None:
        """Pick seq's next token from its logits [1, V] and send it; a failure ends only this
        sequence. Returns the token (None on failure)."""
        try:
            delta = seq.choose(logits)
        except Exception as e:  # noqa: BLE001
            log.exception("request %s: choosing a token failed", seq.request.id)
            self._fail(seq, f"generation failed: {e}")
            return None
        self._deliver(seq, delta)
        return delta.token_ids[0]

    def _deliver(self, seq: _Sequence, delta: Delta) -> None:
        request, now = seq.request, time.perf_counter()
        if request.first_token is None:
            request.first_token = now
            if self.metrics is not None:
                self.metrics.first_token(now - request.submitted)
        if self.metrics is not None:
            self.metrics.tokens(len(delta.token_ids))
            if seq.last_delivery is not None:
                self.metrics.token_gap(now - seq.last_delivery)
        seq.last_delivery = now
        request.completion_tokens += len(delta.token_ids)
        request.push(delta)
        if delta.finish_reason is not None:
            request.finish_reasons.append(delta.finish_reason)
            self._leave(seq, delta.finish_reason)

    def _leave(self, seq: _Sequence, reason: str | None) -> None:
        """The sequence is done (reason) or cancelled (None): free its slot, keep used slots packed."""
        if seq.done:
            return
        if seq in self._active:
            self._active.remove(seq)
            freed = seq.slot
            self.runner.free(freed)
            top = max((s for s in self._active if s.slot > freed), key=lambda s: s.slot, default=None)
            if top is not None:
                self.runner.move(top.slot, freed)
                top.slot = freed
        seq.slot = None
        self._release_admitted(seq)

    def _release_admitted(self, seq: _Sequence) -> None:
        with self._cond:
            self._admitted -= 1
        self._end_of_sequence(seq)

    def _end_of_sequence(self, seq: _Sequence) -> None:
        seq.done = True
        request = seq.request
        request.remaining -= 1
        if request.remaining:
            return
        now = time.perf_counter()
        first = request.first_token
        if request.failed:
            self.failed += 1
            outcome = "failed"
        elif request.cancelled:
            self.cancelled += 1
            outcome = "cancelled"
        elif len(request.finish_reasons) == len(request.sequences):
            self.completed += 1
            outcome = "finish " + ",".join(request.finish_reasons)
            request.push(Done(request.prompt_tokens, request.completion_tokens))
        else:
            self.failed += 1
            outcome = "failed"
        if self.metrics is not None:
            self.metrics.request_ended(outcome.split(" ")[0].replace("finish", "finished"), request.prompt_tokens)
        # tokens/s: the request's own pace after its first token (what a streaming client sees)
        decode_rate = (
            (request.completion_tokens - len(request.sequences)) / max(now - first, 1e-9)
            if first is not None and request.completion_tokens > len(request.sequences)
            else 0.0
        )
        log.info(
            "request %s: %d tokens in, %d out, first token %s, %.1f tokens/s, %s",
            request.id,
            request.prompt_tokens,
            request.completion_tokens,
            f"{first - request.submitted:.3f} s" if first is not None else "none",
            decode_rate,
            outcome,
        )

    def _fail(self, seq: _Sequence, message: str) -> None:
        """The sequence cannot go on: the request fails, and its other sequences are dropped."""
        request = seq.request
        if not request.failed:
            request.push(Failed(message))
        request.failed = request.cancelled = True
        self._leave(seq, None)

    def _shutdown(self) -> None:
        for seq in self._in_hand([]):
            self._fail(seq, "the server is shutting down")
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for seq in waiting:
            if not seq.request.failed:
                seq.request.push(Failed("the server is shutting down"))
            seq.request.failed = True
            self._end_of_sequence(seq)
