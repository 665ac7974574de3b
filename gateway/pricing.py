"""The price table and the cost of a request: pure functions over integers.

Cost = (prompt - cached) x input + cached x cached_input + completion x output, where
``completion`` already contains the reasoning tokens (OpenAI reports them inside
``completion_tokens``), so they are billed as output exactly once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gateway.money import MoneyError, to_pico
from gateway.tokens import ENCODINGS

TOKENS_PER_PRICE_UNIT = 1_000_000  # prices are quoted per 1M tokens
# Used when a price entry has no ``max_input_tokens``: larger than every context window OpenAI
# publishes (1,050,000 tokens, gpt-5.4/5.5, as of 2026-11), so a missing value can only make
# admission reserve more, never less. Set the real value in the price table to tighten it.
DEFAULT_MAX_INPUT_TOKENS = 2_000_000


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one request, in OpenAI's semantics (cached within prompt, etc.)."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0


@dataclass(frozen=True, slots=True)
class TierPrice:
    input: int
    output: int


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

    def cost(self, usage: Usage, service_tier: str | None = None) -> int:
        """Exact cost of ``usage`` in pico-USD."""
        input_price, output_price = self.input, self.output
        cached_price = self.cached_input
        tier = self.service_tiers.get(service_tier or "")
        if tier is not None:
            # Tier discounts/premiums apply to cached input in the same ratio as to input.
            if self.input:
                cached_price = self.cached_input * tier.input // self.input
            input_price, output_price = tier.input, tier.output
        cached = min(usage.cached_tokens, usage.prompt_tokens)
        return (
            (usage.prompt_tokens - cached) * input_price
            + cached * cached_price
            + usage.completion_tokens * output_price
        )

    def upper_bound(self, prompt_tokens: int, max_output_tokens: int,
                    service_tier: str | None = None, fee: int = 0) -> int:
        """Highest cost a request can reach: no cache hits, every allowed output token used.

        ``service_tier`` "auto" may be served at any tier, so it is bounded by the dearest.
        ``fee`` is the bound of per-call tool fees in pico-USD (``gateway.bounds``).
        """
        if service_tier == "auto" and self.service_tiers:
            input_price = max(self.input, *(t.input for t in self.service_tiers.values()))
            output_price = max(self.output, *(t.output for t in self.service_tiers.values()))
        else:
            tier = self.service_tiers.get(service_tier or "")
            input_price = tier.input if tier else self.input
            output_price = tier.output if tier else self.output
        return prompt_tokens * input_price + max_output_tokens * output_price + fee


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
        unknown = set(spec) - {"input", "cached_input", "output", "max_output_tokens",
                               "max_input_tokens", "encoding", "kind", "service_tiers"}
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
        cached = (
            _price(spec["cached_input"], f"{where}.cached_input", problems)
            if "cached_input" in spec
            else input_
        )
        max_out = spec.get("max_output_tokens", 16_384 if kind == "chat" else 0)
        if isinstance(max_out, bool) or not isinstance(max_out, int) or max_out < 0:
            problems.append(f"{where}.max_output_tokens: must be a whole number >= 0")
            max_out = 0
        max_in = spec.get("max_input_tokens", DEFAULT_MAX_INPUT_TOKENS)
        if isinstance(max_in, bool) or not isinstance(max_in, int) or max_in < 1:
            problems.append(f"{where}.max_input_tokens: must be a whole number >= 1")
            max_in = DEFAULT_MAX_INPUT_TOKENS
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
        models[str(name)] = ModelPrice(
            str(name), input_, cached, output, max_out, str(encoding), str(kind), tiers, max_in
        )
    return PriceTable(models), problems


def load_price_table(path: Path) -> tuple[PriceTable, list[str]]:
    """Read and validate a price table file; problems are returned, not raised."""
    from gateway.config import load_yaml  # decimal-preserving loader

    try:
        data = load_yaml(path)
    except (OSError, yaml.YAMLError) as exc:
        return PriceTable({}), [f"{path}: {exc}"]
    return parse_price_table(data, str(path))
