"""The proxy through the official SDK: indistinguishable from the upstream, priced, recorded."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from typing import Any

import openai
import pytest

from gateway.money import format_usd
from gateway.pricing import Usage
from tests.harness import KEYS, Stack, http_request

MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name three colours of the sea at dawn."}]


def direct(stack: Stack) -> openai.OpenAI:
    """An SDK client talking to the simulator directly, for side-by-side comparison."""
    return openai.OpenAI(base_url=stack.upstream_url, api_key="sk-direct", max_retries=0)


def strip_ids(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in ("id", "created", "created_at")}


def price_of(stack: Stack, model: str, usage: Usage) -> int:
    price = stack.gw.prices.lookup(model)
    assert price is not None
    return price.cost(usage)


def test_chat_matches_upstream_and_is_priced_exactly(stack: Stack) -> None:
    via = stack.client().chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=30)
    ours = via.parse()
    theirs = direct(stack).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                                   max_tokens=30)
    assert strip_ids(ours.model_dump()) == strip_ids(theirs.model_dump())
    [row] = stack.rows()
    usage = Usage(ours.usage.prompt_tokens, 0, ours.usage.completion_tokens)
    assert row.state == "settled" and row.usage_source == "upstream" and row.status == 200
    assert row.cost == price_of(stack, "gpt-4o-mini", usage)
    # 0.15/1M in, 0.60/1M out: exact pico arithmetic, visible in the header as a decimal.
    assert via.headers["x-costwall-cost-usd"] == format_usd(row.cost)
    assert Decimal(via.headers["x-costwall-cost-usd"]) == (
        Decimal(usage.prompt_tokens) * Decimal("0.15") + Decimal(30) * Decimal("0.6")
    ) / 1_000_000
    assert via.headers["x-costwall-request-id"] == row.id
    assert (row.tenant, row.agent, row.key_name) == ("acme", "content", "acme-content")


def test_cached_and_reasoning_tokens_priced_once(stack: Stack) -> None:
    stack.state.cached_tokens = 6
    stack.state.reasoning_tokens = 10
    resp = stack.client().chat.completions.create(model="o4-mini-2025-04-16",
                                                  messages=MESSAGES, max_completion_tokens=40)
    assert resp.usage.completion_tokens_details.reasoning_tokens == 10
    [row] = stack.rows()
    assert (row.cached_tokens, row.reasoning_tokens) == (6, 10)
    assert row.completion_tokens == resp.usage.completion_tokens == 40
    # o4-mini: input 1.1, cached 0.275, output 4.4 per 1M; reasoning is inside completion.
    expected = (Decimal(resp.usage.prompt_tokens - 6) * Decimal("1.1") + 6 * Decimal("0.275")
                + 40 * Decimal("4.4")) / 1_000_000
    assert Decimal(format_usd(row.cost)) == expected


def test_stream_without_include_usage_hides_usage_chunk_but_bills_it(stack: Stack) -> None:
    chunks = list(stack.client().chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=17, stream=True))
    assert all(c.choices for c in chunks), "the usage-only chunk must not reach the client"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text
    sent = stack.state.requests[-1]["json"]
    assert sent["stream_options"] == {"include_usage": True}
    [row] = stack.rows()
    assert row.usage_source == "upstream" and row.completion_tokens == 17 and row.stream


def test_stream_with_include_usage_passes_it_through(stack: Stack) -> None:
    chunks = list(stack.client().chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=9, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 9
    [row] = stack.rows()
    assert row.cost == price_of(stack, "gpt-4o-mini", Usage(chunks[-1].usage.prompt_tokens, 0, 9))


def test_cut_stream_is_charged_by_counting(stack: Stack) -> None:
    stack.state.cut_stream_after = 2
    with pytest.raises(openai.APIConnectionError):
        list(stack.client().chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=200, stream=True))
    [row] = stack.rows()
    assert row.usage_source == "counted"
    assert row.completion_tokens == 8  # two content chunks of four one-token words
    assert row.prompt_tokens > 0 and row.cost == price_of(
        stack, "gpt-4o-mini", Usage(row.prompt_tokens, 0, 8))


def test_stream_without_usage_from_upstream_is_counted(stack: Stack) -> None:
    stack.state.omit_usage = True
    chunks = list(stack.client().chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=12, stream=True))
    assert chunks
    [row] = stack.rows()
    assert (row.usage_source, row.completion_tokens) == ("counted", 12)


def test_completions_embeddings_responses_models(stack: Stack) -> None:
    c = stack.client()
    comp = c.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi",
                                max_tokens=5) if stack.gw.prices.lookup(
        "gpt-3.5-turbo-instruct") else c.completions.create(
        model="gpt-3.5-turbo", prompt="Say hi", max_tokens=5)
    assert comp.usage.completion_tokens == 5
    streamed = list(c.completions.create(model="gpt-3.5-turbo", prompt="Say hi", stream=True))
    assert all(s.choices for s in streamed)
    emb = c.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta gamma"])
    assert len(emb.data) == 2 and emb.usage.prompt_tokens == 3
    resp = c.responses.create(model="gpt-4.1-mini", input="Tell me a fact.",
                              max_output_tokens=20)
    assert resp.output_text and resp.usage.output_tokens == 20
    events = list(c.responses.create(model="gpt-4.1-mini", input="Another fact.", stream=True))
    assert events[-1].type == "response.completed"
    models = c.models.list()
    assert any(m.id for m in models.data)
    rows = {r.endpoint: r for r in stack.rows()}
    assert set(rows) == {"completions", "embeddings", "responses"} | set()
    by_endpoint: dict[str, list[Any]] = {}
    for r in stack.rows():
        by_endpoint.setdefault(r.endpoint, []).append(r)
    assert len(by_endpoint["completions"]) == 2 and len(by_endpoint["responses"]) == 2
    assert all(r.usage_source == "upstream" and r.cost > 0 for r in stack.rows())
    [e] = by_endpoint["embeddings"]
    assert e.cost == 3 * 20_000  # text-embedding-3-small: $0.02 per 1M tokens


def test_async_sdk_streaming_and_not(stack: Stack) -> None:
    async def run() -> tuple[str, int]:
        client = stack.async_client("globex-research")
        resp = await client.chat.completions.create(model="gpt-5-mini", messages=MESSAGES,
                                                    max_completion_tokens=25)
        stream = await client.chat.completions.create(model="gpt-5-mini", messages=MESSAGES,
                                                      max_completion_tokens=25, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
        await client.close()
        return text, resp.usage.completion_tokens

    text, tokens = asyncio.run(run())
    assert text and tokens == 25
    rows = stack.rows()
    assert len(rows) == 2 and {r.tenant for r in rows} == {"globex"}


def test_upstream_sees_its_key_never_the_virtual_key(stack: Stack) -> None:
    stack.client().chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=3,
        extra_headers={"Connection": "keep-alive, X-Secret-Hop", "X-Secret-Hop": "1",
                       "Proxy-Authorization": "Basic abc", "X-Costwall-Campaign": "c1",
                       "OpenAI-Beta": "assistants=v2"})
    headers = stack.state.requests[-1]["headers"]
    assert headers["authorization"] == "Bearer sk-upstream-secret"
    assert KEYS["acme-content"]["key"] not in json.dumps(dict(headers))
    for dropped in ("x-secret-hop", "proxy-authorization", "x-costwall-campaign"):
        assert dropped not in headers
    assert headers["openai-beta"] == "assistants=v2"
    [row] = stack.rows()
    assert row.campaign == "c1"


def test_upstream_errors_pass_through_and_cost_nothing(stack: Stack) -> None:
    stack.state.fail_status = 503
    stack.state.retry_after = "7"
    with pytest.raises(openai.InternalServerError) as info:
        stack.client().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert info.value.status_code == 503
    assert info.value.response.headers["retry-after"] == "7"
    [row] = stack.rows()
    assert (row.status, row.cost, row.usage_source) == (503, 0, "none")
    assert stack.gw.budgets.status() == [] or all(s.reserved == 0
                                                   for s in stack.gw.budgets.status())


def error_of(resp: Any) -> dict[str, Any]:
    body = resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize(("body", "status", "param"), [
    (b"{not json", 400, None),
    (b"\xff\xfe\x00bad", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), 400, "model"),
    (json.dumps({"model": "gpt-4o-mini", "messages": "hi"}).encode(), 400, "messages"),
    (json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}],
                 "max_tokens": "lots"}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}
                ).encode(), 400, "model"),
    (json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}],
                 "n": 0}).encode(), 400, "n"),
    (json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}],
                 "max_completion_tokens": True}).encode(), 400, "max_completion_tokens"),
    (json.dumps({"model": "text-embedding-3-small", "messages": [{"role": "user",
                                                                   "content": "x"}]}).encode(),
     400, "model"),
])
def test_bad_input_gets_openai_errors(stack: Stack, body: bytes, status: int,
                                      param: str | None) -> None:
    resp = stack.request("POST", "/v1/chat/completions", data=body, headers={
        "Authorization": f"Bearer {KEYS['acme-content']['key']}",
        "Content-Type": "application/json"})
    assert resp.status == status
    err = error_of(resp)
    assert err["param"] == param and err["message"]
    assert resp.headers["X-Costwall-Request-Id"].startswith("cw-")
    assert stack.rows() == [] and stack.state.requests == []


def test_auth_errors(stack: Stack) -> None:
    for auth in (None, "Bearer sk-cw-wrong", "Basic abc"):
        headers = {"Authorization": auth} if auth else {}
        resp = stack.request("POST", "/v1/chat/completions", json={"model": "gpt-4o-mini"},
                             headers=headers)
        assert resp.status == 401
        assert error_of(resp)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{stack.url}/v1", api_key="sk-nope", max_retries=0).models.list()
    assert stack.state.requests == []


def test_body_too_large_is_413(make_stack: Any) -> None:
    stack = make_stack(limits={"max_body_bytes": 2048})
    big = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 5000}]}
    resp = stack.request("POST", "/v1/chat/completions", json=big,
                         headers={"Authorization": f"Bearer {KEYS['acme-content']['key']}"})
    assert resp.status == 413 and error_of(resp)["code"] == "request_too_large"
    assert stack.rows() == []


def test_unknown_model_fallback_prices(make_stack: Any) -> None:
    stack = make_stack(unknown_model="gpt-4o-mini")
    stack.client().chat.completions.create(model="brand-new-model", messages=MESSAGES,
                                           max_tokens=4)
    [row] = stack.rows()
    assert row.model == "brand-new-model" and row.cost == price_of(
        stack, "gpt-4o-mini", Usage(row.prompt_tokens, 0, 4))


def test_upstream_unreachable_502_and_timeout_504(make_stack: Any) -> None:
    from tests.harness import free_port

    dead = make_stack()
    dead.config_overrides["upstream"] = {"base_url": f"http://127.0.0.1:{free_port()}/v1"}
    dead.restart()
    with pytest.raises(openai.APIStatusError) as info:
        dead.client().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert info.value.status_code == 502
    [row] = dead.rows()
    assert (row.status, row.cost) == (0, 0)
    assert all(s.reserved == 0 for s in dead.gw.budgets.status())

    slow = make_stack(upstream={"timeout_s": 0.5})
    slow.state.delay_s = 3
    with pytest.raises(openai.APIStatusError) as info:
        slow.client().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                              max_tokens=10)
    assert info.value.status_code == 504
    [row] = slow.rows()
    # It may have been processed upstream: charged at its reserved upper bound, never less.
    assert row.usage_source == "reserved" and row.cost == row.reserved > 0


def test_unknown_v1_route_is_openai_404(stack: Stack) -> None:
    resp = http_request("POST", f"{stack.url}/v1/assistants", json={})
    assert resp.status == 404 and error_of(resp)["code"] == "not_found"


def test_health(stack: Stack) -> None:
    assert stack.request("GET", "/healthz").json() == {"status": "ok"}
    assert stack.request("GET", "/readyz").status == 200


def test_ledger_failure_refuses_with_503_and_forwards_nothing(stack: Stack) -> None:
    stack.lt.run(stack.gw.ledger._writer.close())  # type: ignore[attr-defined]  # the db is gone
    with pytest.raises(openai.APIStatusError) as info:
        stack.client().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert info.value.status_code == 503
    assert info.value.response.json()["error"]["code"] == "ledger_unavailable"
    assert stack.state.requests == []
    assert all(s.reserved == 0 for s in stack.gw.budgets.status())


def test_odd_but_valid_fields_never_500(stack: Stack) -> None:
    auth = {"Authorization": f"Bearer {KEYS['acme-content']['key']}"}
    for extra in ({"stream": True, "stream_options": "yes"}, {"stream": "true"},
                  {"service_tier": 7}, {"tools": "none"}, {"messages": [{"content": None}]}):
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 3, **extra}
        resp = stack.request("POST", "/v1/chat/completions", json=body, headers=auth)
        assert resp.status < 500, (extra, resp.body)
