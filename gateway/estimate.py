"""Admission estimates: prompt tokens and the output bound of a request body; pure.

The output bound is what the request itself allows (``max_tokens``,
``max_completion_tokens`` or ``max_output_tokens``, times ``n`` choices), else the model's
``max_output_tokens``. Field types are validated here so bad input becomes a 400, not a 500.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway import tokens
from gateway.errors import BadRequest
from gateway.pricing import ModelPrice

LEGACY_COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
MAX_CHOICES = 128


@dataclass(frozen=True, slots=True)
class Estimate:
    """Upper-bound inputs for admission of one request."""

    prompt_tokens: int
    output_tokens: int          # per choice
    choices: int = 1
    output_field: str | None = None  # the body field to lower when clamping

    @property
    def total_output(self) -> int:
        return self.output_tokens * self.choices


def _positive_int(payload: Mapping[str, Any], name: str) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"'{name}' must be a positive integer.", param=name)
    return value


def _choices(payload: Mapping[str, Any]) -> int:
    n = _positive_int(payload, "n") or 1
    best_of = _positive_int(payload, "best_of") or 1
    total = max(n, best_of)
    if total > MAX_CHOICES:
        raise BadRequest(f"'n' may be at most {MAX_CHOICES}.", param="n")
    return total


def estimate(endpoint: str, payload: Mapping[str, Any], price: ModelPrice) -> Estimate:
    """Prompt tokens and output bound of a request to ``endpoint`` for ``price``'s model."""
    enc = tokens.encoding(price.encoding)
    if endpoint == "chat":
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty array.", param="messages")
        prompt = tokens.count_messages(messages, enc, payload.get("tools") or
                                       payload.get("functions"))
        # Clamp the field the client used; if none, max_completion_tokens, which every current
        # chat model accepts (reasoning models refuse max_tokens).
        field = "max_tokens" if "max_tokens" in payload and "max_completion_tokens" not in \
            payload else "max_completion_tokens"
        requested = _positive_int(payload, "max_completion_tokens") or _positive_int(
            payload, "max_tokens")
        return Estimate(prompt, requested or price.max_output_tokens, _choices(payload), field)
    if endpoint == "completions":
        if "prompt" not in payload:
            raise BadRequest("'prompt' is required.", param="prompt")
        prompt = tokens.count_prompt_input(payload.get("prompt"), enc)
        if isinstance(payload.get("prompt"), list) and payload["prompt"] and not all(
            isinstance(p, int) for p in payload["prompt"]
        ):
            prompts = len(payload["prompt"])
        else:
            prompts = 1
        requested = _positive_int(payload, "max_tokens") or LEGACY_COMPLETIONS_DEFAULT_MAX_TOKENS
        return Estimate(prompt, requested, _choices(payload) * prompts, "max_tokens")
    if endpoint == "embeddings":
        value = payload.get("input")
        if value is None or value == "" or value == []:
            raise BadRequest("'input' is required.", param="input")
        return Estimate(tokens.count_prompt_input(value, enc), 0)
    if endpoint == "responses":
        if "input" not in payload and "previous_response_id" not in payload:
            raise BadRequest("'input' is required.", param="input")
        prompt = tokens.count_responses_input(
            payload.get("input"), enc, payload.get("instructions"), payload.get("tools"))
        requested = _positive_int(payload, "max_output_tokens")
        return Estimate(prompt, requested or price.max_output_tokens, 1, "max_output_tokens")
    raise BadRequest(f"unsupported endpoint {endpoint!r}")


def counted_output(endpoint: str, data: Any, enc_name: str) -> int:
    """Output tokens counted from a non-streaming response that carried no usage."""
    enc = tokens.encoding(enc_name)
    texts: list[str] = []
    if isinstance(data, Mapping):
        for choice in data.get("choices") or ():
            if isinstance(choice, Mapping):
                message = choice.get("message")
                if isinstance(message, Mapping) and isinstance(message.get("content"), str):
                    texts.append(message["content"])
                if isinstance(choice.get("text"), str):
                    texts.append(choice["text"])
        for item in data.get("output") or ():
            for part in (item.get("content") or ()) if isinstance(item, Mapping) else ():
                if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                    texts.append(part["text"])
    return tokens.count_text("".join(texts), enc)
