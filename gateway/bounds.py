"""True upper bounds of what the gateway cannot count; pure, no I/O.

Admission must reserve at least what the upstream can bill. Text is counted with tiktoken
(``gateway.tokens``); everything else in a request is bounded here:

- **images** by the provider's image-token rule at the largest size each ``detail`` level
  allows, per model family (``IMAGE_RULES``);
- **audio, files, unknown content parts, server-side state** (``conversation``, a stored
  ``prompt``, ``item_reference``, reasoning items, a ``previous_response_id`` costwall did not
  answer itself) by the model's context window ``max_input_tokens``;
- **built-in tools** (web search, file search, code interpreter, ...) by a fee per call from
  ``TOOL_FEES`` times the most calls the request can make, plus one context window of input per
  call (each call makes the model read its context again).

docs/hard-cap.md has the tables with their sources. A prompt larger than the context window is
refused by the provider at no cost, so one model call never bills more than ``max_input_tokens``
prompt tokens: that caps the sum of the bounds.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

PICO_PER_USD = 10**12


# -- images -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TileRule:
    """Scale to fit 2048x2048, then the shortest side down to 768, then count 512-px tiles.

    ``detail: low`` is ``base`` alone (a 512x512 thumbnail); high (and auto) adds
    ``per_tile`` for each tile.
    """

    base: int
    per_tile: int


@dataclass(frozen=True, slots=True)
class PatchRule:
    """32-px patches covering the image, at most ``MAX_PATCHES``, times a per-model multiplier.

    The multiplier is kept in thousandths so the bound is exact integer arithmetic.
    """

    multiplier_milli: int


FIT_SIDE, SHORT_SIDE, TILE = 2048, 768, 512
PATCH, MAX_PATCHES = 32, 1536
# The most 512-px tiles any image yields: the short side ends at <= 768 (2 tiles), the long
# side at <= 2048 (4 tiles); 768x2048 reaches both. tests/test_bounds.py checks it over sizes.
MAX_TILES = 8

# Per model family, matched like the price table: the exact name or ``name-<anything>``, the
# longest name first. OpenAI "Images and vision" guide, "Calculating costs" (read 2025; checked
# against the per-tile figures of third-party calculators such as pictoken for gpt-4o-mini).
IMAGE_RULES: Mapping[str, TileRule | PatchRule] = {
    "gpt-4o": TileRule(85, 170),
    "gpt-4o-mini": TileRule(2833, 5667),
    "gpt-4.1": TileRule(85, 170),
    "gpt-4.5-preview": TileRule(85, 170),
    "gpt-4-turbo": TileRule(85, 170),
    "gpt-5": TileRule(70, 140),
    "gpt-5-chat-latest": TileRule(70, 140),
    "o1": TileRule(75, 150),
    "o3": TileRule(75, 150),
    "computer-use-preview": TileRule(65, 129),
    "gpt-4.1-mini": PatchRule(1620),
    "gpt-4.1-nano": PatchRule(2460),
    "gpt-5-mini": PatchRule(1620),
    "gpt-5-nano": PatchRule(2460),
    "o4-mini": PatchRule(1720),
}
_RULES_BY_LENGTH = sorted(IMAGE_RULES, key=len, reverse=True)
_DETAILS = ("low", "high", "auto")


def image_rule(model: str) -> TileRule | PatchRule | None:
    """The image rule of ``model``'s family, or None if costwall does not know it.

    A fine-tuned ``ft:<base>:org::id`` uses its base model's rule.
    """
    if model.startswith("ft:"):
        model = model.split(":")[1]
    rule = IMAGE_RULES.get(model)
    if rule is not None:
        return rule
    return next((IMAGE_RULES[n] for n in _RULES_BY_LENGTH if model.startswith(n + "-")), None)


def tiles(width: int, height: int) -> int:
    """512-px tiles of a ``width`` x ``height`` image after the provider's two resizes.

    Exact fractions, no rounding of the scaled sides: a resize that floors pixels can only
    give as many tiles or fewer, so this is the largest count the rule allows.
    """
    w, h = Fraction(width), Fraction(height)
    if max(w, h) > FIT_SIDE:
        scale = FIT_SIDE / max(w, h)
        w, h = w * scale, h * scale
    if min(w, h) > SHORT_SIDE:  # only ever scaled down: small images are not enlarged
        scale = SHORT_SIDE / min(w, h)
        w, h = w * scale, h * scale
    return math.ceil(w / TILE) * math.ceil(h / TILE)


def patches(width: int, height: int) -> int:
    """32-px patches of a ``width`` x ``height`` image, scaled down to at most MAX_PATCHES."""
    raw = math.ceil(width / PATCH) * math.ceil(height / PATCH)
    if raw <= MAX_PATCHES:
        return raw
    shrink = math.sqrt(PATCH * PATCH * MAX_PATCHES / (width * height))
    w, h = width * shrink / PATCH, height * shrink / PATCH
    shrink *= min(math.floor(w) / w, math.floor(h) / h)
    return min(MAX_PATCHES, math.ceil(int(width * shrink) / PATCH)
               * math.ceil(int(height * shrink) / PATCH))


def image_tokens(rule: TileRule | PatchRule, width: int, height: int, detail: str) -> int:
    """What the provider bills for one image of this size and detail (the rule itself)."""
    if isinstance(rule, PatchRule):
        return math.ceil(patches(width, height) * rule.multiplier_milli / 1000)
    if detail == "low":
        return rule.base
    return rule.base + rule.per_tile * tiles(width, height)


def max_image_tokens(rule: TileRule | PatchRule | None, detail: Any) -> int | None:
    """The most tokens one image can bill at ``detail``; None: only the context window bounds it.

    A missing detail is ``auto``, bounded as ``high``. ``original`` or any other value lets the
    provider keep more pixels than the documented rule, so it is not bounded here.
    """
    if detail is None:
        detail = "auto"
    if rule is None or detail not in _DETAILS:
        return None
    if isinstance(rule, PatchRule):
        return math.ceil(MAX_PATCHES * rule.multiplier_milli / 1000)
    return rule.base if detail == "low" else rule.base + rule.per_tile * MAX_TILES


def image_detail(part: Mapping[str, Any]) -> Any:
    """The ``detail`` of an image part: ``image_url.detail`` (chat) or ``detail`` (responses)."""
    inner = part.get("image_url")
    if isinstance(inner, Mapping):
        return inner.get("detail")
    return part.get("detail")


IMAGE_PART_TYPES = frozenset({"image_url", "input_image", "image"})


def part_bound(part: Any, rule: TileRule | PatchRule | None) -> int | None:
    """Prompt tokens one uncountable part can bill; None: the context window bounds it.

    Images follow their rule; audio, files, stored items and unknown types have no bound but
    the context window.
    """
    if isinstance(part, Mapping) and part.get("type") in IMAGE_PART_TYPES:
        return max_image_tokens(rule, image_detail(part))
    return None


def prompt_bound(counted: int, parts: Iterable[Any], model: str, context: int,
                 known: int = 0) -> int:
    """Prompt tokens of one model call: counted text plus each part's bound plus ``known``
    server-side tokens, never more than the context window ``context``."""
    total = counted + known
    rule = image_rule(model)
    for part in parts:
        bound = part_bound(part, rule)
        if bound is None:
            return context
        total += bound
    return min(total, context)


# -- what costwall has answered itself ----------------------------------------------------------
# Chaining a response turns its output items into input items (a few framing tokens each):
# this margin covers them on top of the answered response's input + output tokens.
PREVIOUS_RESPONSE_MARGIN = 256


class SeenResponses:
    """Token totals of the /v1/responses answers this process relayed, LRU-bounded.

    ``previous_response_id`` makes the upstream bill that response's history again as input:
    at most its input + output tokens. Per process and in memory: after a restart, or on
    another replica, an id is unknown and its history is bounded by the context window.
    """

    def __init__(self, max_entries: int = 50_000):
        self.max_entries = max_entries
        self._totals: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()  # estimates of large bodies run in a worker thread

    def remember(self, response_id: Any, total_tokens: int) -> None:
        if not isinstance(response_id, str) or not response_id or len(response_id) > 256:
            return
        with self._lock:
            self._totals[response_id] = total_tokens
            self._totals.move_to_end(response_id)
            while len(self._totals) > self.max_entries:
                self._totals.popitem(last=False)

    def get(self, response_id: Any) -> int | None:
        if not isinstance(response_id, str):
            return None
        with self._lock:
            return self._totals.get(response_id)

    def __len__(self) -> int:
        return len(self._totals)


# -- built-in tools -----------------------------------------------------------------------------
def _usd_per_1k(usd: str) -> int:
    """Pico-USD per call of a price quoted in USD per 1,000 calls."""
    return int(Fraction(usd) * PICO_PER_USD / 1000)


def _usd(usd: str) -> int:
    return int(Fraction(usd) * PICO_PER_USD)


# OpenAI API pricing page, "Built-in tools" (read 2025-2026; docs/hard-cap.md says how sure each
# figure is). Web search (``web_search``, GA): $10 / 1k calls on every model, search content
# billed as input tokens. ``web_search_preview``: $10 / 1k on reasoning models, $25 / 1k on
# the others (gpt-4o, gpt-4.1), search content free.
WEB_SEARCH = _usd_per_1k("10")
WEB_SEARCH_PREVIEW_OTHER = _usd_per_1k("25")
# Chat Completions search models: the highest per-1k price published for each (search context
# size "high"), because an answer does not say which size was used.
CHAT_SEARCH = {"gpt-4o-mini-search": _usd_per_1k("30"), "gpt-4o-search": _usd_per_1k("50"),
               "gpt-5-search": _usd_per_1k("10")}
CHAT_SEARCH_DEFAULT = _usd_per_1k("50")
FILE_SEARCH = _usd_per_1k("2.50")
# Code interpreter: per container, by memory limit ($0.03 for the default 1 GB). With
# ``container: {"type": "auto"}`` the upstream creates (and bills) one even if it is not used.
CODE_INTERPRETER = {"1g": _usd("0.03"), "4g": _usd("0.12"), "16g": _usd("0.48"),
                    "64g": _usd("1.92")}
IMAGE_GENERATION = _usd("0.25")  # one gpt-image-1 image at high quality, 1536x1024
_REASONING_FAMILIES = ("o1", "o3", "o4", "gpt-5", "gpt-6")

# Tools the client runs itself: the response ends at the call, nothing is billed beyond tokens.
CLIENT_TOOLS = frozenset({"function", "custom", "computer_use_preview", "computer_use",
                          "computer", "local_shell", "shell", "apply_patch"})


@dataclass(frozen=True, slots=True)
class ToolBound:
    """What built-in tools add to one request's bound, and how to settle their fees.

    ``calls`` is the most built-in tool calls the request can make; each costs at most
    ``max_fee`` and makes the model read up to one more context window of input. ``rates`` maps
    a response output item type (``web_search_call``) to its fee per call, for settlement;
    code interpreter is billed per container instead (``container_fee``), with one container
    created up front when ``auto_container``. ``set_max_tool_calls`` is the ``max_tool_calls``
    costwall adds to the forwarded body when the client set none, so the upstream enforces
    the number the bound assumed.
    """

    calls: int
    max_fee: int
    rates: Mapping[str, int]
    set_max_tool_calls: int | None = None
    per_request: int = 0  # chat search: one search fee per answered request
    container_fee: int = 0
    auto_container: bool = False
    known_containers: frozenset[str] = frozenset()  # containers the request names: paid already

    @property
    def fee_bound(self) -> int:
        return self.calls * self.max_fee + (self.container_fee if self.auto_container else 0)


def _reasoning(model: str) -> bool:
    return model.startswith(_REASONING_FAMILIES) and "-chat" not in model


def _tool_rate(tool: Mapping[str, Any], model: str) -> tuple[str, int] | None:
    """(output item type, fee per call) of a built-in tool; None for client-side tools."""
    kind = tool.get("type")
    if not isinstance(kind, str) or kind in CLIENT_TOOLS:
        return None
    if kind.startswith("web_search_preview"):
        return "web_search_call", WEB_SEARCH if _reasoning(model) else WEB_SEARCH_PREVIEW_OTHER
    if kind.startswith("web_search"):
        return "web_search_call", WEB_SEARCH
    if kind == "file_search":
        return "file_search_call", FILE_SEARCH
    if kind == "code_interpreter":
        container = tool.get("container")
        memory = container.get("memory_limit", "1g") if isinstance(container, Mapping) else "1g"
        return "code_interpreter_call", CODE_INTERPRETER.get(memory, max(
            CODE_INTERPRETER.values()))
    if kind == "image_generation":
        return "image_generation_call", IMAGE_GENERATION
    # mcp and tools costwall does not know: executed server-side, no known per-call fee.
    return f"{kind}_call", 0


def responses_tools(tools: Any, model: str, requested_calls: Any,
                    default_calls: int) -> ToolBound | None:
    """The tool bound of a /v1/responses request, or None if it has no built-in tool."""
    if not isinstance(tools, list):
        return None
    rates: dict[str, int] = {}
    auto, known = False, set()
    for tool in tools:
        if not isinstance(tool, Mapping):
            continue
        found = _tool_rate(tool, model)
        if found is None:
            continue
        rates[found[0]] = max(rates.get(found[0], 0), found[1])
        if found[0] == "code_interpreter_call":
            container = tool.get("container")
            if isinstance(container, str):
                known.add(container)
            else:
                auto = True
    if not rates:
        return None
    valid = isinstance(requested_calls, int) and not isinstance(requested_calls, bool) \
        and requested_calls >= 0
    calls = requested_calls if valid else default_calls
    container_fee = rates.pop("code_interpreter_call", 0) if "code_interpreter_call" in rates \
        else 0
    return ToolBound(calls, max([container_fee, *rates.values()]), rates,
                     None if valid else default_calls, 0, container_fee, auto, frozenset(known))


def chat_search(payload: Mapping[str, Any], model: str, default_calls: int) -> ToolBound | None:
    """The search fee bound of a chat request to a search model or with ``web_search_options``.

    Chat answers do not list their searches: settled as one search per answered request.
    """
    if "web_search_options" not in payload and "-search-" not in model:
        return None
    rate = next((r for prefix, r in CHAT_SEARCH.items() if model.startswith(prefix)),
                CHAT_SEARCH_DEFAULT)
    return ToolBound(default_calls, rate, {}, None, per_request=rate)


def settled_fee(bound: ToolBound, output: Any) -> int:
    """Tool fees of an answered response from its ``output`` items.

    Code interpreter is billed per container: calls that share a ``container_id`` pay once,
    a container the request named was paid when it was created, and an ``auto`` container is
    paid even when no call used it.
    """
    if bound.per_request:
        return bound.per_request
    if not isinstance(output, list):
        return bound.fee_bound  # nothing to count: never below the bound
    fee = 0
    containers: set[Any] = set()
    for item in output:
        kind = item.get("type") if isinstance(item, Mapping) else None
        if kind == "code_interpreter_call":
            container = item.get("container_id")
            containers.add(container if isinstance(container, str) else id(item))
        elif isinstance(kind, str):
            fee += bound.rates.get(kind, 0)
    if bound.container_fee:
        new = len(containers - bound.known_containers)
        fee += bound.container_fee * max(new, 1 if bound.auto_container else 0)
    return fee
