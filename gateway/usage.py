"""Reading usage out of OpenAI responses and SSE streams, and deciding whether to trust it; pure.

``StreamMeter`` sits in the relay loop: it cuts the byte stream into SSE events (blank lines
with LF, CRLF or CR line endings, as the WHATWG SSE spec allows), forwards each complete
event's bytes untouched (no re-encoding), drops the usage-only chunk the gateway asked for on
the client's behalf, and remembers the usage or, failing that, the streamed text so a cut
stream can still be charged by counting.

Each API family's way of reporting usage is a ``UsageFormat`` (its ``usage`` parser and the
``StreamMeter`` method that reads one of its stream events); ``gateway.endpoints`` gives each
route its format.

Usage is never trusted blindly (``parse_*`` and ``check_usage``): every token count must be a
non-negative JSON integer (not a bool, float or string) no larger than the request could
possibly have produced (``UsageBounds``), cached tokens within prompt tokens, reasoning tokens
within completion tokens, and the fields OpenAI always sends must be there. A usage that
fails is ``InvalidUsage``: the request path then charges by counting instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from gateway.pricing import Usage

if TYPE_CHECKING:
    from gateway.estimate import Estimate
    from gateway.pricing import ModelPrice

_RESPONSES_FINAL = (b"response.completed", b"response.incomplete", b"response.failed")

# No field of a real usage comes near this: the largest context windows are ~2M tokens and
# 128 choices x 128k output tokens is 16M. It also keeps one request's cost (tokens x a
# per-token price) far inside a signed 64-bit integer, the ledger's money column.
TOKEN_CEILING = 100_000_000
# The prompt bound when the price table gives no context window (``max_input_tokens``).
DEFAULT_CONTEXT_TOKENS = 2_000_000


class InvalidUsage(ValueError):
    """An upstream usage costwall will not bill from; the message says why (no prompt text)."""


@dataclass(frozen=True, slots=True)
class UsageBounds:
    """The most tokens a request can really be billed: anything above is not a real usage.

    ``prompt``: the model's context window (``max_input_tokens``, else 2M tokens), or the
    admission estimate if that is larger. ``completion``: the request's output bound (its
    ``max_tokens`` x choices) or the model's ``max_output_tokens`` x choices, whichever is
    larger. Both at most ``TOKEN_CEILING``. These bounds are looser than the reservation on
    purpose: usage between the reservation and these bounds is believed, charged and flagged
    as an overshoot; usage beyond them is impossible and so not believed.
    """

    prompt: int
    completion: int


def usage_bounds(price: ModelPrice, est: Estimate) -> UsageBounds:
    """The ``UsageBounds`` of a request to ``price``'s model admitted with ``est``."""
    context = getattr(price, "max_input_tokens", None) or DEFAULT_CONTEXT_TOKENS
    prompt = max(est.prompt_tokens, context)
    completion = max(est.total_output, price.max_output_tokens * est.choices)
    return UsageBounds(min(prompt, TOKEN_CEILING), min(completion, TOKEN_CEILING))


def check_usage(usage: Usage, bounds: UsageBounds) -> str | None:
    """Why ``usage`` cannot be real for a request with ``bounds``, or None if it can."""
    if usage.prompt_tokens > bounds.prompt:
        return f"prompt tokens {usage.prompt_tokens} above the bound {bounds.prompt}"
    if usage.completion_tokens > bounds.completion:
        return (f"completion tokens {usage.completion_tokens} above the bound "
                f"{bounds.completion}")
    return None


def _count(usage: dict[str, Any], name: str, required: bool) -> int:
    value = usage.get(name)
    if value is None and not required:
        return 0
    # ``type(...) is int``: a bool is an int subclass, a float 1e13 or "5" is not a count.
    if type(value) is not int or value < 0 or value > TOKEN_CEILING:
        shown = type(value).__name__ if type(value) is not int else value
        raise InvalidUsage(f"{name} is not a token count ({shown})")
    return value


def _details(usage: dict[str, Any], name: str, field: str) -> int:
    details = usage.get(name)
    if details is None:
        return 0
    if not isinstance(details, dict):  # parsed JSON: a dict (an ABC check costs µs here)
        raise InvalidUsage(f"{name} is not an object")
    return _count(details, field, required=False)


def _usage(usage: Any, prompt: str, completion: str, completion_required: bool,
           prompt_details: str, completion_details: str) -> Usage | None:
    if usage is None:
        return None
    if not isinstance(usage, dict):
        raise InvalidUsage("usage is not an object")
    result = Usage(
        prompt_tokens=_count(usage, prompt, required=True),
        cached_tokens=_details(usage, prompt_details, "cached_tokens"),
        completion_tokens=_count(usage, completion, required=completion_required),
        reasoning_tokens=_details(usage, completion_details, "reasoning_tokens"),
    )
    if result.cached_tokens > result.prompt_tokens:
        raise InvalidUsage("cached tokens exceed prompt tokens")
    if result.reasoning_tokens > result.completion_tokens:
        raise InvalidUsage("reasoning tokens exceed completion tokens")
    return result


def usage_from_chat(usage: Any, endpoint: str = "chat") -> Usage | None:
    """Chat and completions usage (``prompt_tokens`` / ``completion_tokens``), both required.

    None when there is none (absent or null); ``InvalidUsage`` when it is malformed.
    ``endpoint="embeddings"`` is ``usage_from_embeddings`` (kept for callers by name).
    """
    return _usage(usage, "prompt_tokens", "completion_tokens", endpoint != "embeddings",
                  "prompt_tokens_details", "completion_tokens_details")


def usage_from_embeddings(usage: Any) -> Usage | None:
    """Embeddings usage: ``prompt_tokens`` only (there is no output)."""
    return _usage(usage, "prompt_tokens", "completion_tokens", False,
                  "prompt_tokens_details", "completion_tokens_details")


def usage_from_responses(usage: Any) -> Usage | None:
    """Responses API usage (``input_tokens`` / ``output_tokens`` and their details)."""
    return _usage(usage, "input_tokens", "output_tokens", True,
                  "input_tokens_details", "output_tokens_details")


def usage_from_messages(usage: Any) -> Usage | None:
    """Anthropic Messages usage, in ``Usage``'s terms.

    ``input_tokens`` excludes cache reads and writes: the whole input (``prompt_tokens``) is
    ``input_tokens + cache_creation_input_tokens + cache_read_input_tokens``; cache reads are
    ``cached_tokens``. Cache writes are split by ``cache_creation`` into 5-minute and 1-hour
    writes; creation tokens the split does not cover (server tools can report more in the
    total than in the split) are 5-minute writes, never free. ``output_tokens`` includes
    thinking (``output_tokens_details.thinking_tokens``, kept as reasoning tokens).

    >>> u = usage_from_messages({"input_tokens": 3, "output_tokens": 5,
    ...     "cache_creation_input_tokens": 10, "cache_read_input_tokens": 20,
    ...     "cache_creation": {"ephemeral_5m_input_tokens": 2, "ephemeral_1h_input_tokens": 4}})
    >>> (u.prompt_tokens, u.cached_tokens, u.cache_write_5m_tokens, u.cache_write_1h_tokens)
    (33, 20, 6, 4)
    """
    if usage is None:
        return None
    if not isinstance(usage, dict):
        raise InvalidUsage("usage is not an object")
    input_ = _count(usage, "input_tokens", required=True)
    output = _count(usage, "output_tokens", required=True)
    creation = _count(usage, "cache_creation_input_tokens", required=False)
    read = _count(usage, "cache_read_input_tokens", required=False)
    split_5m = _details(usage, "cache_creation", "ephemeral_5m_input_tokens")
    split_1h = _details(usage, "cache_creation", "ephemeral_1h_input_tokens")
    creation = max(creation, split_5m + split_1h)  # a split beyond the total: never under
    thinking = _details(usage, "output_tokens_details", "thinking_tokens")
    if thinking > output:
        raise InvalidUsage("thinking tokens exceed output tokens")
    searches = _details(usage, "server_tool_use", "web_search_requests")
    geo = usage.get("inference_geo")
    return Usage(prompt_tokens=input_ + creation + read, cached_tokens=read,
                 completion_tokens=output, reasoning_tokens=thinking,
                 cache_write_5m_tokens=creation - split_1h, cache_write_1h_tokens=split_1h,
                 web_search_requests=searches, geo=geo if isinstance(geo, str) else "")


def usage_from_body(api: str | UsageFormat, body: bytes) -> Usage | None:
    """Usage of a non-streaming response body, or None if it has none or is not JSON.

    ``api`` is a ``UsageFormat`` (or its name). Raises ``InvalidUsage`` when a usage is there
    but malformed, including a body that mentions ``"usage"`` but is not JSON that parses
    (orjson refuses integers past 64 bits).
    """
    fmt = api if isinstance(api, UsageFormat) else _BY_NAME[api]
    if b'"usage"' not in body and not fmt.required:
        return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        if fmt.required:  # a success status with a body that is not JSON reports nothing
            raise InvalidUsage("the answer is not valid JSON") from None
        raise InvalidUsage("the answer carries a usage but is not valid JSON") from None
    if not isinstance(data, dict):
        return None
    usage = fmt.parse(data.get("usage"))
    if usage is None and fmt.required and "type" in data and data.get("type") != "error":
        raise InvalidUsage("the answer has no usage")
    return usage


def choices_text(data: Any) -> str:
    """The text of a Chat Completions or legacy Completions answer (for counting)."""
    texts: list[str] = []
    if isinstance(data, Mapping):
        for choice in data.get("choices") or ():
            if isinstance(choice, Mapping):
                message = choice.get("message")
                if isinstance(message, Mapping) and isinstance(message.get("content"), str):
                    texts.append(message["content"])
                if isinstance(choice.get("text"), str):
                    texts.append(choice["text"])
    return "".join(texts)


def output_text(data: Any) -> str:
    """The text of a Responses API answer's ``output`` items (for counting)."""
    texts: list[str] = []
    if isinstance(data, Mapping):
        for item in data.get("output") or ():
            for part in (item.get("content") or ()) if isinstance(item, Mapping) else ():
                if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                    texts.append(part["text"])
    return "".join(texts)


def messages_text(data: Any) -> str:
    """The generated content of an Anthropic Messages answer: text, thinking and tool input
    (for counting when the answer has no believable usage)."""
    texts: list[str] = []
    if isinstance(data, Mapping):
        for block in data.get("content") or ():
            if not isinstance(block, Mapping):
                continue
            for field in ("text", "thinking", "name"):
                if isinstance(block.get(field), str):
                    texts.append(block[field])
            if block.get("input") is not None:
                texts.append(orjson.dumps(block["input"]).decode())
    return "".join(texts)


def no_text(data: Any) -> str:
    """Answers with no generated text (embeddings): nothing to count."""
    return ""


# Two line terminators in a row (LF, CRLF or a lone CR each): the blank line ending an event.
# A CR at the very end of the data counts as a lone CR; ``StreamMeter`` handles the LF that
# may follow it in the next chunk.
_EVENT_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")
_LINE_END = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


def sse_data(event: bytes) -> bytes:
    """The data of one SSE event: its ``data`` lines joined by LF (WHATWG SSE rules)."""
    if b"\r" not in event:
        if event.startswith(b"data: ") and b"\n" not in event:  # what OpenAI sends
            return event[6:]
        lines = event.split(b"\n")
    else:
        lines = _LINE_END.split(event)
    parts = []
    for line in lines:
        if not line.startswith(b"data"):
            continue
        if len(line) == 4:
            parts.append(b"")
        elif line[4:5] == b":":
            parts.append(line[6:] if line[5:6] == b" " else line[5:])
    return b"\n".join(parts)


class StreamMeter:
    r"""Relays an SSE stream event by event while watching for usage and streamed text.

    >>> m = StreamMeter("chat")
    >>> m.feed(b'data: {"choices": [{"delta": {"content": "hi"}}]}\r\n\r\ndata: [DO')
    b'data: {"choices": [{"delta": {"content": "hi"}}]}\r\n\r\n'
    >>> m.streamed_text
    'hi'
    """

    def __init__(self, api: str | UsageFormat, strip_usage_chunk: bool = False):
        self.format = usage_format(api)
        # Bound once: one call per event, no dispatch on the API's name.
        self._event: Callable[[dict[str, Any]], bool] = self.format.event.__get__(self)
        self.strip_usage_chunk = strip_usage_chunk
        self.usage: Usage | None = None
        self.response: Mapping[str, Any] | None = None  # /v1/responses: the final response
        self.invalid: str | None = None  # why the last usage seen was not believed
        self.texts: list[str] = []
        self._buffer = b""
        self._started = False
        # The last event sent ended in a CR at the end of the data: an LF opening the next
        # chunk completes that CRLF and belongs to it (dropped with it if it was dropped).
        self._cr_end: bool | None = None

    def feed(self, chunk: bytes) -> bytes:
        """Accept upstream bytes; return the bytes to send to the client now."""
        lead = b""
        if self._cr_end is not None and chunk:
            if chunk[:1] == b"\n":
                lead = b"\n" if self._cr_end else b""
                chunk = chunk[1:]
            self._cr_end = None
        data = self._buffer + chunk if self._buffer else chunk
        if not self._started and data:
            self._started = True
            if data.startswith(_BOM):  # forwarded as it came, ignored when parsing
                self._inspect_from = len(_BOM)
        if b"\r" not in data:  # LF only, as OpenAI frames it: no regex needed
            end = data.rfind(b"\n\n")
            if end < 0:
                self._buffer = data
                return lead
            complete, self._buffer = data[: end + 2], data[end + 2 :]
            if not self.strip_usage_chunk:
                for event in complete.split(b"\n\n"):
                    if event:
                        self._inspect(event)
                return lead + complete
            kept = [event + b"\n\n" for event in complete[:-2].split(b"\n\n")
                    if not event or self._inspect(event)]
            return lead + b"".join(kept)
        out = [lead] if lead else []
        start = 0
        for match in _EVENT_END.finditer(data):
            end = match.end()
            keep = self._inspect(data[start:match.start()])
            if keep or not self.strip_usage_chunk:
                out.append(data[start:end])
            start = end
            if end == len(data) and data[-1:] == b"\r":
                self._cr_end = keep or not self.strip_usage_chunk
        self._buffer = data[start:]
        return b"".join(out)

    def finish(self) -> bytes:
        """The stream ended: return whatever incomplete tail is left, inspected."""
        tail, self._buffer = self._buffer, b""
        if tail.strip():
            self._inspect(tail)
        return tail

    _inspect_from = 0

    def _inspect(self, event: bytes) -> bool:
        """Record what the event says; return False if it must not reach the client."""
        if self._inspect_from:
            event, self._inspect_from = event[self._inspect_from:], 0
        payload = sse_data(event)
        if not payload or payload == b"[DONE]":
            return True
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return True
        if not isinstance(obj, dict):  # ``dict``, not ``Mapping``: parsed JSON, and an ABC
            return True               # check per event costs more than the rest of this
        return self._event(obj)

    def chunk_event(self, obj: dict[str, Any]) -> bool:
        """A Chat Completions / Completions chunk: ``usage`` and ``choices`` text."""
        usage = obj.get("usage")
        if usage is not None:
            self._take(self.format.parse, usage)
            if self.strip_usage_chunk and not obj.get("choices"):
                return False
        for choice in obj.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            if isinstance(choice.get("text"), str):
                self.texts.append(choice["text"])
            delta = choice.get("delta")
            if isinstance(delta, dict):
                for field in ("content", "refusal", "reasoning_content"):
                    if isinstance(delta.get(field), str):
                        self.texts.append(delta[field])
                for call in delta.get("tool_calls") or ():
                    function = call.get("function") if isinstance(call, dict) else None
                    if isinstance(function, dict):
                        for field in ("name", "arguments"):
                            if isinstance(function.get(field), str):
                                self.texts.append(function[field])
        return True

    def _take(self, parse: Any, *args: Any) -> None:
        """Remember the usage ``parse(*args)`` gives, or why it was not believed."""
        try:
            usage = parse(*args)
        except InvalidUsage as exc:
            self.usage, self.invalid = None, str(exc)
            return
        if usage is not None:
            self.usage, self.invalid = usage, None

    def responses_event(self, obj: dict[str, Any]) -> bool:
        """A Responses API event: text deltas, and the final response with its usage."""
        kind = obj.get("type")
        if not isinstance(kind, str):
            return True
        if kind.endswith(".delta") and isinstance(obj.get("delta"), str):
            self.texts.append(obj["delta"])
        elif kind.encode() in _RESPONSES_FINAL:
            response = obj.get("response")
            if isinstance(response, dict):
                self.response = response
                self._take(self.format.parse, response.get("usage"))
        return True

    def messages_event(self, obj: dict[str, Any]) -> bool:
        """An Anthropic Messages event: ``message_start`` (input usage so far), deltas (text,
        thinking, tool input), ``message_delta`` (cumulative usage: it replaces what was known,
        field by field, never adds)."""
        kind = obj.get("type")
        if kind == "content_block_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict):
                for field in ("text", "partial_json", "thinking"):
                    if isinstance(delta.get(field), str):
                        self.texts.append(delta[field])
        elif kind == "message_start":
            message = obj.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict):
                self._raw = dict(usage)
                try:
                    self.partial = self.format.parse(self._raw)
                except InvalidUsage as exc:
                    self.invalid = str(exc)
        elif kind == "message_delta":
            usage = obj.get("usage")
            if isinstance(usage, dict):
                raw = dict(self._raw or {})
                raw.update((k, v) for k, v in usage.items() if v is not None)
                self._raw = raw
                self._take(self.format.parse, raw)
        return True

    _raw: dict[str, Any] | None = None
    # What a stream's ``message_start`` reported before its final usage: the input side,
    # known exactly, for charging a stream cut before its end (``gateway.settlement``).
    partial: Usage | None = None

    @property
    def streamed_text(self) -> str:
        return "".join(self.texts)


@dataclass(frozen=True, slots=True)
class UsageFormat:
    """How one API reports usage: its ``usage`` object, and the events of its streams.

    ``parse`` turns a ``usage`` object into a ``Usage`` (None when absent, ``InvalidUsage`` when
    malformed); ``event`` is the ``StreamMeter`` method that reads one parsed stream event and
    says whether it may reach the client.
    """

    name: str
    parse: Callable[[Any], Usage | None]
    event: Callable[[StreamMeter, dict[str, Any]], bool]
    required: bool = False  # the API always reports usage: an answer without one is malformed


CHAT_USAGE = UsageFormat("chat", usage_from_chat, StreamMeter.chunk_event)
EMBEDDINGS_USAGE = UsageFormat("embeddings", usage_from_embeddings, StreamMeter.chunk_event)
RESPONSES_USAGE = UsageFormat("responses", usage_from_responses, StreamMeter.responses_event)
MESSAGES_USAGE = UsageFormat("messages", usage_from_messages, StreamMeter.messages_event,
                             required=True)
# By name, for callers that name the API (``StreamMeter("chat")``); the request path passes
# the format of its ``gateway.endpoints`` entry.
_BY_NAME = {"chat": CHAT_USAGE, "completions": CHAT_USAGE, "embeddings": EMBEDDINGS_USAGE,
            "responses": RESPONSES_USAGE, "messages": MESSAGES_USAGE}


def usage_format(api: str | UsageFormat) -> UsageFormat:
    """``api`` itself, or the format of that name."""
    return api if isinstance(api, UsageFormat) else _BY_NAME[api]
