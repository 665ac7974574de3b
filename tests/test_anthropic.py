"""The Anthropic Messages API through costwall, end to end: the official ``anthropic`` SDK
(sync, async, streaming, count_tokens) against the simulator, through the gateway and
directly; Claude Code's two ways of presenting a key; errors in Anthropic's shape; exact cost
from every usage field; several upstreams (a keyless local one) under one budget."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from gateway.fake_upstream import start_fake_upstream
from gateway.money import to_pico
from tests.harness import KEYS, ROOT, LoopThread, Stack
from tests.hostile import settled_rows

UPSTREAMS = [
    {"name": "openai", "kind": "openai", "base_url": "{sim}",
     "api_key_env": "COSTWALL_TEST_UPSTREAM_KEY", "models": ["gpt-*", "o*", "text-embedding-*"]},
    {"name": "anthropic", "kind": "anthropic", "base_url": "{sim}",
     "api_key_env": "COSTWALL_TEST_ANTHROPIC_KEY", "models": ["claude-*"]},
]
MODEL = "claude-sonnet-4-5"
ASK = [{"role": "user", "content": "Write one line about budgets."}]


def two_stack(tmp_path: Path, **config: Any) -> Stack:
    return Stack(tmp_path, upstreams=UPSTREAMS, **config)


@pytest.fixture
def stack(tmp_path: Path) -> Any:
    s = two_stack(tmp_path)
    yield s
    s.close()


def direct(stack: Stack) -> anthropic.Anthropic:
    """The SDK against the simulator itself (the reference answer)."""
    return anthropic.Anthropic(base_url=stack.upstream_url.removesuffix("/v1"),
                               api_key="sk-ant-direct", max_retries=0, timeout=30)


def expected_cost(stack: Stack, usage: Any) -> int:
    """usage x price, from the price table's decimal strings (not gateway.pricing)."""
    import yaml

    entry = yaml.safe_load((ROOT / "config" / "pricing.yaml").read_text())["models"][MODEL]
    per_token = {k: Decimal(entry[k]) / 10**6 for k in
                 ("input", "output", "cache_read", "cache_write_5m", "cache_write_1h")}
    split = usage.cache_creation
    w1h = split.ephemeral_1h_input_tokens if split else 0
    creation = usage.cache_creation_input_tokens or 0
    usd = (usage.input_tokens * per_token["input"] + usage.output_tokens * per_token["output"]
           + (usage.cache_read_input_tokens or 0) * per_token["cache_read"]
           + (creation - w1h) * per_token["cache_write_5m"] + w1h * per_token["cache_write_1h"])
    return to_pico(usd)


def test_sdk_sync_async_and_streams_match_the_simulator(stack: Stack) -> None:
    stack.state.cached_tokens, stack.state.cache_write_1h_tokens = 5, 3
    client, reference = stack.anthropic(), direct(stack)
    got = client.messages.create(model=MODEL, max_tokens=100, messages=ASK)
    want = reference.messages.create(model=MODEL, max_tokens=100, messages=ASK)
    assert got.content[0].text == want.content[0].text and got.usage == want.usage
    assert got.stop_reason == "end_turn" and got.usage.cache_read_input_tokens == 5

    with client.messages.stream(model=MODEL, max_tokens=100, messages=ASK) as stream:
        streamed = stream.get_final_message()
    assert streamed.content[0].text == want.content[0].text
    assert streamed.usage.output_tokens == want.usage.output_tokens
    events = [e.type for e in client.messages.create(model=MODEL, max_tokens=100, messages=ASK,
                                                     stream=True)]
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert "message_delta" in events and "content_block_delta" in events

    async def run() -> Any:
        async with stack.async_anthropic() as aclient:
            return await aclient.messages.create(model=MODEL, max_tokens=100, messages=ASK)

    assert asyncio.run(run()).content[0].text == want.content[0].text
    counted = client.messages.count_tokens(model=MODEL, messages=ASK)
    assert counted.input_tokens == reference.messages.count_tokens(model=MODEL,
                                                                   messages=ASK).input_tokens

    rows = settled_rows(stack, 4)
    assert len(rows) == 4, "count_tokens is never charged nor recorded"
    for row in rows:
        assert (row.provider, row.endpoint, row.usage_source) == ("anthropic", "messages",
                                                                  "upstream")
        assert row.cost == expected_cost(stack, want.usage), "streamed or not: same cost"
        assert row.prompt_tokens == (want.usage.input_tokens + 5 + 3)
        assert row.cached_tokens == 5


def test_claude_code_headers_both_ways(stack: Stack) -> None:
    """ANTHROPIC_AUTH_TOKEN -> Authorization: Bearer; ANTHROPIC_API_KEY -> x-api-key."""
    virtual = KEYS["acme-content"]["key"]
    common = {"anthropic-version": "2023-06-01",
              "anthropic-beta": "interleaved-thinking-2025-05-14,fine-grained-tool-streaming"}
    body = {"model": MODEL, "max_tokens": 20, "messages": ASK}
    for auth in ({"Authorization": f"Bearer {virtual}"}, {"x-api-key": virtual}):
        stack.state.requests.clear()
        answer = stack.request("POST", "/v1/messages", json=body, headers={**common, **auth})
        assert answer.status == 200, answer.body
        sent = stack.state.requests[-1]["headers"]
        assert sent["x-api-key"] == "sk-ant-upstream-secret"
        assert "authorization" not in sent
        assert sent["anthropic-version"] == common["anthropic-version"]
        assert sent["anthropic-beta"] == common["anthropic-beta"]
        assert virtual not in str(dict(sent)), "the virtual key is never forwarded"
        assert b"sk-ant-upstream-secret" not in answer.body
    # The SDK the way Claude Code configures it: auth_token (bearer), no api key.
    client = anthropic.Anthropic(base_url=stack.url, auth_token=virtual, api_key=None,
                                 max_retries=0)
    assert client.messages.create(model=MODEL, max_tokens=5, messages=ASK).usage.output_tokens


def _anthropic_error(answer: Any, status: int, kind: str) -> dict[str, Any]:
    assert answer.status == status, answer.body
    body = answer.json()
    assert body["type"] == "error" and body["error"]["type"] == kind, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return dict(body)


def test_errors_on_messages_routes_take_anthropic_shape(tmp_path: Path) -> None:
    stack = two_stack(tmp_path, budgets={"tenants": {"globex": {"monthly_usd": "0"}}})
    try:
        good = {"x-api-key": KEYS["acme-content"]["key"], "anthropic-version": "2023-06-01"}
        post = lambda body, headers=good: stack.request(  # noqa: E731
            "POST", "/v1/messages", json=body, headers=headers)
        _anthropic_error(post({"model": MODEL, "messages": ASK}), 400, "invalid_request_error")
        _anthropic_error(post({"model": MODEL, "max_tokens": 5, "messages": ASK},
                              {"x-api-key": "sk-cw-nope"}), 401, "authentication_error")
        _anthropic_error(post({"model": MODEL, "max_tokens": 5, "messages": [
            {"role": "user", "content": [{"text": "no type"}]}]}), 400, "invalid_request_error")
        _anthropic_error(post({"model": MODEL, "max_tokens": 5, "messages": [
            {"role": "user", "content": 42}]}), 400, "invalid_request_error")
        nowhere = _anthropic_error(post({"model": "mistral-large", "max_tokens": 5,
                                         "messages": ASK}), 400, "invalid_request_error")
        assert "mistral-large" in nowhere["error"]["message"]
        wrong_api = _anthropic_error(post({"model": "gpt-4o-mini", "max_tokens": 5,
                                           "messages": ASK}), 400, "invalid_request_error")
        assert "openai" in wrong_api["error"]["message"]
        blocked = post({"model": MODEL, "max_tokens": 5, "messages": ASK},
                       {"x-api-key": KEYS["globex-research"]["key"]})
        body = _anthropic_error(blocked, 402, "budget_exceeded")
        assert body["budget"]["scope"] == "tenant" and body["error"]["budget"] == body["budget"]
        # The SDK raises a plain APIStatusError for 402 (and does not retry it).
        with pytest.raises(anthropic.APIStatusError) as info:
            stack.anthropic("globex-research").messages.create(model=MODEL, max_tokens=5,
                                                               messages=ASK)
        assert info.value.status_code == 402
        # A Claude model on the OpenAI route is refused in OpenAI's shape.
        with pytest.raises(openai.BadRequestError) as oinfo:
            stack.client().chat.completions.create(model=MODEL, messages=ASK)
        assert "anthropic" in str(oinfo.value)
        # The upstream refuses the gateway's own key: 502, never the upstream's 401.
        stack.state.fail_status = 401
        _anthropic_error(post({"model": MODEL, "max_tokens": 5, "messages": ASK}), 502,
                         "api_error")
        stack.state.fail_status = None
        assert len(stack.state.requests) == 1, "nothing else reached the upstream"
        assert [r.status for r in stack.rows()] == [401]
    finally:
        stack.close()


def test_shared_global_cap_openai_and_anthropic_agents_at_c50(tmp_path: Path) -> None:
    probe = two_stack(tmp_path / "probe")
    gpt, claude = probe.gw.prices.lookup("gpt-4o-mini"), probe.gw.prices.lookup(MODEL)
    probe.close()
    assert gpt is not None and claude is not None
    from gateway.estimate import estimate
    from gateway.messages import estimate_messages

    bound_gpt = gpt.upper_bound(estimate("chat", {"messages": ASK, "max_tokens": 100},
                                         gpt).prompt_tokens, 100)
    bound_claude = claude.upper_bound(estimate_messages({"messages": ASK, "max_tokens": 100},
                                                        claude).prompt_tokens, 100)
    cap = Decimal(20 * bound_gpt + 20 * bound_claude) / 10**12
    stack = two_stack(tmp_path / "run", budgets={"global": {"monthly_usd": str(cap)}})
    stack.state.delay_s = 0.02

    async def fire() -> list[int]:
        oclient, aclient = stack.async_client(), stack.async_anthropic("globex-research")
        sem = asyncio.Semaphore(50)

        async def one(i: int) -> int:
            async with sem:
                try:
                    if i % 2:
                        await aclient.messages.create(model=MODEL, max_tokens=100, messages=ASK)
                    else:
                        await oclient.chat.completions.create(model="gpt-4o-mini", messages=ASK,
                                                              max_tokens=100)
                    return 200
                except (openai.APIStatusError, anthropic.APIStatusError) as exc:
                    return exc.status_code

        statuses = await asyncio.gather(*(one(i) for i in range(200)))
        await oclient.close()
        await aclient.close()
        return statuses

    try:
        statuses = asyncio.run(fire())
        ok, blocked = statuses.count(200), statuses.count(402)
        assert ok + blocked == 200 and ok > 0 and blocked > 0
        rows = stack.rows()
        assert sum(r.cost for r in rows) <= to_pico(cap), "zero overshoot"
        assert {r.provider for r in rows} == {"openai", "anthropic"}
        assert all(r.overshoot == 0 for r in rows)
        assert len(stack.state.requests) == ok, "blocked requests never reach an upstream"
        assert all(s.reserved == 0 for s in stack.gw.budgets.status())
    finally:
        stack.close()


def test_keyless_local_openai_compatible_upstream(tmp_path: Path) -> None:
    """A self-hosted server (a second simulator) for llama-* models, no key: priced in the
    operator's own price table."""
    import yaml

    table = yaml.safe_load((ROOT / "config" / "pricing.yaml").read_text())
    table["models"]["llama-3.1-8b"] = {"input": "0.05", "output": "0.1",
                                       "max_output_tokens": 4096, "max_input_tokens": 131072}
    (tmp_path / "pricing.yaml").write_text(yaml.safe_dump(table))
    lt = LoopThread()  # the local server runs on its own loop, on its own port
    runner, local_url, local_state = lt.run(start_fake_upstream())
    local_state.require_key = False
    stack = Stack(tmp_path / "run", pricing=str(tmp_path / "pricing.yaml"), upstreams=[
        *UPSTREAMS, {"name": "local", "kind": "openai", "base_url": local_url,
                     "api_key_env": "", "models": ["llama-*"]}])
    try:
        answer = stack.client().chat.completions.create(model="llama-3.1-8b", messages=ASK,
                                                        max_tokens=10)
        assert answer.choices[0].message.content
        assert len(local_state.requests) == 1 and len(stack.state.requests) == 0
        sent = local_state.requests[0]["headers"]
        assert "authorization" not in sent and "x-api-key" not in sent, "keyless: no key"
        row = settled_rows(stack)[0]
        assert (row.provider, row.usage_source) == ("local", "upstream")
        assert row.cost == row.prompt_tokens * 50_000 + row.completion_tokens * 100_000
        # /v1/models lists the priced models each upstream serves, with their owner.
        listed = {m.id: m.owned_by for m in stack.client().models.list()}
        assert listed["llama-3.1-8b"] == "local" and listed[MODEL] == "anthropic"
        assert listed["gpt-4o-mini"] == "openai"
    finally:
        stack.close()
        lt.run(runner.cleanup())
        lt.stop()


def test_config_errors_for_upstreams(tmp_path: Path) -> None:
    from gateway.config import ConfigError, load_settings

    path = tmp_path / "c.yaml"
    path.write_text("""
upstream: {base_url: "http://127.0.0.1:1/v1"}
upstreams:
  - {name: a, kind: gemini, base_url: "ftp://x", models: []}
  - {name: a, kind: openai, base_url: "http://user:pw@x/v1", models: ["gpt-*"], timout_s: 3}
  - {kind: anthropic, base_url: "https://api.anthropic.com", models: "claude-*"}
""")
    with pytest.raises(ConfigError) as info:
        load_settings(path, {})
    problems = "\n".join(info.value.problems)
    for expected in ("replaces `upstream`", "upstreams[0].kind: must be 'openai' or "
                     "'anthropic', got 'gemini'", "upstreams[0].base_url: expected an http(s) "
                     "URL", "upstreams[0].models: must be a non-empty list",
                     "upstreams[1].name: 'a' is used twice", "upstreams[1].base_url: "
                     "credentials", "did you mean `timeout_s`", "upstreams[2].name: required"):
        assert expected in problems, (expected, problems)
    assert "pw" not in problems


def test_messages_without_usage_or_cut_are_charged_safely(stack: Stack) -> None:
    """A whole answer without usage reports nothing: the reserved bound (never counted
    without a tokenizer). A cut stream: its reported input plus its output, at least what
    was streamed."""
    client = stack.anthropic()
    stack.state.omit_usage = True
    client.messages.create(model=MODEL, max_tokens=300, messages=ASK)
    row = settled_rows(stack)[0]
    assert (row.usage_source, row.cost) == ("invalid", row.reserved)
    stack.state.omit_usage = False
    stack.state.cut_stream_after = 2
    with pytest.raises(anthropic.APIConnectionError), client.messages.stream(
            model=MODEL, max_tokens=300, messages=ASK) as stream:
        for _ in stream:
            pass
    rows = settled_rows(stack, 2)
    cut = next(r for r in rows if r.stream)
    words = 2 * 4  # two content chunks of four one-token words
    assert cut.usage_source == "counted" and cut.completion_tokens >= words
    assert 0 < cut.cost < cut.reserved


def test_provider_in_ledger_csv_invoice_and_usage_report(stack: Stack) -> None:
    from tests.harness import ADMIN_TOKEN

    stack.anthropic().messages.create(model=MODEL, max_tokens=10, messages=ASK)
    stack.client().chat.completions.create(model="gpt-4o-mini", messages=ASK, max_tokens=10)
    settled_rows(stack, 2)
    bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    month = stack.gw.budgets.current_period()
    report = stack.request("GET", f"/admin/api/usage?month={month}&group_by=provider",
                           headers=bearer).json()
    groups = {row["group"]: row for row in report["rows"]}
    assert set(groups) == {"openai", "anthropic"}, report
    csv_text = stack.request("GET", f"/admin/invoices/{month}.csv", headers=bearer).body.decode()
    import csv

    header, *lines = list(csv.reader(csv_text.splitlines()))
    assert sorted(line[header.index("provider")] for line in lines) == ["anthropic", "openai"]
    from admin.invoices import build_invoice

    invoice = stack.lt.run(build_invoice(stack.gw, month, None))
    by_provider = invoice.breakdown("provider")
    assert {line.label for line in by_provider.lines} == {"openai", "anthropic"}
    assert by_provider.total_cents == invoice.total_cents
    pdf = stack.request("GET", f"/admin/invoices/{month}.pdf", headers=bearer)
    assert pdf.status == 200 and pdf.body.startswith(b"%PDF")
    import io

    from pypdf import PdfReader

    text = " ".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf.body)).pages)
    assert "By provider" in text and "anthropic" in text


def test_odd_framing_and_repeated_cumulative_deltas_through_the_gateway(tmp_path: Path) -> None:
    """A misbehaving Anthropic upstream: CRLF framing, the stream written a few bytes at a
    time, two cumulative message_deltas (the second replaces the first: never added)."""
    from aiohttp import web

    from tests.test_messages_bound import FINAL, SONNET_ENTRY, decimal_cost, stream

    body = stream(b"\r\n", [{"type": "message_delta", "delta": {"stop_reason": None},
                             "usage": {"output_tokens": 17}},
                            {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                             "usage": {"output_tokens": 42}}])

    async def messages(request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        if not payload.get("stream"):
            return web.json_response({"type": "message", "content": [], "usage": None})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(0, len(body), 5):
            await response.write(body[i:i + 5])
        await response.write_eof()
        return response

    lt = LoopThread()
    app = web.Application()
    app.router.add_post("/v1/messages", messages)
    runner = web.AppRunner(app, access_log=None)

    async def start() -> str:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

    url = lt.run(start())
    stack = Stack(tmp_path, upstreams=[{**UPSTREAMS[1], "base_url": url}])
    try:
        answer = stack.request("POST", "/v1/messages", json={
            "model": MODEL, "max_tokens": 100, "messages": ASK, "stream": True},
            headers={"x-api-key": KEYS["acme-content"]["key"]})
        assert answer.status == 200 and answer.body == body, "relayed byte for byte"
        row = settled_rows(stack)[0]
        assert (row.usage_source, row.completion_tokens) == ("upstream", 42)
        assert row.cost == decimal_cost(SONNET_ENTRY, FINAL) * 10**12
        # "usage": null in a whole answer: nothing reported, the reserved bound.
        stack.request("POST", "/v1/messages", json={"model": MODEL, "max_tokens": 100,
                                                    "messages": ASK},
                      headers={"x-api-key": KEYS["acme-content"]["key"]})
        rows = settled_rows(stack, 2)
        whole = next(r for r in rows if not r.stream)
        assert (whole.usage_source, whole.cost) == ("invalid", whole.reserved)
    finally:
        stack.close()
        lt.run(runner.cleanup())
        lt.stop()
