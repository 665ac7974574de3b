"""An offline, deterministic OpenAI-compatible upstream for tests, the demo and benchmarks;
it also speaks the Anthropic Messages API (``gateway.fake_anthropic``).

The gateway is only as trustworthy as the checks against it, so this simulator reports usage
computed with exactly the functions in :mod:`gateway.tokens`: prompt tokens are the gateway's own
estimate and completion tokens are ``count_text`` of the generated text. Billing tests can then
assert exact equality instead of "roughly right". Generated text is a sequence of words that are
verified to be one token each, so a limit of N tokens yields exactly N tokens (or fewer when the
per-choice cap ``MAX_GENERATED_TOKENS`` applies).

Knobs on :class:`FakeUpstreamState` simulate the failure modes a budget gateway must survive
(errors with Retry-After, slow or cut streams, missing usage, cached and reasoning tokens). They
can be changed in-process or over HTTP via ``/_fake/config`` for out-of-process benchmarks.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import math
import secrets
import struct
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any

import orjson
import tiktoken
from aiohttp import web

from gateway import fake_anthropic, tokens

DEFAULT_CHAT_TOKENS = 24  # answer length when the request sets no output limit
DEFAULT_COMPLETION_TOKENS = 16  # legacy /v1/completions default max_tokens
MAX_GENERATED_TOKENS = 4096  # visible tokens per choice, whatever the limit (keeps it cheap)
TOKENS_PER_CHUNK = 4  # streamed content tokens per SSE chunk
EMBEDDING_DIM = 8
RECENT_RECORDS = 50
REASONING_PREFIXES = ("o1", "o3", "o4", "gpt-5")
FINGERPRINT = "fp_costwall_fake"
Obj = dict[str, Any]  # a JSON object: a request body, a response, a recorded request
MODELS = (
    "gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-5", "gpt-5-mini", "o3", "o4-mini",
    "gpt-3.5-turbo", "text-embedding-3-small", "text-embedding-3-large",
)
_WORDS = (  # candidates; only those that are one token in the encoding are used
    "budget", "ledger", "token", "stream", "model", "agent", "price", "limit", "cost", "request",
    "answer", "gateway", "tenant", "the", "of", "and", "to", "in", "is", "that", "for", "it",
    "as", "with", "was", "on", "be", "by", "at", "this", "have", "from", "or", "an", "they",
    "which", "one", "you", "were", "all", "we", "there", "would", "their", "will", "when", "who",
    "been", "has", "more", "if", "no", "out", "so", "what", "up", "its", "about", "than", "into",
    "them", "can", "only", "other", "new", "some", "could", "time", "these", "two", "may", "then",
    "do", "first", "any", "my", "now", "such", "like", "our", "over", "even", "most", "made",
    "after", "also", "did", "many", "before", "must", "through", "back", "where", "much", "your",
    "way", "well", "down", "should", "because", "each", "just", "those", "people", "how", "too",
    "little", "good", "very", "make", "world", "still", "own", "see", "work", "long", "get",
    "here", "between", "both", "life", "being", "under", "never", "day", "same", "another",
    "know", "while", "last", "might", "great", "old", "year", "off", "come", "since", "against",
    "go", "came", "right", "used", "take", "three",
)
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
DONE = b"data: [DONE]\n\n"


@dataclass
class FakeUpstreamState:
    """Run-time knobs and the record of received requests (shared with tests by reference).

    ``fail_status`` alone fails every request. ``fail_next`` > 0 fails only the next N requests
    with ``fail_status`` (or 500) and then clears ``fail_status``, so "two 503s, then success"
    is ``fail_status=503, fail_next=2``. ``cut_stream_after`` has no effect on streams with
    fewer content chunks than N. ``requests`` keeps at most ``max_records`` entries (the oldest
    are dropped) so that long benchmarks do not grow memory; ``total_requests`` counts all.
    """

    delay_s: float = 0.0
    chunk_delay_s: float = 0.0
    fail_status: int | None = None
    fail_next: int = 0
    retry_after: str | None = None
    cut_stream_after: int | None = None
    omit_usage: bool = False
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    # Anthropic prompt caching (``gateway.fake_anthropic``): cache writes per answer.
    cache_write_5m_tokens: int = 0
    cache_write_1h_tokens: int = 0
    cache_write_unsplit_tokens: int = 0
    require_key: bool = True  # False: a keyless self-hosted server (vLLM, Ollama)
    max_records: int = 10_000
    requests: list[Obj] = field(default_factory=list)
    total_requests: int = 0

    def reset(self) -> None:
        """Restore default knobs and forget requests, in place (tests hold this object)."""
        for f in fields(self):
            if f.name in KNOBS:
                setattr(self, f.name, f.default)
        self.requests.clear()
        self.total_requests = 0

    def knobs(self) -> Obj:
        """Current knob values, as served by ``/_fake/config``."""
        return {name: getattr(self, name) for name in KNOBS}


KNOBS = tuple(f.name for f in fields(FakeUpstreamState) if f.name not in ("requests",
                                                                           "total_requests"))
# knob -> (accepted types, None allowed, minimum)
_KNOB_TYPES: dict[str, tuple[tuple[type, ...], bool, float]] = {
    "delay_s": ((int, float), False, 0), "chunk_delay_s": ((int, float), False, 0),
    "fail_status": ((int,), True, 400), "fail_next": ((int,), False, 0),
    "retry_after": ((str, int), True, 0), "cut_stream_after": ((int,), True, 0),
    "omit_usage": ((bool,), False, 0), "cached_tokens": ((int,), False, 0),
    "reasoning_tokens": ((int,), False, 0), "max_records": ((int,), False, 1),
    "cache_write_5m_tokens": ((int,), False, 0), "cache_write_1h_tokens": ((int,), False, 0),
    "cache_write_unsplit_tokens": ((int,), False, 0), "require_key": ((bool,), False, 0),
}
STATE_KEY = web.AppKey("fake_upstream_state", FakeUpstreamState)
Handler = Callable[[web.Request, FakeUpstreamState, Any], Awaitable[web.StreamResponse]]


class _Invalid(Exception):
    """A request the real API would refuse with 400; carries the offending parameter."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class _Headers(dict[str, str]):
    """Recorded request headers: a plain dict with lower-case keys, looked up case-insensitively."""

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return super().__contains__(key.lower() if isinstance(key, str) else key)

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.lower(), default)


@lru_cache(maxsize=512)
def _encoding(model: str) -> tiktoken.Encoding:
    """The encoding the gateway's price table uses for this family (see PITFALLS.md)."""
    cl100k = model == "gpt-4" or model.startswith(("gpt-4-", "gpt-3.5", "text-embedding-"))
    return tokens.encoding("cl100k_base" if cl100k else "o200k_base")


@lru_cache(maxsize=4)
def _vocab(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Words that are one token each (capitalised at the start, space-prefixed after), and a
    pseudo-random cyclic word sequence long enough to slice any answer from without a loop.
    """
    enc = tokens.encoding(name)
    ok = [w for w in dict.fromkeys(_WORDS) if tokens.count_text(" " + w, enc) == 1
          and tokens.count_text(w.capitalize(), enc) == 1]
    period = 997  # prime, so the walk below visits words in a varied order
    walk = [" " + ok[(i * i + 3 * i) % len(ok)] for i in range(period)]
    seq = walk * (1 + MAX_GENERATED_TOKENS // period + 1)
    return tuple(w.capitalize() for w in ok), tuple(seq)


def _generate(enc: tiktoken.Encoding, seed: int, n_tokens: int) -> list[str]:
    """Deterministic answer of exactly ``n_tokens`` one-token pieces."""
    if n_tokens <= 0:
        return []
    first, seq = _vocab(enc.name)
    start = seed % 997
    return [first[seed % len(first)], *seq[start : start + n_tokens - 1]]


def _seed(value: Any) -> int:
    """Stable across processes (unlike ``hash``), so the same prompt gets the same answer."""
    return zlib.crc32(orjson.dumps(value))


def _chunks(pieces: list[str]) -> list[str]:
    return ["".join(pieces[i : i + TOKENS_PER_CHUNK]) for i in range(0, len(pieces),
                                                                     TOKENS_PER_CHUNK)]


def _int(body: Obj, key: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _Invalid(f"'{key}' must be an integer between {low} and {high}", key)
    return value


def _limit(body: Obj, *keys: str) -> int | None:
    """The first output limit set among ``keys`` (max_completion_tokens wins over max_tokens)."""
    for key in keys:
        value = _int(body, key, None, 1, 10_000_000)
        if value is not None:
            return value
    return None


def _model(body: Obj) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _Invalid("you must provide a model parameter", "model")
    return model


def _plan(model: str, limit: int | None, default: int, state: FakeUpstreamState,
          ) -> tuple[int, int, bool]:
    """(visible tokens, reasoning tokens, hit the limit) per choice; reasoning uses the limit."""
    reasoning = state.reasoning_tokens if model.startswith(REASONING_PREFIXES) else 0
    if limit is None:
        return min(default, MAX_GENERATED_TOKENS), reasoning, False
    reasoning = min(reasoning, limit)
    visible = min(limit - reasoning, MAX_GENERATED_TOKENS)
    return visible, reasoning, visible == limit - reasoning


def _usage(prompt: int, completion: int, reasoning: int, state: FakeUpstreamState) -> Obj:
    return {
        "prompt_tokens": prompt, "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": min(state.cached_tokens, prompt),
                                  "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0,
                                      "rejected_prediction_tokens": 0},
    }


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, headers=headers,
                        content_type="application/json")


_ERROR_KINDS = {401: ("invalid_request_error", "invalid_api_key"),
                404: ("invalid_request_error", "not_found"),
                429: ("requests", "rate_limit_exceeded")}


def _error(status: int, message: str, param: str | None = None,
           headers: dict[str, str] | None = None) -> web.Response:
    """OpenAI's error shape, so clients and the gateway see what the real API would send."""
    kind, code = _ERROR_KINDS.get(status, ("server_error" if status >= 500
                                           else "invalid_request_error", None))
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return _json(body, status, headers)


async def delay_or_failure(state: FakeUpstreamState
                           ) -> tuple[int, dict[str, str] | None] | None:
    """The knobs every simulated route honours, OpenAI's and Anthropic's: the delay, then the
    failure due, if any, as (status, extra headers)."""
    if state.delay_s > 0:
        await asyncio.sleep(state.delay_s)
    if state.fail_next <= 0 and state.fail_status is None:
        return None
    status = state.fail_status or 500
    if state.fail_next > 0:
        state.fail_next -= 1
        if state.fail_next == 0:
            state.fail_status = None
    return status, {"Retry-After": state.retry_after} if state.retry_after else None


def _endpoint(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Shared front of every /v1 route: record, authenticate, parse, inject failures and delay."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE_KEY]
        body, bad_json = None, False
        if request.body_exists:
            try:
                body = orjson.loads(await request.read())
            except orjson.JSONDecodeError:
                bad_json = True
        headers = _Headers((k.lower(), v) for k, v in request.headers.items())
        state.requests.append({"path": request.path, "method": request.method,
                               "headers": headers, "json": body})
        state.total_requests += 1
        if len(state.requests) > state.max_records:
            del state.requests[: len(state.requests) - state.max_records // 2]
        auth = headers.get("authorization", "")
        if state.require_key and (not auth.startswith("Bearer ") or not auth[7:].strip()):
            return _error(401, "Incorrect API key provided. You must pass a non-empty bearer key.")
        failure = await delay_or_failure(state)
        if failure is not None:
            status, extra = failure
            return _error(status, f"Simulated upstream failure ({status}).", headers=extra)
        if bad_json or (request.method == "POST" and not isinstance(body, dict)):
            return _error(400, "We could not parse the JSON body of your request.")
        try:
            return await handler(request, state, body)
        except (_Invalid, TypeError, ValueError, AttributeError) as exc:
            return _error(400, str(exc) or "invalid request", getattr(exc, "param", None))

    return wrapped


async def _sse(request: web.Request, state: FakeUpstreamState, head: list[bytes],
               content: list[bytes], tail: list[bytes]) -> web.StreamResponse:
    """Write frames one by one; ``cut_stream_after`` closes the socket mid-body (no last chunk),
    which clients see as an incomplete chunked transfer, like a dropped upstream connection.
    """
    resp = web.StreamResponse(headers=SSE_HEADERS)
    await resp.prepare(request)
    cut = state.cut_stream_after
    if cut is not None and cut < len(content):
        content, tail = content[:cut], []
    try:
        for i, frame in enumerate(itertools.chain(head, content, tail)):
            if i and state.chunk_delay_s > 0:
                await asyncio.sleep(state.chunk_delay_s)
            await resp.write(frame)
        if not tail and request.transport is not None:
            request.transport.close()  # flushes what was written, then FIN without "0\r\n\r\n"
            return resp
        await resp.write_eof()
    except ConnectionError:
        pass  # the client went away; nothing left to tell it
    return resp


def _chunk_prefix(obj: Obj) -> bytes:
    """``data: {...,"choices":`` with the per-stream constant fields encoded once."""
    return b"data: " + orjson.dumps(obj)[:-1] + b',"choices":'


async def _chat(request: web.Request, state: FakeUpstreamState, body: Obj) -> web.StreamResponse:
    model = _model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _Invalid("'messages' must be a non-empty array", "messages")
    enc = _encoding(model)
    prompt = tokens.count_messages(messages, enc, body.get("tools"))
    n = _int(body, "n", 1, 1, 128) or 1
    visible, reasoning, hit = _plan(model, _limit(body, "max_completion_tokens", "max_tokens"),
                                    DEFAULT_CHAT_TOKENS, state)
    seed = _seed(messages)
    pieces = [_generate(enc, seed + i, visible) for i in range(n)]
    texts = ["".join(p) for p in pieces]
    completion = sum(tokens.count_text(t, enc) for t in texts) + reasoning * n
    usage = None if state.omit_usage else _usage(prompt, completion, reasoning * n, state)
    finish = "length" if hit else "stop"
    base = {"id": "chatcmpl-" + secrets.token_hex(12), "object": "chat.completion",
            "created": int(time.time()), "model": model, "system_fingerprint": FINGERPRINT}
    if not body.get("stream"):
        base["choices"] = [{"index": i, "message": {"role": "assistant", "content": t,
                                                     "refusal": None, "annotations": []},
                            "logprobs": None, "finish_reason": finish}
                           for i, t in enumerate(texts)]
        if usage is not None:
            base["usage"] = usage
        return _json(base)
    base["object"] = "chat.completion.chunk"
    return await _stream_choices(request, state, body, base, usage, finish, pieces, chat=True)


async def _stream_choices(request: web.Request, state: FakeUpstreamState, body: Obj,
                          base: Obj, usage: Obj | None, finish: str, pieces: list[list[str]],
                          chat: bool) -> web.StreamResponse:
    """Chat and legacy completion chunks; a usage chunk only if the client asked for one."""
    options = body.get("stream_options")
    include = isinstance(options, dict) and options.get("include_usage") is True
    prefix, end = _chunk_prefix(base), b',"usage":null}\n\n' if include else b"}\n\n"

    def frame(index: int, delta: Any, reason: str | None) -> bytes:
        choice = ({"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
                  if chat else
                  {"index": index, "text": delta, "logprobs": None, "finish_reason": reason})
        return prefix + orjson.dumps([choice]) + end

    head = ([frame(i, {"role": "assistant", "content": "", "refusal": None}, None)
             for i in range(len(pieces))] if chat else [])
    content = [frame(i, {"content": c} if chat else c, None)
               for i, p in enumerate(pieces) for c in _chunks(p)]
    tail = [frame(i, {} if chat else "", finish) for i in range(len(pieces))]
    if include and usage is not None:
        tail.append(prefix + b'[],"usage":' + orjson.dumps(usage) + b"}\n\n")
    tail.append(DONE)
    return await _sse(request, state, head, content, tail)


async def _completions(request: web.Request, state: FakeUpstreamState,
                       body: Obj) -> web.StreamResponse:
    model = _model(body)
    prompt_value = body.get("prompt")
    if not isinstance(prompt_value, (str, list)):
        raise _Invalid("'prompt' must be a string, an array of strings or of token ids", "prompt")
    enc = _encoding(model)
    prompt = tokens.count_prompt_input(prompt_value, enc)
    many = isinstance(prompt_value, list) and any(isinstance(p, (str, list))
                                                  for p in prompt_value)
    prompts = prompt_value if many else [prompt_value]
    n = _int(body, "n", 1, 1, 128) or 1
    limit = _limit(body, "max_tokens") or DEFAULT_COMPLETION_TOKENS  # the API's default limit
    visible, reasoning, hit = _plan(model, limit, DEFAULT_COMPLETION_TOKENS, state)
    pieces = [_generate(enc, _seed(p) + j, visible) for p in prompts for j in range(n)]
    texts = ["".join(p) for p in pieces]
    completion = sum(tokens.count_text(t, enc) for t in texts) + reasoning * len(texts)
    usage = None if state.omit_usage else _usage(prompt, completion, reasoning * len(texts), state)
    finish = "length" if hit else "stop"
    base = {"id": "cmpl-" + secrets.token_hex(12), "object": "text_completion",
            "created": int(time.time()), "model": model, "system_fingerprint": FINGERPRINT}
    if body.get("stream"):
        return await _stream_choices(request, state, body, base, usage, finish, pieces, chat=False)
    base["choices"] = [{"index": i, "text": t, "logprobs": None, "finish_reason": finish}
                       for i, t in enumerate(texts)]
    if usage is not None:
        base["usage"] = usage
    return _json(base)


def _vector(item: Any, dim: int) -> list[float]:
    """Deterministic unit vector per input (a tiny LCG), so identical inputs embed identically."""
    x, out = _seed(item) or 1, []
    for _ in range(dim):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        out.append(x / 1073741824.0 - 1.0)
    norm = math.sqrt(sum(v * v for v in out)) or 1.0
    return [v / norm for v in out]


async def _embeddings(request: web.Request, state: FakeUpstreamState,
                      body: Obj) -> web.StreamResponse:
    model = _model(body)
    value = body.get("input")
    if not value or not isinstance(value, (str, list)):
        raise _Invalid("'input' must be a non-empty string or array", "input")
    items = value if isinstance(value, list) and not isinstance(value[0], int) else [value]
    dim = _int(body, "dimensions", EMBEDDING_DIM, 1, 8192) or EMBEDDING_DIM
    b64 = body.get("encoding_format") == "base64"
    data = []
    for i, item in enumerate(items):
        vec: Any = _vector(item, dim)
        if b64:
            vec = base64.b64encode(struct.pack(f"<{dim}f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": vec})
    prompt = tokens.count_prompt_input(value, _encoding(model))
    out: Obj = {"object": "list", "data": data, "model": model}
    if not state.omit_usage:
        out["usage"] = {"prompt_tokens": prompt, "total_tokens": prompt}
    return _json(out)


async def _responses(request: web.Request, state: FakeUpstreamState,
                     body: Obj) -> web.StreamResponse:
    model = _model(body)
    value = body.get("input")
    if not isinstance(value, (str, list)):
        raise _Invalid("'input' must be a string or an array of input items", "input")
    enc = _encoding(model)
    prompt = tokens.count_responses_input(value, enc, body.get("instructions"), body.get("tools"))
    visible, reasoning, hit = _plan(model, _limit(body, "max_output_tokens"),
                                    DEFAULT_CHAT_TOKENS, state)
    pieces = _generate(enc, _seed(value), visible)
    text = "".join(pieces)
    output_tokens = tokens.count_text(text, enc) + reasoning
    usage = None if state.omit_usage else {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": min(state.cached_tokens, prompt),
                                 "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + output_tokens,
    }
    status = "incomplete" if hit else "completed"
    msg_id = "msg_" + secrets.token_hex(12)
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    message = {"id": msg_id, "type": "message", "status": status, "role": "assistant",
               "content": [part]}
    output: list[Obj] = []
    if reasoning:
        output.append({"id": "rs_" + secrets.token_hex(12), "type": "reasoning", "summary": []})
    output.append(message)
    common = {
        "id": "resp_" + secrets.token_hex(12), "object": "response",
        "created_at": int(time.time()), "status": status, "background": False, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if hit else None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"), "model": model,
        "output": output, "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None}, "service_tier": "default",
        "store": body.get("store", True), "temperature": body.get("temperature", 1.0),
        "text": {"format": {"type": "text"}}, "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [], "top_p": body.get("top_p", 1.0),
        "truncation": body.get("truncation", "disabled"), "usage": usage, "user": None,
        "metadata": body.get("metadata") or {},
    }
    if not body.get("stream"):
        return _json(common)
    seq = itertools.count()

    def event(kind: str, **data: Any) -> bytes:
        payload = orjson.dumps({"type": kind, "sequence_number": next(seq), **data})
        return b"event: " + kind.encode() + b"\ndata: " + payload + b"\n\n"

    index = len(output) - 1
    ids = {"item_id": msg_id, "output_index": index, "content_index": 0}
    started = {**common, "status": "in_progress", "output": [], "usage": None,
               "incomplete_details": None}
    head = [event("response.created", response=started),
            event("response.in_progress", response=started)]
    if reasoning:
        head += [event("response.output_item.added", output_index=0, item=output[0]),
                 event("response.output_item.done", output_index=0, item=output[0])]
    head += [event("response.output_item.added", output_index=index,
                   item={**message, "status": "in_progress", "content": []}),
             event("response.content_part.added", part={**part, "text": ""}, **ids)]
    content = [event("response.output_text.delta", delta=c, logprobs=[], **ids)
               for c in _chunks(pieces)]
    tail = [event("response.output_text.done", text=text, logprobs=[], **ids),
            event("response.content_part.done", part=part, **ids),
            event("response.output_item.done", output_index=index, item=message),
            event(f"response.{status}", response=common)]
    return await _sse(request, state, head, content, tail)


def _model_obj(model: str) -> Obj:
    return {"id": model, "object": "model", "created": 1_700_000_000, "owned_by": "system"}


async def _models(request: web.Request, state: FakeUpstreamState,
                  body: Any) -> web.StreamResponse:
    model = request.match_info.get("model")
    if model:
        return _json(_model_obj(model))  # a simulator knows every model
    return _json({"object": "list", "data": [_model_obj(m) for m in MODELS]})


async def _config(request: web.Request) -> web.Response:
    """Set knobs from a JSON object; validated so a typo fails loudly instead of doing nothing."""
    state = request.app[STATE_KEY]
    if request.method == "GET":
        return _json(state.knobs())
    try:
        values = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "body must be a JSON object")
    if not isinstance(values, dict):
        return _error(400, "body must be a JSON object")
    for key, value in values.items():
        if key not in _KNOB_TYPES:
            return _error(400, f"unknown knob {key!r}; knobs: {', '.join(KNOBS)}", key)
        types, nullable, low = _KNOB_TYPES[key]
        if value is None and nullable:
            continue
        if (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
                or (isinstance(value, int | float) and not isinstance(value, bool)
                    and value < low)):
            return _error(400, f"invalid value for {key}: {value!r}", key)
    for key, value in values.items():
        setattr(state, key, str(value) if key == "retry_after" and value is not None else value)
    return _json(state.knobs())


async def _reset(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    state.reset()
    return _json(state.knobs())


async def _recorded(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    return _json({"count": state.total_requests, "requests": state.requests[-RECENT_RECORDS:]})


async def _not_found(request: web.Request) -> web.Response:
    return _error(404, f"Invalid URL ({request.method} {request.path})")


async def _warm(app: web.Application) -> None:
    """Load both encodings before the first request so benchmark latencies are not skewed."""
    def load() -> None:
        for name in tokens.ENCODINGS:
            _vocab(name)
    await asyncio.get_running_loop().run_in_executor(None, load)


def create_fake_upstream(state: FakeUpstreamState | None = None) -> web.Application:
    """Build the simulator app; pass ``state`` to keep a handle on its knobs and records."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATE_KEY] = state if state is not None else FakeUpstreamState()
    add = app.router.add_route
    add("POST", "/v1/chat/completions", _endpoint(_chat))
    add("POST", "/v1/completions", _endpoint(_completions))
    add("POST", "/v1/embeddings", _endpoint(_embeddings))
    add("POST", "/v1/responses", _endpoint(_responses))
    add("GET", "/v1/models", _endpoint(_models))
    add("GET", "/v1/models/{model}", _endpoint(_models))
    # /v1/messages and /v1/messages/count_tokens, sharing this side's helpers.
    fake_anthropic.add_routes(app, fake_anthropic.Kit(STATE_KEY, _Headers, _generate, _seed,
                                                      _chunks, _sse, delay_or_failure))
    add("*", "/_fake/config", _config)
    add("POST", "/_fake/reset", _reset)
    add("GET", "/_fake/requests", _recorded)
    add("*", "/{tail:.*}", _not_found)
    app.on_startup.append(_warm)
    return app


async def start_fake_upstream(host: str = "127.0.0.1", port: int = 0,
                              state: FakeUpstreamState | None = None,
                              ) -> tuple[web.AppRunner, str, FakeUpstreamState]:
    """Start on ``host:port`` (0 picks a free port); returns runner, base URL ("…/v1"), state."""
    app = create_fake_upstream(state)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    bound = runner.addresses[0][1]
    return runner, f"http://{host}:{bound}/v1", app[STATE_KEY]


def main(port: int, host: str = "127.0.0.1") -> None:
    """Serve forever (``costwall fake-upstream``), printing only the base URL."""
    print(f"costwall fake upstream: http://{host}:{port}/v1", flush=True)
    web.run_app(create_fake_upstream(), host=host, port=port, print=None, access_log=None)
