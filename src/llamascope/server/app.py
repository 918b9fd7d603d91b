"""An OpenAI-compatible HTTP face over an `Engine`: FastAPI app, request schemas, streaming.

Endpoints: `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/completions`,
`POST /v1/chat/completions` (the chat template applied with `Tokenizer.encode_chat`), `GET /health`,
`GET /metrics` (Prometheus text: server/metrics.py).
`stream: true` answers with server-sent events in OpenAI's chunk format, ending in `data: [DONE]`.

Generation settings, per request and per choice, resolve as in `Engine.generate`
(`GenerationConfig.resolve`: the request over generation_config.json over config.json over the
server's defaults, SERVER_DEFAULTS, over transformers'); the request's fields map to settings:
  temperature  0 means greedy search (do_sample false); another value samples at it; without it,
               generation_config.json's do_sample and temperature, else sampling at 0.8
  top_p        the request's, else generation_config.json's, else 0.95
  top_k        the request's (0 or -1: off), else generation_config.json's, else 40
  stop         stop strings, stopping as in `generate` (stopping.py); the text ends before them
  seed         choice i draws from a generator seeded seed + i (see scheduler.py)
  max_tokens   must fit the context with the prompt (`config.room_for_new_tokens`); without it,
               16 for a completion (clipped to the room), the rest of the context for a chat
  presence_penalty / frequency_penalty / logit_bias: additive, as OpenAI documents them
  logprobs     of the distribution the token was drawn from (after temperature, top-p, penalties)
Other settings of generation_config.json (repetition_penalty, ...) apply as in `Engine.generate`,
and a chat reply ends at the template's end-of-turn tokens as in `Engine.chat`.

Every error is OpenAI's error object {"error": {"message", "type", "param", "code"}}: 400 for a
malformed body or setting (the message and `param` name the field), 401 for a missing or wrong
API key, 404 for an unknown model or route, 429 (with Retry-After) when the queue is full.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import math
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import openmp
from ..cache import SlotKVCache
from ..config import DEFAULT_MAX_NEW_TOKENS, ContextLengthError, room_for_new_tokens
from ..constraints import constraint_from, grammars_for
from ..errors import LlamascopeError
from ..tokenizer import check_text
from .draining import DrainingServer
from .lockstep import leader_runner, serve_leader
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import ServerMetrics
from .scheduler import Delta, Done, Failed, ModelRunner, QueueFull, Request, Scheduler, SequenceSpec, ShuttingDown
from .tools import call_constraint, chosen_functions, parse_calls, parse_tools, render

log = logging.getLogger("llamascope")

MAX_STOP_STRINGS = 16
# What a request that sets no sampling field gets where the model's files say nothing: sampling
# (OpenAI's), at llama-server's temperature, top-k and top-p rather than temperature 1 over the whole
# vocabulary. They rank below the model's files (GenerationConfig.resolve).
SERVER_DEFAULTS = {"do_sample": True, "temperature": 0.8, "top_k": 40, "top_p": 0.95}


# ---- errors ------------------------------------------------------------------------------------


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers


def error_response(
    status: int,
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _param_name(loc: list) -> str | None:
    """('messages', 0, 'content') -> 'messages[0].content'."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name += ("." if name else "") + str(part)
    return name or None


def _validation_error(errors: list[dict]) -> JSONResponse:
    error = errors[0]
    loc = list(error.get("loc", ()))
    if loc and loc[0] == "body":
        loc = loc[1:]
    if error.get("type") == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "")
        return error_response(
            400, f"the request body is not valid JSON{': ' + detail if detail else ''}", code="invalid_json"
        )
    if not loc:
        if error.get("type") == "missing":
            return error_response(400, "the request needs a JSON object body", code="invalid_body")
        return error_response(400, f"the request body must be a JSON object: {error.get('msg')}", code="invalid_body")
    param = _param_name(loc)
    message = str(error.get("msg", "invalid value"))
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if error.get("type") == "missing":
        message = "this field is required"
    return error_response(400, f"'{param}': {message}", param=param, code="invalid_value")


# ---- request schemas ---------------------------------------------------------------------------


class _Schema(BaseModel):
    # strict: "5" is not a number and true is not 1; fields the server does not know are ignored.
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Schema):
    include_usage: bool = False


class _Sampling(_Schema):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=128)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Any = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # fields vLLM and llama-server take beside OpenAI's
    top_k: int | None = Field(None, ge=-1)  # 0 or -1: off
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool | None = False
    # prompt lookup decoding (transformers' names): drafts from the prompt checked in one pass; off by default
    prompt_lookup_num_tokens: int | None = Field(None, ge=1, le=64)
    max_matching_ngram_size: int | None = Field(None, ge=1, le=16)
    # constrained output: OpenAI's response_format, vLLM's guided_* and llama.cpp's grammar / json_schema
    response_format: dict | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    grammar: str | None = None
    json_schema: Any = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise ValueError("expected a string or a list of strings")
        if len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(s == "" for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not (token.isascii() and token.isdigit() and len(token) <= 12):
                raise ValueError(f"keys must be token ids (digits 0-9), found {token!r}")
            if not (math.isfinite(bias) and -100 <= bias <= 100):
                raise ValueError(f"biases must be between -100 and 100, found {bias!r} for token {token}")
        return value


class CompletionRequest(_Sampling):
    prompt: Any
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> list:
        """-> a list of prompts, each a string or a list of token ids."""

        def ids(v: Any) -> bool:
            return isinstance(v, list) and len(v) > 0 and all(isinstance(t, int) and not isinstance(t, bool) for t in v)

        if isinstance(value, str):
            return [value]
        if ids(value):
            return [value]
        if isinstance(value, list) and value and all(isinstance(p, str) or ids(p) for p in value):
            return value
        raise ValueError(
            "expected a string, a list of strings, a list of token ids or a list of lists of token ids (not empty)"
        )


class ChatMessage(_Schema):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None
    name: str | None = None
    tool_calls: list[dict] | None = None  # an assistant's earlier calls (tools.py renders them)
    tool_call_id: str | None = None  # a tool's result: the call it answers

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> str:
        """A string, null, or a list of text parts -> the text."""
        if value is None:
            return ""
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            texts = []
            for part in value:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ValueError('only text content parts ({"type": "text", "text": ...}) are supported')
                texts.append(part["text"])
            return "".join(texts)
        raise ValueError("expected a string or a list of text parts")


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list | None = None
    tool_choice: Any = None


# ---- the app -----------------------------------------------------------------------------------


@dataclasses.dataclass
class ServerSettings:
    model_name: str
    max_batch: int = 8
    max_queue: int = 64
    kv_budget_bytes: int = 1 << 30
    prefix_cache_bytes: int = 256 << 20  # whole prompt pieces kept for later prompts; 0: no prefix cache
    api_key: str | None = None
    context: int | None = None  # positions each sequence may use; None: the model's, or what the budget allows
    max_body_bytes: int = 8 << 20  # a larger request body gets 413 before it is read whole
    shutdown_grace_s: float = 30.0  # on SIGTERM / Ctrl-C, how long running requests may go on


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 (by its Content-Length before any
    of it is read, else as soon as what has come passes the limit); the app gets the body whole."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(int(declared), scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body came
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(size, scope, receive, send)
            if not message.get("more_body"):
                break
        replayed = False

        async def receive_body():
            nonlocal replayed
            if replayed:
                return await receive()  # (a streaming response listens here for the client leaving)
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, receive_body, send)

    async def _refuse(self, size: int, scope, receive, send) -> None:
        response = error_response(
            413, f"the request body has {size} bytes or more; this server takes at most {self.max_bytes}"
        )
        await response(scope, receive, send)


class BearerAuth:
    """ASGI middleware: /v1 routes need `Authorization: Bearer <api key>` (checked before the body)."""

    def __init__(self, app, api_key: str):
        self.app, self.api_key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            headers = [value for name, value in scope.get("headers") or [] if name.lower() == b"authorization"]
            header = headers[0] if len(headers) == 1 else b""
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                message = (
                    "missing API key: send the header 'Authorization: Bearer <key>'"
                    if not headers
                    else f"{len(headers)} Authorization headers: send one"
                    if len(headers) > 1
                    else "incorrect API key"
                )
                response = error_response(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class StatusCounter:
    """ASGI middleware: counts every HTTP response by status code (ServerMetrics.response)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.response(message["status"])
            await send(message)

        await self.app(scope, receive, counted)


def default_model_name(engine) -> str:
    path = Path(engine.loaded.checkpoint.path)
    return path.stem if path.is_file() else path.name


def slot_capacity_for(engine, settings: ServerSettings) -> int:
    """Positions per slot: `settings.context` (refused where the model or the KV budget cannot
    hold it), else the model's context, or less so that max_batch slots fit the KV budget. Logged."""
    c = engine.config
    per_token = SlotKVCache.token_bytes(c.num_hidden_layers, engine.model.kv_heads, c.head_dim, engine.model.dtype)
    fits = settings.kv_budget_bytes // (settings.max_batch * per_token)
    budget = f"--kv-budget-mb {settings.kv_budget_bytes / 2**20:g} for --max-batch {settings.max_batch}"
    if settings.context is not None and settings.context > c.max_position_embeddings:
        raise LlamascopeError(f"--context {settings.context}: the model's context is {c.max_position_embeddings}")
    if settings.context is not None and settings.context > fits:
        raise LlamascopeError(
            f"--context {settings.context} does not fit {budget} ({per_token} bytes a position: {fits} positions "
            f"each); raise the budget, or lower --max-batch or --context"
        )
    capacity = settings.context or min(c.max_position_embeddings, fits)
    if capacity < 16:
        raise LlamascopeError(f"{budget} leaves {capacity} positions a sequence; raise it or lower --max-batch")
    why = "as asked" if settings.context else "the model's" if capacity == c.max_position_embeddings else budget
    log.info("each of %d sequences may use %d positions (%s)", settings.max_batch, capacity, why)
    return capacity


def create_app(engine, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app serving `engine`; the scheduler thread runs while the app's lifespan does."""
    settings = settings or ServerSettings(model_name=default_model_name(engine))
    if engine.tokenizer is None:
        raise LlamascopeError(f"{engine.loaded.checkpoint.path}: the server needs a tokenizer")
    # rank 0 of a tensor-parallel group: the other ranks repeat its model calls
    runner = leader_runner(engine.parallel) if _parallel(engine) else ModelRunner
    scheduler = Scheduler(
        engine.model,
        engine.tokenizer,
        settings.max_batch,
        settings.max_queue,
        slot_capacity_for(engine, settings),
        runner=runner,
        prefix_cache_bytes=settings.prefix_cache_bytes,
    )
    scheduler.metrics = metrics = ServerMetrics(scheduler.stats)
    app = FastAPI(title="llamascope", lifespan=_lifespan(scheduler, settings))
    app.state.engine, app.state.scheduler, app.state.settings = engine, scheduler, settings
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if settings.api_key is not None:
        if not settings.api_key.strip():
            raise LlamascopeError("--api-key is empty: give a key, or leave the option out to serve without one")
        app.add_middleware(BearerAuth, api_key=settings.api_key)
    app.add_middleware(StatusCounter, metrics=metrics)  # (outermost: it sees the 401s too)
    _add_error_handlers(app)
    _add_model_routes(app, scheduler, settings)
    _add_metrics_route(app, metrics)
    _add_generation_routes(app, engine, scheduler, settings)
    return app


def _lifespan(scheduler: Scheduler, settings: ServerSettings):
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # the scheduler's thread is the one that runs the model in parallel (openmp.py): this
        # thread lets go of the workers it loaded the model with, and the HTTP threads run serially
        openmp.release_pool()
        openmp.serial_thread()
        http_threads = ThreadPoolExecutor(thread_name_prefix="llamascope-http", initializer=openmp.serial_thread)
        asyncio.get_running_loop().set_default_executor(http_threads)
        scheduler.start()
        log.info(
            "serving %s: up to %d sequences of %d positions, queue of %d",
            settings.model_name,
            settings.max_batch,
            scheduler.slot_capacity,
            settings.max_queue,
        )
        try:
            yield
        finally:
            scheduler.stop()

    return lifespan


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's error object."""

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        return _validation_error(list(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(e.status_code, str(e.detail), param=None, code=code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):
        log.exception("unexpected error in %s", request.url.path)
        return error_response(500, f"internal error: {type(e).__name__}", type="server_error")


def _add_metrics_route(app: FastAPI, metrics: ServerMetrics) -> None:
    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)


def _add_model_routes(app: FastAPI, scheduler: Scheduler, settings: ServerSettings) -> None:
    """/health, /v1/models and /v1/models/{id}."""
    created = int(time.time())

    def model_card() -> dict:
        return {
            "id": settings.model_name,
            "object": "model",
            "created": created,
            "owned_by": "llamascope",
            "max_model_len": scheduler.slot_capacity,
        }

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, **scheduler.stats()}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        _check_model(model_id, settings)
        return model_card()


def _add_generation_routes(app: FastAPI, engine, scheduler: Scheduler, settings: ServerSettings) -> None:
    """/v1/completions and /v1/chat/completions: build the choices, queue them, stream or collect."""
    model = settings.model_name

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        _check_model(body.model, settings)
        specs, echo = await _completion_specs(engine, body, scheduler.slot_capacity, settings)
        request = _submit(scheduler, "cmpl", specs)
        logprobs = body.logprobs is not None
        if body.stream:
            return _stream(http, scheduler, request, _CompletionChunks(request, model, echo, logprobs), body)
        choices, usage = await _collect(http, scheduler, request)
        return _completion_body(request, model, choices, usage, echo, logprobs)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http: HTTPRequest):
        _check_model(body.model, settings)
        calls = _tool_calls(body)
        specs = await _chat_specs(engine, body, scheduler.slot_capacity, settings, calls)
        request = _submit(scheduler, "chatcmpl", specs)
        logprobs = bool(body.logprobs)
        if body.stream:
            return _stream(http, scheduler, request, _ChatChunks(request, model, logprobs, calls), body)
        choices, usage = await _collect(http, scheduler, request)
        return _chat_body(request, model, choices, usage, logprobs, calls)


def _check_model(name: str, settings: ServerSettings) -> None:
    if name != settings.model_name:
        raise APIError(
            404,
            f"the model '{name}' does not exist; this server has '{settings.model_name}'",
            param="model",
            code="model_not_found",
        )


def _completion_body(
    request: Request, model: str, choices: list[_Choice], usage: dict, echo: list[str], logprobs: bool
) -> dict:
    return {
        "id": request.id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": c.index,
                "text": echo[c.index] + c.text,
                "logprobs": _completion_logprobs(c.logprobs, len(echo[c.index])) if logprobs else None,
                "finish_reason": c.finish_reason,
            }
            for c in choices
        ],
        "usage": usage,
    }


def _chat_body(
    request: Request, model: str, choices: list[_Choice], usage: dict, logprobs: bool, calls: _Calls
) -> dict:
    replies = [calls.reply(c.text, c.finish_reason) for c in choices]
    return {
        "id": request.id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": c.index,
                "message": message,
                "logprobs": {"content": _chat_logprobs(c.logprobs)} if logprobs else None,
                "finish_reason": finish,
            }
            for c, (message, finish) in zip(choices, replies)
        ],
        "usage": usage,
    }


# ---- building a request ------------------------------------------------------------------------


async def _completion_specs(
    engine, body: CompletionRequest, capacity: int, settings: ServerSettings
) -> tuple[list[SequenceSpec], list[str]]:
    """One spec per choice (prompts x n, prompt by prompt), and the text each choice echoes."""
    if body.suffix:
        raise APIError(400, "'suffix' is not supported", param="suffix", code="unsupported")
    n = body.n or 1
    if body.best_of is not None and body.best_of != n:
        raise APIError(400, "'best_of' other than n is not supported", param="best_of", code="unsupported")
    _check_choices(len(body.prompt) * n, settings, "n" if len(body.prompt) == 1 else "prompt")
    prompts = await asyncio.to_thread(_encode_prompts, engine, body.prompt)
    specs, echo = [], []
    for i, (text, ids) in enumerate(prompts):
        max_tokens = _max_tokens(
            len(ids), body.max_tokens, DEFAULT_MAX_NEW_TOKENS["server_completion"], capacity, "prompt"
        )
        for j in range(n):  # (in a thread: compiling a constraint may take a moment)
            specs.append(await asyncio.to_thread(_spec, engine, body, ids, max_tokens, i * n + j, body.logprobs, False))
            echo.append(text if body.echo else "")
    return specs, echo


@dataclasses.dataclass
class _Calls:
    """A chat request's tools (tools.py): the mode of tool_choice and the functions it may call."""

    mode: str = "none"
    functions: list = dataclasses.field(default_factory=list)

    def reply(self, text: str, reason: str | None) -> tuple[dict, str | None]:
        """The assistant message of a finished reply (its tool calls, where it made any, and its
        text) and its finish reason ("tool_calls" where a reply that stopped made calls)."""
        if self.mode == "none":
            return {"role": "assistant", "content": text}, reason
        content, calls = parse_calls(text, self.functions)
        if not calls:
            return {"role": "assistant", "content": content}, reason
        return {
            "role": "assistant",
            "content": content,
            "tool_calls": calls,
        }, "tool_calls" if reason == "stop" else reason


def _tool_calls(body: ChatRequest) -> _Calls:
    try:
        functions = parse_tools(body.tools)
    except LlamascopeError as e:
        raise APIError(400, str(e), param="tools", code="invalid_value") from None
    try:
        mode, chosen = chosen_functions(functions, body.tool_choice)
    except LlamascopeError as e:
        raise APIError(400, str(e), param="tool_choice", code="invalid_value") from None
    if mode == "required" and _constraint_field(body) is not None:
        raise APIError(
            400, f"a required tool call and '{_constraint_field(body)}' cannot both hold", param="tool_choice"
        )
    return _Calls(mode, chosen)


async def _chat_specs(
    engine, body: ChatRequest, capacity: int, settings: ServerSettings, calls: _Calls
) -> list[SequenceSpec]:
    """One spec per choice; the messages in the chat template, the reply ending at its end of turn."""
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    _check_choices(body.n or 1, settings, "n")
    messages = [
        {"role": m.role, "content": m.content or "", "tool_calls": m.tool_calls, "tool_call_id": m.tool_call_id}
        for m in body.messages
    ]
    offered = calls.functions if calls.mode != "none" else []
    try:
        rendered, extra = render(messages, offered, engine.tokenizer.chat_template or "")
        ids = await asyncio.to_thread(engine.tokenizer.encode_chat, rendered, True, **extra)
    except (LlamascopeError, KeyError, TypeError) as e:
        raise APIError(400, str(e), param="messages") from None
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = _max_tokens(len(ids), requested, None, capacity, "messages")
    top = (body.top_logprobs or 0) if body.logprobs else None
    constraint = call_constraint(calls.functions) if calls.mode == "required" else None
    return [  # (in a thread: compiling a constraint may take a moment)
        await asyncio.to_thread(_spec, engine, body, ids, max_tokens, j, top, True, constraint)
        for j in range(body.n or 1)
    ]


def _encode_prompts(engine, prompts: list) -> list[tuple[str, list[int]]]:
    """Each prompt as (text, token ids); token-id prompts are checked against the vocabulary."""
    vocab = engine.config.vocab_size
    out = []
    for i, prompt in enumerate(prompts):
        param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        if isinstance(prompt, str):
            try:
                check_text(prompt, f"'{param}'")
            except LlamascopeError as e:
                raise APIError(400, str(e), param=param) from None
            ids = engine.tokenizer.encode(prompt)
            if not ids:
                raise APIError(400, f"'{param}' encodes to no tokens", param=param)
            out.append((prompt, ids))
        else:
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise APIError(
                    400, f"'{param}': token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})", param=param
                )
            out.append((engine.tokenizer.decode(prompt), list(prompt)))
    return out


def _max_tokens(
    prompt_tokens: int, requested: int | None, default: int | None, capacity: int, prompt_param: str
) -> int:
    """The new tokens of a request by the context rule (config.room_for_new_tokens, over the slot
    capacity): a max_tokens the client gave must fit, else 400 context_length_exceeded; the
    server's own default (None: the rest of the context) is clipped to the room."""
    try:
        room = room_for_new_tokens(prompt_tokens, capacity)
    except ContextLengthError:
        raise _context_error(prompt_tokens, requested or 1, capacity, prompt_param, prompt_param) from None
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise _context_error(prompt_tokens, requested, capacity, prompt_param, "max_tokens")
    return requested


def _context_error(prompt_tokens: int, max_tokens: int, capacity: int, prompt_param: str, param: str) -> APIError:
    return APIError(
        400,
        f"this model's maximum context length is {capacity} tokens; you asked for "
        f"{prompt_tokens + max_tokens} ({prompt_tokens} in the {prompt_param}, {max_tokens} to generate); "
        f"shorten the {prompt_param} or lower max_tokens",
        param=param,
        code="context_length_exceeded",
    )


# The request fields that constrain the output, each as constraints.constraint_from's argument.
CONSTRAINT_FIELDS = {
    "response_format": "response_format",
    "guided_json": "json_schema",
    "json_schema": "json_schema",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
    "grammar": "grammar",
}


def _constraint_field(body: _Sampling) -> str | None:
    """The field that constrains this request's output (the first given)."""
    return next((name for name in CONSTRAINT_FIELDS if getattr(body, name) is not None), None)


def _constraint(body: _Sampling) -> dict | None:
    given = [name for name in CONSTRAINT_FIELDS if getattr(body, name) is not None]
    if len(given) > 1:
        raise APIError(400, f"give one of {', '.join(given)}, not several", param=given[1], code="invalid_value")
    if not given:
        return None
    try:
        return constraint_from(**{CONSTRAINT_FIELDS[given[0]]: getattr(body, given[0])})
    except LlamascopeError as e:
        raise APIError(400, str(e), param=given[0], code="invalid_value") from None


def _openai_settings(body: _Sampling, max_tokens: int, choice: int) -> dict[str, Any]:
    """A request's OpenAI settings as the call's generation settings (see the module's docstring)."""
    call: dict[str, Any] = {"max_new_tokens": max_tokens, "stop_strings": body.stop or None}
    call["constraint"] = _constraint(body)
    call.update(
        repetition_penalty=body.repetition_penalty,
        min_new_tokens=body.min_tokens or None,
        eos_token_id=[] if body.ignore_eos else None,
        prompt_lookup_num_tokens=body.prompt_lookup_num_tokens,
        max_matching_ngram_size=body.max_matching_ngram_size,
    )
    if body.seed is not None:
        call["seed"] = (body.seed + choice) % 2**64
    if body.temperature == 0:  # greedy search: temperature 0 is not a transformers setting
        call["do_sample"] = False
        return call
    if body.temperature is not None:
        call.update(do_sample=True, temperature=body.temperature)
    call.update(top_p=body.top_p, min_p=body.min_p, top_k=None if body.top_k is None else max(body.top_k, 0))
    return call


def _spec(
    engine,
    body: _Sampling,
    ids: list[int],
    max_tokens: int,
    choice: int,
    logprobs: int | None,
    chat: bool,
    constraint: dict | None = None,
) -> SequenceSpec:
    """One choice's spec; `constraint` (a required tool call's) in place of the body's."""
    call = _openai_settings(body, max_tokens, choice)
    if constraint is not None:
        call["constraint"] = constraint
    try:  # tokens are chosen here (rank 0) alone
        config = engine.local_generation_config(chat, SERVER_DEFAULTS, **call)
    except LlamascopeError as e:
        raise APIError(400, str(e)) from None
    if body.ignore_eos:  # (a chat's end-of-turn ids too)
        config.eos_token_id = []
    if config.constraint is not None:  # checked and compiled here, so the worker only finds it in its cache
        try:
            grammars_for(engine.tokenizer, engine.config.vocab_size, config.eos_token_id).compile(config.constraint)
        except LlamascopeError as e:
            raise APIError(400, str(e), param=_constraint_field(body) or "tools", code="invalid_value") from None
    if config.prompt_lookup_num_tokens and engine.config.rope_varies_with_length:
        raise APIError(
            400,
            f"'prompt_lookup_num_tokens': not with this model's rope_type {engine.config.rope_type!r} "
            "(its positions' angles depend on the sequence's length)",
            param="prompt_lookup_num_tokens",
        )
    bias = {int(t): b for t, b in (body.logit_bias or {}).items()}
    outside = [t for t in bias if t >= engine.config.vocab_size]
    if outside:
        raise APIError(400, f"'logit_bias': token ids {outside[:5]} are outside the vocabulary", param="logit_bias")
    return SequenceSpec(
        list(ids),
        config,
        logprobs=logprobs,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=bias,
    )


def _check_choices(count: int, settings: ServerSettings, param: str) -> None:
    """A request may not ask for more sequences than the server can hold at once (slots + queue)."""
    limit = settings.max_batch + settings.max_queue
    if count > limit:
        raise APIError(
            400,
            f"'{param}': {count} choices asked (prompts x n), this server holds at most {limit} at once",
            param=param,
            code="invalid_value",
        )


def _submit(scheduler: Scheduler, prefix: str, specs: list[SequenceSpec]) -> Request:
    request = Request(f"{prefix}-{secrets.token_hex(12)}", specs, asyncio.get_running_loop())
    try:
        scheduler.submit(request)
    except QueueFull as e:
        raise APIError(429, str(e), type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
    except ShuttingDown as e:
        raise APIError(503, str(e), type="server_error", code="shutting_down") from None
    except LlamascopeError as e:
        raise APIError(400, str(e)) from None
    return request


# ---- collecting and streaming results ----------------------------------------------------------


@dataclasses.dataclass
class _Choice:
    index: int
    text: str = ""
    logprobs: list = dataclasses.field(default_factory=list)
    finish_reason: str | None = None


class _Disconnected:
    pass


def _usage(done: Done) -> dict:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


async def _watch_disconnect(http: HTTPRequest, scheduler: Scheduler, request: Request) -> None:
    """Cancel the request as soon as the client goes away (the body has been read already)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            scheduler.cancel(request)
            request.events.put_nowait(_Disconnected())
            return


async def _collect(http: HTTPRequest, scheduler: Scheduler, request: Request) -> tuple[list[_Choice], dict]:
    choices = [_Choice(i) for i in range(len(request.sequences))]
    watcher = asyncio.create_task(_watch_disconnect(http, scheduler, request))
    try:
        while True:
            event = await request.events.get()
            if isinstance(event, Delta):
                choice = choices[event.index]
                choice.text += event.text
                choice.logprobs.extend(event.logprobs or [])
                choice.finish_reason = event.finish_reason or choice.finish_reason
            elif isinstance(event, Done):
                return choices, _usage(event)
            elif isinstance(event, Failed):
                raise APIError(500, event.message, type="server_error")
            elif isinstance(event, _Disconnected):
                raise APIError(499, "the client closed the connection", code="client_closed")
    finally:
        watcher.cancel()
        scheduler.cancel(request)  # a no-op when the request has finished


def _stream(http: HTTPRequest, scheduler: Scheduler, request: Request, chunks, body: _Sampling) -> StreamingResponse:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events():
        finished = False
        try:
            for chunk in chunks.opening():
                yield _sse(chunk, include_usage)
            while True:
                event = await request.events.get()
                if isinstance(event, Delta):
                    if event.text or event.finish_reason or chunks.logprobs:
                        yield _sse(chunks.delta(event), include_usage)
                elif isinstance(event, Done):
                    finished = True
                    if include_usage:
                        yield _sse(chunks.usage_chunk(_usage(event)), False)
                    yield "data: [DONE]\n\n"
                    return
                elif isinstance(event, Failed):
                    finished = True
                    yield (
                        "data: "
                        + json.dumps(
                            {"error": {"message": event.message, "type": "server_error", "param": None, "code": None}}
                        )
                        + "\n\n"
                    )
                    return
        finally:
            if not finished:  # the client went away (the task was cancelled) or the stream was closed
                scheduler.cancel(request)

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def _sse(chunk: dict, include_usage: bool) -> str:
    if include_usage:
        chunk["usage"] = None
    return "data: " + json.dumps(chunk, ensure_ascii=False) + "\n\n"


class _CompletionChunks:
    def __init__(self, request: Request, model: str, echo: list[str], logprobs: bool):
        self.request, self.model, self.echo, self.logprobs = request, model, echo, logprobs
        self.created = int(time.time())
        self.offsets = [len(e) for e in echo]

    def _chunk(self, choices: list[dict]) -> dict:
        return {
            "id": self.request.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }

    def opening(self) -> list[dict]:
        return [
            self._chunk([{"index": i, "text": e, "logprobs": None, "finish_reason": None}])
            for i, e in enumerate(self.echo)
            if e
        ]

    def delta(self, d: Delta) -> dict:
        logprobs = None
        if self.logprobs:
            logprobs = _completion_logprobs(d.logprobs or [], self.offsets[d.index])
            self.offsets[d.index] += sum(len(e["text"]) for e in d.logprobs or [])
        return self._chunk([{"index": d.index, "text": d.text, "logprobs": logprobs, "finish_reason": d.finish_reason}])

    def usage_chunk(self, usage: dict) -> dict:
        return dict(self._chunk([]), usage=usage)


class _ChatChunks:
    """Chat chunks; with tools offered, each choice's text is held until it ends and then sent as
    its content and tool calls (a call cannot be told from text until its block closes)."""

    def __init__(self, request: Request, model: str, logprobs: bool, calls: _Calls):
        self.request, self.model, self.logprobs, self.calls = request, model, logprobs, calls
        self.created = int(time.time())
        self.held = [""] * len(request.sequences)

    def _chunk(self, choices: list[dict]) -> dict:
        return {
            "id": self.request.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }

    def opening(self) -> list[dict]:
        return [
            self._chunk(
                [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
            )
            for i in range(len(self.request.sequences))
        ]

    def delta(self, d: Delta) -> dict:
        logprobs = {"content": _chat_logprobs(d.logprobs or [])} if self.logprobs else None
        finish = d.finish_reason
        if self.calls.mode != "none":
            self.held[d.index] += d.text
            if finish is None:
                return self._chunk([{"index": d.index, "delta": {}, "logprobs": logprobs, "finish_reason": None}])
            message, finish = self.calls.reply(self.held[d.index], finish)
            delta = {"content": message["content"]}
            if "tool_calls" in message:
                delta["tool_calls"] = [dict(call, index=i) for i, call in enumerate(message["tool_calls"])]
            return self._chunk([{"index": d.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])
        delta = {"content": d.text} if d.text or finish is None else {}
        return self._chunk([{"index": d.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])

    def usage_chunk(self, usage: dict) -> dict:
        return dict(self._chunk([]), usage=usage)


def _completion_logprobs(entries: list[dict], offset: int) -> dict:
    """The legacy completions format: tokens, token_logprobs, top_logprobs, text_offset."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        out["tokens"].append(e["text"])
        out["token_logprobs"].append(e["logprob"])
        out["top_logprobs"].append({t["text"]: t["logprob"] for t in e["top"]})
        out["text_offset"].append(offset)
        offset += len(e["text"])
    return out


def _chat_logprobs(entries: list[dict]) -> list[dict]:
    def item(e: dict) -> dict:
        return {"token": e["text"], "logprob": e["logprob"], "bytes": list(e["text"].encode("utf-8"))}

    return [dict(item(e), top_logprobs=[item(t) for t in e["top"]]) for e in entries]


# ---- running it --------------------------------------------------------------------------------


def _parallel(engine) -> bool:
    return engine.parallel is not None and engine.parallel.world_size > 1


def serve(
    engine, host: str = "127.0.0.1", port: int = 8000, settings: ServerSettings | None = None, log_level: str = "info"
) -> None:
    """Run the server until interrupted (uvicorn, one process; the model runs on one worker thread).

    Under tensor parallelism this is rank 0's part; the other ranks run `lockstep.follow`."""
    if _parallel(engine) and not engine.parallel.is_main:
        raise LlamascopeError(
            f"tensor parallel {engine.parallel.describe()}: only rank 0 serves; "
            f"the other ranks run llamascope.server.lockstep.follow"
        )
    app = create_app(engine, settings)
    if _parallel(engine):
        serve_leader(app, host, port, log_level)
        return
    grace = app.state.settings.shutdown_grace_s
    DrainingServer.for_app(app, host, port, log_level, grace).run()
