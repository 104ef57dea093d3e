"""chat_web against a tiny trained model served by uvicorn on 127.0.0.1: input limits, the SSE
and OpenAI APIs (with the official client), stats, disconnects, a full queue, load, the UI in
headless Chromium, and the one-line failures of the script (bad device, host, port).
The newer API surface (stop, logprobs, completions, fuzzing, bursts) is tests/test_serving.py."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest
import uvicorn

from nanochat.engine import Engine
from scripts import chat_web
from tests.helpers import HELLO, make_app, serve

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


class SlowEngine(Engine):
    """The real engine, 30 ms per token and no stop tokens (every reply runs to max_tokens): long
    enough to disconnect mid-reply and to watch streaming, whatever the tiny model samples."""

    def __init__(self, model, tokenizer) -> None:
        super().__init__(model, tokenizer)
        self.stop_ids = frozenset()

    def steps(self, *args, **kwargs):
        for step in super().steps(*args, **kwargs):
            time.sleep(0.03)
            yield step


@pytest.fixture(scope="module")
def server(tiny_base) -> Iterator[str]:
    """Two workers sharing one model, replies of at most 16 tokens by default."""
    with serve(make_app(tiny_base, num_workers=2, max_tokens=16)) as url:
        yield url


@pytest.fixture(scope="module")
def slow_server(tiny_base) -> Iterator[str]:
    """One slow worker and no waiting room: a second concurrent request gets 503."""
    with serve(make_app(tiny_base, SlowEngine, num_workers=1, max_queue=0, max_tokens=20)) as url:
        yield url


def sse_events(lines: Iterator[str]) -> list[str]:
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def wait_until_idle(client: httpx.Client, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = client.get("/stats").json()
        if stats["workers_busy"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------
# limits

LONG = "x" * 8001
BAD_REQUESTS = [
    ({"messages": []}, "messages: expected at least 1 item(s), got 0"),
    ({"messages": "hi"}, "messages: expected a list"),
    ({"messages": HELLO * 501}, "messages: at most 500 items, got 501"),
    ({"messages": [{"role": "user", "content": LONG}]}, "messages[0].content: at most 8000 characters, got 8001"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": LONG}]}]},
     "messages[0].content: at most 8000 characters, got 8001"),
    ({"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": "y" * 7000} for i in range(5)]},
     "messages: at most 32000 characters in all, got 35000"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role: expected 'system', 'user' or 'assistant'"),
    ({"messages": [{"role": "user"}]}, "messages[0].content: required"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content: expected a string or a list of"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0].type: expected 'text'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "the last message must be from the user"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "expected role 'assistant'"),
    ({"messages": HELLO, "temperature": 2.5}, "temperature: expected a value <= 2.0, got 2.5"),
    ({"messages": HELLO, "temperature": -0.1}, "temperature: expected a value >= 0"),
    ({"messages": HELLO, "temperature": "hot"}, "temperature: expected a number, got \"hot\""),
    ({"messages": HELLO, "temperature": "0.5"}, "temperature: expected a number"),  # strict: no strings for numbers
    ({"messages": HELLO, "top_k": 201}, "top_k: expected a value <= 200, got 201"),
    ({"messages": HELLO, "top_k": -1}, "top_k: expected a value >= 0"),
    ({"messages": HELLO, "top_k": 1.5}, "top_k: expected an integer"),
    ({"messages": HELLO, "top_k": True}, "top_k: expected an integer"),
    ({"messages": HELLO, "top_p": 0}, "top_p: expected a value > 0"),
    ({"messages": HELLO, "max_tokens": 0}, "max_tokens: expected a value >= 1, got 0"),
    ({"messages": HELLO, "max_tokens": 4097}, "max_tokens: expected a value <= 4096, got 4097"),
    ({"messages": HELLO, "seed": -1}, "seed: expected a value >= 0"),
    ({"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, "stop: at most 4 items, got 5"),
    ({"messages": HELLO, "stop": [""]}, "stop[0]: expected at least 1 character(s)"),
    ({"messages": HELLO, "stop": 7}, "stop: expected a string or a list of at most 4 strings, got 7"),
    ([HELLO], "request body: expected a JSON object, got list"),
    ({"messages": [{"role": "user", "content": "word " * 1500}]}, "the model takes at most"),
]
OPENAI_ONLY_BAD_REQUESTS = [  # /v1/chat/completions has these fields; /chat/completions refuses them as unknown
    ({"messages": HELLO, "max_completion_tokens": 5000}, "max_completion_tokens: expected a value <= 4096"),
    ({"messages": HELLO, "n": 2}, "n: expected a value <= 1, got 2"),
    ({"messages": HELLO, "stream": "yes"}, "stream: expected true or false"),
    ({"messages": HELLO, "top_logprobs": 3}, "top_logprobs: needs logprobs=true"),
    ({"messages": HELLO, "logprobs": True, "top_logprobs": 21}, "top_logprobs: expected a value <= 20"),
]


@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions"])
def test_limits_are_400_with_a_message_naming_the_field(server, path):
    with httpx.Client(base_url=server, timeout=30) as client:
        for body, message in BAD_REQUESTS + (OPENAI_ONLY_BAD_REQUESTS if path.startswith("/v1") else []):
            response = client.post(path, json=body)
            assert response.status_code == 400, (body if len(json.dumps(body)) < 200 else message, response.text[:200])
            assert message in response.json()["error"]["message"], response.json()
        for raw in (b"{not json", b"\xff\xfe", b""):
            response = client.post(path, content=raw, headers={"Content-Type": "application/json"})
            assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
        response = client.post(path, content=b"[" + b"1," * 600_000 + b"1]", headers={"Content-Type": "application/json"})
        assert response.status_code == 400 and "at most 1048576 bytes" in response.json()["error"]["message"]
        assert client.get("/health").json()["status"] == "ok"  # still serving


# ---------------------------------------------------------------------------------------------
# the APIs

def test_nanochat_sse_streams_tokens_then_done(server):
    with httpx.Client(base_url=server, timeout=30) as client:
        with client.stream("POST", "/chat/completions", json={"messages": HELLO, "seed": 5, "max_tokens": 12}) as response:
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
            events = sse_events(response.iter_lines())
        assert events[-1] == "[DONE]"
        tokens = [json.loads(e)["token"] for e in events[:-2]]
        final = json.loads(events[-2])
        assert len(tokens) >= 2 and "".join(tokens).strip()
        assert final["finish_reason"] in ("stop", "length") and final["usage"]["completion_tokens"] <= 12
        # same seed, same reply on the OpenAI endpoint
        same = client.post("/v1/chat/completions", json={"messages": HELLO, "seed": 5, "max_tokens": 12}).json()
        assert same["choices"][0]["message"]["content"] == "".join(tokens)


def test_openai_client_works_unchanged(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.create(model="anything", messages=HELLO, max_tokens=10, seed=4, temperature=0.9)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and reply.created > 0
    assert reply.model == "nanochat-base-tiny"
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 10
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    chunks = list(client.chat.completions.create(model="anything", messages=HELLO, max_tokens=10, seed=4, temperature=0.9,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert {c.id for c in chunks} == {chunks[0].id}

    with pytest.raises(openai.BadRequestError, match="top_k: expected a value <= 200, got 500"):
        client.chat.completions.create(model="anything", messages=HELLO, extra_body={"top_k": 500})
    assert [m.id for m in client.models.list()] == ["nanochat-base-tiny"]


def test_stats_count_requests_and_tokens(server):
    with httpx.Client(base_url=server, timeout=30) as client:
        before = wait_until_idle(client)
        reply = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 7, "temperature": 0}).json()
        after = wait_until_idle(client)
    assert after["requests_served"] == before["requests_served"] + 1
    assert after["tokens_generated"] == before["tokens_generated"] + reply["usage"]["completion_tokens"]
    assert after["workers_total"] == 2 and after["workers_free"] == 2 and after["queue_length"] == 0


def test_32_concurrent_streaming_chats_all_complete(server):
    async def one_chat(client: httpx.AsyncClient, i: int) -> tuple[str, str]:
        messages = [{"role": "user", "content": f"question number {i}"}]
        async with client.stream("POST", "/chat/completions", json={"messages": messages, "max_tokens": 16}) as response:
            assert response.status_code == 200
            events = [line async for line in response.aiter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        # a reply may legitimately be empty (the model's first token is <|assistant_end|>)
        return "".join(json.loads(e[6:]).get("token", "") for e in events[:-1]), json.loads(events[-2][6:]).get("finish_reason")

    async def all_chats() -> list[tuple[str, str]]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server, timeout=60, limits=limits) as client:
            return await asyncio.gather(*(one_chat(client, i) for i in range(32)))

    start = time.monotonic()
    replies = asyncio.run(asyncio.wait_for(all_chats(), timeout=90))
    assert len(replies) == 32 and all(finish in ("stop", "length") for _, finish in replies)
    assert sum(bool(text) for text, _ in replies) >= 16  # the tiny model does talk
    assert time.monotonic() - start < 90
    with httpx.Client(base_url=server) as client:
        assert wait_until_idle(client)["workers_busy"] == 0


# ---------------------------------------------------------------------------------------------
# disconnects, a full queue, a responsive event loop

def test_disconnect_stops_generation_and_frees_the_worker(slow_server):
    with httpx.Client(base_url=slow_server, timeout=30) as client:
        before = wait_until_idle(client)
        with client.stream("POST", "/chat/completions", json={"messages": HELLO, "max_tokens": 200}) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: {\"token\""))
            t0 = time.monotonic()
            assert client.get("/health").status_code == 200  # the event loop answers during generation
            assert time.monotonic() - t0 < 1.0
            assert client.get("/stats").json()["workers_busy"] == 1
            busy = client.post("/v1/chat/completions", json={"messages": HELLO})
            assert busy.status_code == 503 and "server busy" in busy.json()["error"]["message"]
        # leaving the block closed the connection mid-reply
        after = wait_until_idle(client)
    assert after["workers_busy"] == 0 and after["workers_free"] == 1
    generated = after["tokens_generated"] - before["tokens_generated"]
    assert 1 <= generated < 100, generated  # stopped long before max_tokens=200 (6 s of generation)


# ---------------------------------------------------------------------------------------------
# the UI in a real browser

@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian chromium (runs/setup_env.sh installs it)")
def test_ui_streams_regenerates_edits_in_chromium(slow_server):
    from playwright.sync_api import sync_playwright

    stats = httpx.Client(base_url=slow_server, timeout=30)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(slow_server)
            page.wait_for_function("document.getElementById('model').textContent === 'nanochat-base-tiny'")
            # count the separate updates of the reply while it streams
            page.evaluate("""() => {
                window.updates = 0;
                new MutationObserver(() => { window.updates += 1; })
                    .observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
            }""")
            page.fill("#input", "hello there")
            page.press("#input", "Enter")
            page.wait_for_selector("body[data-state=generating]")
            page.wait_for_selector("body[data-state=idle]", timeout=20000)
            assert page.inner_text(".message.user .content") == "hello there"
            first = page.inner_text(".message.assistant .content")
            assert first.strip()
            assert page.evaluate("window.updates") >= 5  # tokens arrived one by one, not all at once
            served = stats.get("/stats").json()["requests_served"]

            page.click(".message.assistant button.regenerate")
            page.wait_for_selector("body[data-state=generating]")
            page.wait_for_selector("body[data-state=idle]", timeout=20000)
            assert page.inner_text(".message.assistant .content").strip()
            assert page.locator(".message").count() == 2
            assert wait_until_idle(stats)["requests_served"] == served + 1  # a new reply was generated

            page.click(".message.user button.edit")
            page.fill(".message.user textarea.editor", "edited question")
            page.click(".message.user button.save")
            page.wait_for_selector("body[data-state=idle]", timeout=20000)
            assert page.inner_text(".message.user .content") == "edited question"
            assert page.inner_text(".message.assistant .content").strip()
            assert wait_until_idle(stats)["requests_served"] == served + 2

            page.click("#new-chat")
            assert page.locator(".message").count() == 0
        finally:
            browser.close()
            stats.close()


# ---------------------------------------------------------------------------------------------
# the script: one line, before the model loads

@pytest.fixture
def occupied_port() -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def script_error(monkeypatch, capsys, argv: list[str]) -> str:
    """chat_web.main's one error line; fails the test if a model was loaded first."""
    monkeypatch.setattr(chat_web, "load_engines", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as e:
        chat_web.main(["-i", "base", "-c", "tiny", "--threads=1", *argv])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_script_fails_on_a_busy_port_with_one_line(base_dir, monkeypatch, capsys, occupied_port):
    assert f"--port: {occupied_port} is already in use on 127.0.0.1" in script_error(monkeypatch, capsys, [f"--port={occupied_port}"])


@pytest.mark.parametrize("argv,message", [
    (["--host=no-such-host.invalid"], "--host: cannot resolve 'no-such-host.invalid'"),
    (["--host=203.0.113.7"], "--host: cannot listen on 203.0.113.7:"),  # TEST-NET-3: not an address of this machine
    (["--port=70000"], "--port: expected 1..65535, got 70000"),
    (["--device=tpu"], "--device: expected one of cuda|mps|cpu"),
])
def test_script_fails_on_a_bad_host_port_or_device_with_one_line(base_dir, monkeypatch, capsys, argv, message):
    assert message in script_error(monkeypatch, capsys, argv)


def test_script_device_cuda_without_a_gpu_is_one_line(base_dir, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "is a CPU-only build: install the CUDA build" in script_error(monkeypatch, capsys, ["--device=cuda"])


def test_script_serves_on_the_socket_it_bound(base_dir, monkeypatch):
    """main binds, loads, and hands the bound socket to uvicorn (which is stubbed here)."""
    served = {}

    def fake_run(self, sockets):
        served["port"] = sockets[0].getsockname()[1]
        served["routes"] = {route.path for route in self.config.app.routes}

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    chat_web.main(["-i", "base", "-c", "tiny", "--threads=1", f"--port={port}"])
    assert served["port"] == port and "/v1/completions" in served["routes"]
