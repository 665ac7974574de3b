"""True upper bounds (gateway.bounds): the image rules, tool fees, and a property test that a
request's actual cost, for any upstream answer within the provider's rules, never exceeds what
admission reserves."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import bounds, tokens
from gateway.errors import BadRequest
from gateway.estimate import estimate
from gateway.pricing import DEFAULT_MAX_INPUT_TOKENS, Usage, load_price_table, parse_price_table

ROOT = Path(__file__).resolve().parent.parent
PRICES, _ = load_price_table(ROOT / "config" / "pricing.yaml")


# -- the provider's rules, written out independently of gateway.bounds -------------------------
def doc_tiles(width: int, height: int) -> int:
    """OpenAI's tile rule as its guide words it, with pixels floored after each resize."""
    w, h = width, height
    if max(w, h) > 2048:
        w, h = (2048, h * 2048 // w) if w >= h else (w * 2048 // h, 2048)
    if min(w, h) > 768:
        w, h = (768, h * 768 // w) if w <= h else (w * 768 // h, 768)
    return -(-w // 512) * -(-h // 512)


def doc_patches(width: int, height: int) -> int:
    """OpenAI's patch rule (gpt-4.1-mini/nano, o4-mini) as its guide words it."""
    raw = -(-width // 32) * -(-height // 32)
    if raw <= 1536:
        return raw
    shrink = math.sqrt(32 * 32 * 1536 / (width * height))
    pw, ph = width * shrink / 32, height * shrink / 32
    shrink *= min(math.floor(pw) / pw, math.floor(ph) / ph)
    return min(1536, -(-int(width * shrink) // 32) * -(-int(height * shrink) // 32))


def real_image_tokens(model: str, width: int, height: int, detail: str | None) -> int | None:
    rule = bounds.image_rule(model)
    if rule is None or detail not in (None, "low", "high", "auto"):
        return None
    if isinstance(rule, bounds.PatchRule):
        return round(doc_patches(width, height) * rule.multiplier_milli / 1000)
    return rule.base if detail == "low" else rule.base + rule.per_tile * doc_tiles(width, height)


# -- images ------------------------------------------------------------------------------------
def test_most_tiles_any_image_can_have_is_eight() -> None:
    sides = sorted({*range(1, 5000, 37), 511, 512, 513, 767, 768, 769, 1023, 1024, 1025, 1535,
                    1536, 1537, 2047, 2048, 2049, 3000, 4096, 8192, 20000, 65535})
    worst = max((bounds.tiles(w, h), w, h) for w in sides for h in sides)
    assert worst[0] == bounds.MAX_TILES == 8
    assert bounds.tiles(768, 2048) == bounds.tiles(2048, 768) == 8
    # the exact-fraction count is never below the floored one the provider uses
    assert all(bounds.tiles(w, h) >= doc_tiles(w, h) for w in sides[::3] for h in sides[::3])


def test_documented_examples() -> None:
    four_o = bounds.image_rule("gpt-4o-2024-08-06")
    assert four_o == bounds.TileRule(85, 170)
    assert bounds.image_tokens(four_o, 1024, 1024, "high") == 765
    assert bounds.image_tokens(four_o, 2048, 4096, "high") == 1105
    assert bounds.image_tokens(four_o, 4096, 8192, "low") == 85
    mini = bounds.image_rule("gpt-4o-mini")
    assert bounds.image_tokens(mini, 128, 64, "high") == 2833 + 5667
    assert bounds.max_image_tokens(mini, "auto") == 2833 + 8 * 5667 == 48_169
    assert bounds.max_image_tokens(mini, "low") == 2833
    assert bounds.patches(1024, 1024) == 1024 and bounds.patches(1800, 2400) == 1452
    assert bounds.max_image_tokens(bounds.image_rule("gpt-4.1-mini"), None) == 2489
    assert bounds.max_image_tokens(bounds.image_rule("gpt-4.1-nano"), "high") == 3779
    assert bounds.max_image_tokens(bounds.image_rule("o4-mini-2025-04-16"), "low") == 2642


def test_families_resolve_like_the_price_table() -> None:
    assert bounds.image_rule("gpt-4o-mini-search-preview") == bounds.TileRule(2833, 5667)
    assert bounds.image_rule("ft:gpt-4o-mini-2024-07-18:acme::x1") == bounds.TileRule(2833, 5667)
    assert bounds.image_rule("gpt-5-mini-2025-08-07") == bounds.PatchRule(1620)
    assert bounds.image_rule("gpt-5-codex") == bounds.TileRule(70, 140)
    assert bounds.image_rule("o3-pro") == bounds.TileRule(75, 150)
    for unknown in ("gpt-5.1", "gpt-5.5-pro", "chat-latest", "llama-3", "gpt-4o1"):
        assert bounds.image_rule(unknown) is None, unknown
    assert bounds.max_image_tokens(bounds.TileRule(85, 170), "original") is None
    assert bounds.max_image_tokens(None, "low") is None


def test_uncountable_parts_are_bounded_by_the_context_window() -> None:
    price = PRICES.lookup("gpt-4o-mini")
    assert price is not None and price.max_input_tokens == 128_000

    def prompt(part: dict[str, Any], endpoint: str = "chat") -> int:
        if endpoint == "chat":
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": [part]}]}
        else:
            body = {"model": "gpt-4o-mini", "input": [{"role": "user", "content": [part]}]}
        return estimate(endpoint, body, price).prompt_tokens

    # 3 reply priming + 3 per message + 1 for "user", then the image at 8 tiles
    assert prompt({"type": "image_url", "image_url": {"url": "u"}}) == 7 + 48_169
    assert prompt({"type": "image_url", "image_url": {"url": "u", "detail": "low"}}) < 2850
    for part in ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                 {"type": "file", "file": {"file_id": "file-1"}},
                 {"type": "image_url", "image_url": {"url": "u", "detail": "original"}},
                 {"type": "hologram", "text": "not a text part"}):
        assert prompt(part) == 128_000, part
    for part in ({"type": "input_file", "file_id": "file-1"},
                 {"type": "input_file", "file_url": "https://x/a.pdf"},
                 {"type": "input_file", "file_data": "data:application/pdf;base64,AAAA"}):
        assert prompt(part, "responses") == 128_000, part
    replay = [{"role": "user", "content": "hi"}, {"role": "assistant", "audio": {"id": "audio_1"}}]
    assert estimate("chat", {"model": "gpt-4o-mini", "messages": replay}, price).prompt_tokens \
        == 128_000
    big = "word " * 200_000  # more than the window: the provider refuses it at no cost
    assert estimate("chat", {"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": big}]}, price).prompt_tokens == 128_000


def test_responses_server_side_state() -> None:
    price = PRICES.lookup("gpt-5")
    assert price is not None and price.max_input_tokens == 272_000
    base = {"model": "gpt-5", "input": "hi"}
    plain = estimate("responses", base, price).prompt_tokens
    assert plain < 20
    for extra in ({"previous_response_id": "resp_unknown"}, {"conversation": "conv_1"},
                  {"prompt": {"id": "pmpt_1"}},
                  {"input": [{"type": "item_reference", "id": "msg_1"}]},
                  {"input": [{"type": "reasoning", "id": "rs_1", "encrypted_content": "x"}]}):
        assert estimate("responses", {**base, **extra}, price).prompt_tokens == 272_000, extra
    seen = bounds.SeenResponses()
    seen.remember("resp_1", 20_000)
    known = estimate("responses", {**base, "previous_response_id": "resp_1"}, price, seen.get)
    assert known.prompt_tokens == plain + 20_000 + bounds.PREVIOUS_RESPONSE_MARGIN
    calls = [{"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
             {"type": "function_call_output", "call_id": "c1", "output": "42"}]
    assert estimate("responses", {**base, "input": calls}, price).prompt_tokens < 100


def test_seen_responses_is_bounded() -> None:
    seen = bounds.SeenResponses(max_entries=3)
    for i in range(5):
        seen.remember(f"resp_{i}", i)
    assert len(seen) == 3 and seen.get("resp_0") is None and seen.get("resp_4") == 4
    seen.remember(None, 1)
    seen.remember("x" * 300, 1)
    assert len(seen) == 3 and seen.get(["not", "a", "str"]) is None


# -- built-in tools -----------------------------------------------------------------------------
def test_tool_fees_bound_and_settle() -> None:
    price = PRICES.lookup("gpt-5")
    assert price is not None
    body = {"model": "gpt-5", "input": "search",
            "tools": [{"type": "web_search"}, {"type": "function", "name": "f"}]}
    est = estimate("responses", body, price, max_tool_calls=5)
    assert est.tools is not None and est.tools.set_max_tool_calls == 5
    assert est.fee == 5 * 10_000_000_000  # $10 / 1k calls
    assert est.prompt_tokens > 5 * 272_000  # each call reads the context again
    output = [{"type": "web_search_call"}] * 3 + [{"type": "message"}]
    assert bounds.settled_fee(est.tools, output) == 3 * 10_000_000_000
    assert bounds.settled_fee(est.tools, None) == est.fee  # nothing to count: the bound
    own = estimate("responses", {**body, "max_tool_calls": 2}, price, max_tool_calls=5)
    assert own.tools is not None and own.tools.set_max_tool_calls is None and own.fee == 2 * 10**10
    with pytest.raises(BadRequest):
        estimate("responses", {**body, "max_tool_calls": -1}, price)
    preview = estimate("responses", {"model": "gpt-4o", "input": "x", "max_tool_calls": 1,
                                     "tools": [{"type": "web_search_preview"}]},
                       PRICES.lookup("gpt-4o"))  # type: ignore[arg-type]
    assert preview.fee == 25_000_000_000
    assert estimate("responses", {**body, "tools": [{"type": "function", "name": "f"}]},
                    price).tools is None


def test_code_interpreter_is_billed_per_container() -> None:
    auto = bounds.responses_tools([{"type": "code_interpreter", "container": {"type": "auto"}}],
                                  "gpt-5", 3, 16)
    assert auto is not None and auto.fee_bound == 4 * 30_000_000_000
    assert bounds.settled_fee(auto, []) == 30_000_000_000  # the auto container, unused
    calls = [{"type": "code_interpreter_call", "container_id": "c1"}] * 2 + [
        {"type": "code_interpreter_call", "container_id": "c2"}]
    assert bounds.settled_fee(auto, calls) == 2 * 30_000_000_000
    named = bounds.responses_tools([{"type": "code_interpreter", "container": "c1"}], "gpt-5",
                                   3, 16)
    assert named is not None and bounds.settled_fee(named, calls) == 30_000_000_000
    big = bounds.responses_tools([{"type": "code_interpreter", "container": {
        "type": "auto", "memory_limit": "64g"}}], "gpt-5", 0, 16)
    assert big is not None and big.fee_bound == 1_920_000_000_000


def test_chat_search_models_carry_a_search_fee() -> None:
    price = PRICES.lookup("gpt-4o-search-preview")
    assert price is not None
    est = estimate("chat", {"model": "gpt-4o-search-preview", "messages": [
        {"role": "user", "content": "news?"}], "web_search_options": {}}, price,
        max_tool_calls=4)
    assert est.tools is not None and est.fee == 4 * 50_000_000_000
    assert est.prompt_tokens == price.max_input_tokens
    assert bounds.settled_fee(est.tools, None) == 50_000_000_000
    plain = estimate("chat", {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]},
                     PRICES.lookup("gpt-4o"))  # type: ignore[arg-type]
    assert plain.tools is None and plain.fee == 0
    assert bounds.chat_search({}, "gpt-4o-mini-search-preview-2025-03-11", 2) is not None
    assert bounds.chat_search({}, "o3-deep-research", 2) is None


def test_price_table_context_window() -> None:
    table, problems = parse_price_table({"models": {
        "a": {"input": "1", "output": "2", "max_input_tokens": 1000},
        "b": {"input": "1", "output": "2"},
        "c": {"input": "1", "output": "2", "max_input_tokens": 0},
        "d": {"input": "1", "output": "2", "max_input_tokens": "many"}}})
    assert table.lookup("a").max_input_tokens == 1000  # type: ignore[union-attr]
    assert table.lookup("b").max_input_tokens == DEFAULT_MAX_INPUT_TOKENS  # type: ignore[union-attr]
    assert len(problems) == 2 and all("max_input_tokens" in p for p in problems)
    # the shipped table has the window of every model whose source lists one
    defaulted = {p.name for p in PRICES if p.max_input_tokens == DEFAULT_MAX_INPUT_TOKENS}
    assert defaulted == {"gpt-5.5-cyber", "gpt-rosalind-discovery", "gpt-rosalind-research"}


# -- the property: actual <= reserved for every answer the rules allow --------------------------
MODELS = ["gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "o4-mini", "o3",
          "gpt-5", "gpt-5-mini", "gpt-5.1", "computer-use-preview", "gpt-3.5-turbo"]
DETAILS = st.sampled_from([None, "low", "high", "auto", "original"])
WORDS = st.text(alphabet="abcdefgh ijk\n", max_size=40)


@st.composite
def image(draw: Any, chat: bool) -> dict[str, Any]:
    size = (draw(st.integers(1, 9000)), draw(st.integers(1, 9000)))
    detail = draw(DETAILS)
    if chat:
        inner: dict[str, Any] = {"url": "https://example.com/i.png"}
        if detail is not None:
            inner["detail"] = detail
        part: dict[str, Any] = {"type": "image_url", "image_url": inner}
    else:
        part = {"type": "input_image", "image_url": "https://example.com/i.png"}
        if detail is not None:
            part["detail"] = detail
    part["_size"] = size  # what the upstream sees; not sent
    return part


@st.composite
def part(draw: Any, chat: bool) -> dict[str, Any]:
    kind = draw(st.sampled_from(["text", "text", "image", "audio", "file"]))
    if kind == "text":
        return {"type": "text" if chat else "input_text", "text": draw(WORDS)}
    if kind == "image":
        return draw(IMAGES[chat])
    if kind == "audio":
        return {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
    if chat:
        return {"type": "file", "file": {"file_id": "file-abc"}}
    return {"type": "input_file", "file_id": "file-abc"}


IMAGES = {True: image(True), False: image(False)}
PARTS = {True: st.lists(part(True), min_size=1, max_size=3),
         False: st.lists(part(False), min_size=1, max_size=3)}
TOOLS = [{"type": "web_search"}, {"type": "web_search_preview"}, {"type": "file_search",
         "vector_store_ids": ["vs_1"]}, {"type": "code_interpreter", "container": {"type": "auto"}},
         {"type": "code_interpreter", "container": {"type": "auto", "memory_limit": "4g"}},
         {"type": "function", "name": "lookup", "parameters": {}}, {"type": "mcp",
         "server_label": "x", "server_url": "https://mcp.example.com"}]
CALL_ITEMS = ["web_search_call", "file_search_call", "code_interpreter_call", "mcp_call",
              "function_call"]


@st.composite
def request(draw: Any) -> tuple[str, dict[str, Any]]:
    endpoint = draw(st.sampled_from(["chat", "responses"]))
    chat = endpoint == "chat"
    model = draw(st.sampled_from(MODELS))
    messages = [{"role": draw(st.sampled_from(["user", "system", "assistant"])),
                 "content": draw(st.one_of(WORDS, PARTS[chat]))}
                for _ in range(draw(st.integers(1, 3)))]
    body: dict[str, Any] = {"model": model}
    if chat:
        body["messages"] = messages
        if draw(st.booleans()):
            body["n"] = draw(st.integers(1, 3))
        limit = draw(st.one_of(st.none(), st.integers(1, 5000)))
        if limit is not None:
            body[draw(st.sampled_from(["max_tokens", "max_completion_tokens"]))] = limit
        if draw(st.integers(0, 9)) == 0:
            body["web_search_options"] = {}
    else:
        body["input"] = messages
        if draw(st.booleans()):
            body["instructions"] = draw(WORDS)
        if draw(st.booleans()):
            body["max_output_tokens"] = draw(st.integers(1, 5000))
        tools = draw(st.lists(st.sampled_from(TOOLS), max_size=3))
        if tools:
            body["tools"] = tools
            if draw(st.booleans()):
                body["max_tool_calls"] = draw(st.integers(0, 4))
        state = draw(st.sampled_from([None, "seen", "seen", "unseen", "conversation"]))
        if state == "seen":
            body["previous_response_id"] = "resp_seen"
        elif state == "unseen":
            body["previous_response_id"] = "resp_other_replica"
        elif state == "conversation":
            body["conversation"] = "conv_1"
    if draw(st.integers(0, 4)) == 0:
        body["service_tier"] = draw(st.sampled_from(["auto", "flex", "priority", "default"]))
    return endpoint, body


def strip_sizes(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: strip_sizes(v) for k, v in value.items() if k != "_size"}
    if isinstance(value, list):
        return [strip_sizes(v) for v in value]
    return value


def walk_parts(body: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for message in body.get("messages") or body.get("input") or []:
        content = message.get("content")
        if isinstance(content, list):
            found.extend(p for p in content if p.get("type") not in ("text", "input_text"))
    return found


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request(), st.data())
def test_actual_cost_never_exceeds_the_reserved_bound(req: tuple[str, dict[str, Any]],
                                                      data: st.DataObject) -> None:
    endpoint, raw = req
    body = strip_sizes(raw)
    model = body["model"]
    price = PRICES.lookup(model)
    assert price is not None
    seen = bounds.SeenResponses()
    history = data.draw(st.integers(0, 50_000), label="history of resp_seen")
    seen.remember("resp_seen", history)
    est = estimate(endpoint, body, price, seen.get, max_tool_calls=6)
    tier = body.get("service_tier")
    reserved = price.upper_bound(est.prompt_tokens, est.total_output, tier, est.fee)

    # The upstream: text as tiktoken counts it, images by the provider's rule for their pixel
    # size, audio/files/unknown state anything up to the context window, one model call never
    # above the context window (a larger prompt is refused and costs nothing).
    ctx = price.max_input_tokens
    enc = tokens.encoding(price.encoding)
    if endpoint == "chat":
        text = tokens.count_messages(body["messages"], enc)
    else:
        text = tokens.count_responses_input(body["input"], enc, body.get("instructions"),
                                            body.get("tools"))
    def upto(n: int, label: str) -> int:
        """Anything the rules allow, and often the most: an upstream that bills to the limit."""
        n = max(n, 0)
        return n if data.draw(st.booleans(), label=label) else data.draw(st.integers(0, n))

    prompt = text
    for p in walk_parts(raw):
        real = None
        if p.get("type") in bounds.IMAGE_PART_TYPES:
            real = real_image_tokens(model, *p["_size"], bounds.image_detail(p))
        prompt += real if real is not None else upto(ctx - prompt, "part")
    if body.get("previous_response_id") == "resp_seen":
        prompt += upto(history, "history billed")
    elif body.get("previous_response_id") or body.get("conversation"):
        prompt += upto(ctx - prompt, "server-side state")
    if est.tools is not None and endpoint == "chat":
        prompt += upto(ctx - prompt, "search content")
    if prompt > ctx:
        return  # refused by the provider: nothing billed
    fee, output = 0, None
    if est.tools is not None and endpoint == "responses":
        limit = body.get("max_tool_calls", 6)
        items = data.draw(st.lists(st.sampled_from(CALL_ITEMS), max_size=limit), label="calls")
        output = [{"type": t, "container_id": data.draw(st.sampled_from(["c1", "c2", "c3"]))}
                  for t in items]
        for item in items:  # every built-in call makes the model read up to one more window
            if item != "function_call":
                prompt += upto(ctx, "tool round")
    if est.tools is not None:
        fee = bounds.settled_fee(est.tools, output)
    completion = sum(upto(est.output_tokens, "out") for _ in range(body.get("n", 1)))
    cached = data.draw(st.one_of(st.just(0), st.integers(0, prompt)), label="cached")
    actual_tier = tier if tier != "auto" else data.draw(
        st.sampled_from([None, "flex", "priority"]), label="served tier")
    actual = price.cost(Usage(prompt, cached, completion, 0), actual_tier) + fee
    assert actual <= reserved, (actual, reserved, est)
