"""Admission estimates: prompt tokens and the output bound of a request body; pure.

The output bound is what the request itself allows (``max_tokens``,
``max_completion_tokens`` or ``max_output_tokens``, times ``n`` choices), else the model's
``max_output_tokens``. The prompt bound is the counted text plus ``gateway.bounds``' bounds of
what cannot be counted (images, audio, files, server-side state, built-in tool calls). Field
types are validated here so bad input becomes a 400, not a 500.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway import bounds, tokens
from gateway.errors import BadRequest
from gateway.pricing import ModelPrice

LEGACY_COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
MAX_CHOICES = 128
DEFAULT_MAX_TOOL_CALLS = 16  # budgets.max_tool_calls


@dataclass(frozen=True, slots=True)
class Estimate:
    """Upper-bound inputs for admission of one request."""

    prompt_tokens: int
    output_tokens: int          # per choice
    choices: int = 1
    output_field: str | None = None  # the body field to lower when clamping
    tools: bounds.ToolBound | None = None  # built-in tools: fees and max_tool_calls
    # A fee bound the answer's usage settles itself (Anthropic web searches), pico-USD.
    extra_fee: int = 0
    # Body fields to forward changed, so the upstream enforces what the bound assumed.
    set_fields: Mapping[str, Any] = field(default_factory=dict)

    @property
    def total_output(self) -> int:
        return self.output_tokens * self.choices

    @property
    def fee(self) -> int:
        """Bound of the request's tool fees in pico-USD."""
        return (self.tools.fee_bound if self.tools is not None else 0) + self.extra_fee


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


def _prompt(counted: int, uncounted: list[Any], model: str, context: int) -> int:
    if not uncounted:  # text only: the common case stays one comparison
        return min(counted, context)
    return bounds.prompt_bound(counted, uncounted, model, context)


# The fields that bound a request's output, in the order they are read; the first one the body
# sets is the one lowered when clamping, else the first of the list (``gateway.endpoints``).
# Chat: every current chat model accepts max_completion_tokens (reasoning models refuse
# max_tokens), so that is the field added when the client set none.
CHAT_OUTPUT_FIELDS = ("max_completion_tokens", "max_tokens")
COMPLETIONS_OUTPUT_FIELDS = ("max_tokens",)
RESPONSES_OUTPUT_FIELDS = ("max_output_tokens",)

# (payload, price, seen, max_tool_calls) -> Estimate; see ``estimate_responses``.
Estimator = Callable[[Mapping[str, Any], ModelPrice, Callable[[Any], int | None] | None, int],
                     Estimate]


def _requested(payload: Mapping[str, Any], fields: tuple[str, ...]) -> int | None:
    """The output bound the request sets itself: the first of ``fields`` it sets."""
    for name in fields:
        value = _positive_int(payload, name)
        if value:
            return value
    return None


def _clamp_field(payload: Mapping[str, Any], fields: tuple[str, ...]) -> str:
    """The field to lower when clamping: the first of ``fields`` the body has, else the first."""
    for name in fields:
        if name in payload:
            return name
    return fields[0]


def estimate_chat(payload: Mapping[str, Any], price: ModelPrice,
                  seen: Callable[[Any], int | None] | None = None,
                  max_tool_calls: int = DEFAULT_MAX_TOOL_CALLS) -> Estimate:
    """/v1/chat/completions: counted messages and tools, search fees, the output bound."""
    enc = tokens.encoding(price.encoding)
    model = _model(payload, price)
    uncounted: list[Any] = []
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array.", param="messages")
    counted = tokens.count_messages(messages, enc, payload.get("tools") or
                                    payload.get("functions"), uncounted)
    prompt = _prompt(counted, uncounted, model, price.max_input_tokens)
    search = bounds.chat_search(payload, model, max_tool_calls)
    if search is not None:  # the search results are read as input by the one model call
        prompt = price.max_input_tokens
    field = _clamp_field(payload, CHAT_OUTPUT_FIELDS)
    requested = _requested(payload, CHAT_OUTPUT_FIELDS)
    return Estimate(prompt, requested or price.max_output_tokens, _choices(payload), field,
                    search)


def estimate_completions(payload: Mapping[str, Any], price: ModelPrice,
                         seen: Callable[[Any], int | None] | None = None,
                         max_tool_calls: int = DEFAULT_MAX_TOOL_CALLS) -> Estimate:
    """/v1/completions: the prompt(s), ``max_tokens`` (default 16) per choice and prompt."""
    if "prompt" not in payload:
        raise BadRequest("'prompt' is required.", param="prompt")
    prompt = tokens.count_prompt_input(payload.get("prompt"), tokens.encoding(price.encoding))
    if isinstance(payload.get("prompt"), list) and payload["prompt"] and not all(
        isinstance(p, int) for p in payload["prompt"]
    ):
        prompts = len(payload["prompt"])
    else:
        prompts = 1
    requested = _requested(payload, COMPLETIONS_OUTPUT_FIELDS) or \
        LEGACY_COMPLETIONS_DEFAULT_MAX_TOKENS
    return Estimate(prompt, requested, _choices(payload) * prompts,
                    COMPLETIONS_OUTPUT_FIELDS[0])


def estimate_embeddings(payload: Mapping[str, Any], price: ModelPrice,
                        seen: Callable[[Any], int | None] | None = None,
                        max_tool_calls: int = DEFAULT_MAX_TOOL_CALLS) -> Estimate:
    """/v1/embeddings: the input tokens; no output."""
    value = payload.get("input")
    if value is None or value == "" or value == []:
        raise BadRequest("'input' is required.", param="input")
    return Estimate(tokens.count_prompt_input(value, tokens.encoding(price.encoding)), 0)


def estimate_responses(payload: Mapping[str, Any], price: ModelPrice,
                       seen: Callable[[Any], int | None] | None = None,
                       max_tool_calls: int = DEFAULT_MAX_TOOL_CALLS) -> Estimate:
    """/v1/responses: counted input, server-side state and built-in tools.

    ``seen`` gives the token total of a response costwall answered itself (for
    ``previous_response_id``); ``max_tool_calls`` bounds built-in tool calls when the request
    sets no ``max_tool_calls``.
    """
    if "input" not in payload and "previous_response_id" not in payload \
            and "prompt" not in payload and "conversation" not in payload:
        raise BadRequest("'input' is required.", param="input")
    return _responses(payload, price, tokens.encoding(price.encoding), _model(payload, price),
                      seen, max_tool_calls)


ESTIMATORS: Mapping[str, Estimator] = {
    "chat": estimate_chat, "completions": estimate_completions,
    "embeddings": estimate_embeddings, "responses": estimate_responses,
}


def estimate(endpoint: str, payload: Mapping[str, Any], price: ModelPrice,
             seen: Callable[[Any], int | None] | None = None,
             max_tool_calls: int = DEFAULT_MAX_TOOL_CALLS) -> Estimate:
    """Prompt tokens and output bound of a request to ``endpoint`` (a route's name) for
    ``price``'s model; for callers that name the route (tests, benches). The request path
    calls its ``gateway.endpoints`` entry's estimator directly."""
    estimator = ESTIMATORS.get(endpoint)
    if estimator is None:
        raise BadRequest(f"unsupported endpoint {endpoint!r}")
    return estimator(payload, price, seen, max_tool_calls)


def _model(payload: Mapping[str, Any], price: ModelPrice) -> str:
    model = payload.get("model")
    return model if isinstance(model, str) else price.name


def _responses(payload: Mapping[str, Any], price: ModelPrice, enc: Any, model: str,
               seen: Callable[[Any], int | None] | None, max_tool_calls: int) -> Estimate:
    """/v1/responses: counted input, server-side state and built-in tools."""
    context = price.max_input_tokens
    uncounted: list[Any] = []
    counted = tokens.count_responses_input(
        payload.get("input"), enc, payload.get("instructions"), payload.get("tools"), uncounted)
    # A conversation or a stored prompt holds items costwall never saw: the context window.
    unknown = payload.get("conversation") is not None or payload.get("prompt") is not None
    known = 0
    previous = payload.get("previous_response_id")
    if previous is not None:
        total = seen(previous) if seen is not None else None
        if total is None:
            unknown = True
        else:
            known = total + bounds.PREVIOUS_RESPONSE_MARGIN
    if unknown:
        prompt = context
    elif known:
        prompt = bounds.prompt_bound(counted, uncounted, model, context, known)
    else:
        prompt = _prompt(counted, uncounted, model, context)
    requested_calls = payload.get("max_tool_calls")
    if requested_calls is not None and (isinstance(requested_calls, bool) or not isinstance(
            requested_calls, int) or requested_calls < 0):
        raise BadRequest("'max_tool_calls' must be a non-negative integer.",
                         param="max_tool_calls")
    tools = bounds.responses_tools(payload.get("tools"), model, requested_calls, max_tool_calls)
    if tools is not None:
        # Each built-in tool call makes the model read its whole context again.
        prompt += tools.calls * context
    requested = _requested(payload, RESPONSES_OUTPUT_FIELDS)
    return Estimate(prompt, requested or price.max_output_tokens, 1, RESPONSES_OUTPUT_FIELDS[0],
                    tools)
