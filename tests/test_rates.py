"""Rate limits end to end: the official openai SDK against a real gateway and simulator.

rpm lets exactly its limit through in a minute and the SDK's own retry honours the 429's
``Retry-After``; ``concurrent`` holds under 50 parallel streams (measured at the upstream) and
every slot comes back however a request ends; ``tpm`` reserves the bound and corrects to usage;
a 429 is never forwarded, never in the ledger, never charged, and comes before the budget.
The clock is the gateway's own, injected: no test sleeps a minute.
``tests/test_rates_pg.py`` runs every test here again on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web

from gateway.fake_upstream import FakeUpstreamState, create_fake_upstream
from tests.harness import FINANCE_TOKEN, KEYS, LoopThread, Stack
from tests.test_metrics import scrape, value

MESSAGES = [{"role": "user", "content": "one line about rate limits"}]
T0 = datetime(2026, 11, 10, 9, 30, 0, 500_000, tzinfo=UTC)  # half a second into a second
KEY_LIMIT = "acme-content"  # the key most tests limit (tenant acme, agent content)


class Clock:
    """The gateway's clock: frozen at ``now`` until a test moves it, or following real time
    from an offset (``follow``) for tests in which the SDK really waits."""

    def __init__(self, now: datetime):
        self.now = now
        self.real: float | None = None  # monotonic() when ``now`` was last set, if following

    def __call__(self) -> datetime:
        if self.real is None:
            return self.now
        return self.now + timedelta(seconds=time.monotonic() - self.real)

    def set(self, now: datetime, follow: bool = False) -> None:
        self.now, self.real = now, (time.monotonic() if follow else None)


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def rate_stack(tmp_path: Path, clock: Clock) -> Iterator[Callable[..., Stack]]:
    """``rate_stack(rate_limits={...}, **config)``: a stack on the injected clock."""
    made: list[Stack] = []

    def make(**config: Any) -> Stack:
        s = Stack(tmp_path / f"s{len(made)}", clock=clock, **config)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def chat(stack: Stack, key: str = KEY_LIMIT, **kwargs: Any) -> tuple[int, Any, Any]:
    """One chat request: (status, headers, body or error body)."""
    kwargs.setdefault("max_tokens", 20)
    client = stack.client(key)
    try:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES, **kwargs)
        return raw.status_code, raw.headers, raw.parse()
    except openai.APIStatusError as exc:
        return exc.status_code, exc.response.headers, exc.body
    finally:
        client.close()


async def gather_chats(stack: Stack, count: int, concurrency: int, key: str = KEY_LIMIT,
                       **kwargs: Any) -> list[int]:
    """``count`` chat requests ``concurrency`` at a time through the async SDK: statuses."""
    client = stack.async_client(key)
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> int:
        async with sem:
            try:
                await client.chat.completions.create(
                    model="gpt-4o-mini", max_tokens=20,
                    messages=[{"role": "user", "content": f"request {i}"}], **kwargs)
            except openai.APIStatusError as exc:
                return exc.status_code
            return 200

    try:
        return list(await asyncio.gather(*(one(i) for i in range(count))))
    finally:
        await client.close()


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run client coroutines on a loop of their own (the gateway's loop serves them)."""
    return asyncio.run(coro)


def metric(stack: Stack, name: str, **labels: str) -> float:
    samples, _ = scrape(stack)
    return value(samples, name, **labels)


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# -- rpm ----------------------------------------------------------------------------------------
def test_rpm_lets_exactly_the_limit_through_in_a_minute(rate_stack: Callable[..., Stack],
                                                        clock: Clock) -> None:
    stack = rate_stack(rate_limits={"global": {"rpm": 1000},
                                    "keys": {KEY_LIMIT: {"rpm": 60}}})
    statuses = run(gather_chats(stack, 100, 25))
    assert (statuses.count(200), statuses.count(429)) == (60, 40)
    assert stack.state.total_requests == 60  # a 429 is never forwarded
    rows = stack.rows()
    assert len(rows) == 60 and all(r.cost > 0 for r in rows)  # nor recorded, nor charged
    charged = sum(r.cost for r in rows) / 10**12
    assert metric(stack, "costwall_spend_usd_total") == pytest.approx(charged)
    assert metric(stack, "costwall_rate_limited_total", scope="key", kind="rpm") == 40
    assert metric(stack, "costwall_requests_total", outcome="rate_limited") == 40
    assert metric(stack, "costwall_requests_total", outcome="rejected") == 0

    # The window slides: 30 s later still full, told to wait until the burst's second leaves.
    clock.set(T0 + timedelta(seconds=30))
    status, headers, body = chat(stack)
    assert status == 429
    assert (body["type"], body["code"]) == ("rate_limit_exceeded", "rate_limit_exceeded")
    assert body["message"] == ("Rate limit reached for key 'acme-content': 60 requests per "
                               "minute (rpm). Try again in 31s.")
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("31", "30500")
    assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-remaining-requests"],
            headers["x-ratelimit-reset-requests"]) == ("60", "0", "30.5s")
    clock.set(T0 + timedelta(seconds=60, microseconds=499_000))
    assert chat(stack)[0] == 429  # 60 s after the burst's second began: still inside
    clock.set(T0 + timedelta(seconds=60, microseconds=500_000))
    status, headers, _ = chat(stack)
    assert status == 200
    # The tightest of the two limits (the key's), after this request.
    assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-remaining-requests"],
            headers["x-ratelimit-reset-requests"]) == ("60", "59", "1m1s")
    assert stack.state.total_requests == 61


def test_the_sdks_own_retry_honours_retry_after(rate_stack: Callable[..., Stack],
                                                clock: Clock) -> None:
    """The SDK's default retries (2) with its own backoff (0.5 s, 1 s) would give up before a
    2.5 s ``retry-after-ms``; honouring it, its first retry succeeds."""
    stack = rate_stack(rate_limits={"keys": {KEY_LIMIT: {"rpm": 2}}})
    assert [chat(stack)[0] for _ in range(3)] == [200, 200, 429]
    # The window frees at T0's second + 61: put the clock 2.5 s before that, running.
    clock.set(T0.replace(microsecond=0) + timedelta(seconds=61 - 2.5), follow=True)
    client = stack.client(KEY_LIMIT, max_retries=2)
    started = time.monotonic()
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                           max_tokens=5)
    waited = time.monotonic() - started
    client.close()
    assert reply.choices[0].message.content
    assert 2.0 < waited < 5.0, waited  # its own backoff would have given up by 1.5 s
    assert metric(stack, "costwall_rate_limited_total", scope="key", kind="rpm") == 2
    assert stack.state.total_requests == 3


def test_the_messages_route_is_limited_too_and_the_anthropic_sdk_waits(
        rate_stack: Callable[..., Stack], clock: Clock) -> None:
    """Rate limits are route-agnostic: Anthropic's Messages API counts in the same windows,
    its 429 comes in Anthropic's error shape, and the anthropic SDK honours retry-after-ms."""
    import anthropic

    from tests.test_anthropic import ASK, MODEL, UPSTREAMS

    stack = rate_stack(upstreams=UPSTREAMS, rate_limits={"keys": {KEY_LIMIT: {"rpm": 2}}})
    client = stack.anthropic(KEY_LIMIT)
    assert client.messages.create(model=MODEL, max_tokens=20, messages=ASK).content
    assert chat(stack)[0] == 200  # the OpenAI route counts in the same window
    with pytest.raises(anthropic.RateLimitError) as info:
        client.messages.create(model=MODEL, max_tokens=20, messages=ASK)
    body = info.value.body
    assert body["type"] == "error" and body["error"]["code"] == "rate_limit_exceeded"
    assert info.value.response.headers["retry-after"] == "61"
    clock.set(T0.replace(microsecond=0) + timedelta(seconds=61 - 2.5), follow=True)
    started = time.monotonic()
    retrying = stack.anthropic(KEY_LIMIT, max_retries=2)
    assert retrying.messages.create(model=MODEL, max_tokens=20, messages=ASK).content
    assert 2.0 < time.monotonic() - started < 5.0


def test_limits_of_every_scope_and_end_users(rate_stack: Callable[..., Stack]) -> None:
    stack = rate_stack(rate_limits={
        "tenants": {"globex": {"rpm": 1}}, "agents": {"ops": {"rpm": 1}},
        "users": {"alice": {"rpm": 1}}, "users_default": {"rpm": 2}})
    assert [chat(stack, "globex-research")[0] for _ in range(2)] == [200, 429]
    status = chat(stack, "acme-ops")[0]
    status2, _, body2 = chat(stack, "acme-ops")
    assert (status, status2) == (200, 429)
    assert body2["message"].startswith("Rate limit reached for agent 'ops': 1 requests per")
    alice = {"extra_headers": {"X-Costwall-User": "alice"}}
    assert [chat(stack, **alice)[0] for _ in range(2)] == [200, 429]
    assert chat(stack, **alice)[2]["message"].startswith(
        "Rate limit reached for end user 'alice': 1 requests per minute")
    bob = {"extra_headers": {"X-Costwall-User": "bob"}}
    assert [chat(stack, **bob)[0] for _ in range(3)] == [200, 200, 429]  # users_default
    assert [chat(stack, user="carol")[0] for _ in range(3)] == [200, 200, 429]  # body's user
    assert chat(stack)[0] == 200  # no user: no user limit
    text = stack.request("GET", "/metrics").body.decode()
    assert "alice" not in text and "bob" not in text and "carol" not in text
    assert metric(stack, "costwall_rate_limited_total", scope="user", kind="rpm") == 4
    assert metric(stack, "costwall_rate_limited_total", scope="tenant", kind="rpm") == 1


def test_end_users_come_and_go_and_their_limits_hold(rate_stack: Callable[..., Stack],
                                                      clock: Clock) -> None:
    """Every minute new end users arrive; the idle windows of the last ones are dropped (a
    sweep about once a minute) without ever letting a current user past the limit."""
    stack = rate_stack(rate_limits={"users_default": {"rpm": 2}})
    for minute in range(4):
        clock.set(T0 + timedelta(seconds=70 * minute))
        for i in range(6):
            user = {"extra_headers": {"X-Costwall-User": f"user-{minute}-{i}"}}
            assert [chat(stack, **user)[0] for _ in range(3)] == [200, 200, 429]
        windows = getattr(stack.gw.rates, "windows", None)  # in memory: only the live ones
        assert windows is None or len(windows) == 6
    assert stack.state.total_requests == 4 * 6 * 2


# -- concurrency --------------------------------------------------------------------------------
class CountingUpstream:
    """The simulator behind a middleware that measures requests in flight at the upstream."""

    def __init__(self, lt: LoopThread, delay_s: float,
                 headers: dict[str, str] | None = None):
        self.lt = lt
        self.state = FakeUpstreamState(delay_s=delay_s, chunk_delay_s=0.01)
        self.inflight = self.peak = 0
        app = create_fake_upstream(self.state)

        async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
            response.headers.update(headers or {})  # e.g. OpenAI's own x-ratelimit-*

        app.on_response_prepare.append(add_headers)

        @web.middleware
        async def count(request: web.Request, handler: Any) -> web.StreamResponse:
            self.inflight += 1
            self.peak = max(self.peak, self.inflight)
            try:
                return await handler(request)  # streams: returns after the last chunk
            finally:
                self.inflight -= 1

        app.middlewares.append(count)

        async def start() -> tuple[web.AppRunner, str]:
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/v1"

        self.runner, self.url = lt.run(start())

    def close(self) -> None:
        self.lt.run(self.runner.cleanup())
        self.lt.stop()


def test_concurrent_limit_holds_under_50_parallel_streams(tmp_path: Path,
                                                          clock: Clock) -> None:
    upstream = CountingUpstream(LoopThread(), delay_s=0.2)
    clock.set(T0, follow=True)
    stack = Stack(tmp_path / "gw", clock=clock, upstream={"base_url": upstream.url},
                  rate_limits={"keys": {KEY_LIMIT: {"concurrent": 4}}})
    try:
        async def streams() -> list[int]:
            # The SDK retries each 429 after its retry-after-ms (1 s for a busy slot).
            client = stack.async_client(KEY_LIMIT, max_retries=30)

            async def one(i: int) -> int:
                stream = await client.chat.completions.create(
                    model="gpt-4o-mini", max_tokens=12, stream=True,
                    messages=[{"role": "user", "content": f"stream {i}"}])
                return len([c async for c in stream])

            try:
                return list(await asyncio.gather(*(one(i) for i in range(50))))
            finally:
                await client.close()

        chunks = asyncio.run(streams())
        assert len(chunks) == 50 and min(chunks) > 1  # every stream completed, eventually
        assert upstream.peak == 4, upstream.peak  # never more than the limit in flight
        assert upstream.state.total_requests == 50  # the 429s never reached it
        refused = metric(stack, "costwall_rate_limited_total", scope="key", kind="concurrent")
        assert refused > 0  # (46 in the first wave when all 50 arrive within 0.2 s)
        assert metric(stack, "costwall_requests_total", outcome="rate_limited") == refused
    finally:
        stack.close()
        upstream.close()


def test_the_upstreams_own_ratelimit_headers_are_never_sent_twice(tmp_path: Path,
                                                                   clock: Clock) -> None:
    """OpenAI sends the organisation's x-ratelimit-*: per kind the client gets the tighter
    limit's trio, the upstream's or costwall's, once."""
    upstream = CountingUpstream(LoopThread(), delay_s=0, headers={
        "x-ratelimit-limit-requests": "5000", "x-ratelimit-remaining-requests": "4999",
        "x-ratelimit-reset-requests": "12ms", "x-ratelimit-limit-tokens": "160000",
        "x-ratelimit-remaining-tokens": "7", "x-ratelimit-reset-tokens": "9ms"})
    stack = Stack(tmp_path, clock=clock, upstream={"base_url": upstream.url},
                  rate_limits={"keys": {KEY_LIMIT: {"rpm": 60, "tpm": 100_000}}})
    try:
        for stream in (False, True):
            raw = stack.client(KEY_LIMIT).chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=MESSAGES, max_tokens=5, stream=stream)
            got = [(k, v) for k, v in raw.headers.multi_items() if k.startswith("x-ratelimit")]
            assert sorted(got) == sorted([
                ("x-ratelimit-limit-requests", "60"),  # ours: 59 left < 4999
                ("x-ratelimit-remaining-requests", str(59 - stream)),
                ("x-ratelimit-reset-requests", "1m0.5s"),
                ("x-ratelimit-limit-tokens", "160000"),  # the upstream's: 7 left
                ("x-ratelimit-remaining-tokens", "7"), ("x-ratelimit-reset-tokens", "9ms")])
    finally:
        stack.close()
        upstream.close()


def test_every_slot_comes_back_however_the_request_ends(rate_stack: Callable[..., Stack],
                                                        clock: Clock) -> None:
    stack = rate_stack(rate_limits={"keys": {KEY_LIMIT: {"concurrent": 1, "rpm": 100}}},
                       budgets={"campaigns": {"broke": {"monthly_usd": "0"}}})
    state = stack.state

    def idle() -> bool:
        return stack.gw.inflight == 0

    # an upstream error
    state.fail_status, state.fail_next = 500, 1
    assert chat(stack)[0] == 500
    assert chat(stack)[0] == 200
    # a stream the upstream cuts
    state.cut_stream_after = 1
    client = stack.client(KEY_LIMIT)
    with pytest.raises(openai.APIConnectionError):
        for _ in client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                                max_tokens=40, stream=True):
            pass
    state.cut_stream_after = None
    wait_until(idle)
    assert chat(stack)[0] == 200
    # a client that goes away mid-stream
    state.chunk_delay_s = 0.05
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                            max_tokens=200, stream=True)
    next(iter(stream))
    stream.close()
    wait_until(idle)
    state.chunk_delay_s = 0
    assert chat(stack)[0] == 200
    # refused by the budget after the rate limit counted it: 402, and the slot comes back
    broke = {"extra_headers": {"X-Costwall-Campaign": "broke"}}
    assert [chat(stack, **broke)[0] for _ in range(3)] == [402, 402, 402]
    assert chat(stack)[0] == 200
    # a slow request holds the slot: the next one is refused with Retry-After 1
    state.delay_s = 1.0
    slow = threading.Thread(target=chat, args=(stack,))
    slow.start()
    wait_until(lambda: stack.gw.inflight == 1)
    status, headers, body = chat(stack)
    slow.join()
    assert status == 429 and headers["retry-after"] == "1"
    assert body["message"] == ("Rate limit reached for key 'acme-content': 1 concurrent "
                               "requests. Retry when one of them finishes (Retry-After: 1s).")
    state.delay_s = 0
    assert chat(stack)[0] == 200
    client.close()


# -- tpm ----------------------------------------------------------------------------------------
def test_tpm_reserves_the_bound_and_corrects_to_usage(rate_stack: Callable[..., Stack]) -> None:
    limit = 20_000
    stack = rate_stack(rate_limits={"keys": {KEY_LIMIT: {"tpm": limit}}})
    # Without max_tokens the bound is the model's whole output (16,384 for gpt-4o-mini);
    # the simulator answers 24 tokens.
    stack.state.delay_s = 1.0
    first: list[tuple[int, Any, Any]] = []
    slow = threading.Thread(target=lambda: first.append(chat(stack, max_tokens=None)))
    slow.start()
    wait_until(lambda: stack.gw.inflight == 1)
    status, headers, body = chat(stack, max_tokens=None)  # the bound of both does not fit
    slow.join()
    stack.state.delay_s = 0
    assert status == 429
    assert body["message"].startswith("Rate limit reached for key 'acme-content': 20000 tokens "
                                      "per minute (tpm). This request counts up to ")
    [(status1, headers1, _)] = first
    bound = limit - int(headers1["x-ratelimit-remaining-tokens"])
    assert status1 == 200 and bound > 16_384
    assert f"counts up to {bound} tokens" in body["message"]
    [row] = stack.rows()
    used = row.prompt_tokens + row.completion_tokens
    assert used < 100
    # Settled: the first request now counts what it used, so the second fits.
    status, headers, _ = chat(stack, max_tokens=None)
    assert status == 200
    assert int(headers["x-ratelimit-remaining-tokens"]) == limit - used - bound


def test_a_request_larger_than_the_tpm_limit_is_never_retried(
        rate_stack: Callable[..., Stack]) -> None:
    stack = rate_stack(rate_limits={"keys": {KEY_LIMIT: {"tpm": 1_000}}})
    client = stack.client(KEY_LIMIT, max_retries=2)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                       max_tokens=5_000)
    client.close()
    assert info.value.response.headers["x-should-retry"] == "false"
    assert "It can never fit" in info.value.message
    assert metric(stack, "costwall_rate_limited_total", scope="key", kind="tpm") == 1
    assert stack.state.total_requests == 0
    assert chat(stack, max_tokens=100)[0] == 200


# -- order and cost -----------------------------------------------------------------------------
def test_the_rate_limit_comes_before_the_budget(rate_stack: Callable[..., Stack]) -> None:
    stack = rate_stack(rate_limits={"tenants": {"acme": {"rpm": 2}}},
                       budgets={"campaigns": {"broke": {"monthly_usd": "0"}}})
    broke = {"extra_headers": {"X-Costwall-Campaign": "broke"}}
    assert [chat(stack, **broke)[0] for _ in range(3)] == [402, 402, 402]  # slot given back
    assert [chat(stack)[0] for _ in range(2)] == [200, 200]
    assert chat(stack, **broke)[0] == 429  # over both: the rate limit answers, no 402
    assert metric(stack, "costwall_requests_total", outcome="blocked") == 3
    assert len(stack.rows()) == 2 and stack.state.total_requests == 2


def test_the_admin_api_lists_the_configured_limits(rate_stack: Callable[..., Stack]) -> None:
    stack = rate_stack(rate_limits={"global": {"rpm": 6000},
                                    "keys": {KEY_LIMIT: {"tpm": 200_000, "concurrent": 20}},
                                    "users_default": {"rpm": 30}})
    reply = stack.request("GET", "/admin/api/budget",
                          headers={"Authorization": f"Bearer {FINANCE_TOKEN}"})
    assert reply.status == 200
    assert reply.json()["rate_limits"] == [
        {"scope": "global", "id": "global", "rpm": 6000, "tpm": None, "concurrent": None},
        {"scope": "key", "id": KEY_LIMIT, "rpm": None, "tpm": 200_000, "concurrent": 20},
        {"scope": "user", "id": "*", "rpm": 30, "tpm": None, "concurrent": None}]


def test_no_rate_limit_configured_costs_nothing_and_says_nothing(stack: Stack) -> None:
    assert stack.gw.rates is None
    assert stack.request("GET", "/admin/api/budget", headers={
        "Authorization": f"Bearer {FINANCE_TOKEN}"}).json()["rate_limits"] == []
    status, headers, _ = chat(stack)
    assert status == 200
    assert not [h for h in headers if h.lower().startswith("x-ratelimit")]
    assert KEYS  # the harness keys are the ones configured
