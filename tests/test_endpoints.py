"""The endpoint table (one entry per route) and the one settle decision, as plain functions.

The pipeline tests (test_proxy, test_usage_hostile, test_bounds_pipeline, ...) check the same
rules through a real gateway; these pin each entry and each branch of ``decide``.
"""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import bounds, endpoints, estimate, messages, usage
from gateway.endpoints import BY_NAME, BY_PATH, ROUTES
from gateway.estimate import Estimate
from gateway.pricing import ModelPrice, Usage
from gateway.providers import ANTHROPIC, OPENAI
from gateway.proxy import setup_routes
from gateway.settlement import LEDGER_MAX_COST, TOO_COSTLY, UsageSource, decide
from gateway.usage import StreamMeter

PRICE = ModelPrice("gpt-4o", input=2_500_000, cached_input=1_250_000, output=10_000_000,
                   max_output_tokens=16_384, max_input_tokens=128_000)
EMBED = ModelPrice("text-embedding-3-small", 20_000, 0, 0, 0, "cl100k_base", "embedding")
MSG = [{"role": "user", "content": "Say hello."}]


# -- the table ---------------------------------------------------------------------------------
def test_each_route_has_its_entry() -> None:
    want = {
        # path: (name, estimator, output fields, usage format, answer text, model kind,
        #        ask stream usage, server-side state, tool fees)
        "chat/completions": ("chat", estimate.estimate_chat,
                             ("max_completion_tokens", "max_tokens"), usage.CHAT_USAGE,
                             usage.choices_text, "chat", True, False, True),
        "completions": ("completions", estimate.estimate_completions, ("max_tokens",),
                        usage.CHAT_USAGE, usage.choices_text, "chat", True, False, False),
        "embeddings": ("embeddings", estimate.estimate_embeddings, (), usage.EMBEDDINGS_USAGE,
                       usage.no_text, "embedding", False, False, False),
        "responses": ("responses", estimate.estimate_responses, ("max_output_tokens",),
                      usage.RESPONSES_USAGE, usage.output_text, "chat", False, True, True),
        "messages": ("messages", messages.estimate_messages, ("max_tokens",),
                     usage.MESSAGES_USAGE, usage.messages_text, "chat", False, False, False),
    }
    assert set(BY_PATH) == set(want) and len(ROUTES) == len(want)
    for path, fields in want.items():
        route = BY_PATH[path]
        got = (route.name, route.estimate, route.output_fields, route.usage, route.answer_text,
               route.model_kind, route.ask_stream_usage, route.server_state, route.tool_fees)
        assert got == fields, path
        assert BY_NAME[route.name] is route
    assert endpoints.NAMES == ("chat", "completions", "embeddings", "responses", "messages")
    # The Anthropic route: its kind, no tokenizer (UTF-8 bytes bound a count), never
    # priced by a count alone.
    assert BY_PATH["messages"].kind is ANTHROPIC and not BY_PATH["messages"].countable
    assert all(route.kind is OPENAI and route.countable for route in ROUTES[:4])


def test_routes_registered_from_the_table() -> None:
    app = web.Application()
    setup_routes(app)
    posts = [r for r in app.router.routes() if r.method == "POST"]
    assert len(posts) == 2  # the table's pattern, and the free /v1/messages/count_tokens
    resource = posts[0].resource
    assert resource is not None
    pattern = resource.get_info()["pattern"]  # what aiohttp matches a request path with
    for route in ROUTES:
        match = pattern.fullmatch(f"/v1/{route.path}")
        assert match is not None and match["endpoint"] == route.path, route.path
    for other in ("/v1/messages/count_tokens", "/v1/chat", "/v1/completions/x",
                  "/v1/embeddings/../models"):
        assert pattern.fullmatch(other) is None, other


def test_by_name_helpers_follow_the_table() -> None:
    """``estimate("chat", ...)``, ``StreamMeter("chat")``: the same functions as the table."""
    for route in ROUTES:
        # gateway.messages builds on Estimate, so estimate's by-name table cannot hold it.
        assert estimate.ESTIMATORS.get(route.name, messages.estimate_messages) is route.estimate
        assert usage.usage_format(route.name) is route.usage
        assert usage.usage_format(route.usage) is route.usage


@pytest.mark.parametrize(("path", "body", "field", "output"), [
    ("chat/completions", {"messages": MSG}, "max_completion_tokens", 16_384),
    ("chat/completions", {"messages": MSG, "max_tokens": 7}, "max_tokens", 7),
    ("chat/completions", {"messages": MSG, "max_completion_tokens": 9, "max_tokens": 7},
     "max_completion_tokens", 9),
    ("completions", {"prompt": "Say"}, "max_tokens", 16),
    ("completions", {"prompt": "Say", "max_tokens": 5}, "max_tokens", 5),
    ("responses", {"input": "Say"}, "max_output_tokens", 16_384),
    ("responses", {"input": "Say", "max_output_tokens": 3}, "max_output_tokens", 3),
])
def test_output_bound_and_clamp_field_follow_output_fields(
        path: str, body: dict[str, Any], field: str, output: int) -> None:
    route = BY_PATH[path]
    est = route.estimate({"model": "gpt-4o", **body}, PRICE, None, 16)
    assert est.output_field == field and field in route.output_fields
    assert est.output_tokens == output
    # The first field the body sets is the one clamped, else the table's first.
    assert field == next((f for f in route.output_fields if f in body), route.output_fields[0])


def test_only_tool_fee_routes_bound_tool_fees() -> None:
    """``tool_fees`` says which estimators may return a built-in tool bound."""
    tools = {"tools": [{"type": "web_search"}], "web_search_options": {}}
    bodies = {"chat/completions": {"messages": MSG}, "completions": {"prompt": "Say"},
              "embeddings": {"input": "Say"}, "responses": {"input": "Say"},
              "messages": {"messages": MSG, "max_tokens": 10}}
    for route in ROUTES:
        price = EMBED if route.model_kind == "embedding" else PRICE
        est = route.estimate({"model": price.name, **bodies[route.path], **tools}, price, None, 4)
        assert (est.tools is not None) == route.tool_fees, route.path


def test_embeddings_have_no_output_to_bound() -> None:
    est = BY_PATH["embeddings"].estimate({"model": EMBED.name, "input": "hi"}, EMBED, None, 16)
    assert est.output_field is None and est.total_output == 0 and est.prompt_tokens > 0


def test_usage_formats_read_bodies_and_stream_events() -> None:
    chat_body = b'{"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}'
    assert usage.usage_from_body(BY_PATH["chat/completions"].usage, chat_body) == Usage(5, 0, 2)
    assert usage.usage_from_body(BY_PATH["embeddings"].usage,
                                 b'{"usage": {"prompt_tokens": 4}}') == Usage(4)
    with pytest.raises(usage.InvalidUsage):  # chat must report completion tokens
        usage.usage_from_body(BY_PATH["completions"].usage, b'{"usage": {"prompt_tokens": 4}}')
    assert usage.usage_from_body(BY_PATH["responses"].usage,
                                 b'{"usage": {"input_tokens": 3, "output_tokens": 1}}') \
        == Usage(3, 0, 1)

    chat = StreamMeter(BY_PATH["chat/completions"].usage, strip_usage_chunk=True)
    out = chat.feed(b'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\n'
                    b'data: {"choices": [], "usage": {"prompt_tokens": 5, '
                    b'"completion_tokens": 1}}\n\ndata: [DONE]\n\n')
    assert b'"usage"' not in out and chat.usage == Usage(5, 0, 1) and chat.streamed_text == "Hi"
    responses = StreamMeter(BY_PATH["responses"].usage)
    responses.feed(b'data: {"type": "response.output_text.delta", "delta": "Yo"}\n\n'
                   b'data: {"type": "response.completed", "response": {"id": "r1", '
                   b'"usage": {"input_tokens": 3, "output_tokens": 1}}}\n\n')
    assert responses.usage == Usage(3, 0, 1) and responses.streamed_text == "Yo"
    assert responses.response is not None and responses.response["id"] == "r1"


def test_answer_text_per_route() -> None:
    chat = {"choices": [{"message": {"content": "Hello"}}, {"text": " there"}]}
    responses = {"output": [{"type": "message", "content": [{"type": "output_text",
                                                            "text": "Hi"}]}]}
    assert BY_PATH["chat/completions"].answer_text(chat) == "Hello there"
    assert BY_PATH["completions"].answer_text({"choices": [{"text": "ok"}]}) == "ok"
    assert BY_PATH["responses"].answer_text(responses) == "Hi"
    assert BY_PATH["embeddings"].answer_text({"data": [{"embedding": [0.1]}]}) == ""
    for route in ROUTES:  # not JSON, or not an object: nothing to count, no exception
        assert route.answer_text(None) == "" and route.answer_text([1]) == ""


# -- the settle decision -----------------------------------------------------------------------
EST = Estimate(prompt_tokens=100, output_tokens=50)
RESERVED = PRICE.upper_bound(100, 50)


def charge(**facts: Any) -> Any:
    base: dict[str, Any] = dict(reserved=RESERVED, sent=True, answered=True, status=200,
                                reported=None, problem=None, count=lambda: 20, price=PRICE,
                                estimate=EST)
    return decide(**{**base, **facts})


def never_count() -> int:
    raise AssertionError("counted although the answer needed no counting")


def test_usage_source_values_are_the_ledger_strings() -> None:
    assert [s.value for s in UsageSource] == ["upstream", "counted", "reserved", "invalid",
                                              "none"]
    assert UsageSource.UPSTREAM == "upstream" and f"{UsageSource.COUNTED}" == "counted"


def test_not_sent_costs_nothing_and_no_answer_costs_the_bound() -> None:
    assert charge(sent=False, answered=False, count=never_count) == \
        charge(sent=False, count=never_count)
    nothing = charge(sent=False, answered=False, count=never_count)
    assert (nothing.cost, nothing.usage, nothing.source) == (0, None, UsageSource.NONE)
    unknown = charge(answered=False, status=0, count=never_count)
    assert (unknown.cost, unknown.usage, unknown.source) == (RESERVED, None,
                                                             UsageSource.RESERVED)
    assert unknown.overshoot == 0 and unknown.problems == ()


def test_believable_upstream_usage_is_charged_even_above_the_reservation() -> None:
    usage = Usage(80, 30, 40)
    up = charge(reported=usage, count=never_count)
    assert (up.cost, up.usage, up.source, up.overshoot) == (
        PRICE.cost(usage), usage, UsageSource.UPSTREAM, 0)
    # Within what the model allows but past what was reserved: charged, the excess shown.
    big = Usage(100, 0, 5_000)
    over = charge(reported=big, count=never_count)
    assert over.cost == PRICE.cost(big) and over.overshoot == PRICE.cost(big) - RESERVED > 0
    assert over.source is UsageSource.UPSTREAM
    # An error answer with a usage is billed by the upstream: charged too.
    assert charge(reported=usage, status=429, count=never_count).cost == PRICE.cost(usage)


def test_unbelievable_usage_is_counted_else_the_bound() -> None:
    impossible = Usage(100, 0, 10**6)  # past the model's max_output_tokens
    counted = charge(reported=impossible)
    assert counted.source is UsageSource.INVALID and counted.usage == Usage(100, 0, 20)
    assert counted.cost == PRICE.cost(Usage(100, 0, 20)) and "above the bound" in \
        counted.problems[0]
    malformed = charge(problem="prompt_tokens is not a token count (str)", count=lambda: 0)
    assert (malformed.cost, malformed.usage, malformed.source) == (
        RESERVED, None, UsageSource.INVALID)
    assert malformed.problems == ("prompt_tokens is not a token count (str)",)
    error = charge(problem="usage is not an object", status=500, count=never_count)
    assert (error.cost, error.source, error.problems) == (0, UsageSource.NONE,
                                                          ("usage is not an object",))


def test_no_usage_is_counted_unless_an_error_or_queued() -> None:
    counted = charge()
    assert (counted.cost, counted.usage, counted.source) == (
        PRICE.cost(Usage(100, 0, 20)), Usage(100, 0, 20), UsageSource.COUNTED)
    error = charge(status=400, count=never_count)
    assert (error.cost, error.usage, error.source) == (0, None, UsageSource.NONE)
    queued = charge(queued=True, count=never_count)
    assert (queued.cost, queued.usage, queued.source) == (RESERVED, None, UsageSource.RESERVED)
    # A queued answer that reports its usage is charged from it.
    assert charge(queued=True, reported=Usage(10, 0, 1)).source is UsageSource.UPSTREAM


def test_tool_fees_are_added_to_a_successful_answer() -> None:
    tools = bounds.responses_tools([{"type": "web_search"}], "gpt-4o", 3, 16)
    assert tools is not None
    est = Estimate(100, 50, 1, "max_output_tokens", tools)
    output = [{"type": "web_search_call"}, {"type": "web_search_call"}, {"type": "message"}]
    usage = Usage(100, 0, 10)
    for facts in ({"reported": usage}, {"count": lambda: 10}):
        got = charge(estimate=est, reserved=RESERVED + tools.fee_bound, output=output, **facts)
        assert got.fee == 2 * bounds.WEB_SEARCH and got.cost == PRICE.cost(usage) + got.fee
    # No output items to count: the fee bound, never less.
    blind = charge(estimate=est, reported=usage)
    assert blind.fee == tools.fee_bound
    # An error answer pays no tool fee.
    assert charge(estimate=est, reported=usage, status=500, output=output).fee == 0
    # Chat search: one search per answered request.
    search = bounds.chat_search({"web_search_options": {}}, "gpt-4o-search-preview", 16)
    assert search is not None
    chat = charge(estimate=Estimate(100, 50, 1, "max_tokens", search), reported=usage)
    assert chat.fee == search.per_request and chat.cost == PRICE.cost(usage) + chat.fee


def test_a_cost_past_the_ledger_is_not_believed() -> None:
    absurd = ModelPrice("m", LEDGER_MAX_COST // 10, 0, LEDGER_MAX_COST // 10)
    got = charge(price=absurd, reported=Usage(20, 0, 1))
    assert (got.cost, got.usage, got.source, got.problems) == (
        RESERVED, None, UsageSource.INVALID, (TOO_COSTLY,))
    # Counted after an unbelievable report, then too costly: both reasons are recorded.
    both = charge(price=absurd, problem="usage is not an object")
    assert both.problems == ("usage is not an object", TOO_COSTLY)


@settings(max_examples=300, deadline=None)
@given(reported=st.none() | st.builds(Usage, st.integers(0, 200_000), st.just(0),
                                      st.integers(0, 40_000)),
       problem=st.none() | st.just("bad"), counted=st.integers(0, 40_000),
       status=st.sampled_from([200, 400, 500]), queued=st.booleans(),
       sent=st.booleans(), answered=st.booleans())
def test_never_under_what_is_known(reported: Usage | None, problem: str | None, counted: int,
                                   status: int, queued: bool, sent: bool,
                                   answered: bool) -> None:
    """Never under the believable report, never under the count, the bound if nothing."""
    got = charge(reported=reported, problem=problem, count=lambda: counted, status=status,
                 queued=queued, sent=sent, answered=answered)
    assert got.overshoot == max(got.cost - RESERVED, 0)
    if not sent:
        assert got.cost == 0
    elif not answered:
        assert got.cost == RESERVED
    elif got.source is UsageSource.UPSTREAM:
        assert reported is not None and got.usage == reported
        assert got.cost >= PRICE.cost(reported)
    elif got.source in (UsageSource.COUNTED, UsageSource.INVALID) and got.usage is not None:
        assert got.cost >= PRICE.cost(Usage(EST.prompt_tokens, 0, counted))
    elif got.source in (UsageSource.INVALID, UsageSource.RESERVED):
        assert got.cost == RESERVED and got.usage is None
    else:
        assert got.source is UsageSource.NONE and got.cost == 0 and status >= 400
