"""nanochat.serving: the OpenAI contract with the official client (stop, logprobs, completions,
models/{id}, unsupported fields), the OpenAPI document, a bounded fuzz run against it
(schemathesis) plus the two malformed-body shapes that used to be 500s, admission under a burst,
and the reply-text logic (stop strings, logprob alignment) against a slow reference."""

from __future__ import annotations

import asyncio
import json
import math
import threading
from typing import Iterator

import httpx
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanochat.engine import Engine
from nanochat.serving import MAX_BODY_BYTES, ReplyText
from nanochat.tokenizer import Tokenizer, chat_prompt, get_tokenizer
from tests.helpers import HELLO, make_app, serve

MODEL = "nanochat-base-tiny"
PROMPT = [{"role": "user", "content": "the gradient"}]  # the tiny model's greedy reply is long (to "hello" it is empty)


@pytest.fixture(scope="module")
def server(tiny_base) -> Iterator[str]:
    with serve(make_app(tiny_base, num_workers=2, max_tokens=16)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0)


def greedy_chat(client: openai.OpenAI, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=12, temperature=0, **kwargs)


# ---------------------------------------------------------------------------------------------
# stop strings

def test_stop_cuts_the_reply_before_the_stop_string(client):
    full = greedy_chat(client).choices[0].message.content
    assert len(full) > 8, full
    stop = full[4:7]  # a piece from the middle of the greedy reply
    cut = full[:full.index(stop)]
    reply = greedy_chat(client, stop=[stop, "never-appears"])
    assert reply.choices[0].message.content == cut
    assert reply.choices[0].finish_reason == "stop"
    assert greedy_chat(client, stop=stop).choices[0].message.content == cut  # a bare string works too
    # a stop string that never appears changes nothing
    assert greedy_chat(client, stop="never-appears").choices[0].message.content == full


def test_stop_in_streaming_never_leaks_the_stop_text(client):
    full = greedy_chat(client).choices[0].message.content
    stop = full[4:7]
    cut = full[:full.index(stop)]
    chunks = list(greedy_chat(client, stop=[stop], stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == cut  # pieces are never taken back: any leaked stop text would show here
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


# ---------------------------------------------------------------------------------------------
# logprobs

def test_chat_logprobs_describe_the_reply(client):
    reply = greedy_chat(client, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    text = reply.choices[0].message.content
    assert "".join(entry.token for entry in content) == text  # ASCII reply: one entry per token, in order
    stop_token = reply.choices[0].finish_reason == "stop"
    assert len(content) == reply.usage.completion_tokens - stop_token
    for entry in content:
        assert len(entry.top_logprobs) == 3
        values = [top.logprob for top in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and sum(math.exp(v) for v in values) <= 1 + 1e-5
        # greedy: the chosen token is the most likely one
        assert entry.token == entry.top_logprobs[0].token and entry.logprob == pytest.approx(values[0])
        assert bytes(entry.bytes).decode() == entry.token
    assert greedy_chat(client).choices[0].logprobs is None  # not asked, not given

    chunks = list(greedy_chat(client, logprobs=True, top_logprobs=3, stream=True))
    streamed = [entry for c in chunks if c.choices and c.choices[0].logprobs for entry in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]


def test_sampled_logprobs_match_the_engine(client, tiny_base):
    """Temperature 1 with a seed and no top-k: the tokens and logprobs the API reports are the
    engine's for the same prompt and seed."""
    reply = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=8, temperature=1.0, seed=11,
                                           logprobs=True, top_logprobs=0, extra_body={"top_k": None})
    content = reply.choices[0].logprobs.content
    assert content and all(entry.top_logprobs == [] for entry in content)
    engine: Engine = make_app(tiny_base, num_workers=1).state.pool.workers[0].engine
    steps = list(engine.steps(chat_prompt(engine.tokenizer, PROMPT), max_tokens=8, temperature=1.0, seed=11, top_logprobs=0))
    sampled = [(step.tokens[0], step.logprobs[0].logprob) for step in steps if step.tokens[0] not in engine.stop_ids]
    assert [entry.bytes for entry in content] == [list(engine.tokenizer.enc.decode_single_token_bytes(t)) for t, _ in sampled]
    assert [entry.logprob for entry in content] == pytest.approx([lp for _, lp in sampled], abs=1e-5)
    assert min(entry.logprob for entry in content) < -0.01  # sampling at T=1 is not always a near-certain token


# ---------------------------------------------------------------------------------------------
# /v1/completions, /v1/models/{id}

def test_completions_stream_and_not_agree_with_the_engine(client, tiny_base):
    reply = client.completions.create(model=MODEL, prompt="the gradient", max_tokens=8, temperature=0)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-") and reply.model == MODEL
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 8
    # the same continuation straight from the engine
    app = make_app(tiny_base, num_workers=1)
    engine: Engine = app.state.pool.workers[0].engine
    tokenizer = engine.tokenizer
    prompt = [tokenizer.get_bos_token_id(), *tokenizer.encode("the gradient")]
    assert reply.usage.prompt_tokens == len(prompt)
    sequence, _ = engine.generate_batch(prompt, max_tokens=8, temperature=0.0)
    assert choice.text == tokenizer.decode(sequence[0][len(prompt):])

    chunks = list(client.completions.create(model=MODEL, prompt="the gradient", max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens

    by_ids = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)  # token ids as the prompt
    assert by_ids.choices[0].text == choice.text


def test_completion_logprobs_and_stop(client):
    reply = client.completions.create(model=MODEL, prompt="the gradient", max_tokens=8, temperature=0, logprobs=2)
    text, logprobs = reply.choices[0].text, reply.choices[0].logprobs
    assert "".join(logprobs.tokens) == text
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]
    assert len(logprobs.token_logprobs) == len(logprobs.tokens) == len(logprobs.top_logprobs)
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) <= 2 and max(top.values()) == pytest.approx(value) and token in top
    stop = text[3:6]
    cut = client.completions.create(model=MODEL, prompt="the gradient", max_tokens=8, temperature=0, stop=stop)
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_models_by_id(client):
    assert client.models.retrieve(MODEL).id == MODEL
    assert [m.id for m in client.models.list()] == [MODEL]
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4' not found"):
        client.models.retrieve("gpt-4")


# ---------------------------------------------------------------------------------------------
# unsupported fields are refused, never ignored

@pytest.mark.parametrize("extra", [
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
    {"tool_choice": "auto"}, {"response_format": {"type": "json_object"}}, {"presence_penalty": 0.5},
    {"frequency_penalty": 0.1}, {"logit_bias": {"1": 5}}, {"functions": [{"name": "f"}]},
])
def test_unsupported_chat_fields_are_a_400_naming_the_field(client, extra):
    name = next(iter(extra))
    with pytest.raises(openai.BadRequestError, match=f"{name}: not supported by this server") as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, **extra)
    assert e.value.body["param"] == name


@pytest.mark.parametrize("extra", [{"echo": True}, {"suffix": "x"}, {"best_of": 2}, {"presence_penalty": 1.0}])
def test_unsupported_completion_fields_are_a_400_naming_the_field(client, extra):
    name = next(iter(extra))
    with pytest.raises(openai.BadRequestError, match=f"{name}: not supported by this server"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, **extra)


def test_completion_prompt_checks(server, tiny_base):
    vocab_size = get_tokenizer(tiny_base / "tokenizer").get_vocab_size()
    with httpx.Client(base_url=server, timeout=30) as http:
        for body, message in [({"prompt": [1, 10**9]}, f"prompt[1]: expected a token id in 0..{vocab_size - 1}, got 1000000000"),
                              ({"prompt": ["a", "b"]}, "prompt[0]: expected an integer"),
                              ({"prompt": 3}, "prompt: expected a string or a list of token ids, got 3"),
                              ({"prompt": ""}, "prompt: expected at least 1 character(s)"),
                              ({}, "prompt: required"),
                              ({"prompt": "x", "logprobs": 6}, "logprobs: expected a value <= 5")]:
            response = http.post("/v1/completions", json=body)
            assert response.status_code == 400 and message in response.json()["error"]["message"], (body, response.text)


# ---------------------------------------------------------------------------------------------
# the OpenAPI document, and fuzzing against it

def test_openapi_describes_request_bodies_and_responses(server):
    spec = httpx.get(f"{server}/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for path, model in [("/v1/chat/completions", "ChatCompletionRequest"), ("/v1/completions", "CompletionRequest"),
                        ("/chat/completions", "ChatRequest")]:
        operation = spec["paths"][path]["post"]
        assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(f"/{model}")
        assert schemas[model]["additionalProperties"] is False
        assert {"200", "400", "503"} <= set(operation["responses"])
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert {"messages", "stop", "logprobs", "top_logprobs", "max_tokens", "temperature", "stream"} <= set(chat)
    assert "tools" not in chat
    assert spec["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]["application/json"]["schema"][
        "$ref"].endswith("/ChatCompletion")
    assert "/v1/models/{model_id}" in spec["paths"]
    assert httpx.get(f"{server}/docs").status_code == 200


class ShortEngine(Engine):
    """At most 2 new tokens per reply, whatever max_tokens says: fuzzing checks status codes, not text."""

    def steps(self, tokens, num_samples=1, max_tokens=None, *args, **kwargs):
        return super().steps(tokens, num_samples, min(max_tokens or 2, 2), *args, **kwargs)


@pytest.fixture(scope="module")
def fuzz_server(tiny_base) -> Iterator[str]:
    with serve(make_app(tiny_base, ShortEngine, num_workers=1, max_queue=100, max_tokens=2)) as url:
        yield url


@pytest.mark.slow
def test_fuzzing_the_openapi_contract_gives_no_5xx(fuzz_server):
    """Schema-driven requests (valid and invalid) to every operation of /openapi.json: none may be
    a 5xx. Bounded: a fixed number of examples per operation and mode, derandomized."""
    schema = schemathesis.openapi.from_url(f"{fuzz_server}/openapi.json")
    statuses: list[int] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/chat/completions",
                                               "/v1/models/{model_id}", "/health"}
    for operation in operations:
        has_body = operation.method.upper() == "POST"  # GETs have nothing to make invalid (a path id is any string)
        modes = [schemathesis.GenerationMode.POSITIVE] + [schemathesis.GenerationMode.NEGATIVE] * has_body
        for mode in modes:
            examples = 12 if operation.method.upper() == "POST" else 3

            @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def call(case) -> None:
                response = case.call(base_url=fuzz_server, timeout=30)
                statuses.append(response.status_code)
                assert response.status_code < 500, (operation.label, mode, case.body, response.text[:300])

            call()
    assert len(statuses) >= 60 and any(s == 200 for s in statuses) and any(400 <= s < 500 for s in statuses)


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                           lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
                           max_leaves=20)
FIELDS = ["messages", "prompt", "temperature", "top_k", "top_p", "max_tokens", "seed", "stop", "logprobs", "top_logprobs",
          "stream", "stream_options", "n", "model", "max_completion_tokens", "role", "content"]


def test_random_json_bodies_give_no_5xx(fuzz_server):
    bodies = st.one_of(JSON_VALUES, st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=5),
                       st.fixed_dictionaries({"messages": st.lists(st.dictionaries(st.sampled_from(["role", "content"]),
                                                                                     JSON_VALUES), max_size=3)}))
    with httpx.Client(base_url=fuzz_server, timeout=30) as http:
        @settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
        @given(body=bodies, path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/chat/completions"]))
        def post(body, path) -> None:
            response = http.post(path, content=json.dumps(body))
            assert response.status_code < 500, (path, body, response.text[:300])
            if response.status_code != 200:
                assert response.json()["error"]["message"]

        post()


def nested(depth: int, kind: str) -> str:
    return "[" * depth + "]" * depth if kind == "array" else '{"a":' * depth + "1" + "}" * depth


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/chat/completions"])
def test_the_two_body_shapes_that_were_500s_are_400s(fuzz_server, path):
    """Integer literals past Python's 4300-digit limit, and deep nesting (under the 1 MB limit)."""
    huge = "9" * 5000
    shapes = [f'{{"messages": [{{"role": "user", "content": "hi"}}], "prompt": "x", "{field}": {huge}}}'
              for field in ("max_tokens", "seed", "temperature", "top_k")]
    shapes += [f'{{"messages": {huge}}}', f'{{"prompt": [{huge}]}}', f"{huge}", f'{{"a": -{huge}}}']
    for depth in (150, 199, 200, 201, 1000, 60_000):
        for kind in ("array", "object"):
            shapes += [nested(depth, kind),
                       f'{{"messages": [{{"role": "user", "content": {nested(depth, kind)}}}], "prompt": {nested(depth, kind)}}}',
                       f'{{"messages": [{{"role": "user", "content": "hi"}}], "prompt": "x", "stop": {nested(depth, kind)}}}']
    with httpx.Client(base_url=fuzz_server, timeout=30) as http:
        for body in shapes:
            assert len(body) < MAX_BODY_BYTES
            response = http.post(path, content=body, headers={"Content-Type": "application/json"})
            assert 400 <= response.status_code < 500, (body[:80], response.status_code, response.text[:200])
            assert response.json()["error"]["message"]
        assert http.get("/health").status_code == 200


# ---------------------------------------------------------------------------------------------
# admission under a burst

class GatedEngine(Engine):
    """The real engine, but no reply starts before `gate` opens: admitted requests pile up."""

    gate = threading.Event()

    def steps(self, *args, **kwargs):
        assert self.gate.wait(timeout=60), "the test never opened the gate"
        yield from super().steps(*args, **kwargs)


WORKERS, MAX_QUEUE, EXTRA = 2, 3, 4


@pytest.fixture(scope="module")
def gated_server(tiny_base) -> Iterator[str]:
    with serve(make_app(tiny_base, GatedEngine, num_workers=WORKERS, max_queue=MAX_QUEUE, max_tokens=3)) as url:
        yield url


def burst(url: str, count: int) -> list[tuple[int, str | None]]:
    """`count` simultaneous requests (three endpoints, streamed and not) while the gate is shut;
    the gate opens once `EXTRA` of them have come back. (status, Retry-After) of each."""
    requests = [("/chat/completions", {"messages": HELLO}), ("/v1/chat/completions", {"messages": HELLO}),
                ("/v1/chat/completions", {"messages": HELLO, "stream": True}), ("/v1/completions", {"prompt": "hi"})]

    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, str | None]:
        path, body = requests[i % len(requests)]
        async with client.stream("POST", path, json=body) as response:
            await response.aread()
            return response.status_code, response.headers.get("retry-after")

    async def run() -> list[tuple[int, str | None]]:
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=64)) as client:
            tasks = [asyncio.create_task(one(client, i)) for i in range(count)]
            for _ in range(500):  # the refused ones answer at once; the admitted ones wait for the gate
                stats = (await client.get("/stats")).json()
                if sum(task.done() for task in tasks) >= EXTRA and stats["queue_length"] == MAX_QUEUE \
                        and stats["workers_busy"] == WORKERS:
                    break
                await asyncio.sleep(0.02)
            done_before_gate = sum(task.done() for task in tasks)
            GatedEngine.gate.set()
            results = await asyncio.gather(*tasks)
            GatedEngine.gate.clear()
            assert (stats["queue_length"], stats["workers_busy"], done_before_gate) == (MAX_QUEUE, WORKERS, EXTRA), stats
            return results

    return asyncio.run(asyncio.wait_for(run(), timeout=120))


def test_a_burst_past_the_limit_gets_exactly_the_extra_503s(gated_server):
    for _ in range(2):  # the second burst shows every slot was given back
        results = burst(gated_server, WORKERS + MAX_QUEUE + EXTRA)
        refused = [r for r in results if r[0] == 503]
        assert len(refused) == EXTRA, results
        assert all(retry_after == "1" for _, retry_after in refused)
        assert all(status == 200 for status, _ in results if status != 503), results


# ---------------------------------------------------------------------------------------------
# reply text: stop strings and logprob alignment against a slow reference

@pytest.fixture(scope="module")
def letters_tokenizer() -> Tokenizer:
    return Tokenizer.train_from_iterator(["abba cab STOP stop aa bb ab ba ST OP"] * 30, vocab_size=280)


def reference_cut(token_texts: list[str], stops: list[str]) -> tuple[str, bool]:
    """The reply up to the first stop string, checked after each token as a server must."""
    text = ""
    for piece in token_texts:
        text += piece
        found = [text.find(s) for s in stops if s in text]
        if found:
            return text[:min(found)], True
    return text, False


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(text=st.text(alphabet="abST OP", max_size=40),
       stops=st.lists(st.text(alphabet="abST OP", min_size=1, max_size=4), max_size=4))
def test_reply_text_cuts_at_the_first_stop_and_never_emits_it(letters_tokenizer, text, stops):
    tokens = letters_tokenizer.encode(text)
    token_texts = [letters_tokenizer.decode([t]) for t in tokens]
    expected, stopped = reference_cut(token_texts, stops)
    reply = ReplyText(letters_tokenizer, stops)
    pieces = []
    for token in tokens:
        piece = reply.push(token)
        if piece is not None:
            pieces.append(piece)
        if reply.stopped:
            break
    if not reply.stopped:
        tail = reply.finish()
        if tail is not None:
            pieces.append(tail)
    assert reply.stopped == stopped
    assert "".join(p.text for p in pieces) == expected
    # each token is reported once, in order, at the offset where its text begins; after a stop,
    # only the tokens whose text begins before the cut
    starts = [sum(len(t) for t in token_texts[:i]) for i in range(len(token_texts))]
    reported = [(offset, token) for p in pieces for offset, token, _ in p.tokens]
    expected_tokens = [(start, token) for start, token in zip(starts, tokens) if not stopped or start < len(expected)]
    assert reported == expected_tokens


def test_reply_text_holds_back_a_possible_stop_then_lets_it_go(letters_tokenizer):
    reply = ReplyText(letters_tokenizer, ["STOP"])
    emitted = ""
    for piece_text in ["ab", " ST", "ab", " ST", "OP", "ba"]:
        for token in letters_tokenizer.encode(piece_text):
            piece = reply.push(token)
            emitted += piece.text if piece else ""
            if reply.stopped:
                break
            assert not emitted.endswith(("S", "ST", "STO"))  # a possible stop is held back
    assert reply.stopped and emitted == "ab STab "
