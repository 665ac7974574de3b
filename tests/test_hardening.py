"""Issue 11, the parts that are not about upper bounds: attribution cannot leave a capped agent
scope, and the smaller holes (log line forging, the upstream key inside SSE, compressed
request bodies, the session cookie behind TLS, slowloris connections, the 503 outcome).

Every test runs a real gateway on a real port; misbehaving upstreams are small aiohttp
servers written here.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import re
import socket
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web

from gateway.logs import TextFormatter
from tests.harness import ADMIN_TOKEN, KEYS, LoopThread, Stack, free_port, http_request
from tests.test_admin_api import Browser, api
from tests.test_metrics import scrape

MSG = [{"role": "user", "content": "One line about budgets, please."}]
UPSTREAM_KEY = "sk-upstream-secret"


def auth(key: str = "acme-content") -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[key]['key']}"}


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": MSG, "max_tokens": 5, **extra}


def keys_with(**agents: list[str]) -> list[dict[str, Any]]:
    """The harness keys, with an ``agents`` list added to the named ones."""
    return [{"name": name, **spec, **({"agents": agents[name]} if name in agents else {})}
            for name, spec in KEYS.items()]


# -- attribution ------------------------------------------------------------------------------
def test_agent_header_cannot_leave_a_capped_agent_scope(make_stack: Any) -> None:
    """On main, ``X-Costwall-Agent: anything-N`` moved requests out of the capped agent scope
    (the key spent 2.7x its agent's cap). Now every such request is 403 and nothing forwarded."""
    stack: Stack = make_stack(budgets={"agents": {"content": {"monthly_usd": "0.0001"}}},
                              keys=keys_with(**{"globex-research": ["summarizer"]}))
    client = stack.client()
    refused = 0
    for i in range(30):
        try:
            client.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=5,
                                           extra_headers={"X-Costwall-Agent": f"anything-{i}"})
        except openai.PermissionDeniedError as exc:
            error = exc.response.json()["error"]
            assert error["code"] == "agent_not_allowed" and error["type"] == "permission_error"
            assert error["param"] == "X-Costwall-Agent" and "anything-" in error["message"]
            refused += 1
    assert refused == 30 and stack.state.total_requests == 0
    # Its own agent type by header is fine; the cap on it still holds.
    for _ in range(30):
        try:
            client.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=5,
                                           extra_headers={"X-Costwall-Agent": "content"})
        except openai.APIStatusError as exc:
            assert exc.status_code == 402
    rows = stack.rows()
    spent = sum(r.cost for r in rows)
    assert rows and all(r.agent == "content" for r in rows)
    assert spent <= stack.gw.budgets.limits.get(("agent", "content"), "monthly")
    # A key whose list names another agent type may use it (and only that one).
    other = stack.client("globex-research")
    other.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=5,
                                  extra_headers={"X-Costwall-Agent": "summarizer"})
    assert stack.rows()[-1].agent == "summarizer"
    with pytest.raises(openai.PermissionDeniedError):
        other.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=5,
                                      extra_headers={"X-Costwall-Agent": "content"})
    # Refusals count as rejected, never as allowed.
    samples, _ = scrape(stack)
    rejected = sum(v for lab, v in samples["costwall_requests_total"]
                   if lab["outcome"] == "rejected")
    assert rejected == 31


def test_a_wildcard_key_attributes_freely_by_choice(make_stack: Any) -> None:
    stack: Stack = make_stack(keys=keys_with(**{"acme-content": ["*"]}))
    stack.client().chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=5,
                                           extra_headers={"X-Costwall-Agent": "anything-7"})
    assert stack.rows()[-1].agent == "anything-7"


def test_bad_agents_lists_in_the_config_are_problems(tmp_path: Path) -> None:
    from gateway.config import ConfigError
    from tests.harness import test_env, write_config

    for bad in ("content", ["ok", "no spaces"], [1]):
        path = write_config(tmp_path, "http://127.0.0.1:9/v1",
                            keys=[{**keys_with()[0], "agents": bad}])
        with pytest.raises(ConfigError) as info:
            from gateway.config import load_settings

            load_settings(path, test_env())
        assert any("agents" in p for p in info.value.problems), bad


def test_admin_created_keys_carry_their_agents_across_a_restart(tmp_path: Path) -> None:
    stack = Stack(tmp_path)
    try:
        created = api(stack, "POST", "keys", body={
            "name": "writer-bot", "tenant": "acme", "agent": "writer",
            "agents": ["editor", "translator"]})
        assert created.status == 201, created.body
        assert created.json()["agents"] == ["editor", "translator"]
        for bad in ("*", ["a b"], [1], {"x": 1}):
            answer = api(stack, "POST", "keys", body={"name": "x-bot", "tenant": "acme",
                                                      "agents": bad})
            assert answer.status == 400 and answer.json()["error"]["param"] == "agents", bad
        stack.restart()  # read back from the ledger (the new column)
        listing = {k["name"]: k for k in api(stack, "GET", "keys").json()["keys"]}
        assert listing["writer-bot"]["agents"] == ["editor", "translator"]
        assert listing["acme-content"]["agents"] == []
        client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=created.json()["key"],
                               max_retries=0)
        for agent in ("writer", "editor", "translator"):
            client.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=5,
                                           extra_headers={"X-Costwall-Agent": agent})
        with pytest.raises(openai.PermissionDeniedError):
            client.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=5,
                                           extra_headers={"X-Costwall-Agent": "content"})
        assert [r.agent for r in stack.rows()] == ["writer", "editor", "translator"]
        # The keys page form takes the list as text.
        b = Browser(stack.url)
        b.login(ADMIN_TOKEN)
        page = b.post("/admin/keys", {"csrf": b.csrf("/admin/keys"), "name": "page-bot",
                                      "tenant": "acme", "agent": "a", "agents": "b, c"})
        assert page.status == 200 and b"page-bot" in page.body
        stored = {r.name: r for r in stack.call(lambda gw: gw.ledger.keys())}
        assert stored["page-bot"].agents == ("b", "c")
        assert b"+ b, c" in b.get("/admin/keys").body
    finally:
        stack.close()


# -- (a) the text log -------------------------------------------------------------------------
def test_a_newline_in_a_model_cannot_forge_a_log_line(make_stack: Any,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    stack: Stack = make_stack(unknown_model="gpt-4o-mini")
    forged = "gpt-x\n2026-11-29 10:00:00,000 INFO costwall.access: settled outcome=allowed"
    with caplog.at_level(logging.INFO, logger="costwall.access"):
        stack.request("POST", "/v1/chat/completions", json=chat_body(model=forged),
                      headers=auth())
        stack.flush()
    formatter = TextFormatter()
    lines = [formatter.format(r) for r in caplog.records if r.name == "costwall.access"]
    assert lines and all("\n" not in line for line in lines)
    assert any("gpt-x\\n2026-11-29" in line for line in lines)
    # The message part too (not only key=value fields), and a terminal escape.
    record = logging.makeLogRecord({"msg": "model %s", "args": ("a\r\nb\x1b[31m",),
                                    "levelname": "INFO", "name": "t"})
    line = formatter.format(record)
    assert line.endswith("model a\\r\\nb\\x1b[31m") and "\n" not in line
    multi = logging.makeLogRecord({"msg": "x", "levelname": "INFO", "name": "t",
                                   "v": "é ok"})
    assert formatter.format(multi).endswith('x v="é ok"')  # printable text is untouched


# -- (b) the upstream key inside SSE ----------------------------------------------------------
@pytest.fixture
def echo_stream_upstream() -> Iterator[str]:
    """An upstream that echoes its key in an SSE event, the key split over two writes."""

    async def stream(request: web.Request) -> web.StreamResponse:
        key = request.headers["Authorization"].removeprefix("Bearer ")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        head, tail = key[:7], key[7:]
        chunk = {"choices": [{"index": 0, "delta": {"content": "KEY"}}]}
        text = "data: " + json.dumps(chunk)
        before, after = text.split("KEY")
        await response.write((before + "your key " + head).encode())
        await asyncio.sleep(0.05)
        await response.write((tail + after + "\n\n").encode())
        usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3,
                                          "total_tokens": 8}}
        await response.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        return response

    lt = LoopThread()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", stream)
    runner = web.AppRunner(app)
    lt.run(runner.setup())
    port = free_port()
    lt.run(web.TCPSite(runner, "127.0.0.1", port).start())
    yield f"http://127.0.0.1:{port}/v1"
    lt.run(runner.cleanup())
    lt.stop()


def test_an_upstream_key_echoed_in_a_stream_is_redacted(make_stack: Any,
                                                        echo_stream_upstream: str) -> None:
    stack: Stack = make_stack(upstream={"base_url": echo_stream_upstream})
    answer = stack.request("POST", "/v1/chat/completions", json=chat_body(stream=True),
                           headers=auth())
    text = answer.body.decode()
    assert answer.status == 200 and UPSTREAM_KEY not in text, text
    assert "your key [redacted]" in text and "data: [DONE]" in text
    chunks = list(stack.client().chat.completions.create(
        model="gpt-4o-mini", messages=MSG, max_tokens=5, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        "your key [redacted]"


# -- (c) compressed request bodies ------------------------------------------------------------
def test_compressed_bodies_are_forwarded_inflated_and_unlabelled(stack: Stack) -> None:
    body = json.dumps(chat_body()).encode()
    for encoding, data in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body)),
                           ("GZIP", gzip.compress(body))):
        answer = stack.request("POST", "/v1/chat/completions", data=data, headers={
            **auth(), "Content-Type": "application/json", "Content-Encoding": encoding})
        assert answer.status == 200, (encoding, answer.body)
        seen = stack.state.requests[-1]
        assert "content-encoding" not in seen["headers"], encoding
        assert seen["json"]["messages"] == MSG
    before = stack.state.total_requests
    for encoding in ("compress", "gzip, identity", "x-custom"):
        answer = stack.request("POST", "/v1/chat/completions", data=gzip.compress(body),
                               headers={**auth(), "Content-Type": "application/json",
                                        "Content-Encoding": encoding})
        assert answer.status == 415, (encoding, answer.body)
        error = answer.json()["error"]
        assert error["code"] == "unsupported_content_encoding" and "gzip" in error["message"]
    # br (without Brotli installed, aiohttp refuses it itself: 400) or zstd: never forwarded
    for encoding in ("br", "zstd"):
        answer = stack.request("POST", "/v1/chat/completions", data=b"\x00\x01garbage",
                               headers={**auth(), "Content-Type": "application/json",
                                        "Content-Encoding": encoding})
        assert answer.status in (400, 415), encoding
    assert stack.state.total_requests == before


# -- (d) the session cookie -------------------------------------------------------------------
def test_session_cookie_is_secure_when_configured(make_stack: Any) -> None:
    plain: Stack = make_stack()
    b = Browser(plain.url)
    assert b.login(ADMIN_TOKEN).status == 303
    assert "Secure" not in b.set_cookie_headers[-1]  # plain HTTP, not configured
    behind_tls: Stack = make_stack(admin={"secure_cookies": True})
    b = Browser(behind_tls.url)
    assert b.login(ADMIN_TOKEN).status == 303
    cookie = b.set_cookie_headers[-1]
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie


# -- (e) slowloris ----------------------------------------------------------------------------
def _closed(sock: socket.socket) -> bool:
    """True once the server has closed the connection (reads reach EOF or fail) before the
    socket's timeout."""
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except OSError:  # reset by the server
        pass
    return True


def test_connections_without_a_complete_head_are_closed(make_stack: Any) -> None:
    stack: Stack = make_stack(limits={"header_timeout_s": 1})
    stack.state.chunk_delay_s = 0.4  # a stream of a few seconds must not be cut
    socks = []
    for i in range(100):
        s = socket.create_connection(("127.0.0.1", stack.port), timeout=5)
        if i % 2:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # never finished
        socks.append(s)
    stream = stack.client().chat.completions.create(
        model="gpt-4o-mini", messages=MSG, max_tokens=6, stream=True)
    started = time.monotonic()
    for s in socks[1::2]:  # keep dribbling bytes: it must not extend the deadline
        s.sendall(b"X-A: 1\r\n")
    time.sleep(0.6)
    for s in socks[1::2]:
        with contextlib.suppress(OSError):
            s.sendall(b"X-B: 2\r\n")
    deadline = started + 4
    for s in socks:
        s.settimeout(max(0.1, deadline - time.monotonic()))
        assert _closed(s), "a connection without a complete request head is still open"
        s.close()
    elapsed = time.monotonic() - started
    assert elapsed < 4
    parts = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(parts) >= 3  # the slow stream (> 1 s) ran to its end
    assert time.monotonic() - started > 1
    # A normal request on a fresh connection still works.
    ok = http_request("POST", stack.url + "/v1/chat/completions", json=chat_body(),
                      headers=auth())
    assert ok.status == 200


# -- (f) the outcome of a 503 -----------------------------------------------------------------
def test_ledger_unavailable_has_its_own_outcome(stack: Stack) -> None:
    db = Path(stack.settings.database.removeprefix("sqlite:///"))
    db.unlink()
    time.sleep(0.3)  # past the ledger's identity re-check interval
    answer = stack.request("POST", "/v1/chat/completions", json=chat_body(), headers=auth())
    assert answer.status == 503 and answer.json()["error"]["code"] == "ledger_unavailable"
    samples, _ = scrape(stack)
    outcomes = {lab["outcome"]: v for lab, v in samples["costwall_requests_total"]}
    assert outcomes.get("unavailable") == 1 and "upstream_error" not in outcomes
    assert re.search(r"ledger", answer.json()["error"]["message"])
