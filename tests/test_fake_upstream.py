"""Tests for the OpenAI simulator that every other test suite and benchmark uses as "OpenAI".

They pin the two properties the gateway's billing checks rely on: the official SDK parses every
response shape, and the reported usage equals what :mod:`gateway.tokens` counts. The server runs
in a background thread so that the SDK's synchronous client can be used as a real client.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import math
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import openai
import pytest

from gateway import tokens
from gateway.fake_upstream import (
    MAX_GENERATED_TOKENS,
    FakeUpstreamState,
    create_fake_upstream,
    start_fake_upstream,
)

O200K = tokens.encoding("o200k_base")
CL100K = tokens.encoding("cl100k_base")
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "name": "ana", "content": "Summarise the budget report for March."},
]


@dataclass
class Fake:
    """A running simulator: its base URL, its live state and raw HTTP helpers."""

    url: str
    state: FakeUpstreamState

    def client(self, **kwargs: Any) -> openai.OpenAI:
        """An SDK client without retries, so each call is exactly one upstream request."""
        kwargs.setdefault("max_retries", 0)
        return openai.OpenAI(base_url=self.url, api_key="sk-test", timeout=20, **kwargs)

    def raw(self, method: str, path: str, body: Any = None, auth: str | None = "Bearer sk-raw",
            data: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
        """One plain HTTP request; returns status, lower-cased headers and the full body."""
        parts = urlsplit(self.url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=20)
        headers = {"Content-Type": "application/json"}
        if auth is not None:
            headers["Authorization"] = auth
        if data is None and body is not None:
            data = json.dumps(body).encode()
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[str, FakeUpstreamState]]:
    """One server for the module, on its own event loop in a daemon thread."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, Any] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        box["started"] = loop.run_until_complete(start_fake_upstream())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(60), "fake upstream did not start"
    runner, url, state = box["started"]
    yield url, state
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


@pytest.fixture
def fake(upstream: tuple[str, FakeUpstreamState]) -> Fake:
    """Fresh knobs and an empty request record for every test."""
    url, state = upstream
    state.reset()
    return Fake(url, state)


def _sse_data(body: bytes) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    return [line[6:] for line in body.decode().split("\n") if line.startswith("data: ")]


def test_chat_usage_equals_token_counts(fake: Fake) -> None:
    resp = fake.client().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    text = resp.choices[0].message.content
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.prompt_tokens == tokens.count_messages(MESSAGES, O200K)
    assert resp.usage.completion_tokens == tokens.count_text(text, O200K) == 24
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 24
    assert resp.usage.prompt_tokens_details.cached_tokens == 0
    assert resp.usage.completion_tokens_details.reasoning_tokens == 0
    record = fake.state.requests[-1]
    assert record["path"] == "/v1/chat/completions" and record["method"] == "POST"
    assert record["headers"]["Authorization"] == "Bearer sk-test"
    assert record["json"]["messages"] == MESSAGES


def test_chat_encoding_and_tools_follow_gateway_rules(fake: Fake) -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"q": {"type": "string"}}}}}]
    client = fake.client()
    old = client.chat.completions.create(model="gpt-4-0613", messages=MESSAGES, tools=tools)
    assert old.usage.prompt_tokens == tokens.count_messages(MESSAGES, CL100K, tools)
    assert old.usage.completion_tokens == tokens.count_text(old.choices[0].message.content, CL100K)
    new = client.chat.completions.create(model="gpt-4.1", messages=MESSAGES, tools=tools)
    assert new.usage.prompt_tokens == tokens.count_messages(MESSAGES, O200K, tools)


def test_chat_is_deterministic_per_prompt(fake: Fake) -> None:
    client = fake.client()
    one = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    two = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    other = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Something else"}])
    assert one.choices[0].message.content == two.choices[0].message.content
    assert one.choices[0].message.content != other.choices[0].message.content


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("limit", [1, 5, 37, 300])
def test_chat_max_tokens_honoured_exactly(fake: Fake, field: str, limit: int) -> None:
    resp = fake.client().chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, **{field: limit})
    assert resp.choices[0].finish_reason == "length"
    assert tokens.count_text(resp.choices[0].message.content, O200K) == limit
    assert resp.usage.completion_tokens == limit


def test_chat_n_choices_and_cap(fake: Fake) -> None:
    client = fake.client()
    resp = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, n=3, max_tokens=7)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert len({c.message.content for c in resp.choices}) == 3
    assert resp.usage.completion_tokens == 21
    big = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=100_000)
    assert big.choices[0].finish_reason == "stop"
    assert big.usage.completion_tokens == MAX_GENERATED_TOKENS
    assert tokens.count_text(big.choices[0].message.content, O200K) == MAX_GENERATED_TOKENS


def test_chat_stream_without_include_usage_on_the_wire(fake: Fake) -> None:
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True, "max_tokens": 10}
    status, headers, raw = fake.raw("POST", "/v1/chat/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    payloads = _sse_data(raw)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all("usage" not in c for c in chunks)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "",
                                                "refusal": None}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert tokens.count_text(text, O200K) == 10
    assert len(chunks) == 1 + 3 + 1  # role, ceil(10 / 4) content chunks, finish
    plain = fake.client().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                                  max_tokens=10)
    assert plain.choices[0].message.content == text


def test_chat_stream_include_usage_via_sdk(fake: Fake) -> None:
    stream = fake.client().chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, n=2,
        stream_options={"include_usage": True})
    chunks = list(stream)
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert all(c.usage is None and len(c.choices) == 1 for c in body)
    texts = ["", ""]
    for c in body:
        texts[c.choices[0].index] += c.choices[0].delta.content or ""
    assert last.usage.prompt_tokens == tokens.count_messages(MESSAGES, O200K)
    assert last.usage.completion_tokens == sum(tokens.count_text(t, O200K) for t in texts) == 48


def test_legacy_completions(fake: Fake) -> None:
    client = fake.client()
    resp = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once upon a time")
    assert resp.object == "text_completion"
    assert resp.choices[0].finish_reason == "length"  # the API's default max_tokens is 16
    assert tokens.count_text(resp.choices[0].text, CL100K) == 16 == resp.usage.completion_tokens
    assert resp.usage.prompt_tokens == tokens.count_text("Once upon a time", CL100K)
    multi = client.completions.create(model="davinci-002", prompt=["a b", "c"], max_tokens=3)
    assert len(multi.choices) == 2 and multi.usage.completion_tokens == 6
    assert multi.usage.prompt_tokens == tokens.count_prompt_input(["a b", "c"], O200K)
    chunks = list(client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Hi",
                                            max_tokens=9, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert tokens.count_text(text, CL100K) == 9
    assert chunks[-2].choices[0].finish_reason == "length"


def test_embeddings_via_sdk_base64_default(fake: Fake) -> None:
    client = fake.client()
    inputs = ["budget report", "ledger"]
    resp = client.embeddings.create(model="text-embedding-3-small", input=inputs)
    assert fake.state.requests[-1]["json"]["encoding_format"] == "base64"
    assert [d.index for d in resp.data] == [0, 1]
    assert all(len(d.embedding) == 8 for d in resp.data)
    assert math.isclose(sum(v * v for v in resp.data[0].embedding), 1.0, rel_tol=1e-5)
    assert resp.usage.prompt_tokens == tokens.count_prompt_input(inputs, CL100K)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens
    sized = client.embeddings.create(model="text-embedding-3-large", input="x", dimensions=16,
                                     encoding_format="float")
    assert len(sized.data[0].embedding) == 16
    status, _, raw = fake.raw("POST", "/v1/embeddings", {
        "model": "text-embedding-3-small", "input": [[1, 2, 3], [4]],
        "encoding_format": "base64"})
    out = json.loads(raw)
    assert status == 200 and out["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    vector = struct.unpack("<8f", base64.b64decode(out["data"][0]["embedding"]))
    assert math.isclose(sum(v * v for v in vector), 1.0, rel_tol=1e-5)


def test_responses_non_streaming(fake: Fake) -> None:
    client = fake.client()
    resp = client.responses.create(model="gpt-4.1-mini", input="Plan the sprint",
                                   instructions="Be brief.")
    assert resp.status == "completed" and resp.id.startswith("resp_")
    expected = tokens.count_responses_input("Plan the sprint", O200K, "Be brief.")
    assert resp.usage.input_tokens == expected
    assert resp.usage.output_tokens == tokens.count_text(resp.output_text, O200K) == 24
    assert resp.usage.total_tokens == expected + 24
    cut = client.responses.create(model="gpt-4.1-mini", input="Plan", max_output_tokens=16)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage.output_tokens == tokens.count_text(cut.output_text, O200K) == 16


def test_responses_streaming_via_sdk(fake: Fake) -> None:
    client = fake.client()
    items = [{"role": "user", "content": "Plan the sprint"}]
    events = list(client.responses.create(model="gpt-4o", input=items, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert kinds.count("response.output_text.delta") == 6
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert final.output_text == text and final.usage.output_tokens == 24
    assert final.usage.input_tokens == tokens.count_responses_input(items, O200K)
    with client.responses.stream(model="gpt-4o", input=items) as stream:
        assert stream.get_final_response().output_text == text


def test_responses_stream_incomplete_carries_usage(fake: Fake) -> None:
    events = list(fake.client().responses.create(model="gpt-4o", input="x", stream=True,
                                                 max_output_tokens=5))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.usage.output_tokens == 5


def test_cut_stream_is_an_error_without_usage(fake: Fake) -> None:
    fake.state.cut_stream_after = 2
    received: list[Any] = []
    with pytest.raises(openai.APIConnectionError):
        received.extend(fake.client().chat.completions.create(  # keeps chunks before the error
            model="gpt-4o", messages=MESSAGES, stream=True,
            stream_options={"include_usage": True}))
    assert len(received) == 3  # role chunk + the two content chunks written before the cut
    assert all(c.usage is None for c in received)
    with pytest.raises(http.client.IncompleteRead) as info:
        fake.raw("POST", "/v1/chat/completions", {"model": "gpt-4o", "messages": MESSAGES,
                                                  "stream": True})
    assert b"[DONE]" not in info.value.partial
    with pytest.raises(openai.APIConnectionError):
        list(fake.client().responses.create(model="gpt-4o", input="x", stream=True))


def test_fail_status_503_with_retry_after(fake: Fake) -> None:
    fake.state.fail_status = 503
    fake.state.retry_after = "7"
    with pytest.raises(openai.InternalServerError) as info:
        fake.client().chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert info.value.status_code == 503
    assert info.value.response.headers["retry-after"] == "7"
    assert info.value.body["type"] == "server_error"
    assert fake.state.fail_status == 503  # persistent until changed


def test_fail_next_then_recover_and_429_shape(fake: Fake) -> None:
    fake.state.fail_next = 2
    fake.state.fail_status = 429
    for _ in range(2):
        status, _, raw = fake.raw("POST", "/v1/chat/completions",
                                  {"model": "gpt-4o", "messages": MESSAGES})
        assert status == 429
        assert json.loads(raw) == {"error": {
            "message": "Simulated upstream failure (429).", "type": "requests", "param": None,
            "code": "rate_limit_exceeded"}}
    assert fake.state.fail_status is None and fake.state.fail_next == 0
    status, _, _ = fake.raw("POST", "/v1/chat/completions",
                            {"model": "gpt-4o", "messages": MESSAGES})
    assert status == 200
    fake.state.fail_next = 1
    status, _, _ = fake.raw("POST", "/v1/responses", {"model": "gpt-4o", "input": "x"})
    assert status == 500


def test_cached_and_reasoning_tokens(fake: Fake) -> None:
    fake.state.cached_tokens = 5
    fake.state.reasoning_tokens = 10
    client = fake.client()
    resp = client.chat.completions.create(model="o3", messages=MESSAGES,
                                          max_completion_tokens=30)
    visible = tokens.count_text(resp.choices[0].message.content, O200K)
    assert visible == 20 and resp.usage.completion_tokens == 30
    assert resp.usage.completion_tokens_details.reasoning_tokens == 10
    assert resp.usage.prompt_tokens_details.cached_tokens == 5
    plain = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert plain.usage.completion_tokens_details.reasoning_tokens == 0
    assert plain.usage.completion_tokens == 24
    fake.state.cached_tokens = 10**6
    capped = client.responses.create(model="gpt-5-mini", input="hi")
    assert capped.usage.input_tokens_details.cached_tokens == capped.usage.input_tokens
    assert capped.usage.output_tokens_details.reasoning_tokens == 10
    assert capped.usage.output_tokens == 34
    assert capped.output[0].type == "reasoning" and capped.output_text
    starved = client.chat.completions.create(model="gpt-5", messages=MESSAGES, max_tokens=4)
    assert starved.choices[0].message.content == "" and starved.usage.completion_tokens == 4
    assert starved.choices[0].finish_reason == "length"


def test_omit_usage(fake: Fake) -> None:
    fake.state.omit_usage = True
    status, _, raw = fake.raw("POST", "/v1/chat/completions",
                              {"model": "gpt-4o", "messages": MESSAGES})
    assert status == 200 and "usage" not in json.loads(raw)
    status, _, raw = fake.raw("POST", "/v1/chat/completions", {
        "model": "gpt-4o", "messages": MESSAGES, "stream": True,
        "stream_options": {"include_usage": True}})
    payloads = _sse_data(raw)
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert payloads[-1] == "[DONE]" and all(c["usage"] is None and c["choices"] for c in chunks)
    resp = fake.client().responses.create(model="gpt-4o", input="x")
    assert resp.usage is None


def test_auth_required(fake: Fake) -> None:
    for auth in (None, "Bearer ", "Basic abc"):
        status, _, raw = fake.raw("POST", "/v1/chat/completions",
                                  {"model": "gpt-4o", "messages": MESSAGES}, auth=auth)
        assert status == 401
        error = json.loads(raw)["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
        assert error["param"] is None and error["message"]
    assert len(fake.state.requests) == 3
    assert "authorization" not in fake.state.requests[0]["headers"]


def test_bad_requests_are_400_not_500(fake: Fake) -> None:
    status, _, raw = fake.raw("POST", "/v1/chat/completions", data=b"{not json")
    assert status == 400 and json.loads(raw)["error"]["type"] == "invalid_request_error"
    for path, body in [("/v1/chat/completions", {"model": "gpt-4o"}),
                       ("/v1/chat/completions", {"messages": MESSAGES}),
                       ("/v1/chat/completions", {"model": "m", "messages": MESSAGES, "n": 0}),
                       ("/v1/chat/completions", {"model": "m", "messages": MESSAGES,
                                                 "max_tokens": "5"}),
                       ("/v1/embeddings", {"model": "m", "input": []}),
                       ("/v1/responses", {"model": "m"}),
                       ("/v1/completions", [1, 2])]:
        status, _, raw = fake.raw("POST", path, body)
        assert status == 400, (path, body, raw)
        assert set(json.loads(raw)["error"]) == {"message", "type", "param", "code"}
    status, _, raw = fake.raw("GET", "/v1/nope")
    assert status == 404 and json.loads(raw)["error"]["message"] == "Invalid URL (GET /v1/nope)"


def test_models(fake: Fake) -> None:
    client = fake.client()
    ids = [m.id for m in client.models.list()]
    assert "gpt-4o-mini" in ids and "text-embedding-3-small" in ids
    model = client.models.retrieve("my-custom-model")
    assert model.id == "my-custom-model" and model.object == "model"


def test_control_endpoints(fake: Fake) -> None:
    status, _, raw = fake.raw("POST", "/_fake/config", {
        "delay_s": 0.05, "fail_status": 502, "retry_after": 3, "cut_stream_after": None,
        "omit_usage": True}, auth=None)
    assert status == 200 and json.loads(raw)["fail_status"] == 502
    assert fake.state.delay_s == 0.05 and fake.state.retry_after == "3"
    assert fake.state.omit_usage is True
    for bad in ({"nope": 1}, {"fail_next": -1}, {"omit_usage": 1}, {"cached_tokens": "5"},
                {"requests": []}):
        status, _, _ = fake.raw("POST", "/_fake/config", bad)
        assert status == 400, bad
    started = time.monotonic()
    status, headers, _ = fake.raw("GET", "/v1/models")
    assert status == 502 and headers["retry-after"] == "3"
    assert time.monotonic() - started >= 0.05
    status, _, raw = fake.raw("POST", "/_fake/reset")
    assert status == 200 and json.loads(raw)["fail_status"] is None
    assert fake.state.requests == [] and fake.state.delay_s == 0
    for i in range(60):
        fake.raw("GET", f"/v1/models/m{i}")
    status, _, raw = fake.raw("GET", "/_fake/requests")
    recorded = json.loads(raw)
    assert recorded["count"] == 60 and len(recorded["requests"]) == 50
    assert recorded["requests"][-1]["path"] == "/v1/models/m59"
    assert recorded["requests"][-1]["headers"]["authorization"] == "Bearer sk-raw"


def test_record_limit_and_chunk_delay(fake: Fake) -> None:
    fake.state.max_records = 4
    for _ in range(10):
        fake.raw("GET", "/v1/models")
    assert len(fake.state.requests) <= 4 and fake.state.total_requests == 10
    fake.state.chunk_delay_s = 0.02
    started = time.monotonic()
    chunks = list(fake.client().chat.completions.create(model="gpt-4o", messages=MESSAGES,
                                                        stream=True))
    assert len(chunks) == 8 and time.monotonic() - started >= 7 * 0.02


def test_create_app_shares_given_state() -> None:
    state = FakeUpstreamState(delay_s=1.5)
    app = create_fake_upstream(state)
    assert any(value is state for value in app.values())
