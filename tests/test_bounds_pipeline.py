"""True upper bounds end to end: a real gateway on a real port, the openai SDK, and an upstream
that bills what the gateway cannot see (image tiles, a stored history, a file by id, built-in
tool calls) the way the real API does. At the cap, under concurrency, recorded spend never
exceeds the cap."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web

from gateway import bounds, tokens
from gateway.estimate import estimate
from gateway.money import to_pico
from gateway.pricing import Usage
from tests.harness import LoopThread, Stack, free_port

MODEL = "gpt-4o-mini"
IMAGE_TOKENS = 2833 + 5667 * 4  # a 1024x1024 image on gpt-4o-mini: 4 tiles
HISTORY_TOKENS = 20_000  # a stored conversation costwall never saw
FILE_TOKENS = 30_000  # a PDF uploaded straight to the provider
OUT_TOKENS = 40
ENC = tokens.encoding("o200k_base")
IMAGE_MSG = [{"role": "user", "content": [
    {"type": "text", "text": "What is in this picture?"},
    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]
FILE_INPUT = [{"role": "user", "content": [
    {"type": "input_text", "text": "Summarise the report."},
    {"type": "input_file", "file_id": "file-report"}]}]


class Billing:
    """The misbehaving-but-honest upstream: bills by the provider's rules, state included."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.totals: dict[str, int] = {}  # response id -> input + output tokens
        self.searches = 0
        self.ids = itertools.count(1)

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        prompt = tokens.count_messages(body["messages"], ENC)
        prompt += IMAGE_TOKENS * sum(1 for m in body["messages"] if isinstance(
            m.get("content"), list) for p in m["content"] if p.get("type") == "image_url")
        out = min(OUT_TOKENS, body.get("max_tokens") or OUT_TOKENS)
        return {"id": f"chatcmpl-{next(self.ids)}", "object": "chat.completion", "created": 1,
                "model": body["model"], "choices": [{"index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": "A cat. " * (out // 3)}}],
                "usage": {"prompt_tokens": prompt, "completion_tokens": out,
                          "total_tokens": prompt + out}}

    def response(self, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("background"):  # billed later, out of the gateway's sight
            return {"id": f"resp_{next(self.ids)}", "object": "response", "created_at": 1,
                    "status": "queued", "model": body["model"], "output": [],
                    "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
                    "usage": None}
        prompt = tokens.count_responses_input(body.get("input"), ENC, body.get("instructions"))
        previous = body.get("previous_response_id")
        if previous is not None:
            prompt += self.totals.get(previous, HISTORY_TOKENS)
        items = body.get("input") if isinstance(body.get("input"), list) else []
        prompt += FILE_TOKENS * sum(1 for i in items for p in i.get("content") or []
                                    if p.get("type") == "input_file")
        output: list[dict[str, Any]] = []
        if any(t.get("type") == "web_search" for t in body.get("tools") or []):
            for n in range(self.searches):
                output.append({"type": "web_search_call", "id": f"ws_{n}", "status": "completed",
                               "action": {"type": "search", "query": "news"}})
        out = min(OUT_TOKENS, body.get("max_output_tokens") or OUT_TOKENS)
        output.append({"type": "message", "id": "msg_1", "status": "completed",
                       "role": "assistant", "content": [
                           {"type": "output_text", "text": "Done.", "annotations": []}]})
        rid = f"resp_{next(self.ids)}"
        self.totals[rid] = prompt + out
        return {"id": rid, "object": "response", "created_at": 1, "status": "completed",
                "model": body["model"], "output": output, "parallel_tool_calls": True,
                "tool_choice": "auto", "tools": [],
                "usage": {"input_tokens": prompt, "output_tokens": out,
                          "total_tokens": prompt + out,
                          "input_tokens_details": {"cached_tokens": 0},
                          "output_tokens_details": {"reasoning_tokens": 0}}}


def sse(events: list[dict[str, Any]]) -> bytes:
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


async def start_upstream(billing: Billing) -> tuple[web.AppRunner, str]:
    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        billing.bodies.append(body)
        await asyncio.sleep(0.02)  # long enough for concurrent requests to overlap
        return web.json_response(billing.chat(body))

    async def responses(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        billing.bodies.append(body)
        await asyncio.sleep(0.02)
        answer = billing.response(body)
        if not body.get("stream"):
            return web.json_response(answer)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        created = {**answer, "status": "in_progress", "output": [], "usage": None}
        await resp.write(sse([
            {"type": "response.created", "sequence_number": 0, "response": created},
            {"type": "response.output_text.delta", "sequence_number": 1, "item_id": "msg_1",
             "output_index": 0, "content_index": 0, "delta": "Done.", "logprobs": []},
            {"type": "response.completed", "sequence_number": 2, "response": answer}]))
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/responses", responses)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}/v1"


@pytest.fixture
def upstream() -> Iterator[tuple[Billing, str]]:
    billing, lt = Billing(), LoopThread()
    runner, url = lt.run(start_upstream(billing))
    yield billing, url
    lt.run(runner.cleanup())
    lt.stop()


def bound_of(stack: Stack, endpoint: str, body: dict[str, Any]) -> int:
    """The gateway's own upper bound of one request (what admission reserves)."""
    price = stack.gw.prices.lookup(body["model"])
    assert price is not None
    est = estimate(endpoint, body, price)
    return price.upper_bound(est.prompt_tokens, est.total_output, None, est.fee)


def fire(stack: Stack, endpoint: str, body: dict[str, Any], requests: int = 30,
         concurrency: int = 10) -> list[int]:
    async def run() -> list[int]:
        client = stack.async_client()
        sem = asyncio.Semaphore(concurrency)

        async def one() -> int:
            async with sem:
                try:
                    if endpoint == "chat":
                        await client.chat.completions.create(**body)
                    else:
                        await client.responses.create(**body)
                    return 200
                except openai.APIStatusError as exc:
                    return exc.status_code

        statuses = await asyncio.gather(*(one() for _ in range(requests)))
        await client.close()
        return statuses

    return asyncio.run(run())


CASES = {
    "image_url": ("chat", {"model": MODEL, "messages": IMAGE_MSG, "max_tokens": OUT_TOKENS}),
    "previous_response_id": ("responses", {"model": MODEL, "input": "And then?",
                                           "previous_response_id": "resp_from_elsewhere",
                                           "max_output_tokens": OUT_TOKENS}),
    "file_id": ("responses", {"model": MODEL, "input": FILE_INPUT,
                              "max_output_tokens": OUT_TOKENS}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_spend_stays_under_the_cap_when_the_upstream_bills_what_costwall_cannot_see(
        tmp_path: Path, upstream: tuple[Billing, str], case: str) -> None:
    billing, url = upstream
    endpoint, body = CASES[case]
    probe = Stack(tmp_path / "probe", upstream={"base_url": url})
    bound = bound_of(probe, endpoint, body)
    probe.close()
    cap = Decimal(bound * 3) / 10**12  # three requests fit at once
    stack = Stack(tmp_path / "run", upstream={"base_url": url},
                  budgets={"global": {"monthly_usd": str(cap)}})
    try:
        statuses = fire(stack, endpoint, body)
        rows = stack.rows()
        ok = statuses.count(200)
        assert ok + statuses.count(402) == 30 and ok >= 3
        assert len(billing.bodies) == ok
        spent = sum(r.cost for r in rows)
        print(f"\n{case}: {ok} of 30 allowed, spend {Decimal(spent) / to_pico(str(cap)):.1%} "
              f"of the cap, billed {rows[0].prompt_tokens} prompt tokens per request")
        assert spent <= to_pico(str(cap)), "recorded spend above the cap"
        assert all(r.usage_source == "upstream" and r.cost <= r.reserved for r in rows)
        assert all(s.reserved == 0 for s in stack.gw.budgets.status())
    finally:
        stack.close()


@pytest.mark.parametrize("stream", [False, True])
def test_previous_response_answered_by_costwall_is_bounded_by_its_total(
        tmp_path: Path, upstream: tuple[Billing, str], stream: bool) -> None:
    billing, url = upstream
    stack = Stack(tmp_path, upstream={"base_url": url})
    try:
        client = stack.client()
        first = client.responses.create(model=MODEL, input=FILE_INPUT,
                                        max_output_tokens=OUT_TOKENS, stream=stream)
        if stream:
            first_id = next(e for e in first if e.type == "response.completed").response.id
        else:
            first_id = first.id
        total = billing.totals[first_id]
        assert total > FILE_TOKENS
        follow = {"model": MODEL, "input": "And the conclusion?", "previous_response_id":
                  first_id, "max_output_tokens": OUT_TOKENS}
        second = client.responses.create(**follow)
        assert second.usage is not None and second.usage.input_tokens > total
        price = stack.gw.prices.lookup(MODEL)
        assert price is not None
        counted = tokens.count_responses_input("And the conclusion?", ENC)
        expected = price.upper_bound(counted + total + bounds.PREVIOUS_RESPONSE_MARGIN,
                                     OUT_TOKENS)
        row = next(r for r in stack.rows() if r.prompt_tokens == second.usage.input_tokens)
        assert row.reserved == expected, "bounded by what costwall saw, not the whole window"
        assert row.reserved < price.upper_bound(price.max_input_tokens, OUT_TOKENS)
        assert row.cost <= row.reserved
        assert row.cost == price.cost(Usage(second.usage.input_tokens, 0, OUT_TOKENS))

        stack.restart()  # per process: after a restart the id is unknown again
        client = stack.client()
        client.responses.create(**follow)
        last = max(stack.rows(), key=lambda r: r.ts)
        assert last.reserved == price.upper_bound(price.max_input_tokens, OUT_TOKENS)
    finally:
        stack.close()


@pytest.mark.parametrize("stream", [False, True])
def test_built_in_tool_fees_are_reserved_forwarded_and_settled(
        tmp_path: Path, upstream: tuple[Billing, str], stream: bool) -> None:
    billing, url = upstream
    billing.searches = 3
    stack = Stack(tmp_path, upstream={"base_url": url}, budgets={"max_tool_calls": 4})
    try:
        client = stack.client()
        answer = client.responses.create(model=MODEL, input="Latest news?", stream=stream,
                                         tools=[{"type": "web_search"}],
                                         max_output_tokens=OUT_TOKENS)
        if stream:
            answer = next(e for e in answer if e.type == "response.completed").response
        assert billing.bodies[-1]["max_tool_calls"] == 4, "the bound's call count is enforced"
        row = stack.rows()[-1]
        price = stack.gw.prices.lookup(MODEL)
        assert price is not None and answer.usage is not None
        tokens_cost = price.cost(Usage(answer.usage.input_tokens, 0, answer.usage.output_tokens))
        assert row.cost == tokens_cost + 3 * bounds.WEB_SEARCH  # three searches at $10 / 1k
        counted = tokens.count_responses_input("Latest news?", ENC, None,
                                               [{"type": "web_search"}])
        assert row.reserved == price.upper_bound(
            counted + 4 * price.max_input_tokens, OUT_TOKENS, None, 4 * bounds.WEB_SEARCH)

        own = client.responses.create(model=MODEL, input="x", max_tool_calls=1,
                                      tools=[{"type": "web_search"}], max_output_tokens=5)
        assert own.usage is not None and billing.bodies[-1]["max_tool_calls"] == 1
    finally:
        stack.close()


def test_background_response_is_charged_at_its_bound(
        tmp_path: Path, upstream: tuple[Billing, str]) -> None:
    _, url = upstream
    stack = Stack(tmp_path, upstream={"base_url": url})
    try:
        queued = stack.client().responses.create(model=MODEL, input=FILE_INPUT, background=True,
                                                 max_output_tokens=OUT_TOKENS)
        assert queued.status == "queued"
        row = stack.rows()[-1]
        assert row.usage_source == "reserved" and row.cost == row.reserved > 0
    finally:
        stack.close()
