"""The price table and the cost of a request: pure functions over integers.

Cost = (prompt - cached - cache writes) x input + cached x cached_input + 5-minute cache
writes x cache_write_5m + 1-hour cache writes x cache_write_1h + completion x output
(+ web searches x web_search), where ``completion`` already contains the reasoning tokens
(OpenAI reports them inside ``completion_tokens``), so they are billed as output exactly once.
``prompt_tokens`` is the whole input: for Anthropic that is ``input_tokens`` plus cache
writes plus cache reads (``gateway.usage.usage_from_messages``). Models with a long-context
tier (``long_context``) price a whole request at that tier's prices once its input passes the
tier's threshold; an ``inference_geo`` multiplier (Anthropic's US-only inference) scales the
whole cost, rounded up to the pico-dollar.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

from gateway.money import MoneyError, parse_usd, to_pico
from gateway.tokens import ENCODINGS

TOKENS_PER_PRICE_UNIT = 1_000_000  # prices are quoted per 1M tokens
# Used when a price entry has no ``max_input_tokens``: larger than every context window OpenAI
# publishes (1,050,000 tokens, gpt-5.4/5.5, as of 2026-11), so a missing value can only make
# admission reserve more, never less. Set the real value in the price table to tighten it.
DEFAULT_MAX_INPUT_TOKENS = 2_000_000


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one request, in OpenAI's semantics (cached within prompt, etc.).

    ``cache_write_5m_tokens`` and ``cache_write_1h_tokens`` (Anthropic's cache creation) are
    part of ``prompt_tokens`` too, like ``cached_tokens`` (cache reads). ``web_search_requests``
    are server-side searches billed per request; ``geo`` is where inference ran ("" unless
    the upstream says, e.g. Anthropic's ``inference_geo``).
    """

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_5m_tokens: int = 0
    cache_write_1h_tokens: int = 0
    web_search_requests: int = 0
    geo: str = ""

    @property
    def cache_write_tokens(self) -> int:
        return self.cache_write_5m_tokens + self.cache_write_1h_tokens


@dataclass(frozen=True, slots=True)
class TierPrice:
    input: int
    output: int


@dataclass(frozen=True, slots=True)
class LongContext:
    """Prices of a whole request whose input passes ``above`` tokens (pico-USD per token)."""

    above: int
    input: int
    output: int
    cached_input: int
    cache_write_5m: int
    cache_write_1h: int


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """Per-token prices of one model in pico-USD.

    Cached tokens are part of the prompt: 6 × 150 000 + 4 × 75 000 + 5 × 600 000 here.

    >>> p = ModelPrice("m", input=150_000, cached_input=75_000, output=600_000)
    >>> p.cost(Usage(prompt_tokens=10, cached_tokens=4, completion_tokens=5))
    4200000
    """

    name: str
    input: int
    cached_input: int
    output: int
    max_output_tokens: int = 16_384
    encoding: str = "o200k_base"
    kind: str = "chat"
    service_tiers: Mapping[str, TierPrice] = field(default_factory=dict)
    # The context window: the most prompt tokens one model call can bill (the provider refuses,
    # at no cost, a prompt that does not fit). The bound of last resort for what cannot be counted.
    max_input_tokens: int = DEFAULT_MAX_INPUT_TOKENS
    # Anthropic prompt caching: writes to the 5-minute and the 1-hour cache (0: no such price,
    # the model has no cache writes), server-side web searches per request, the long-context
    # tier and inference-geography multipliers (``{"us": Fraction(11, 10)}``).
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    web_search: int = 0
    long_context: LongContext | None = None
    geo: Mapping[str, Fraction] = field(default_factory=dict)

    def cost(self, usage: Usage, service_tier: str | None = None) -> int:
        """Exact cost of ``usage`` in pico-USD."""
        input_price, output_price = self.input, self.output
        cached_price = self.cached_input
        write_5m, write_1h = self.cache_write_5m, self.cache_write_1h
        long = self.long_context
        tier = self.service_tiers.get(service_tier or "")
        if long is not None and usage.prompt_tokens > long.above:
            input_price, output_price, cached_price = long.input, long.output, long.cached_input
            write_5m, write_1h = long.cache_write_5m, long.cache_write_1h
        elif tier is not None:
            # Tier discounts/premiums apply to cached input in the same ratio as to input.
            if self.input:
                cached_price = self.cached_input * tier.input // self.input
            input_price, output_price = tier.input, tier.output
        cached = min(usage.cached_tokens, usage.prompt_tokens)
        writes = min(usage.cache_write_tokens, usage.prompt_tokens - cached)
        w1h = min(usage.cache_write_1h_tokens, writes)
        cost = (
            (usage.prompt_tokens - cached - writes) * input_price
            + cached * cached_price
            + (writes - w1h) * (write_5m or input_price)
            + w1h * (write_1h or write_5m or input_price)
            + usage.completion_tokens * output_price
            + usage.web_search_requests * self.web_search
        )
        multiplier = self.geo.get(usage.geo) if usage.geo else None
        return _scaled(cost, multiplier) if multiplier is not None else cost

    def upper_bound(self, prompt_tokens: int, max_output_tokens: int,
                    service_tier: str | None = None, fee: int = 0) -> int:
        """Highest cost a request can reach: no cache hits, every allowed output token used.

        ``service_tier`` "auto" may be served at any tier, so it is bounded by the dearest.
        ``fee`` is the bound of per-call tool fees in pico-USD (``gateway.bounds``). Every
        input token may be a cache write (the dearest input-side price), a prompt past the
        long-context threshold is priced at that tier, and the dearest inference-geography
        multiplier applies (the upstream may choose the region: a workspace default).
        """
        if self.long_context is not None and prompt_tokens > self.long_context.above:
            long = self.long_context
            input_price = max(long.input, long.cache_write_5m, long.cache_write_1h)
            output_price = long.output
        elif service_tier == "auto" and self.service_tiers:
            input_price = max(self.input, *(t.input for t in self.service_tiers.values()))
            output_price = max(self.output, *(t.output for t in self.service_tiers.values()))
        else:
            tier = self.service_tiers.get(service_tier or "")
            input_price = tier.input if tier else self.input
            output_price = tier.output if tier else self.output
        input_price = max(input_price, self.cache_write_5m, self.cache_write_1h)
        bound = prompt_tokens * input_price + max_output_tokens * output_price + fee
        return _scaled(bound, self._dearest_geo) if self.geo else bound

    def output_price_bound(self, prompt_tokens: int, service_tier: str | None = None) -> int:
        """The most one more output token can add to ``upper_bound`` (clamping's unit)."""
        return self.upper_bound(prompt_tokens, 1, service_tier) - self.upper_bound(
            prompt_tokens, 0, service_tier) + (1 if self.geo else 0)

    @property
    def _dearest_geo(self) -> Fraction:
        return max(Fraction(1), *self.geo.values())


def _scaled(amount: int, multiplier: Fraction) -> int:
    """``amount`` times ``multiplier``, rounded up to the pico-dollar (never under)."""
    return -(-amount * multiplier.numerator // multiplier.denominator)


class PriceTable:
    """Model prices with snapshot names resolved to their base entry by longest prefix."""

    def __init__(self, models: Mapping[str, ModelPrice]):
        self._models = dict(models)
        self._by_length = sorted(self._models, key=len, reverse=True)
        self._resolved: dict[str, ModelPrice | None] = {}

    def __len__(self) -> int:
        return len(self._models)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._models.values())

    def lookup(self, model: str) -> ModelPrice | None:
        """Exact entry, else the longest entry ``e`` with ``model.startswith(e + "-")``."""
        if model in self._resolved:
            return self._resolved[model]
        found = self._models.get(model)
        if found is None:
            found = next(
                (self._models[n] for n in self._by_length if model.startswith(n + "-")), None
            )
        if len(self._resolved) < 10_000:  # bounded: model names come from clients
            self._resolved[model] = found
        return found


def _price(value: Any, where: str, problems: list[str]) -> int:
    try:
        per_million = to_pico(value)
    except MoneyError as exc:
        problems.append(f"{where}: {exc}")
        return 0
    if per_million % TOKENS_PER_PRICE_UNIT:
        problems.append(f"{where}: at most 6 decimal places per 1M tokens")
    return per_million // TOKENS_PER_PRICE_UNIT


def _whole(value: Any, where: str, problems: list[str], low: int, default: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        problems.append(f"{where}: must be a whole number >= {low}")
        return default
    return value


FIELDS = frozenset({"input", "cached_input", "cache_read", "output", "max_output_tokens",
                    "max_input_tokens", "encoding", "kind", "service_tiers", "cache_write_5m",
                    "cache_write_1h", "web_search_usd", "long_context", "inference_geo"})
_LONG_FIELDS = frozenset({"above_tokens", "input", "output", "cache_read", "cache_write_5m",
                          "cache_write_1h"})


def _cached(spec: Mapping[str, Any], where: str, input_: int, problems: list[str]) -> int:
    """``cached_input`` (OpenAI's name) or ``cache_read`` (Anthropic's); absent: ``input``."""
    if "cached_input" in spec and "cache_read" in spec:
        problems.append(f"{where}: give cached_input or cache_read, not both")
    name = "cache_read" if "cache_read" in spec else "cached_input"
    return _price(spec[name], f"{where}.{name}", problems) if name in spec else input_


def _long_context(raw: Any, where: str, problems: list[str]) -> LongContext | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        problems.append(f"{where}: must be a mapping ({', '.join(sorted(_LONG_FIELDS))})")
        return None
    unknown = set(raw) - _LONG_FIELDS
    if unknown:
        problems.append(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    for name in ("above_tokens", "input", "output"):
        if name not in raw:
            problems.append(f"{where}: '{name}' is required")
    input_ = _price(raw.get("input", 0), f"{where}.input", problems)
    write_5m = _price(raw.get("cache_write_5m", raw.get("input", 0)),
                      f"{where}.cache_write_5m", problems)
    return LongContext(
        _whole(raw.get("above_tokens", 0), f"{where}.above_tokens", problems, 1, 1),
        input_, _price(raw.get("output", 0), f"{where}.output", problems),
        _cached(raw, where, input_, problems), write_5m,
        _price(raw.get("cache_write_1h", 0), f"{where}.cache_write_1h", problems) or write_5m)


def _geo(raw: Any, where: str, problems: list[str]) -> dict[str, Fraction]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        problems.append(f"{where}: must map a region to a price multiplier (us: \"1.1\")")
        return {}
    out: dict[str, Fraction] = {}
    for region, value in raw.items():
        try:
            out[str(region)] = Fraction(str(parse_usd(value)))
        except MoneyError as exc:
            problems.append(f"{where}.{region}: {exc}")
    return out


def _entry(name: str, spec: Mapping[str, Any], where: str, problems: list[str]) -> ModelPrice:
    unknown = set(spec) - FIELDS
    if unknown:
        problems.append(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    kind = spec.get("kind", "chat")
    if kind not in ("chat", "embedding"):
        problems.append(f"{where}.kind: must be chat or embedding")
    if "input" not in spec:
        problems.append(f"{where}: 'input' price is required")
    input_ = _price(spec.get("input", 0), f"{where}.input", problems)
    output = _price(spec.get("output", 0), f"{where}.output", problems)
    if kind == "chat" and "output" not in spec:
        problems.append(f"{where}: 'output' price is required for chat models")
    cached = _cached(spec, where, input_, problems)
    max_out = _whole(spec.get("max_output_tokens", 16_384 if kind == "chat" else 0),
                     f"{where}.max_output_tokens", problems, 0, 0)
    max_in = _whole(spec.get("max_input_tokens", DEFAULT_MAX_INPUT_TOKENS),
                    f"{where}.max_input_tokens", problems, 1, DEFAULT_MAX_INPUT_TOKENS)
    encoding = spec.get("encoding", "o200k_base")
    if encoding not in ENCODINGS:
        problems.append(f"{where}.encoding: must be one of {', '.join(ENCODINGS)}")
    tiers: dict[str, TierPrice] = {}
    raw_tiers = spec.get("service_tiers") or {}
    if not isinstance(raw_tiers, Mapping):
        problems.append(f"{where}.service_tiers: must be a mapping")
        raw_tiers = {}
    for tier, tspec in raw_tiers.items():
        if not isinstance(tspec, Mapping):
            problems.append(f"{where}.service_tiers.{tier}: must be a mapping")
            continue
        tiers[str(tier)] = TierPrice(
            _price(tspec.get("input", 0), f"{where}.service_tiers.{tier}.input", problems),
            _price(tspec.get("output", 0), f"{where}.service_tiers.{tier}.output", problems),
        )
    write_5m = _price(spec.get("cache_write_5m", 0), f"{where}.cache_write_5m", problems)
    write_1h = _price(spec.get("cache_write_1h", 0), f"{where}.cache_write_1h", problems)
    search = 0
    if "web_search_usd" in spec:
        try:
            search = to_pico(spec["web_search_usd"])
        except MoneyError as exc:
            problems.append(f"{where}.web_search_usd: {exc}")
    return ModelPrice(
        name, input_, cached, output, max_out, str(encoding), str(kind), tiers, max_in,
        write_5m, write_1h, search, _long_context(spec.get("long_context"),
                                                  f"{where}.long_context", problems),
        _geo(spec.get("inference_geo"), f"{where}.inference_geo", problems))


def parse_price_table(data: Any, source: str = "pricing") -> tuple[PriceTable, list[str]]:
    """Build a PriceTable from parsed YAML; returns it with every problem found."""
    problems: list[str] = []
    models: dict[str, ModelPrice] = {}
    entries = data.get("models") if isinstance(data, Mapping) else None
    if not isinstance(entries, Mapping) or not entries:
        return PriceTable({}), [f"{source}: needs a non-empty 'models' mapping"]
    for name, spec in entries.items():
        where = f"{source}: models.{name}"
        if not isinstance(spec, Mapping):
            problems.append(f"{where}: must be a mapping")
            continue
        models[str(name)] = _entry(str(name), spec, where, problems)
    return PriceTable(models), problems


def load_price_table(path: Path) -> tuple[PriceTable, list[str]]:
    """Read and validate a price table file; problems are returned, not raised."""
    from gateway.config import load_yaml  # decimal-preserving loader

    try:
        data = load_yaml(path)
    except (OSError, yaml.YAMLError) as exc:
        return PriceTable({}), [f"{path}: {exc}"]
    return parse_price_table(data, str(path))
