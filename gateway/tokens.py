"""Token counting with tiktoken from encoding files shipped in the package.

Gateways run offline, so tiktoken's own downloader is never used: the ``.tiktoken`` files live
in ``gateway/data/tiktoken`` and are checked against ``SHA256SUMS`` when first loaded. Counts
here are estimates for admission and for streams that end without usage; the upstream's
``usage`` is what gets billed whenever it exists.
"""

from __future__ import annotations

import base64
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson
import tiktoken

DATA_DIR = Path(__file__).parent / "data" / "tiktoken"

_O200K_PAT = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
_CL100K_PAT = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_SPECS: dict[str, tuple[str, dict[str, int]]] = {
    "o200k_base": (_O200K_PAT, {"<|endoftext|>": 199999, "<|endofprompt|>": 200018}),
    "cl100k_base": (
        _CL100K_PAT,
        {
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
    ),
}
ENCODINGS = tuple(_SPECS)

# Chat formula constants from the OpenAI cookbook ("How to count tokens with tiktoken").
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
TOOLS_OVERHEAD = 12
# Content parts whose text is counted, and the field that holds it. Every other part (images,
# audio, files, types added later) is the kind of input the gateway cannot count: the counting
# functions hand it to ``uncounted`` and ``gateway.bounds`` bounds it.
TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text",
              "refusal": "refusal", "summary_text": "text", "reasoning_text": "text"}
# Responses input items that carry all they bill as their own JSON (calls and their outputs):
# counted as that JSON. Other items (reasoning, item_reference, built-in tool calls whose
# results live on the server, unknown types) go to ``uncounted``.
JSON_ITEMS = frozenset({
    "function_call", "function_call_output", "custom_tool_call", "custom_tool_call_output",
    "computer_call", "local_shell_call", "local_shell_call_output", "shell_call",
    "shell_call_output", "apply_patch_call", "apply_patch_call_output", "mcp_list_tools",
    "mcp_approval_request", "mcp_approval_response", "mcp_call"})

_cache: dict[str, tiktoken.Encoding] = {}
_lock = threading.Lock()


class EncodingFileError(RuntimeError):
    """A bundled encoding file is missing or does not match SHA256SUMS."""


def _expected_hashes() -> dict[str, str]:
    sums: dict[str, str] = {}
    for line in (DATA_DIR / "SHA256SUMS").read_text().splitlines():
        if line.strip():
            digest, name = line.split()
            sums[name] = digest
    return sums


def encoding(name: str) -> tiktoken.Encoding:
    """Return the named encoding, loading and verifying its bundled file once per process."""
    enc = _cache.get(name)
    if enc is not None:
        return enc
    with _lock:
        enc = _cache.get(name)
        if enc is not None:
            return enc
        if name not in _SPECS:
            raise EncodingFileError(f"unknown encoding {name!r}; bundled: {', '.join(ENCODINGS)}")
        path = DATA_DIR / f"{name}.tiktoken"
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise EncodingFileError(f"cannot read {path}: {exc}") from exc
        expected = _expected_hashes().get(path.name)
        actual = hashlib.sha256(data).hexdigest()
        if expected != actual:
            raise EncodingFileError(f"{path} has SHA-256 {actual}, SHA256SUMS says {expected}")
        ranks = {
            base64.b64decode(token): int(rank)
            for token, rank in (line.split() for line in data.splitlines() if line)
        }
        pat, special = _SPECS[name]
        enc = tiktoken.Encoding(name, pat_str=pat, mergeable_ranks=ranks, special_tokens=special)
        # The Rust core now holds its own copy of the ranks; tiktoken keeps this dict only to
        # pickle the Encoding, which costwall never does. Emptying it frees ~27 MB per
        # encoding (200k bytes objects) for the life of the process.
        ranks.clear()
        _cache[name] = enc
        return enc


class CountCache:
    """Token counts of recently seen texts, bounded by the characters it holds (LRU).

    Agents resend the same system prompt and the whole conversation on every turn, so most
    of a chat request's text was counted before. Keys are the texts themselves (exact: no
    hash collision can ever change an admission estimate); short texts are cheaper to count
    than to keep. Safe to use from the event loop and from ``asyncio.to_thread`` at once.
    """

    MIN_CHARS = 64

    def __init__(self, max_chars: int = 4 * 1024 * 1024):
        self.max_chars = max_chars
        self._counts: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()

    def count(self, text: str, enc: tiktoken.Encoding) -> int:
        if len(text) < self.MIN_CHARS or len(text) > self.max_chars // 4:
            return len(enc.encode_ordinary(text))
        key = (enc.name, text)
        with self._lock:
            cached = self._counts.get(key)
            if cached is not None:
                self._counts.move_to_end(key)
                return cached
        tokens = len(enc.encode_ordinary(text))  # outside the lock: the GIL is released here
        with self._lock:
            if key not in self._counts:
                self._counts[key] = tokens
                self._chars += len(text)
                while self._chars > self.max_chars:
                    (_, old), _n = self._counts.popitem(last=False)
                    self._chars -= len(old)
        return tokens


_counts = CountCache()


def count_text(text: str, enc: tiktoken.Encoding) -> int:
    """Tokens in ``text``; special-token lookalikes in user text count as ordinary text."""
    if not text:
        return 0
    return _counts.count(text, enc)


def _count_content(content: Any, enc: tiktoken.Encoding,
                   uncounted: list[Any] | None = None) -> int:
    """Tokens of a message ``content``: a string or a list of typed parts.

    Parts that are not text are appended to ``uncounted`` (when given) and count 0 here.
    """
    if content is None:
        return 0
    if isinstance(content, str):
        return count_text(content, enc)
    if isinstance(content, list):
        total = 0
        for part in content:
            if not isinstance(part, Mapping):
                total += count_text(str(part), enc)
                continue
            kind = part.get("type")
            field = TEXT_PARTS.get(kind) if isinstance(kind, str) else (
                "text" if kind is None else None)
            if field is None:
                if uncounted is not None:
                    uncounted.append(part)
            elif isinstance(part.get(field), str):
                total += count_text(part[field], enc)
            else:
                total += count_text(orjson.dumps(part).decode(), enc)
        return total
    return count_text(orjson.dumps(content).decode(), enc)


def count_messages(
    messages: Iterable[Any], enc: tiktoken.Encoding, tools: Any = None,
    uncounted: list[Any] | None = None,
) -> int:
    """Prompt tokens of a chat request by the cookbook formula (plus tool definitions).

    Content parts that cannot be counted (images, audio, files) go to ``uncounted``.
    """
    total = REPLY_PRIMING
    for message in messages:
        total += TOKENS_PER_MESSAGE
        if not isinstance(message, Mapping):
            total += count_text(str(message), enc)
            continue
        for key, value in message.items():
            if key == "content":
                total += _count_content(value, enc, uncounted)
            elif isinstance(value, str):
                total += count_text(value, enc)
                if key == "name":
                    total += TOKENS_PER_NAME
            elif key == "audio" and value is not None and uncounted is not None:
                uncounted.append(value)  # an earlier audio answer by id: held server-side
            elif value is not None:
                total += count_text(orjson.dumps(value).decode(), enc)
    if tools:
        total += TOOLS_OVERHEAD + count_text(orjson.dumps(tools).decode(), enc)
    return total


def _count_item(item: Mapping[str, Any], enc: tiktoken.Encoding,
                uncounted: list[Any] | None) -> int:
    """Tokens of one Responses input item that is not a message."""
    if item.get("type") not in JSON_ITEMS:  # a bare content part, or an item kept server-side
        return _count_content([item], enc, uncounted)
    output = item.get("output")
    if isinstance(output, list):  # a tool output given as content parts (text, images, files)
        rest = {k: v for k, v in item.items() if k != "output"}
        return count_text(orjson.dumps(rest).decode(), enc) + _count_content(
            output, enc, uncounted)
    return count_text(orjson.dumps(item).decode(), enc)


def count_responses_input(
    input_: Any, enc: tiktoken.Encoding, instructions: Any = None, tools: Any = None,
    uncounted: list[Any] | None = None,
) -> int:
    """Prompt tokens of a Responses API request (``input`` string or list of items).

    Parts and items that cannot be counted go to ``uncounted``.
    """
    total = count_text(instructions, enc) if isinstance(instructions, str) else 0
    if isinstance(input_, str):
        total += TOKENS_PER_MESSAGE + count_text(input_, enc)
    elif isinstance(input_, list):
        for item in input_:
            total += TOKENS_PER_MESSAGE
            if not isinstance(item, Mapping):
                total += _count_content(item, enc, uncounted)
            elif item.get("type", "message") == "message" and "content" in item:
                total += _count_content(item["content"], enc, uncounted)
                if isinstance(item.get("role"), str):
                    total += count_text(item["role"], enc)
            else:
                total += _count_item(item, enc, uncounted)
    if tools:
        total += TOOLS_OVERHEAD + count_text(orjson.dumps(tools).decode(), enc)
    return total + REPLY_PRIMING


def count_prompt_input(value: Any, enc: tiktoken.Encoding) -> int:
    """Tokens of a completions ``prompt`` or embeddings ``input``: text, texts, or token ids."""
    if value is None:
        return 0
    if isinstance(value, str):
        return count_text(value, enc)
    if isinstance(value, list):
        if all(isinstance(v, int) for v in value):
            return len(value)
        return sum(count_prompt_input(v, enc) for v in value)
    return count_text(str(value), enc)
