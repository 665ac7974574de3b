"""The endpoint table: everything the request path knows about one upstream route; pure.

The proxy never branches on an endpoint's name: it looks the route up here once per request
(``BY_PATH``) and asks the entry. The routes it serves (``POST /v1/<path>``) are exactly the
entries of ``ROUTES``.

Adding a route is one new ``Endpoint`` in ``ROUTES`` plus its tests. An entry needs:

- ``name``: the label stored in the ledger's ``endpoint`` column and in metrics (short, stable);
- ``path``: the path under ``/v1`` it is served at, forwarded as is to the upstream;
- ``estimate``: ``(payload, price, seen, max_tool_calls) -> Estimate``, the admission bound of a
  body (``gateway.estimate``): prompt tokens, output bound, choices, the field to clamp and any
  built-in tool bound; it raises ``BadRequest`` for a body it cannot bound;
- ``output_fields``: the body fields that bound the output, in the order the estimator reads
  them (the first one present is lowered when clamping, else the first); empty: nothing to clamp;
- ``usage``: a ``gateway.usage.UsageFormat``: how its ``usage`` object is parsed and how its
  stream events are read (a new API family adds its parser and ``StreamMeter`` event method);
- ``answer_text``: the generated text of a non-streaming answer, counted when the upstream gave
  no believable usage;
- ``model_kind``: the price table ``kind`` its models must have (``chat`` or ``embedding``);
- ``ask_stream_usage``: whether to add ``stream_options.include_usage`` to a streaming request
  (the extra usage chunk is dropped again when the client did not ask for it);
- ``server_state``: answers are stored upstream (``previous_response_id``, ``background``): the
  answered response is parsed to remember its token total, and a queued answer is charged its
  bound;
- ``tool_fees``: built-in tools may add per-call fees: its estimator may return a tool bound
  (``Estimate.tools``), reserved at admission and settled by ``gateway.settlement``;
- ``kind``: the upstream kind it speaks (``gateway.providers``): its models must be routed to
  an upstream of that kind, and errors costwall answers on it take that kind's shape;
- ``count``: ``(text, price, estimate) -> tokens`` of generated text, for answers without a
  believable usage (tiktoken for OpenAI; UTF-8 bytes, an upper bound, for Anthropic);
- ``countable``: whether such a count alone may price an answer (no tokenizer for Anthropic
  ships offline: an answer that reports nothing is charged its reserved bound).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway import estimate, messages, tokens, usage
from gateway.estimate import Estimate
from gateway.pricing import ModelPrice
from gateway.providers import ANTHROPIC, OPENAI, UpstreamKind


def count_tiktoken(text: str, price: ModelPrice, est: Estimate) -> int:
    """Tokens of ``text`` in the model's tiktoken encoding."""
    return tokens.count_text(text, tokens.encoding(price.encoding))


def count_bytes(text: str, price: ModelPrice, est: Estimate) -> int:
    """An upper bound of the tokens of ``text`` without its tokenizer: one per UTF-8 byte,
    at most the request's output bound (the upstream stops there)."""
    return min(len(text.encode("utf-8", "surrogatepass")), est.total_output)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One upstream route and how costwall bounds, meters and settles it.

    >>> BY_PATH["chat/completions"].name, BY_PATH["chat/completions"].output_fields[0]
    ('chat', 'max_completion_tokens')
    """

    name: str
    path: str
    estimate: estimate.Estimator
    output_fields: tuple[str, ...]
    usage: usage.UsageFormat
    answer_text: Callable[[Any], str]
    model_kind: str = "chat"
    ask_stream_usage: bool = False
    server_state: bool = False
    tool_fees: bool = False
    kind: UpstreamKind = OPENAI
    count: Callable[[str, ModelPrice, Estimate], int] = count_tiktoken
    countable: bool = True


CHAT = Endpoint(
    "chat", "chat/completions", estimate.estimate_chat, estimate.CHAT_OUTPUT_FIELDS,
    usage.CHAT_USAGE, usage.choices_text, ask_stream_usage=True, tool_fees=True)
COMPLETIONS = Endpoint(
    "completions", "completions", estimate.estimate_completions,
    estimate.COMPLETIONS_OUTPUT_FIELDS, usage.CHAT_USAGE, usage.choices_text,
    ask_stream_usage=True)
EMBEDDINGS = Endpoint(
    "embeddings", "embeddings", estimate.estimate_embeddings, (), usage.EMBEDDINGS_USAGE,
    usage.no_text, model_kind="embedding")
RESPONSES = Endpoint(
    "responses", "responses", estimate.estimate_responses, estimate.RESPONSES_OUTPUT_FIELDS,
    usage.RESPONSES_USAGE, usage.output_text, server_state=True, tool_fees=True)

MESSAGES = Endpoint(
    "messages", "messages", messages.estimate_messages, messages.OUTPUT_FIELDS,
    usage.MESSAGES_USAGE, usage.messages_text, kind=ANTHROPIC, count=count_bytes,
    countable=False)

ROUTES: tuple[Endpoint, ...] = (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, MESSAGES)
BY_PATH: Mapping[str, Endpoint] = {route.path: route for route in ROUTES}
BY_NAME: Mapping[str, Endpoint] = {route.name: route for route in ROUTES}
NAMES: tuple[str, ...] = tuple(route.name for route in ROUTES)
# The aiohttp route pattern of every path (``{endpoint:<PATTERN>}``).
PATTERN = "|".join(route.path for route in ROUTES)
# Forwarded without being charged or budgeted (still authenticated): path -> kind.
FREE_ROUTES: Mapping[str, UpstreamKind] = {"messages/count_tokens": ANTHROPIC}
# The kind whose error shape each served path answers in (OpenAI's elsewhere under /v1).
ERROR_KINDS: Mapping[str, UpstreamKind] = {
    **{f"/v1/{route.path}": route.kind for route in ROUTES},
    **{f"/v1/{path}": kind for path, kind in FREE_ROUTES.items()}}
