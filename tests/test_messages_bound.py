"""The Anthropic side's pure core: the admission bound is a true upper bound (property test),
cost is usage x price exactly for every usage field combination (table-driven), and streams
are metered from ``message_start`` and the cumulative ``message_delta`` (overwrite, never add),
whatever the SSE framing."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import fake_anthropic, messages, tokens
from gateway.errors import BadRequest
from gateway.pricing import load_price_table
from gateway.usage import InvalidUsage, StreamMeter, usage_from_messages

ROOT = Path(__file__).resolve().parent.parent
TABLE, _ = load_price_table(ROOT / "config" / "pricing.yaml")
SONNET = TABLE.lookup("claude-sonnet-4-5")
SONNET5 = TABLE.lookup("claude-sonnet-5")  # has web search and US-only inference prices
HAIKU55 = TABLE.lookup("claude-haiku-5-5")
assert SONNET is not None and HAIKU55 is not None and SONNET5 is not None

# -- the bound -----------------------------------------------------------------------------------
# What the provider can bill, written out independently of gateway.messages: the worst
# byte-level tokenizer (one token per UTF-8 byte of every text, key and value the request
# carries) plus the overheads Anthropic documents or count_tokens reports: a few tokens per
# message and block, the tool-use system prompt (346 at most), 4,784 per image.
WORST_MESSAGE, WORST_BLOCK, WORST_TOOLS, WORST_IMAGE = 8, 4, 346, 4_784


def worst_case(body: dict[str, Any]) -> int:
    def blocks(content: Any) -> int:
        if isinstance(content, str):
            return WORST_BLOCK + len(content.encode())
        total = 0
        for block in content:
            total += WORST_BLOCK
            if block["type"] == "image":
                total += WORST_IMAGE
            elif block["type"] == "tool_result":
                total += len(block["tool_use_id"].encode()) + blocks(block["content"])
            elif block["type"] == "tool_use":
                total += len((block["id"] + block["name"]).encode()) + len(
                    orjson.dumps(block["input"]))
            else:
                total += len(block["text"].encode())
        return total

    total = 16 + sum(WORST_MESSAGE + blocks(m["content"]) for m in body["messages"])
    if "system" in body:
        total += WORST_BLOCK + len(body["system"].encode())
    if body.get("tools"):
        total += WORST_TOOLS + len(orjson.dumps(body["tools"]))
    return total


texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)
text_block = st.builds(lambda t: {"type": "text", "text": t}, texts)
image_block = st.just({"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                   "data": "iVBORw0KGgo="}})
json_values = st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | texts,
                           lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(texts, inner, max_size=3), max_leaves=8)
tool_use = st.builds(lambda n, v: {"type": "tool_use", "id": "toolu_1", "name": n,
                                   "input": {"v": v}}, texts, json_values)
tool_result = st.builds(lambda c: {"type": "tool_result", "tool_use_id": "toolu_1",
                                   "content": c}, st.lists(text_block | image_block, max_size=2)
                        | texts)
content = texts | st.lists(text_block | image_block | tool_use | tool_result, min_size=1,
                           max_size=4)
message = st.builds(lambda r, c: {"role": r, "content": c}, st.sampled_from(["user",
                                                                             "assistant"]),
                    content)
tool = st.builds(lambda n, d, s: {"name": n, "description": d, "input_schema": {
    "type": "object", "properties": s}}, texts, texts, st.dictionaries(texts, json_values,
                                                                        max_size=3))


@settings(max_examples=300, deadline=None)
@given(st.lists(message, min_size=1, max_size=5), st.none() | texts,
       st.lists(tool, max_size=3), st.integers(1, 64_000))
def test_bound_is_above_what_any_byte_tokenizer_and_the_simulator_bill(
        msgs: list[Any], system: str | None, tools: list[Any], max_tokens: int) -> None:
    body: dict[str, Any] = {"model": "claude-sonnet-4-5", "max_tokens": max_tokens,
                            "messages": msgs}
    if system is not None:
        body["system"] = system
    if tools:
        body["tools"] = tools
    est = messages.estimate_messages(body, SONNET)
    assert est.output_tokens == max_tokens and est.output_field == "max_tokens"
    # The window caps the bound: a larger prompt is refused by the API at no cost.
    billable = min(worst_case(body), SONNET.max_input_tokens)
    assert billable <= est.prompt_tokens
    assert fake_anthropic.input_tokens(body) <= est.prompt_tokens
    for enc in ("o200k_base", "cl100k_base"):  # real BPE tokenizers: never above the bytes
        for m in msgs:
            if isinstance(m["content"], str):
                assert tokens.count_text(m["content"], tokens.encoding(enc)) <= len(
                    m["content"].encode())


def test_what_the_bytes_cannot_bound_is_the_window() -> None:
    pdf = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                          "data": "JVBERi0="}}
    by_id = {"type": "image", "source": {"type": "file", "file_id": "file_1"}}
    for block in (pdf, {"type": "container_upload", "file_id": "f"}, {"type": "new_kind"}):
        est = messages.estimate_messages({"max_tokens": 5, "messages": [
            {"role": "user", "content": [block]}]}, SONNET)
        assert est.prompt_tokens == SONNET.max_input_tokens, block
    est = messages.estimate_messages({"max_tokens": 5, "messages": [
        {"role": "user", "content": [by_id]}]}, SONNET)
    assert est.prompt_tokens < 10_000  # an image is an image wherever it is stored
    text_doc = {"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                               "data": "x" * 1000},
                "citations": {"enabled": True}}
    est = messages.estimate_messages({"max_tokens": 5, "messages": [
        {"role": "user", "content": [text_doc]}]}, SONNET)
    assert est.prompt_tokens >= 2000  # citations re-chunk the text: twice its bytes


def test_server_tools_bound_each_round_and_forward_max_uses() -> None:
    body = {"max_tokens": 100, "messages": [{"role": "user", "content": "news?"}],
            "tools": [{"type": "web_search_20250305", "name": "web_search"},
                      {"name": "mine", "input_schema": {"type": "object"}}]}
    est = messages.estimate_messages(body, SONNET, None, 4)
    assert est.prompt_tokens == SONNET.max_input_tokens * 5
    assert est.extra_fee == 4 * SONNET.web_search == 4 * 10**10  # $0.01 per search
    assert est.set_fields["tools"][0]["max_uses"] == 4
    assert "max_uses" not in est.set_fields["tools"][1]
    est = messages.estimate_messages({**body, "tools": [{"type": "code_execution_20250825",
                                                         "name": "code"}]}, SONNET, None, 4)
    assert est.prompt_tokens == SONNET.max_input_tokens * (messages.SERVER_LOOP_ROUNDS + 1)


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({"max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({"max_tokens": True, "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({"max_tokens": 5, "messages": []}, "messages"),
    ({"max_tokens": 5, "messages": [{"role": "robot", "content": "x"}]}, "messages.0"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"text": "x"}]}]},
     "messages.0.content.0"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "messages.0.content.0.text"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image"}]}]},
     "messages.0.content.0.source"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "system": 5}, "system"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "tools": {}}, "tools"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "speed": "fast"},
     "speed"),
])
def test_malformed_requests_are_400s(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as info:
        messages.estimate_messages(body, SONNET)
    assert info.value.param == param


# -- cost = usage x price, exactly ---------------------------------------------------------------
def decimal_cost(entry: dict[str, str], usage: dict[str, Any], geo: str = "") -> Decimal:
    """The contract's formula with the table's decimal strings (USD)."""
    per = {k: Decimal(v) / 10**6 for k, v in entry.items() if isinstance(v, str)}
    split = usage.get("cache_creation") or {}
    w1h = split.get("ephemeral_1h_input_tokens", 0)
    w5m = split.get("ephemeral_5m_input_tokens", 0)
    creation = max(usage.get("cache_creation_input_tokens") or 0, w5m + w1h)
    usd = (usage["input_tokens"] * per["input"] + usage["output_tokens"] * per["output"]
           + (usage.get("cache_read_input_tokens") or 0) * per["cache_read"]
           + (creation - w1h) * per["cache_write_5m"] + w1h * per["cache_write_1h"]
           + (usage.get("server_tool_use") or {}).get("web_search_requests", 0)
           * Decimal("0.01"))
    return usd * Decimal("1.1") if geo == "us" else usd


SONNET5_ENTRY = {"input": "2", "output": "10", "cache_read": "0.2", "cache_write_5m": "2.5",
                 "cache_write_1h": "4"}
SONNET_ENTRY = {"input": "3", "output": "15", "cache_read": "0.3", "cache_write_5m": "3.75",
                "cache_write_1h": "6"}
HAIKU_LONG = {"input": "0.5", "output": "2.5", "cache_read": "0.05", "cache_write_5m": "0.625",
              "cache_write_1h": "1"}
CASES = [
    {"input_tokens": 10, "output_tokens": 5},
    {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 1000},
    {"input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 300},
    {"input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 300,
     "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200}},
    # LiteLLM #42663: the total beyond the split (server tools): priced at 5m, never zero
    {"input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 900,
     "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200}},
    {"input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 0,
     "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 70}},
    {"input_tokens": 0, "output_tokens": 1, "cache_creation_input_tokens": 50,
     "cache_read_input_tokens": 7, "cache_creation": {"ephemeral_5m_input_tokens": 0,
                                                     "ephemeral_1h_input_tokens": 50}},
    {"input_tokens": 3, "output_tokens": 400, "output_tokens_details": {"thinking_tokens": 300},
     "cache_creation_input_tokens": None, "cache_read_input_tokens": None},
    {"input_tokens": 3, "output_tokens": 9, "server_tool_use": {"web_search_requests": 2,
                                                                "web_fetch_requests": 1}},
]


@pytest.mark.parametrize("usage", CASES)
@pytest.mark.parametrize("geo", ["", "us", "global"])
def test_cost_is_usage_times_price(usage: dict[str, Any], geo: str) -> None:
    raw = {**usage, "inference_geo": geo} if geo else usage
    parsed = usage_from_messages(raw)
    assert parsed is not None
    assert Fraction(SONNET5.cost(parsed)) == Fraction(decimal_cost(SONNET5_ENTRY, usage, geo)
                                                      * 10**12)
    if not usage.get("server_tool_use"):  # no web search price in its entry
        assert Fraction(SONNET.cost(parsed)) == Fraction(decimal_cost(SONNET_ENTRY, usage)
                                                         * 10**12)


def test_long_context_prices_the_whole_request_at_its_tier() -> None:
    short = {"input_tokens": 100_000, "output_tokens": 10}
    long = {"input_tokens": 60_000, "cache_read_input_tokens": 40_001, "output_tokens": 10}
    cheap = {"input": "0.1", "output": "0.5", "cache_read": "0.01", "cache_write_5m": "0.125",
             "cache_write_1h": "0.2"}
    for usage, entry in ((short, cheap), (long, HAIKU_LONG)):
        parsed = usage_from_messages(usage)
        assert parsed is not None
        assert HAIKU55.cost(parsed) == decimal_cost(entry, usage) * 10**12
    # The bound prices a prompt past the threshold at the tier's dearest input-side price.
    assert HAIKU55.upper_bound(200_000, 10) >= HAIKU55.cost(usage_from_messages(  # type: ignore[arg-type]
        {"input_tokens": 0, "cache_creation_input_tokens": 200_000, "output_tokens": 10,
         "cache_creation": {"ephemeral_5m_input_tokens": 0,
                            "ephemeral_1h_input_tokens": 200_000}, "inference_geo": "us"}))


@pytest.mark.parametrize("usage, why", [
    ({"output_tokens": 5}, "input_tokens"),
    ({"input_tokens": "5", "output_tokens": 5}, "input_tokens"),
    ({"input_tokens": 5, "output_tokens": -1}, "output_tokens"),
    ({"input_tokens": 5, "output_tokens": 5, "cache_read_input_tokens": 1.5},
     "cache_read_input_tokens"),
    ({"input_tokens": 5, "output_tokens": 5, "cache_creation": []}, "cache_creation"),
    ({"input_tokens": 5, "output_tokens": 5, "output_tokens_details": {"thinking_tokens": 9}},
     "thinking"),
])
def test_malformed_usage_is_not_believed(usage: dict[str, Any], why: str) -> None:
    with pytest.raises(InvalidUsage, match=why):
        usage_from_messages(usage)


# -- streams -------------------------------------------------------------------------------------
def stream(nl: bytes, deltas: list[dict[str, Any]]) -> bytes:
    start = {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "content": [],
        "usage": {"input_tokens": 10, "output_tokens": 1, "cache_read_input_tokens": 20,
                  "cache_creation_input_tokens": 30,
                  "cache_creation": {"ephemeral_5m_input_tokens": 10,
                                     "ephemeral_1h_input_tokens": 20}}}}
    events = [start, {"type": "content_block_start", "index": 0,
                      "content_block": {"type": "text", "text": ""}}, {"type": "ping"},
              {"type": "content_block_delta", "index": 0,
               "delta": {"type": "text_delta", "text": "Hello"}},
              {"type": "content_block_delta", "index": 0,
               "delta": {"type": "thinking_delta", "thinking": "hmm"}},
              {"type": "content_block_stop", "index": 0}, *deltas, {"type": "message_stop"}]
    return b"".join(b"event: " + e["type"].encode() + nl + b"data: " + orjson.dumps(e) + nl
                    + nl for e in events)


FINAL = {"input_tokens": 10, "output_tokens": 42, "cache_read_input_tokens": 20,
         "cache_creation_input_tokens": 30,
         "cache_creation": {"ephemeral_5m_input_tokens": 10, "ephemeral_1h_input_tokens": 20}}


@pytest.mark.parametrize("nl", [b"\n", b"\r\n", b"\r"])
@pytest.mark.parametrize("piece", [1, 7, 10_000])
def test_stream_usage_is_the_cumulative_delta_overwritten(nl: bytes, piece: int) -> None:
    # Two message_deltas: cumulative, so the second replaces the first (never 17 + 42).
    body = stream(nl, [{"type": "message_delta", "delta": {"stop_reason": None},
                        "usage": {"output_tokens": 17}},
                       {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                        "usage": {"output_tokens": 42, "input_tokens": 10}}])
    meter = StreamMeter("messages")
    out = b"".join(meter.feed(body[i:i + piece]) for i in range(0, len(body), piece))
    out += meter.finish()
    assert out == body, "bytes relayed as they came"
    assert meter.usage == usage_from_messages(FINAL)
    assert SONNET.cost(meter.usage) == decimal_cost(SONNET_ENTRY, FINAL) * 10**12
    assert meter.partial is not None and meter.partial.completion_tokens == 1
    assert meter.streamed_text == "Hellohmm"


def test_a_stream_cut_before_its_end_keeps_only_the_partial() -> None:
    body = stream(b"\n", [])
    cut = body[: body.index(b"event: content_block_stop")]
    meter = StreamMeter("messages")
    meter.feed(cut)
    meter.finish()
    assert meter.usage is None and meter.partial is not None
    assert (meter.partial.prompt_tokens, meter.partial.cached_tokens) == (60, 20)
    assert meter.partial.cache_write_1h_tokens == 20


def test_admission_bound_covers_the_dearest_input_side_price() -> None:
    est = messages.estimate_messages({"max_tokens": 10, "messages": [
        {"role": "user", "content": "hi"}]}, SONNET)
    worst = {"input_tokens": 0, "output_tokens": 10, "cache_creation_input_tokens":
             est.prompt_tokens, "cache_creation": {"ephemeral_5m_input_tokens": 0,
                                                   "ephemeral_1h_input_tokens":
                                                   est.prompt_tokens}, "inference_geo": "us"}
    parsed = usage_from_messages(worst)
    assert parsed is not None
    assert SONNET.cost(parsed) <= SONNET.upper_bound(est.prompt_tokens, est.total_output)
