"""Web chat: a single-page UI and an HTTP API (nanochat-style SSE and OpenAI-compatible).

    python -m scripts.chat_web                          # newest sft checkpoint on http://127.0.0.1:8000
    python -m scripts.chat_web -i mid -c d6 --num_workers=2 --port=8080

Endpoints:
    GET  /                      the chat UI (nanochat/ui.html)
    POST /chat/completions      {"messages": [...], "temperature", "top_k", "top_p", "max_tokens", "seed"}
                                -> SSE: data: {"token": "..."} ... data: {"finish_reason", "usage"} data: [DONE]
    POST /v1/chat/completions   OpenAI chat completions, stream or not: the official client works with
                                OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="x")
    GET  /v1/models             the one model served
    GET  /health, GET /stats    liveness; workers busy/free, queue, requests served, tokens generated

Tool calls appear in a reply's text as their special tokens
("<|python_start|>2+3<|python_end|><|output_start|>5<|output_end|>"); assistant messages sent
back in that form are rendered as tool calls again. Bad input is HTTP 400 with
{"error": {"message", "type", "param"}} naming the field and the limit; a full queue is 503.

Workers: --num_workers engines, each generating one reply at a time in its own thread (torch
releases the GIL, so the event loop stays responsive). On CPU they share one read-only copy of
the weights and split the CPU threads; on CUDA there is one model per GPU. A request waits in
an asyncio queue for a free worker (at most --max_queue waiting); a client that disconnects
stops its generation at the next token and frees the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import anyio
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

import nanochat
from nanochat.checkpoint import CheckpointError
from nanochat.common import compute_init, fail, get_logger, set_cpu_threads
from nanochat.config import check, parse_args
from nanochat.engine import Engine, ModelFlags, StreamDecoder, chat_prompt, load_chat_model

MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
MAX_TEMPERATURE = 2.0
MAX_TOP_K = 200
MAX_MAX_TOKENS = 4096
MAX_BODY_BYTES = 1 << 20  # JSON escapes can make 32,000 characters ~6x longer; more is never a valid request
HEARTBEAT_S = 1.0  # while waiting for a worker, an SSE comment this often (and a disconnect check)
ROLES = ("user", "assistant", "system")
UI_PATH = Path(nanochat.__file__).parent / "ui.html"

log = get_logger("chat_web")


@dataclass
class ChatWebConfig(ModelFlags):
    """Serve a checkpoint: web chat UI + HTTP API."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (0.0.0.0 = every interface)"})
    port: int = field(default=8000, metadata={"help": "TCP port"})
    num_workers: int = field(default=0, metadata={"help": "model workers: 0 = one per GPU on CUDA, 1 on CPU/MPS"})
    max_queue: int = field(default=100, metadata={"help": "requests that may wait for a worker; more get HTTP 503"})
    temperature: float = field(default=0.8, metadata={"help": "default sampling temperature"})
    top_k: int = field(default=50, metadata={"help": "default top-k (0 = off)"})
    max_tokens: int = field(default=512, metadata={"help": "default longest reply in tokens"})

    def validate(self) -> None:
        check(1 <= self.port <= 65535, f"--port: expected 1..65535, got {self.port}")
        check(self.num_workers >= 0, f"--num_workers: expected >= 0 (0 = auto), got {self.num_workers}")
        check(self.max_queue >= 0, f"--max_queue: expected >= 0, got {self.max_queue}")
        check(0 <= self.temperature <= MAX_TEMPERATURE, f"--temperature: expected 0..{MAX_TEMPERATURE}, got {self.temperature}")
        check(0 <= self.top_k <= MAX_TOP_K, f"--top_k: expected 0..{MAX_TOP_K} (0 = off), got {self.top_k}")
        check(1 <= self.max_tokens <= MAX_MAX_TOKENS, f"--max_tokens: expected 1..{MAX_MAX_TOKENS}, got {self.max_tokens}")


# ---------------------------------------------------------------------------------------------
# requests

class RequestError(ValueError):
    """Bad client input: HTTP 400 with this message; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class ChatRequest:
    messages: list[dict[str, str]]  # {"role", "content": str}, validated
    temperature: float
    top_k: int | None
    top_p: float | None
    max_tokens: int
    seed: int
    stream: bool
    include_usage: bool  # OpenAI stream_options.include_usage


def _message_text(index: int, content: Any) -> str:
    """A message's content as text: a string, or OpenAI's list of {"type": "text", "text"} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                         for p in content):
        return "".join(p["text"] for p in content)
    raise RequestError(f"messages[{index}].content: expected a string (or a list of {{'type': 'text', 'text': ...}} parts), "
                       f"got {json.dumps(content)[:60]}", f"messages[{index}].content")


def _number(body: dict[str, Any], name: str, default: float | None, low: float, high: float, low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{name}: expected a number, got {json.dumps(value)[:40]}", name)
    if value > high or value < low or (low_open and value == low):
        interval = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise RequestError(f"{name}: expected a value in {interval}, got {value}", name)
    return float(value)


def _integer(body: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name}: expected an integer, got {json.dumps(value)[:40]}", name)
    if not low <= value <= high:
        raise RequestError(f"{name}: expected an integer in [{low}, {high}], got {value}", name)
    return value


def parse_chat_request(body: Any, cfg: ChatWebConfig) -> ChatRequest:
    """Validate a request body against the limits; raise RequestError naming the field."""
    if not isinstance(body, dict):
        raise RequestError(f"request body: expected a JSON object, got {type(body).__name__}")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise RequestError("messages: expected a list of {\"role\", \"content\"} objects", "messages")
    if not messages:
        raise RequestError("messages: expected at least one message, got an empty list", "messages")
    if len(messages) > MAX_MESSAGES:
        raise RequestError(f"messages: at most {MAX_MESSAGES} messages, got {len(messages)}", "messages")
    normalized, total_chars = [], 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{i}]: expected an object with role and content", f"messages[{i}]")
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(f"messages[{i}].role: expected one of {'|'.join(ROLES)}, got {json.dumps(role)[:40]}",
                               f"messages[{i}].role")
        content = _message_text(i, message.get("content"))
        if len(content) > MAX_MESSAGE_CHARS:
            raise RequestError(f"messages[{i}].content: at most {MAX_MESSAGE_CHARS} characters, got {len(content)}",
                               f"messages[{i}].content")
        total_chars += len(content)
        normalized.append({"role": role, "content": content})
    if total_chars > MAX_TOTAL_CHARS:
        raise RequestError(f"messages: at most {MAX_TOTAL_CHARS} characters in all, got {total_chars}", "messages")
    if normalized[-1]["role"] != "user":
        raise RequestError(f"messages: the last message must be from the user, got '{normalized[-1]['role']}'", "messages")
    # top_k: absent = the server's default; null or 0 = off
    top_k = _integer(body, "top_k", 0, 0, MAX_TOP_K) if "top_k" in body else cfg.top_k
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    max_tokens_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if body.get("n") not in (None, 1):
        raise RequestError(f"n: only 1 completion per request is supported, got {json.dumps(body['n'])[:40]}", "n")
    stream, stream_options = body.get("stream", False), body.get("stream_options") or {}
    if not isinstance(stream, bool):
        raise RequestError(f"stream: expected true or false, got {json.dumps(stream)[:40]}", "stream")
    if not isinstance(stream_options, dict):
        raise RequestError("stream_options: expected an object", "stream_options")
    return ChatRequest(
        messages=normalized,
        temperature=_number(body, "temperature", cfg.temperature, 0.0, MAX_TEMPERATURE),
        top_k=top_k or None,
        top_p=top_p if top_p < 1.0 else None,
        max_tokens=_integer(body, max_tokens_name, cfg.max_tokens, 1, MAX_MAX_TOKENS),
        seed=_integer(body, "seed", random.randrange(2**31), 0, 2**63 - 1),
        stream=stream,
        include_usage=bool(stream_options.get("include_usage", False)),
    )


async def read_json(request: Request) -> Any:
    """The request body as JSON, reading at most MAX_BODY_BYTES."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise RequestError(f"request body: at most {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"request body is not valid JSON: {e}") from None


# ---------------------------------------------------------------------------------------------
# workers

@dataclass
class Worker:
    index: int
    engine: Engine
    busy: bool = False
    requests: int = 0


@dataclass
class Finish:
    """The last event of a generation."""

    reason: str  # "stop" (stop token) | "length" (max_tokens) | "cancelled" (client gone)
    completion_tokens: int


class WorkerPool:
    """Engines handed out one request at a time through an asyncio queue; each generation runs in
    a thread of its own executor and gives its worker back when that thread finishes."""

    def __init__(self, engines: list[Engine], max_queue: int) -> None:
        if not engines:
            raise ValueError("WorkerPool: expected at least one engine")
        self.workers = [Worker(i, engine) for i, engine in enumerate(engines)]
        self.max_queue = max_queue
        self.executor = ThreadPoolExecutor(len(engines), thread_name_prefix="generate")
        self._free: asyncio.Queue[Worker] | None = None  # made on first use, inside the server's event loop
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

    def is_full(self) -> bool:
        return self.free.empty() and self.waiting >= self.max_queue

    def stats(self) -> dict[str, Any]:
        busy = sum(worker.busy for worker in self.workers)
        return {
            "workers": [{"index": w.index, "device": str(w.engine.device), "busy": w.busy, "requests": w.requests}
                        for w in self.workers],
            "workers_total": len(self.workers), "workers_busy": busy, "workers_free": len(self.workers) - busy,
            "queue_length": self.waiting, "max_queue": self.max_queue,
            "requests_served": self.requests_served, "tokens_generated": self.tokens_generated,
            "uptime_s": round(time.time() - self.started, 1),
        }

    async def generate(self, tokens: list[int], chat: ChatRequest) -> AsyncIterator[str | Finish | None]:
        """Events of one reply: None while waiting for a worker (every HEARTBEAT_S), text pieces,
        then a Finish. Closing the iterator (client gone) stops the generation at the next token."""
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

        loop = asyncio.get_running_loop()
        events: asyncio.Queue[str | Finish | BaseException] = asyncio.Queue()
        stop = threading.Event()
        worker.busy, worker.requests = True, worker.requests + 1

        def emit(event: str | Finish | BaseException) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        def produce() -> int:
            engine, count, reason = worker.engine, 0, "length"
            decoder = StreamDecoder(engine.tokenizer)
            steps = engine.generate(tokens, max_tokens=chat.max_tokens, temperature=chat.temperature,
                                    top_k=chat.top_k, top_p=chat.top_p, seed=chat.seed)
            try:
                for column, _ in steps:
                    if stop.is_set():
                        reason = "cancelled"
                        break
                    count += 1
                    if column[0] in engine.stop_ids:
                        reason = "stop"
                        break
                    piece = decoder.push(column[0])
                    if piece:
                        emit(piece)
                tail = decoder.flush()
                if tail:
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
    so the generation behind it stops now rather than when the iterator is garbage collected."""

    async def stream_response(self, send: Any) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


# ---------------------------------------------------------------------------------------------
# the app

def error_response(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def build_app(engines: list[Engine], model_name: str, cfg: ChatWebConfig) -> FastAPI:
    """The FastAPI app serving `engines` (one worker each; all share one tokenizer)."""
    pool = WorkerPool(engines, cfg.max_queue)
    tokenizer = engines[0].tokenizer
    max_len = min(engine.max_len for engine in engines)
    ui_html = UI_PATH.read_text(encoding="utf-8")
    app = FastAPI(title="nanochat", docs_url=None, redoc_url=None)
    app.state.pool = pool

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, e: RequestError) -> JSONResponse:
        return error_response(400, str(e), "invalid_request_error", e.param)

    async def admit(request: Request) -> tuple[ChatRequest, list[int]]:
        chat = parse_chat_request(await read_json(request), cfg)
        try:
            tokens = chat_prompt(tokenizer, chat.messages)
        except ValueError as e:
            raise RequestError(f"messages: {e}", "messages") from None
        room = max_len - len(tokens)
        if room < 1:
            raise RequestError(f"messages: the conversation is {len(tokens)} tokens; the model takes at most {max_len - 1} "
                               "before its reply", "messages")
        chat.max_tokens = min(chat.max_tokens, room)
        return chat, tokens

    def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def busy_response() -> JSONResponse:
        response = error_response(503, f"server busy: {pool.waiting} requests are waiting for a worker "
                                       f"(--max_queue={pool.max_queue}); retry later", "server_busy")
        response.headers["Retry-After"] = "1"
        return response

    def log_finish(start: float, prompt_tokens: int, finish: Finish) -> None:
        seconds = time.perf_counter() - start
        log.info(f"reply: {prompt_tokens} prompt + {finish.completion_tokens} tokens in {seconds:.2f} s "
                 f"({finish.completion_tokens / max(seconds, 1e-9):.1f} tok/s, {finish.reason})")

    @app.get("/")
    async def ui() -> HTMLResponse:
        return HTMLResponse(ui_html)

    @app.get("/favicon.ico")
    async def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "workers": len(pool.workers)}

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return pool.stats()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(pool.started),
                                            "owned_by": "nanochat"}]}

    def sse_reply(tokens: list[int], chat: ChatRequest, head: list[str], piece: Callable[[str], str],
                  tail: Callable[[Finish], list[str]]) -> ClosingStreamingResponse:
        """The reply as server-sent events: `head`, one `piece(text)` per text piece, `tail(finish)`,
        then [DONE]; SSE comments while waiting for a worker."""
        async def events() -> AsyncIterator[str]:
            start = time.perf_counter()
            try:
                async with contextlib.aclosing(pool.generate(tokens, chat)) as stream:
                    for line in head:
                        yield line
                    async for event in stream:
                        if event is None:
                            yield ": waiting for a worker\n\n"
                        elif isinstance(event, str):
                            yield piece(event)
                        else:
                            log_finish(start, len(tokens), event)
                            for line in tail(event):
                                yield line
            except RuntimeError as e:
                yield sse({"error": {"message": str(e), "type": "server_error"}})
            yield "data: [DONE]\n\n"

        return ClosingStreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/chat/completions")
    async def chat_completions(request: Request) -> Any:
        chat, tokens = await admit(request)
        if pool.is_full():
            return busy_response()
        return sse_reply(tokens, chat, [], lambda text: sse({"token": text}),
                         lambda finish: [sse({"finish_reason": finish.reason,
                                              "usage": usage(len(tokens), finish.completion_tokens)})])

    @app.post("/v1/chat/completions")
    async def openai_chat_completions(request: Request) -> Any:
        chat, tokens = await admit(request)
        if pool.is_full():
            return busy_response()
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            return sse({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                        "choices": choices, **extra})

        def delta(content: dict[str, str], finish_reason: str | None = None) -> str:
            return chunk([{"index": 0, "delta": content, "logprobs": None, "finish_reason": finish_reason}])

        def tail(finish: Finish) -> list[str]:
            usage_chunk = [chunk([], usage=usage(len(tokens), finish.completion_tokens))] if chat.include_usage else []
            return [delta({}, finish.reason), *usage_chunk]

        if chat.stream:
            return sse_reply(tokens, chat, [delta({"role": "assistant", "content": ""})],
                             lambda text: delta({"content": text}), tail)

        start, pieces, finish, events_seen = time.perf_counter(), [], None, 0
        try:
            async with contextlib.aclosing(pool.generate(tokens, chat)) as stream:
                async for event in stream:
                    if isinstance(event, Finish):
                        finish = event
                    elif isinstance(event, str):
                        pieces.append(event)
                    events_seen += 1
                    if (event is None or events_seen % 16 == 0) and await request.is_disconnected():
                        return error_response(499, "client disconnected", "cancelled")  # nobody reads it
        except RuntimeError as e:
            return error_response(500, str(e), "server_error")
        log_finish(start, len(tokens), finish)
        return {
            "id": completion_id, "object": "chat.completion", "created": created, "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                         "logprobs": None, "finish_reason": finish.reason}],
            "usage": usage(len(tokens), finish.completion_tokens),
        }

    return app


def load_engines(cfg: ChatWebConfig, device_type: str) -> tuple[list[Engine], str]:
    """(one Engine per worker, model name). CUDA: one model per GPU; elsewhere one shared model."""
    if device_type == "cuda":
        num_workers = cfg.num_workers or torch.cuda.device_count()
        if num_workers > torch.cuda.device_count():
            raise ValueError(f"--num_workers: {num_workers} workers need as many GPUs, found {torch.cuda.device_count()}")
        devices = [torch.device("cuda", i) for i in range(num_workers)]
    else:
        devices = [torch.device(device_type)] * (cfg.num_workers or 1)
    models: dict[torch.device, tuple[torch.nn.Module, Any, dict]] = {}
    for device in devices:
        if device not in models:
            models[device] = load_chat_model(cfg, device)
    engines = [Engine(models[device][0], models[device][1]) for device in devices]
    meta = models[devices[0]][2]
    return engines, f"nanochat-{cfg.source}-{Path(meta['checkpoint_dir']).name}"


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(ChatWebConfig, argv, prog="python -m scripts.chat_web")
    ctx = compute_init(cfg.device, seed=0)
    try:
        engines, model_name = load_engines(cfg, ctx.device_type)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        fail(str(e))
    if ctx.device_type == "cpu":  # concurrent workers split the cores rather than oversubscribe them
        set_cpu_threads(max(1, (cfg.threads or os.cpu_count() or 1) // len(engines)))
    app = build_app(engines, model_name, cfg)
    log.info(f"serving {model_name} with {len(engines)} worker(s) on {ctx.device_type}, "
             f"{torch.get_num_threads()} CPU thread(s) each: http://{cfg.host}:{cfg.port}/")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")


if __name__ == "__main__":
    main()
