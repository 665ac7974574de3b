"""The endpoint table: everything the request path knows about one upstream route; pure.

The proxy never branches on an endpoint's name: it looks the route up here once per request
(``BY_PATH``) and asks the entry. The routes it serves (``POST /v1/<path>``) are exactly the
entries of ``ROUTES``.

Adding a route (next: ``/v1/messages`` for Anthropic) is one new ``Endpoint`` in ``ROUTES``
plus its tests. An entry needs:

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
  (``Estimate.tools``), reserved at admission and settled by ``gateway.settlement``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway import estimate, usage


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

ROUTES: tuple[Endpoint, ...] = (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES)
BY_PATH: Mapping[str, Endpoint] = {route.path: route for route in ROUTES}
BY_NAME: Mapping[str, Endpoint] = {route.name: route for route in ROUTES}
NAMES: tuple[str, ...] = tuple(route.name for route in ROUTES)
# The aiohttp route pattern of every path (``{endpoint:<PATTERN>}``).
PATTERN = "|".join(route.path for route in ROUTES)
