"""The simulator's Anthropic side: ``POST /v1/messages`` (JSON and SSE) and
``POST /v1/messages/count_tokens``, served by the same app as the OpenAI routes
(``gateway.fake_upstream``) and steered by the same knobs.

Usage is deterministic and always within costwall's admission bound (``gateway.messages``):
input tokens are the o200k tiktoken count of the request's text (never more than its UTF-8
bytes) plus a few tokens per message and block, 1,600 per image; the answer is made of words
that are one token each, so ``output_tokens`` is the number of words (never more than the
answer's bytes). Knobs: ``cached_tokens`` (cache reads), ``cache_write_5m_tokens``,
``cache_write_1h_tokens`` and ``cache_write_unsplit_tokens`` (creation tokens reported in the
total but not in the 5m/1h split, as server tools cause) take tokens out of
``input_tokens``; ``fail_status``/``fail_next``/``retry_after``, ``delay_s``,
``chunk_delay_s``, ``cut_stream_after`` and ``omit_usage`` work as on the OpenAI routes.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from gateway import tokens

ANSWER_TOKENS = 24  # words in an answer when max_tokens allows
IMAGE_TOKENS = 1_600
MESSAGE_TOKENS = 4
BLOCK_TOKENS = 2
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
          500: "api_error", 529: "overloaded_error"}
Obj = dict[str, Any]


class Invalid(Exception):
    """A request the real API refuses with 400."""


@dataclass(frozen=True)
class Kit:
    """What the Anthropic side shares with the OpenAI side (``gateway.fake_upstream`` hands
    it over, so neither module imports the other): the state's app key, the recorded-headers
    type, the one-token word generator, its seed, chunking, the SSE writer and the delay and
    failure knobs."""

    state_key: Any
    headers: Callable[[Any], Any]
    generate: Callable[[Any, int, int], list[str]]
    seed: Callable[[Any], int]
    chunks: Callable[[list[str]], list[str]]
    sse: Callable[..., Awaitable[web.StreamResponse]]
    fault: Callable[[Any], Awaitable[tuple[int, dict[str, str] | None] | None]]


def error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """Anthropic's error shape."""
    body = {"type": "error", "error": {"type": _TYPES.get(status, "api_error"),
                                       "message": message},
            "request_id": "req_" + secrets.token_hex(12)}
    return web.Response(body=orjson.dumps(body), status=status, headers=headers,
                        content_type="application/json")


def _enc() -> Any:
    return tokens.encoding("o200k_base")


def _text_tokens(value: Any) -> int:
    return tokens.count_text(value, _enc()) if isinstance(value, str) else 0


def _content_tokens(content: Any) -> int:
    if isinstance(content, str):
        return BLOCK_TOKENS + _text_tokens(content)
    if not isinstance(content, list):
        raise Invalid("content must be a string or an array of content blocks")
    total = 0
    for block in content:
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise Invalid("each content block must be an object with a type")
        total += BLOCK_TOKENS
        if block["type"] == "image":
            total += IMAGE_TOKENS
        elif block["type"] == "tool_result":
            total += _content_tokens(block.get("content") or "")
        elif block["type"] == "tool_use":
            total += _text_tokens(orjson.dumps(block.get("input")).decode())
        else:
            total += _text_tokens(block.get("text")) + _text_tokens(block.get("thinking"))
    return total


def input_tokens(body: Obj) -> int:
    """Total input tokens of a Messages request, as this simulator bills (and counts) them."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Invalid("messages: at least one message is required")
    total = 8
    for message in messages:
        if not isinstance(message, dict):
            raise Invalid("each message must be an object with role and content")
        total += MESSAGE_TOKENS + _content_tokens(message.get("content"))
    system = body.get("system")
    if system is not None:
        total += _content_tokens(system)
    if body.get("tools"):
        total += 300 + _text_tokens(orjson.dumps(body["tools"]).decode())
    return total


def _usage(body: Obj, output: int, state: Any) -> Obj:
    total = input_tokens(body)
    read = min(state.cached_tokens, total)
    w1h = min(state.cache_write_1h_tokens, total - read)
    w5m = min(state.cache_write_5m_tokens, total - read - w1h)
    extra = min(state.cache_write_unsplit_tokens, total - read - w1h - w5m)
    return {"input_tokens": total - read - w1h - w5m - extra,
            "cache_creation_input_tokens": w5m + w1h + extra, "cache_read_input_tokens": read,
            "cache_creation": {"ephemeral_5m_input_tokens": w5m,
                               "ephemeral_1h_input_tokens": w1h},
            "output_tokens": output, "service_tier": "standard"}


def _answer(kit: Kit, body: Obj) -> tuple[str, list[str], str]:
    """(model, one-token words of the answer, stop reason)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise Invalid("model: Field required")
    limit = body.get("max_tokens")
    if limit is None:
        raise Invalid("max_tokens: Field required")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise Invalid("max_tokens: Input should be a positive integer")
    count = min(limit, ANSWER_TOKENS)
    words = kit.generate(_enc(), kit.seed(body.get("messages")), count)
    return model, words, "max_tokens" if count == limit else "end_turn"


def _front(kit: Kit, handler: Callable[[Kit, web.Request, Any, Obj],
                                       Awaitable[web.StreamResponse]]
           ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Record, authenticate (``x-api-key`` or a bearer token), fail or delay as the knobs
    say, parse; the Anthropic side of ``gateway.fake_upstream._endpoint``."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        state = request.app[kit.state_key]
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        headers = kit.headers((k.lower(), v) for k, v in request.headers.items())
        state.requests.append({"path": request.path, "method": request.method,
                               "headers": headers, "json": body})
        state.total_requests += 1
        if len(state.requests) > state.max_records:
            del state.requests[: len(state.requests) - state.max_records // 2]
        bearer = headers.get("authorization", "")
        if not headers.get("x-api-key", "").strip() and not (
                bearer.startswith("Bearer ") and bearer[7:].strip()):
            return error(401, "invalid x-api-key")
        failure = await kit.fault(state)
        if failure is not None:
            status, extra = failure
            return error(status, f"Simulated upstream failure ({status}).", extra)
        if not isinstance(body, dict):
            return error(400, "There was an issue with the format of your request body.")
        try:
            return await handler(kit, request, state, body)
        except Invalid as exc:
            return error(400, str(exc))

    return wrapped


async def _count_tokens(kit: Kit, request: web.Request, state: Any,
                        body: Obj) -> web.StreamResponse:
    if not isinstance(body.get("model"), str):
        raise Invalid("model: Field required")
    return web.Response(body=orjson.dumps({"input_tokens": input_tokens(body)}),
                        content_type="application/json")


def _event(kind: str, data: Obj) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **data}) \
        + b"\n\n"


async def _messages(kit: Kit, request: web.Request, state: Any,
                    body: Obj) -> web.StreamResponse:
    model, words, stop = _answer(kit, body)
    text = "".join(words)
    usage = _usage(body, len(words), state)
    message: Obj = {"id": "msg_" + secrets.token_hex(12), "type": "message",
                    "role": "assistant", "model": model,
                    "content": [{"type": "text", "text": text}],
                    "stop_reason": stop, "stop_sequence": None, "usage": usage}
    if state.omit_usage:
        del message["usage"]
    if not body.get("stream"):
        return web.Response(body=orjson.dumps(message), content_type="application/json")
    start_usage = {**usage, "output_tokens": 1}
    started = {**message, "content": [], "stop_reason": None, "usage": start_usage}
    if state.omit_usage:
        del started["usage"]
    head = [_event("message_start", {"message": started}),
            _event("content_block_start", {"index": 0,
                                           "content_block": {"type": "text", "text": ""}}),
            _event("ping", {})]
    content = [_event("content_block_delta", {"index": 0, "delta": {"type": "text_delta",
                                                                     "text": piece}})
               for piece in kit.chunks(words)]
    delta: Obj = {"delta": {"stop_reason": stop, "stop_sequence": None}}
    if not state.omit_usage:  # cumulative: the whole usage again, output complete
        delta["usage"] = {k: v for k, v in usage.items()
                          if k not in ("cache_creation", "service_tier")}
    tail = [_event("content_block_stop", {"index": 0}), _event("message_delta", delta),
            _event("message_stop", {})]
    return await kit.sse(request, state, head, content, tail)


def add_routes(app: web.Application, kit: Kit) -> None:
    """The Anthropic routes on the simulator's app."""
    app.router.add_post("/v1/messages", _front(kit, _messages))
    app.router.add_post("/v1/messages/count_tokens", _front(kit, _count_tokens))
