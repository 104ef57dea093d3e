"""The HTTP API of chat_web: request/response models, validation, the worker pool, the app.

    app = build_app(engines, "nanochat-sft-d12", ServingFlags())    # FastAPI; serve with uvicorn

Endpoints (the request and response models below are the contract; /openapi.json and /docs
show them):
    POST /v1/chat/completions   OpenAI chat completions, stream or not (the official client works)
    POST /v1/completions        OpenAI (legacy) text completions of a raw prompt, stream or not
    GET  /v1/models, /v1/models/{id}
    POST /chat/completions      the UI's SSE: data: {"token"} ... {"finish_reason", "usage"} [DONE]
    GET  /health, /stats, / (the UI)

Every malformed body is a 400 {"error": {"message", "type", "param"}} naming the field: wrong
types, out-of-range values, fields this server does not support (`tools`, `response_format`,
penalties, ...: refused, never ignored), bodies over MAX_BODY_BYTES, invalid JSON, integers past
Python's digit limit, nesting past 200 levels (pydantic's JSON parser refuses both).

Admission: a request takes a slot when it is admitted (after validation, before its response
starts), and gives it back when its generation has finished; at most `workers + max_queue`
slots, beyond that HTTP 503 with Retry-After. A client that disconnects stops its generation at
the next token. `stop` strings are cut from the text (streaming included: text that could begin
a stop string is held back until it cannot); logprobs are the engine's (see nanochat.engine).
The choices behind the contract: docs/serving.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import random
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Callable, Literal, Union

import anyio
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException

from nanochat.common import get_logger
from nanochat.config import Flags, UserError, check
from nanochat.engine import Engine, TokenLogprobs
from nanochat.tokenizer import StreamDecoder, Tokenizer, chat_prompt

MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000  # all messages of a chat, or a completion prompt
MAX_TEMPERATURE = 2.0
MAX_TOP_K = 200
MAX_MAX_TOKENS = 4096
MAX_STOP = 4
MAX_STOP_CHARS = 200
MAX_TOP_LOGPROBS = 20  # chat completions; legacy completions take logprobs 0..5 like OpenAI
MAX_COMPLETION_LOGPROBS = 5
MAX_SEED = 2**63 - 1
MAX_BODY_BYTES = 1 << 20  # JSON escapes can make 32,000 characters ~6x longer; more is never a valid request
HEARTBEAT_S = 1.0  # while waiting for a worker, an SSE comment this often (and a disconnect check)
UI_PATH = Path(__file__).parent / "ui.html"

log = get_logger("serving")


@dataclass
class ServingFlags(Flags):
    """How chat_web serves: address, workers, queue, and the sampling defaults of a request."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (0.0.0.0 = every interface)"})
    port: int = field(default=8000, metadata={"help": "TCP port"})
    num_workers: int = field(default=0, metadata={"help": "model workers: 0 = one per GPU on CUDA, 1 on CPU/MPS"})
    max_queue: int = field(default=100, metadata={"help": "requests that may wait for a worker; more get HTTP 503"})
    temperature: float = field(default=0.8, metadata={"help": "default sampling temperature"})
    top_k: int = field(default=50, metadata={"help": "default top-k (0 = off)"})
    max_tokens: int = field(default=512, metadata={"help": "default longest reply in tokens"})

    def validate(self) -> None:
        super().validate()
        check(1 <= self.port <= 65535, f"--port: expected 1..65535, got {self.port}")
        check(self.num_workers >= 0, f"--num_workers: expected >= 0 (0 = auto), got {self.num_workers}")
        check(self.max_queue >= 0, f"--max_queue: expected >= 0, got {self.max_queue}")
        check(0 <= self.temperature <= MAX_TEMPERATURE, f"--temperature: expected 0..{MAX_TEMPERATURE}, got {self.temperature}")
        check(0 <= self.top_k <= MAX_TOP_K, f"--top_k: expected 0..{MAX_TOP_K} (0 = off), got {self.top_k}")
        check(1 <= self.max_tokens <= MAX_MAX_TOKENS, f"--max_tokens: expected 1..{MAX_MAX_TOKENS}, got {self.max_tokens}")


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (uvicorn listens on it), or UserError naming --host or
    --port: called before the model loads, so a typo costs a second, not a checkpoint load."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(f"--host: cannot resolve {host!r} ({e})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait for TIME_WAIT
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"--port: {port} is already in use on {host} (pick another --port)") from None
        if e.errno == errno.EACCES:
            raise UserError(f"--port: no permission to listen on {port} (ports below 1024 need root)") from None
        raise UserError(f"--host: cannot listen on {host}:{port} ({e.strerror})") from None
    return sock


# ---------------------------------------------------------------------------------------------
# request models: strict types (no "1" for 1), unknown fields refused, no NaN/Infinity

class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


def _kind(value: Any) -> str | None:
    return "str" if isinstance(value, str) else "list" if isinstance(value, list) else None


def _one_of(string: Any, array: Any, expected: str) -> Any:
    """A string-or-array field: one error naming both shapes, not one per union member."""
    return Annotated[Union[Annotated[string, Tag("str")], Annotated[array, Tag("list")]],
                     Discriminator(_kind, custom_error_type="one_of", custom_error_message=f"expected {expected}")]


MessageContent = _one_of(Annotated[str, Field(max_length=MAX_MESSAGE_CHARS)], list[TextPart],
                         "a string or a list of {'type': 'text', 'text': ...} parts")
StopStrings = _one_of(Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)],
                      Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOP)],
                      f"a string or a list of at most {MAX_STOP} strings")
Prompt = _one_of(Annotated[str, Field(min_length=1, max_length=MAX_TOTAL_CHARS)],
                 Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=MAX_MAX_TOKENS * 4)],
                 "a string or a list of token ids")


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: MessageContent
    name: str | None = Field(default=None, description="accepted and ignored")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingRequest(_Strict):
    """What every generating endpoint takes. Absent or null = the server's default."""

    temperature: Annotated[float, Field(ge=0, le=MAX_TEMPERATURE)] | None = None
    top_k: Annotated[int, Field(ge=0, le=MAX_TOP_K, description="absent = the server's default; null or 0 = off")] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    max_tokens: Annotated[int, Field(ge=1, le=MAX_MAX_TOKENS)] | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    stop: StopStrings | None = Field(default=None, description="the reply ends before the first of these strings")

    def stop_strings(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatRequest(SamplingRequest):
    """POST /chat/completions (the UI): always streamed as SSE."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]


class ChatCompletionRequest(ChatRequest):
    """POST /v1/chat/completions. Fields OpenAI has and this server lacks (tools, response_format,
    penalties, logit_bias, ...) are refused with 400."""

    model: str | None = Field(default=None, description="accepted; the one model served answers")
    n: Annotated[int, Field(ge=1, le=1, description="only 1")] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_MAX_TOKENS)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    user: str | None = Field(default=None, description="accepted and ignored")


class CompletionRequest(SamplingRequest):
    """POST /v1/completions: continue a raw prompt (text gets <|bos|> in front; token ids are used as given)."""

    prompt: Prompt
    model: str | None = Field(default=None, description="accepted; the one model served answers")
    n: Annotated[int, Field(ge=1, le=1, description="only 1")] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    user: str | None = Field(default=None, description="accepted and ignored")


# ---------------------------------------------------------------------------------------------
# response models

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


FinishReason = Literal["stop", "length"]


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One SSE event of a streamed chat completion (text/event-stream: data: <chunk>, ..., data: [DONE])."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int] = Field(description="where each token's text begins in the completion text")


class CompletionChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class Completion(BaseModel):
    """A text completion, or (streamed) one SSE event of one, with finish_reason on the last."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nanochat"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    workers: int


class WorkerStats(BaseModel):
    index: int
    device: str
    busy: bool
    requests: int


class Stats(BaseModel):
    workers: list[WorkerStats]
    workers_total: int
    workers_busy: int
    workers_free: int
    queue_length: int = Field(description="admitted requests waiting for a worker")
    max_queue: int
    requests_served: int
    tokens_generated: int
    uptime_s: float


REQUEST_MODELS = (ChatRequest, ChatCompletionRequest, CompletionRequest)


# ---------------------------------------------------------------------------------------------
# validation errors as one line naming the field

class RequestError(ValueError):
    """Bad client input: HTTP 400 with this message; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _short(value: Any) -> str:
    try:
        return json.dumps(value[:40] if isinstance(value, str) else value)[:40]
    except (TypeError, ValueError, RecursionError):
        return type(value).__name__


def _field_path(loc: tuple[Any, ...]) -> str:
    """messages[0].content from ("messages", 0, "content"), without union tags ("str"/"list")."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part not in ("str", "list"):
            path += f".{part}" if path else part
    return path


_TYPE_NAMES = {"string_type": "a string", "int_type": "an integer", "int_from_float": "an integer",
               "float_type": "a number", "bool_type": "true or false", "list_type": "a list",
               "model_type": "a JSON object", "dict_type": "a JSON object", "model_attributes_type": "a JSON object",
               "finite_number": "a finite number"}


def describe_error(error: dict[str, Any]) -> RequestError:
    """One pydantic error as a RequestError whose message names the field and what was expected."""
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    param = _field_path(tuple(error["loc"]))
    name = param or "request body"
    if kind == "json_invalid":
        return RequestError(f"request body is not valid JSON: {ctx.get('error', error['msg'])}")
    if kind == "missing":
        return RequestError(f"{name}: required", param or None)
    if kind == "extra_forbidden":
        return RequestError(f"{name}: not supported by this server", param or None)
    if kind in _TYPE_NAMES:
        got = type(value).__name__ if not param else _short(value)
        return RequestError(f"{name}: expected {_TYPE_NAMES[kind]}, got {got}", param or None)
    bounds = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le"),
              "less_than": ("<", "lt")}
    if kind in bounds:
        symbol, key = bounds[kind]
        return RequestError(f"{name}: expected a value {symbol} {ctx[key]}, got {_short(value)}", param)
    if kind == "literal_error":
        return RequestError(f"{name}: expected {ctx['expected']}, got {_short(value)}", param)
    if kind == "string_too_long":
        return RequestError(f"{name}: at most {ctx['max_length']} characters, got {len(value)}", param)
    if kind == "string_too_short":
        return RequestError(f"{name}: expected at least {ctx['min_length']} character(s)", param)
    if kind == "too_long":
        return RequestError(f"{name}: at most {ctx['max_length']} items, got {ctx['actual_length']}", param)
    if kind == "too_short":
        return RequestError(f"{name}: expected at least {ctx['min_length']} item(s), got {ctx['actual_length']}", param)
    if kind == "one_of":
        return RequestError(f"{name}: {error['msg']}, got {_short(value)}", param)
    return RequestError(f"{name}: {error['msg']}", param or None)


def parse_body(model: type[BaseModel], body: bytes) -> Any:
    """`body` (JSON bytes) validated as `model`; RequestError for the first problem, an
    unsupported field before any other."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        errors = sorted(e.errors(include_url=False), key=lambda error: error["type"] != "extra_forbidden")
        raise describe_error(errors[0]) from None


async def read_body(request: Request) -> bytes:
    """The request body, reading at most MAX_BODY_BYTES."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise RequestError(f"request body: at most {MAX_BODY_BYTES} bytes")
    return bytes(body)


# ---------------------------------------------------------------------------------------------
# generation: parameters, reply text with stop strings, the worker pool

@dataclass
class Generation:
    """A validated request, ready for a worker."""

    tokens: list[int]  # the prompt
    max_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int
    stop: list[str]
    top_logprobs: int | None = None  # None = no logprobs


@dataclass
class Piece:
    """Text of a reply as it becomes final, with the tokens whose text begins in it."""

    text: str
    tokens: list[tuple[int, int, TokenLogprobs | None]]  # (offset in the reply text, token id, logprobs)


@dataclass
class Finish:
    """The last event of a generation."""

    reason: str  # "stop" (stop token or stop string) | "length" (max_tokens) | "cancelled" (client gone)
    completion_tokens: int


class ReplyText:
    """The text of a streamed reply: complete UTF-8 characters only (StreamDecoder), cut before
    the first stop string, and never emitting text that could still turn out to begin one."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]) -> None:
        self.decoder = StreamDecoder(tokenizer)
        self.stop = stop
        self.held = ""  # decoded, not yet emitted
        self.emitted = 0  # characters emitted so far
        self.tokens: list[tuple[int, int, TokenLogprobs | None]] = []  # not yet emitted
        self.stopped = False

    def push(self, token: int, logprobs: TokenLogprobs | None = None) -> Piece | None:
        """The text that became final with `token` (None if nothing did); sets `stopped` at a stop string."""
        self.tokens.append((self.emitted + len(self.held), token, logprobs))
        self.held += self.decoder.push(token)
        hits = [index for index in (self.held.find(s) for s in self.stop) if index >= 0]
        if hits:
            self.stopped = True
            return self._emit(min(hits), final=True)
        keep = max((k for s in self.stop for k in range(min(len(s) - 1, len(self.held)), 0, -1)
                    if self.held.endswith(s[:k])), default=0)  # the longest tail that begins a stop string
        return self._emit(len(self.held) - keep)

    def finish(self) -> Piece | None:
        """The rest, at the end of a generation that did not stop at a stop string."""
        self.held += self.decoder.flush()
        return self._emit(len(self.held), final=True)

    def _emit(self, n: int, final: bool = False) -> Piece | None:
        text, self.held = self.held[:n], self.held[n:]
        end = self.emitted + n
        ready = [t for t in self.tokens if t[0] < end or (final and not self.stopped)]
        self.tokens = [] if final else self.tokens[len(ready):]
        self.emitted = end
        return Piece(text, ready) if text or ready else None


@dataclass
class Worker:
    index: int
    engine: Engine
    busy: bool = False
    requests: int = 0


class Ticket:
    """An admitted request's slot in the pool, given back exactly once."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.started = False  # a generation took it over (and will give it back)
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.pool.admitted -= 1

    def release_unless_started(self) -> None:
        if not self.started:
            self.release()


class WorkerPool:
    """Engines handed out one request at a time through an asyncio queue; each generation runs in
    a thread of its own executor and gives its worker (and its ticket) back when that thread
    finishes. At most len(engines) + max_queue requests hold a ticket."""

    def __init__(self, engines: list[Engine], max_queue: int) -> None:
        if not engines:
            raise ValueError("WorkerPool: expected at least one engine")
        self.workers = [Worker(i, engine) for i, engine in enumerate(engines)]
        self.max_queue = max_queue
        self.executor = ThreadPoolExecutor(len(engines), thread_name_prefix="generate")
        self._free: asyncio.Queue[Worker] | None = None  # made on first use, inside the server's event loop
        self.admitted = 0  # requests holding a ticket: waiting or generating
        self.waiting = 0
        self.requests_served = 0
        self.tokens_generated = 0
        self.started = time.time()

    @property
    def free(self) -> asyncio.Queue[Worker]:
        if self._free is None:
            self._free = asyncio.Queue()
            for worker in self.workers:
                self._free.put_nowait(worker)
        return self._free

    def admit(self) -> Ticket | None:
        """A ticket, or None when every worker is busy and max_queue requests already wait.
        Runs on the event loop with no await inside, so a burst cannot overshoot."""
        if self.admitted >= len(self.workers) + self.max_queue:
            return None
        self.admitted += 1
        return Ticket(self)

    def stats(self) -> Stats:
        busy = sum(worker.busy for worker in self.workers)
        return Stats(
            workers=[WorkerStats(index=w.index, device=str(w.engine.device), busy=w.busy, requests=w.requests)
                     for w in self.workers],
            workers_total=len(self.workers), workers_busy=busy, workers_free=len(self.workers) - busy,
            queue_length=self.waiting, max_queue=self.max_queue, requests_served=self.requests_served,
            tokens_generated=self.tokens_generated, uptime_s=round(time.time() - self.started, 1))

    async def generate(self, ticket: Ticket, job: Generation) -> AsyncIterator[Piece | Finish | None]:
        """Events of one reply: None while waiting for a worker (every HEARTBEAT_S), Pieces, then
        a Finish. Closing the iterator (client gone) stops the generation at the next token."""
        ticket.started = True
        worker = None
        self.waiting += 1
        getter = asyncio.ensure_future(self.free.get())
        try:
            while worker is None:
                done, _ = await asyncio.wait({getter}, timeout=HEARTBEAT_S)
                if done:
                    worker = getter.result()
                else:
                    yield None
        finally:
            self.waiting -= 1
            if worker is None:  # gave up waiting: the worker, if one arrived meanwhile, goes back
                if getter.done() and not getter.cancelled():
                    self.free.put_nowait(getter.result())
                else:
                    getter.cancel()
                ticket.release()

        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Piece | Finish | BaseException] = asyncio.Queue()
        stop = threading.Event()
        worker.busy, worker.requests = True, worker.requests + 1

        def emit(event: Piece | Finish | BaseException) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        def produce() -> int:
            engine, count, reason = worker.engine, 0, "length"
            reply = ReplyText(engine.tokenizer, job.stop)
            steps = engine.steps(job.tokens, max_tokens=job.max_tokens, temperature=job.temperature, top_k=job.top_k,
                                 top_p=job.top_p, seed=job.seed, top_logprobs=job.top_logprobs)
            try:
                for step in steps:
                    if stop.is_set():
                        reason = "cancelled"
                        break
                    count += 1
                    token = step.tokens[0]
                    if token in engine.stop_ids:
                        reason = "stop"
                        break
                    piece = reply.push(token, step.logprobs[0] if step.logprobs else None)
                    if piece is not None:
                        emit(piece)
                    if reply.stopped:
                        reason = "stop"
                        break
                if not reply.stopped:
                    tail = reply.finish()
                    if tail is not None:
                        emit(tail)
                emit(Finish(reason, count))
            except Exception as e:  # noqa: BLE001 - handed to the request, which reports it
                log.exception("generation failed")
                emit(e)
            finally:
                steps.close()
            return count

        def release(future: asyncio.Future) -> None:
            worker.busy = False
            self.requests_served += 1
            if not future.cancelled() and future.exception() is None:
                self.tokens_generated += future.result()
            self.free.put_nowait(worker)
            ticket.release()

        loop.run_in_executor(self.executor, produce).add_done_callback(release)
        try:
            while True:
                event = await events.get()
                if isinstance(event, BaseException):
                    raise RuntimeError(f"generation failed: {type(event).__name__}: {event}") from event
                yield event
                if isinstance(event, Finish):
                    return
        finally:
            stop.set()


class ClosingStreamingResponse(StreamingResponse):
    """Closes its body iterator however the response ends (a client disconnect cancels the send),
    so the generation behind it stops now rather than when the iterator is garbage collected;
    gives the ticket back if the body never started."""

    def __init__(self, content: AsyncIterator[str], ticket: Ticket) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.ticket = ticket

    async def stream_response(self, send: Any) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
            self.ticket.release_unless_started()


# ---------------------------------------------------------------------------------------------
# the app

def error_response(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param))
    return JSONResponse(body.model_dump(), status_code=status)


def sse(data: BaseModel | dict[str, Any]) -> str:
    text = data.model_dump_json() if isinstance(data, BaseModel) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n"


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """openapi_extra declaring `model` as the JSON request body (handlers read and validate the
    raw body themselves: bounded size, one-line 400s)."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _responses(model: type[BaseModel] | None, stream: str) -> dict[int | str, Any]:
    """OpenAPI responses of a generating endpoint: `model` as JSON (None = SSE only), `stream`
    describes the text/event-stream form."""
    ok: dict[str, Any] = {"description": f"the reply; streamed: text/event-stream of {stream}, then `data: [DONE]`",
                          "content": {"text/event-stream": {"schema": {"type": "string"}}}}
    if model is not None:
        ok["model"] = model
    return {200: ok, 400: {"model": ErrorResponse, "description": "invalid request"},
            503: {"model": ErrorResponse, "description": "busy: retry after the Retry-After header's seconds"}}


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


def build_app(engines: list[Engine], model_name: str, flags: ServingFlags) -> FastAPI:
    """The FastAPI app serving `engines` (one worker each; all share one tokenizer)."""
    pool = WorkerPool(engines, flags.max_queue)
    tokenizer = engines[0].tokenizer
    vocab_size = tokenizer.get_vocab_size()
    special_names = {tokenizer.encode_special(name): name for name in tokenizer.get_special_tokens()}
    max_len = min(engine.max_len for engine in engines)
    ui_html = UI_PATH.read_text(encoding="utf-8")
    app = FastAPI(title="nanochat", version="1", redoc_url=None,
                  description="OpenAI-compatible chat and text completions of one nanochat model.")
    app.state.pool = pool

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            _, definitions = models_json_schema([(model, "validation") for model in REQUEST_MODELS],
                                                ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(definitions["$defs"])
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, e: RequestError) -> JSONResponse:
        return error_response(400, str(e), "invalid_request_error", e.param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, str(e.detail), kind)

    def generation(params: SamplingRequest, tokens: list[int], max_tokens: int | None,
                   top_logprobs: int | None = None) -> Generation:
        room = max_len - len(tokens)
        if room < 1:
            param = "messages" if isinstance(params, ChatRequest) else "prompt"
            raise RequestError(f"{param}: the prompt is {len(tokens)} tokens; the model takes at most {max_len - 1} "
                               "before its reply", param)
        top_k = params.top_k if "top_k" in params.model_fields_set else flags.top_k
        return Generation(
            tokens=tokens, max_tokens=min(max_tokens or flags.max_tokens, room),
            temperature=flags.temperature if params.temperature is None else params.temperature,
            top_k=top_k or None, top_p=params.top_p if params.top_p is not None and params.top_p < 1 else None,
            seed=random.randrange(2**31) if params.seed is None else params.seed,
            stop=params.stop_strings(), top_logprobs=top_logprobs)

    def chat_generation(chat: ChatRequest, max_tokens: int | None, top_logprobs: int | None = None) -> Generation:
        messages = [{"role": m.role, "content": m.text()} for m in chat.messages]
        for i, message in enumerate(messages):
            if len(message["content"]) > MAX_MESSAGE_CHARS:
                raise RequestError(f"messages[{i}].content: at most {MAX_MESSAGE_CHARS} characters, got "
                                   f"{len(message['content'])}", f"messages[{i}].content")
        total_chars = sum(len(m["content"]) for m in messages)
        if total_chars > MAX_TOTAL_CHARS:
            raise RequestError(f"messages: at most {MAX_TOTAL_CHARS} characters in all, got {total_chars}", "messages")
        if messages[-1]["role"] != "user":
            raise RequestError(f"messages: the last message must be from the user, got '{messages[-1]['role']}'", "messages")
        try:
            tokens = chat_prompt(tokenizer, messages)
        except ValueError as e:
            raise RequestError(f"messages: {e}", "messages") from None
        return generation(chat, tokens, max_tokens, top_logprobs)

    def busy_response() -> JSONResponse:
        response = error_response(503, f"server busy: {pool.admitted} requests are generating or waiting "
                                       f"({len(pool.workers)} workers, --max_queue={pool.max_queue}); retry later",
                                  "server_busy")
        response.headers["Retry-After"] = "1"
        return response

    def token_text(token: int) -> tuple[str, list[int]]:
        name = special_names.get(token)
        raw = name.encode() if name is not None else tokenizer.enc.decode_single_token_bytes(token)
        return raw.decode("utf-8", errors="replace"), list(raw)

    def top_logprob(token: int, logprob: float) -> TopLogprob:
        text, raw = token_text(token)
        return TopLogprob(token=text, logprob=logprob, bytes=raw)

    def chat_logprobs(piece: Piece) -> ChoiceLogprobs:
        return ChoiceLogprobs(content=[
            TokenLogprob(**top_logprob(token, lp.logprob).model_dump(),
                         top_logprobs=[top_logprob(i, v) for i, v in zip(lp.top_ids, lp.top_logprobs)])
            for _, token, lp in piece.tokens])

    def completion_logprobs(pieces: list[Piece]) -> CompletionLogprobs:
        entries = [entry for piece in pieces for entry in piece.tokens]
        return CompletionLogprobs(
            tokens=[token_text(token)[0] for _, token, _ in entries],
            token_logprobs=[lp.logprob for _, _, lp in entries],
            top_logprobs=[{token_text(i)[0]: v for i, v in zip(lp.top_ids, lp.top_logprobs)} for _, _, lp in entries],
            text_offset=[offset for offset, _, _ in entries])

    def log_finish(start: float, prompt_tokens: int, finish: Finish) -> None:
        seconds = time.perf_counter() - start
        log.info(f"reply: {prompt_tokens} prompt + {finish.completion_tokens} tokens in {seconds:.2f} s "
                 f"({finish.completion_tokens / max(seconds, 1e-9):.1f} tok/s, {finish.reason})")

    def sse_reply(ticket: Ticket, job: Generation, head: list[str], piece: Callable[[Piece], str],
                  tail: Callable[[Finish], list[str]]) -> ClosingStreamingResponse:
        """The reply as server-sent events: `head`, one `piece(p)` per Piece, `tail(finish)`, then
        [DONE]; SSE comments while waiting for a worker."""
        async def events() -> AsyncIterator[str]:
            start = time.perf_counter()
            try:
                async with contextlib.aclosing(pool.generate(ticket, job)) as stream:
                    for line in head:
                        yield line
                    async for event in stream:
                        if event is None:
                            yield ": waiting for a worker\n\n"
                        elif isinstance(event, Piece):
                            yield piece(event)
                        else:
                            log_finish(start, len(job.tokens), event)
                            for line in tail(event):
                                yield line
            except RuntimeError as e:
                yield sse({"error": {"message": str(e), "type": "server_error"}})
            yield "data: [DONE]\n\n"

        return ClosingStreamingResponse(events(), ticket)

    async def collect(request: Request, ticket: Ticket, job: Generation) -> tuple[list[Piece], Finish] | JSONResponse:
        """A whole reply (non-streamed); an error response if the client left or generation failed."""
        start, pieces, finish, events_seen = time.perf_counter(), [], None, 0
        try:
            async with contextlib.aclosing(pool.generate(ticket, job)) as stream:
                async for event in stream:
                    if isinstance(event, Finish):
                        finish = event
                    elif isinstance(event, Piece):
                        pieces.append(event)
                    events_seen += 1
                    if (event is None or events_seen % 16 == 0) and await request.is_disconnected():
                        return error_response(499, "client disconnected", "cancelled")  # nobody reads it
        except RuntimeError as e:
            return error_response(500, str(e), "server_error")
        finally:
            ticket.release_unless_started()
        log_finish(start, len(job.tokens), finish)
        return pieces, finish

    @app.get("/", include_in_schema=False)
    async def ui() -> HTMLResponse:
        return HTMLResponse(ui_html)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/health")
    async def health() -> Health:
        return Health(model=model_name, workers=len(pool.workers))

    @app.get("/stats")
    async def stats() -> Stats:
        return pool.stats()

    model_card = ModelCard(id=model_name, created=int(pool.started))

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[model_card])

    @app.get("/v1/models/{model_id:path}", responses={404: {"model": ErrorResponse, "description": "no such model"}})
    async def model(model_id: str) -> ModelCard:
        if model_id != model_name:
            raise HTTPException(404, f"model {model_id!r} not found: this server serves {model_name!r}")
        return model_card

    @app.post("/chat/completions", openapi_extra=_json_body(ChatRequest),
              responses=_responses(None, '`data: {"token": text}` events and one `data: {"finish_reason", "usage"}`'))
    async def chat_completions(request: Request) -> Response:
        """The UI's stream: data: {"token": text} events, then {"finish_reason", "usage"}, then [DONE]."""
        chat = parse_body(ChatRequest, await read_body(request))
        job = chat_generation(chat, chat.max_tokens)
        ticket = pool.admit()
        if ticket is None:
            return busy_response()
        return sse_reply(ticket, job, [], lambda piece: sse({"token": piece.text}),
                         lambda finish: [sse({"finish_reason": finish.reason,
                                              "usage": _usage(len(job.tokens), finish.completion_tokens).model_dump()})])

    @app.post("/v1/chat/completions", openapi_extra=_json_body(ChatCompletionRequest),
              responses=_responses(ChatCompletion, "`data: <ChatCompletionChunk>` events"))
    async def openai_chat_completions(request: Request) -> Response:
        chat = parse_body(ChatCompletionRequest, await read_body(request))
        if chat.top_logprobs is not None and not chat.logprobs:
            raise RequestError("top_logprobs: needs logprobs=true", "top_logprobs")
        job = chat_generation(chat, chat.max_completion_tokens or chat.max_tokens,
                              (chat.top_logprobs or 0) if chat.logprobs else None)
        ticket = pool.admit()
        if ticket is None:
            return busy_response()
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
            return sse(ChatCompletionChunk(id=completion_id, created=created, model=model_name, choices=choices, usage=usage))

        if chat.stream:
            include_usage = chat.stream_options is not None and chat.stream_options.include_usage

            def piece(p: Piece) -> str:
                logprobs = chat_logprobs(p) if job.top_logprobs is not None else None
                return chunk([ChunkChoice(delta=Delta(content=p.text), logprobs=logprobs)])

            def tail(finish: Finish) -> list[str]:
                usage = [chunk([], _usage(len(job.tokens), finish.completion_tokens))] if include_usage else []
                return [chunk([ChunkChoice(delta=Delta(), finish_reason=finish.reason)]), *usage]

            return sse_reply(ticket, job, [chunk([ChunkChoice(delta=Delta(role="assistant", content=""))])], piece, tail)

        result = await collect(request, ticket, job)
        if isinstance(result, Response):
            return result
        pieces, finish = result
        logprobs = None
        if job.top_logprobs is not None:
            logprobs = ChoiceLogprobs(content=[entry for p in pieces for entry in chat_logprobs(p).content])
        reply = ChatCompletion(
            id=completion_id, created=created, model=model_name, usage=_usage(len(job.tokens), finish.completion_tokens),
            choices=[ChatChoice(message=AssistantMessage(content="".join(p.text for p in pieces)), logprobs=logprobs,
                                finish_reason=finish.reason)])
        return JSONResponse(reply.model_dump())

    @app.post("/v1/completions", openapi_extra=_json_body(CompletionRequest),
              responses=_responses(Completion, "`data: <Completion>` events (finish_reason on the last)"))
    async def completions(request: Request) -> Response:
        params = parse_body(CompletionRequest, await read_body(request))
        if isinstance(params.prompt, str):
            tokens = [tokenizer.get_bos_token_id(), *tokenizer.encode(params.prompt)]
        else:
            tokens = list(params.prompt)
            bad = next((i for i, token in enumerate(tokens) if token >= vocab_size), None)
            if bad is not None:
                raise RequestError(f"prompt[{bad}]: expected a token id in 0..{vocab_size - 1}, got {tokens[bad]}",
                                   f"prompt[{bad}]")
        job = generation(params, tokens, params.max_tokens, params.logprobs)
        ticket = pool.admit()
        if ticket is None:
            return busy_response()
        completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def completion(choice: CompletionChoice, usage: Usage | None = None) -> Completion:
            return Completion(id=completion_id, created=created, model=model_name, choices=[choice], usage=usage)

        if params.stream:
            include_usage = params.stream_options is not None and params.stream_options.include_usage

            def piece(p: Piece) -> str:
                logprobs = completion_logprobs([p]) if job.top_logprobs is not None else None
                return sse(completion(CompletionChoice(text=p.text, logprobs=logprobs)))

            def tail(finish: Finish) -> list[str]:
                usage = _usage(len(job.tokens), finish.completion_tokens)
                events = [sse(completion(CompletionChoice(text="", finish_reason=finish.reason)))]
                if include_usage:
                    events.append(sse(Completion(id=completion_id, created=created, model=model_name, choices=[], usage=usage)))
                return events

            return sse_reply(ticket, job, [], piece, tail)

        result = await collect(request, ticket, job)
        if isinstance(result, Response):
            return result
        pieces, finish = result
        logprobs = completion_logprobs(pieces) if job.top_logprobs is not None else None
        reply = completion(CompletionChoice(text="".join(p.text for p in pieces), logprobs=logprobs,
                                            finish_reason=finish.reason), _usage(len(tokens), finish.completion_tokens))
        return JSONResponse(reply.model_dump())

    return app
