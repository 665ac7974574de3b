"""A misbehaving OpenAI-compatible upstream for tests: usage and SSE framing as it is told.

Real upstreams (and the proxies in front of them) send usages that are malformed or absurd,
frame SSE with CRLF or CR, or label a stream ``text/plain``. ``Hostile`` serves
``/v1/chat/completions`` and ``/v1/responses`` on a real port with exactly the bytes its
``Plan`` says, so the gateway can be tested against each case.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.harness import LoopThread, Stack


@dataclass
class Plan:
    """What the next answers look like (tests change it between requests)."""

    # The usage as raw JSON text (so ``1e13``, ``9223372036854775807`` or ``"5"`` go out
    # exactly as written); None leaves usage out altogether.
    usage: bytes | None = b'{"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}'
    text: list[str] = field(default_factory=lambda: ["Hello", " there", "!"])
    newline: bytes = b"\n"          # SSE line ending: LF, CRLF or CR
    content_type: str | None = "text/event-stream"  # None: no Content-Type header at all
    status: int = 200
    piece: int = 0                  # if > 0, write the stream in pieces of this many bytes
    requests: list[dict[str, Any]] = field(default_factory=list)


def chat_stream(plan: Plan, include_usage: bool) -> bytes:
    """A chat completion stream framed with ``plan.newline``."""
    nl = plan.newline
    base = b'{"id":"chatcmpl-h","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",'
    events = []
    for i, piece in enumerate(plan.text):
        delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
        events.append(base + b'"choices":[{"index":0,"delta":' + orjson.dumps(delta)
                      + b',"finish_reason":null}]' + (b',"usage":null}' if include_usage else b"}"))
    events.append(base + b'"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]'
                  + (b',"usage":null}' if include_usage else b"}"))
    if include_usage and plan.usage is not None:
        events.append(base + b'"choices":[],"usage":' + plan.usage + b"}")
    events.append(b"[DONE]")
    return b"".join(b"data: " + e + nl + nl for e in events)


def chat_body(plan: Plan) -> bytes:
    content = orjson.dumps("".join(plan.text))
    body = (b'{"id":"chatcmpl-h","object":"chat.completion","created":1,"model":"gpt-4o-mini",'
            b'"choices":[{"index":0,"message":{"role":"assistant","content":' + content
            + b',"refusal":null},"finish_reason":"stop"}]')
    if plan.usage is not None:
        body += b',"usage":' + plan.usage
    return body + b"}"


def responses_stream(plan: Plan) -> bytes:
    nl = plan.newline
    out = []
    for piece in plan.text:
        data = orjson.dumps({"type": "response.output_text.delta", "delta": piece})
        out.append(b"event: response.output_text.delta" + nl + b"data: " + data + nl + nl)
    usage = plan.usage if plan.usage is not None else b"null"
    done = (b'{"type":"response.completed","response":{"id":"resp_h","object":"response",'
            b'"status":"completed","output":[],"usage":' + usage + b"}}")
    out.append(b"event: response.completed" + nl + b"data: " + done + nl + nl)
    return b"".join(out)


class Hostile:
    """The misbehaving upstream on a real port, on ``loop``; ``url`` ends in ``/v1``."""

    def __init__(self, lt: LoopThread, plan: Plan | None = None):
        self.plan = plan or Plan()
        self.lt = lt
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/responses", self._responses)
        self.runner = web.AppRunner(app, access_log=None)

        async def start() -> str:
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"  # type: ignore[union-attr]

        self.url = lt.run(start())

    def close(self) -> None:
        self.lt.run(self.runner.cleanup())

    async def _send(self, request: web.Request, body: bytes, stream: bool) -> web.StreamResponse:
        plan = self.plan
        if not stream:
            return web.Response(status=plan.status, body=body, content_type="application/json")
        response = web.StreamResponse(status=plan.status)
        if plan.content_type is not None:  # else aiohttp's default, application/octet-stream
            response.headers["Content-Type"] = plan.content_type
        response.enable_chunked_encoding()
        await response.prepare(request)
        step = plan.piece or len(body)
        for i in range(0, len(body), step):
            await response.write(body[i:i + step])
            if plan.piece:
                await asyncio.sleep(0.001)  # separate reads, so events split across chunks
        await response.write_eof()
        return response

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        self.plan.requests.append(payload)
        if self.plan.status >= 400:  # an error is JSON, whatever was asked
            return web.json_response({"error": {
                "message": "bad things", "type": "invalid_request_error", "param": None,
                "code": None}}, status=self.plan.status)
        if payload.get("stream"):
            options = payload.get("stream_options") or {}
            return await self._send(request, chat_stream(self.plan, options.get(
                "include_usage") is True), True)
        return await self._send(request, chat_body(self.plan), False)

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        self.plan.requests.append(payload)
        return await self._send(request, responses_stream(self.plan), True)


def settled_rows(stack: Stack, count: int = 1, timeout: float = 10) -> list[Any]:
    """The ledger rows once ``count`` are settled: the SDK stops reading a stream at
    ``[DONE]``, while the gateway settles when the upstream's body ends, a moment later."""
    deadline = time.monotonic() + timeout
    while True:
        rows = stack.rows()
        if sum(r.state == "settled" for r in rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.02)


def hostile_stack(stack: Stack, plan: Plan | None = None) -> Hostile:
    """Point ``stack``'s gateway at a new misbehaving upstream (restarting the gateway)."""
    hostile = Hostile(stack.lt, plan)
    stack.upstream_url = hostile.url
    stack.restart()
    return hostile
