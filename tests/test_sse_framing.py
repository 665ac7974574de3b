"""SSE framed the way the WHATWG spec allows (LF, CRLF, CR, mixed), and streams whatever the
upstream's content type says: usage is read, the bytes reach the client untouched, and the usage
chunk the gateway asked for is removed for a client that did not ask for it."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from gateway.pricing import Usage
from gateway.usage import StreamMeter, sse_data
from tests.harness import Stack
from tests.hostile import (
    Hostile,
    Plan,
    chat_stream,
    hostile_stack,
    responses_stream,
    settled_rows,
)

MESSAGES = [{"role": "user", "content": "Say hello."}]
USAGE = b'{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12,' \
        b'"prompt_tokens_details":{"cached_tokens":2}}'
FRAMINGS = {"lf": b"\n", "crlf": b"\r\n", "cr": b"\r"}


def feed_in_pieces(meter: StreamMeter, data: bytes, size: int) -> bytes:
    out = b"".join(meter.feed(data[i:i + size]) for i in range(0, len(data), size))
    return out + meter.finish()


# -- the meter, pure ------------------------------------------------------------------------
@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize("size", [1, 2, 3, 7, 4096])
def test_meter_reads_usage_and_strips_only_the_usage_chunk(framing: str, size: int) -> None:
    nl = FRAMINGS[framing]
    stream = chat_stream(Plan(usage=USAGE, newline=nl), include_usage=True)
    without = chat_stream(Plan(usage=None, newline=nl), include_usage=True)
    meter = StreamMeter("chat", strip_usage_chunk=True)
    out = feed_in_pieces(meter, stream, size)
    assert meter.usage == Usage(9, 2, 3, 0) and meter.invalid is None
    assert meter.streamed_text == "Hello there!"
    assert out == without  # exactly the upstream bytes minus the usage event
    keep = StreamMeter("chat")
    assert feed_in_pieces(keep, stream, size) == stream
    assert keep.usage == Usage(9, 2, 3, 0)


@pytest.mark.parametrize("size", [1, 5, 4096])
def test_meter_mixed_line_endings_and_cr_split_from_lf(size: int) -> None:
    usage_event = b'data: {"choices":[],"usage":' + USAGE + b"}"
    text = b'data: {"choices":[{"delta":{"content":"a"}}]}'
    # Events ended by CR CRLF, LF CR, CRLF LF and CR CR; the usage event ends with a lone CR
    # then CRLF ("\r\r\n"), so a piece boundary can fall between its CR and LF.
    stream = (text + b"\r\r\n" + text + b"\n\r" + b": comment\r\n" + text + b"\r\n\n"
              + usage_event + b"\r\r\n" + b"data: [DONE]\r\r")
    meter = StreamMeter("chat", strip_usage_chunk=True)
    out = feed_in_pieces(meter, stream, size)
    assert meter.usage == Usage(9, 2, 3, 0) and meter.streamed_text == "aaa"
    assert out == stream.replace(usage_event + b"\r\r\n", b"")


def test_meter_lf_after_a_dropped_cr_event_comes_alone() -> None:
    usage_event = b'data: {"choices":[],"usage":' + USAGE + b"}"
    meter = StreamMeter("chat", strip_usage_chunk=True)
    out = meter.feed(usage_event + b"\n\r")  # ends in CR: an LF may complete it
    out += meter.feed(b"\n")                  # it does: dropped with the usage event
    out += meter.feed(b"\ndata: [DONE]\n\n")  # a blank line of its own: forwarded
    assert out + meter.finish() == b"\ndata: [DONE]\n\n" and meter.usage is not None


def test_meter_responses_events_with_crlf() -> None:
    stream = responses_stream(Plan(newline=b"\r\n", usage=b'{"input_tokens":4,'
                                   b'"output_tokens":9,"output_tokens_details":'
                                   b'{"reasoning_tokens":3}}'))
    meter = StreamMeter("responses")
    assert feed_in_pieces(meter, stream, 3) == stream
    assert meter.usage == Usage(4, 0, 9, 3) and meter.streamed_text == "Hello there!"


def test_sse_data_field_rules() -> None:
    assert sse_data(b"data:x") == b"x"
    assert sse_data(b"data:  two spaces") == b" two spaces"  # only one space is removed
    assert sse_data(b"data: a\r\ndata: b\rdata\ndata:c") == b"a\nb\n\nc"
    assert sse_data(b": comment\nevent: x\nid: 4\ndatum: no") == b""
    meter = StreamMeter("chat")
    bom = b"\xef\xbb\xbfdata: " + b'{"choices":[],"usage":' + USAGE + b"}\n\n"
    assert meter.feed(bom) == bom and meter.usage == Usage(9, 2, 3, 0)


# -- through the gateway, with the openai SDK ------------------------------------------------
@pytest.fixture
def hostile(stack: Stack) -> Iterator[Hostile]:
    h = hostile_stack(stack, Plan(usage=USAGE))
    yield h
    h.close()


CASES = {
    "crlf": {"newline": b"\r\n"},
    "cr": {"newline": b"\r", "piece": 5},
    "crlf-split": {"newline": b"\r\n", "piece": 3},
    "text-plain": {"content_type": "text/plain; charset=utf-8"},
    "octet-stream": {"content_type": "application/octet-stream", "newline": b"\r\n"},
    "no-content-type": {"content_type": None},
}


@pytest.mark.parametrize("case", CASES)
def test_stream_through_gateway_is_charged_from_upstream_usage(
        stack: Stack, hostile: Hostile, case: str) -> None:
    for name, value in CASES[case].items():
        setattr(hostile.plan, name, value)
    chunks = list(stack.client().chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=20, stream=True))
    # The client did not ask for usage: it never sees the chunk the gateway asked for.
    assert chunks and all(c.usage is None and c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello there!"
    assert hostile.plan.requests[-1]["stream_options"] == {"include_usage": True}
    [row] = settled_rows(stack)
    price = stack.gw.prices.lookup("gpt-4o-mini")
    assert price is not None
    assert (row.usage_source, row.prompt_tokens, row.cached_tokens, row.completion_tokens) == (
        "upstream", 9, 2, 3)
    assert row.cost == price.cost(Usage(9, 2, 3, 0)) and row.overshoot == 0


def test_client_that_asked_for_usage_gets_it_with_crlf(stack: Stack, hostile: Hostile) -> None:
    hostile.plan.newline = b"\r\n"
    chunks = list(stack.client().chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=20, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    assert settled_rows(stack)[0].usage_source == "upstream"


def test_responses_stream_framed_with_cr(stack: Stack, hostile: Hostile) -> None:
    hostile.plan.newline = b"\r"
    hostile.plan.usage = b'{"input_tokens":7,"output_tokens":5,"total_tokens":12}'
    events = list(stack.client().responses.create(model="gpt-4o-mini", input="hi",
                                                   max_output_tokens=50, stream=True))
    assert events[-1].type == "response.completed"
    [row] = settled_rows(stack)
    assert (row.usage_source, row.prompt_tokens, row.completion_tokens) == ("upstream", 7, 5)


def test_upstream_error_json_stays_json_for_a_stream_request(
        stack: Stack, hostile: Hostile) -> None:
    hostile.plan.status = 400
    with pytest.raises(openai.BadRequestError) as exc:
        list(stack.client().chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=20, stream=True))
    assert exc.value.status_code == 400 and "bad things" in str(exc.value)
    [row] = settled_rows(stack)
    assert (row.status, row.cost, row.usage_source) == (400, 0, "none")
