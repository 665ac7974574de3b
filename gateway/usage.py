"""Reading usage out of OpenAI responses and SSE streams; pure, no I/O.

``StreamMeter`` sits in the relay loop: it cuts the byte stream into SSE events, forwards
each complete event's bytes untouched (no re-encoding), drops the usage-only chunk the
gateway asked for on the client's behalf, and remembers the usage or, failing that, the
streamed text so a cut stream can still be charged by counting.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from gateway.pricing import Usage

_RESPONSES_FINAL = (b"response.completed", b"response.incomplete", b"response.failed")


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def usage_from_chat(usage: Any) -> Usage | None:
    """Chat, completions and embeddings usage (``prompt_tokens`` / ``completion_tokens``)."""
    if not isinstance(usage, Mapping):
        return None
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    return Usage(
        prompt_tokens=_int(usage.get("prompt_tokens")),
        cached_tokens=_int(prompt_details.get("cached_tokens")) if isinstance(
            prompt_details, Mapping) else 0,
        completion_tokens=_int(usage.get("completion_tokens")),
        reasoning_tokens=_int(completion_details.get("reasoning_tokens")) if isinstance(
            completion_details, Mapping) else 0,
    )


def usage_from_responses(usage: Any) -> Usage | None:
    """Responses API usage (``input_tokens`` / ``output_tokens`` and their details)."""
    if not isinstance(usage, Mapping):
        return None
    input_details = usage.get("input_tokens_details") or {}
    output_details = usage.get("output_tokens_details") or {}
    return Usage(
        prompt_tokens=_int(usage.get("input_tokens")),
        cached_tokens=_int(input_details.get("cached_tokens")) if isinstance(
            input_details, Mapping) else 0,
        completion_tokens=_int(usage.get("output_tokens")),
        reasoning_tokens=_int(output_details.get("reasoning_tokens")) if isinstance(
            output_details, Mapping) else 0,
    )


def usage_from_body(endpoint: str, body: bytes) -> Usage | None:
    """Usage of a non-streaming response body, or None if it has none or is not JSON."""
    if b'"usage"' not in body:
        return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, Mapping):
        return None
    if endpoint == "responses":
        return usage_from_responses(data.get("usage"))
    return usage_from_chat(data.get("usage"))


class StreamMeter:
    """Relays an SSE stream event by event while watching for usage and streamed text."""

    def __init__(self, endpoint: str, strip_usage_chunk: bool = False):
        self.endpoint = endpoint
        self.strip_usage_chunk = strip_usage_chunk
        self.usage: Usage | None = None
        self.response: Mapping[str, Any] | None = None  # /v1/responses: the final response
        self.texts: list[str] = []
        self._buffer = b""

    def feed(self, chunk: bytes) -> bytes:
        """Accept upstream bytes; return the bytes to send to the client now."""
        data = self._buffer + chunk
        end = data.rfind(b"\n\n")
        if end < 0:
            self._buffer = data
            return b""
        complete, self._buffer = data[: end + 2], data[end + 2 :]
        if not self.strip_usage_chunk:
            for event in complete.split(b"\n\n"):
                if event:
                    self._inspect(event)
            return complete
        out = []
        for event in complete.split(b"\n\n"):
            if event and self._inspect(event):
                out.append(event + b"\n\n")
        return b"".join(out)

    def finish(self) -> bytes:
        """The stream ended: return whatever incomplete tail is left, inspected."""
        tail, self._buffer = self._buffer, b""
        if tail.strip():
            self._inspect(tail.rstrip(b"\n"))
        return tail

    def _inspect(self, event: bytes) -> bool:
        """Record what the event says; return False if it must not reach the client."""
        payload = b"".join(
            line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")
        )
        if not payload or payload == b"[DONE]":
            return True
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return True
        if not isinstance(obj, Mapping):
            return True
        if self.endpoint == "responses":
            self._responses_event(obj)
            return True
        usage = obj.get("usage")
        if usage:
            self.usage = usage_from_chat(usage)
            if self.strip_usage_chunk and not obj.get("choices"):
                return False
        for choice in obj.get("choices") or ():
            if not isinstance(choice, Mapping):
                continue
            if isinstance(choice.get("text"), str):
                self.texts.append(choice["text"])
            delta = choice.get("delta")
            if isinstance(delta, Mapping):
                for field in ("content", "refusal", "reasoning_content"):
                    if isinstance(delta.get(field), str):
                        self.texts.append(delta[field])
                for call in delta.get("tool_calls") or ():
                    function = call.get("function") if isinstance(call, Mapping) else None
                    if isinstance(function, Mapping):
                        for field in ("name", "arguments"):
                            if isinstance(function.get(field), str):
                                self.texts.append(function[field])
        return True

    def _responses_event(self, obj: Mapping[str, Any]) -> None:
        kind = obj.get("type")
        if not isinstance(kind, str):
            return
        if kind.endswith(".delta") and isinstance(obj.get("delta"), str):
            self.texts.append(obj["delta"])
        elif kind.encode() in _RESPONSES_FINAL:
            response = obj.get("response")
            if isinstance(response, Mapping):
                self.response = response
                self.usage = usage_from_responses(response.get("usage")) or self.usage

    @property
    def streamed_text(self) -> str:
        return "".join(self.texts)
