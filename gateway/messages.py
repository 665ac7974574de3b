"""The admission bound of an Anthropic Messages request, without an Anthropic tokenizer; pure.

No Anthropic tokenizer ships offline, so text is bounded instead of counted: **a token is at
least one byte** of the UTF-8 text it stands for (Claude's tokenizer is a byte-level BPE: no
token of text is empty), so a text's UTF-8 length bounds its tokens. On top of that, fixed
overheads bound what the API adds around the text (role and block markers, the tool-use
system prompt, JSON rendered in another shape), each chosen well above what count_tokens
reports for it. What cannot be bounded by its bytes is bounded by a documented maximum
(an image: 4,800 tokens) or by the model's context window (a PDF, a file by id, an unknown
block type). A prompt over the context window is refused by the API at no cost, so without
server tools one request's input is at most the window. docs/hard-cap.md has the table and
tests/test_messages_bound.py the property test.

Server tools (web search, web fetch, code execution, ...) run a sampling loop inside one
request: each round reads the context again. Their bound is one context window per round:
``max_uses`` for web search and web fetch (costwall forwards ``budgets.max_tool_calls`` as
``max_uses`` when a tool sets none), ``SERVER_LOOP_ROUNDS`` otherwise; web searches add their
per-search price (``web_search_usd``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from gateway.errors import BadRequest
from gateway.estimate import Estimate
from gateway.pricing import ModelPrice

OUTPUT_FIELDS = ("max_tokens",)
REQUEST_OVERHEAD = 64     # the request's framing; count_tokens reports ~8 for one "hi"
MESSAGE_OVERHEAD = 16     # role markers around one message
BLOCK_OVERHEAD = 16       # one content block's markers
VALUE_OVERHEAD = 8        # one JSON key, value or array item when rendered otherwise
TOOLS_OVERHEAD = 1_024    # the tool-use system prompt (documented: 346 tokens at most)
SCHEMA_OVERHEAD = 1_024   # structured outputs' format instructions
IMAGE_TOKENS = 4_800      # the high-resolution tier's maximum is 4,784 (2,576 px long edge)
SERVER_LOOP_ROUNDS = 10   # the API's server-tool sampling loop pauses after 10 rounds
# Anthropic-defined tools the client runs itself: the response ends at the call.
CLIENT_TOOL_TYPES = ("custom", "bash_", "text_editor_", "computer_", "memory_")
USES_TOOLS = ("web_search_", "web_fetch_")  # server tools that take ``max_uses``
# Block types whose content costwall cannot see (files by id, containers) or does not know.
_TEXT_FIELDS = ("text", "thinking", "signature", "title", "context", "tool_use_id", "name")


class _Bound:
    """Running prompt bound; ``window`` set when only the context window bounds it."""

    def __init__(self) -> None:
        self.tokens = REQUEST_OVERHEAD
        self.window = False

    def text(self, value: Any, where: str) -> None:
        if not isinstance(value, str):
            raise BadRequest(f"'{where}' must be a string.", param=where)
        self.tokens += len(value.encode("utf-8", "surrogatepass"))

    def json(self, value: Any) -> None:
        self.tokens += json_bound(value)


def json_bound(value: Any) -> int:
    """Tokens a JSON value can take however it is rendered: its bytes (strings and keys),
    plus ``VALUE_OVERHEAD`` per key, value and item (quotes, brackets, tags around them)."""
    if isinstance(value, str):
        return VALUE_OVERHEAD + len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, Mapping):
        return VALUE_OVERHEAD + sum(json_bound(str(k)) + json_bound(v) for k, v in value.items())
    if isinstance(value, list):
        return VALUE_OVERHEAD + sum(json_bound(item) for item in value)
    return VALUE_OVERHEAD + len(str(value))


def _blocks(content: Any, bound: _Bound, where: str) -> None:
    """A message's (or a tool result's) content: a string or a list of content blocks."""
    if isinstance(content, str):
        bound.tokens += BLOCK_OVERHEAD
        bound.text(content, where)
        return
    if not isinstance(content, list):
        raise BadRequest(f"'{where}' must be a string or an array of content blocks.",
                         param=where)
    for i, block in enumerate(content):
        _block(block, bound, f"{where}.{i}")


def _block(block: Any, bound: _Bound, where: str) -> None:
    if not isinstance(block, Mapping) or not isinstance(block.get("type"), str):
        raise BadRequest(f"'{where}' must be a content block object with a 'type'.",
                         param=where)
    kind = block["type"]
    bound.tokens += BLOCK_OVERHEAD
    if kind == "text":
        bound.text(block.get("text"), f"{where}.text")
    elif kind == "image":
        _source(block, where)
        bound.tokens += IMAGE_TOKENS
    elif kind in ("document", "search_result"):
        _document(block, bound, where)
    elif kind in ("tool_use", "server_tool_use", "mcp_tool_use"):
        for name in ("id", "name", "server_name"):
            if isinstance(block.get(name), str):
                bound.text(block[name], f"{where}.{name}")
        bound.json(block.get("input"))
    elif kind in ("tool_result", "mcp_tool_result"):
        if isinstance(block.get("tool_use_id"), str):
            bound.text(block["tool_use_id"], f"{where}.tool_use_id")
        if block.get("content") is not None:
            _blocks(block["content"], bound, f"{where}.content")
    elif kind == "thinking":
        bound.text(block.get("thinking"), f"{where}.thinking")
        if block.get("signature") is not None:
            bound.text(block["signature"], f"{where}.signature")
    elif kind == "redacted_thinking" or kind.endswith("_tool_result"):
        # Encrypted content carried back (thinking, search results): twice its JSON bytes.
        bound.tokens += 2 * json_bound(dict(block))
    else:  # files by id, container uploads, block types costwall does not know
        bound.window = True


def _source(block: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    source = block.get("source")
    if not isinstance(source, Mapping) or not isinstance(source.get("type"), str):
        raise BadRequest(f"'{where}.source' must be an object with a 'type'.",
                         param=f"{where}.source")
    return source


def _document(block: Mapping[str, Any], bound: _Bound, where: str) -> None:
    """A text document is its bytes (twice with citations: the text is re-chunked with
    markers); inline content blocks recursively; a PDF, a URL or a file: the window."""
    if block["type"] == "search_result":
        source: Mapping[str, Any] = {"type": "content", "content": block.get("content")}
        if isinstance(block.get("source"), str):
            bound.text(block["source"], f"{where}.source")
    else:
        source = _source(block, where)
    for name in ("title", "context"):
        if block.get(name) is not None:
            bound.text(block[name], f"{where}.{name}")
    before = bound.tokens
    if source["type"] == "text":
        bound.text(source.get("data"), f"{where}.source.data")
    elif source["type"] == "content":
        _blocks(source.get("content"), bound, f"{where}.source.content")
    else:
        bound.window = True
        return
    citations = block.get("citations")
    if isinstance(citations, Mapping) and citations.get("enabled") is not False:
        bound.tokens += bound.tokens - before


def _system(system: Any, bound: _Bound) -> None:
    if system is None:
        return
    if isinstance(system, str):
        bound.text(system, "system")
        return
    if not isinstance(system, list):
        raise BadRequest("'system' must be a string or an array of text blocks.",
                         param="system")
    for i, block in enumerate(system):
        if not isinstance(block, Mapping) or block.get("type") != "text":
            raise BadRequest(f"'system.{i}' must be a text block.", param=f"system.{i}")
        bound.tokens += BLOCK_OVERHEAD
        bound.text(block.get("text"), f"system.{i}.text")


def server_tools(tools: list[Any], max_tool_calls: int) -> tuple[int, int, list[Any] | None]:
    """(sampling rounds, web searches, tools to forward or None) of a request's server tools.

    Web search and web fetch are bounded by ``max_uses``, set to ``max_tool_calls`` when the
    tool has none (the forwarded tools then carry it); other server tools by
    ``SERVER_LOOP_ROUNDS``.
    """
    rounds = searches = 0
    forwarded, changed = [], False
    for tool in tools:
        kind = tool.get("type") if isinstance(tool, Mapping) else None
        if not isinstance(kind, str) or kind.startswith(CLIENT_TOOL_TYPES):
            forwarded.append(tool)
            continue
        if kind.startswith(USES_TOOLS):
            uses = tool.get("max_uses")
            if uses is None:
                uses = max_tool_calls
                tool, changed = {**tool, "max_uses": uses}, True
            elif isinstance(uses, bool) or not isinstance(uses, int) or uses < 1:
                raise BadRequest("'max_uses' must be a positive integer.", param="tools")
            rounds += uses
            if kind.startswith("web_search_"):
                searches += uses
        else:
            rounds = max(rounds, SERVER_LOOP_ROUNDS)
        forwarded.append(tool)
    return rounds, searches, forwarded if changed else None


def estimate_messages(payload: Mapping[str, Any], price: ModelPrice,
                      seen: Callable[[Any], int | None] | None = None,
                      max_tool_calls: int = 16) -> Estimate:
    """/v1/messages: the bounded prompt (messages, system, tools) and ``max_tokens``.

    >>> from gateway.pricing import ModelPrice
    >>> est = estimate_messages({"max_tokens": 50, "messages": [
    ...     {"role": "user", "content": "hello"}]}, ModelPrice("claude", 1, 1, 1))
    >>> est.prompt_tokens, est.output_tokens   # 64 + 16 + 16 + 5 bytes
    (101, 50)
    """
    max_tokens = payload.get("max_tokens")
    if max_tokens is None:
        raise BadRequest("max_tokens: Field required (the Messages API needs it; it bounds the "
                         "answer's cost).", param="max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest("'max_tokens' must be a positive integer.", param="max_tokens")
    speed = payload.get("speed")
    if speed not in (None, "standard"):
        raise BadRequest(f"costwall has no price for speed '{str(speed)[:20]}', so it cannot "
                         "budget this request; send it without 'speed'.", param="speed")
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array.", param="messages")
    bound = _Bound()
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or message.get("role") not in ("user", "assistant",
                                                                              "system"):
            raise BadRequest(f"'messages.{i}' must be an object with role 'user' or "
                             "'assistant' and 'content'.", param=f"messages.{i}")
        bound.tokens += MESSAGE_OVERHEAD
        _blocks(message.get("content"), bound, f"messages.{i}.content")
    _system(payload.get("system"), bound)
    tools = payload.get("tools")
    rounds = searches = 0
    set_fields: dict[str, Any] = {}
    if tools is not None:
        if not isinstance(tools, list):
            raise BadRequest("'tools' must be an array.", param="tools")
        if tools:
            bound.tokens += TOOLS_OVERHEAD + json_bound(tools)
            rounds, searches, forwarded = server_tools(tools, max_tool_calls)
            if forwarded is not None:
                set_fields["tools"] = forwarded
    output_config = payload.get("output_config")
    if isinstance(output_config, Mapping) and output_config.get("format") is not None:
        bound.tokens += SCHEMA_OVERHEAD + json_bound(output_config["format"])
    if payload.get("mcp_servers") or payload.get("container") is not None:
        bound.window = True  # tools or skills fetched server-side: unseen input
    window = price.max_input_tokens
    prompt = window if bound.window else min(bound.tokens, window)
    if rounds:
        prompt = window * (rounds + 1)  # each server-tool round reads the context again
    return Estimate(prompt, max_tokens, 1, OUTPUT_FIELDS[0], None,
                    extra_fee=searches * price.web_search, set_fields=set_fields)
