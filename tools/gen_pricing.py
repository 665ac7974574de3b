"""Regenerate config/pricing.yaml from LiteLLM-style price JSON files (per-token floats).

Run once when prices change: ``python tools/gen_pricing.py tools/data/openai-prices.json``
prints the table; with ``--write`` it writes it to both config/pricing.yaml (the repository's
table) and gateway/data/pricing.yaml (the copy shipped inside the package, used when a config
sets no ``pricing``). tests/test_install.py fails while the two differ. The Anthropic entries
come from ``tools/data/anthropic-prices.json`` (``--anthropic PATH`` for another file; see
tools/data/README.md for where both files come from and when they were taken).
Floats are only read here, turned into exact decimals per 1M tokens via their shortest repr.
``max_input_tokens`` (the context window, admission's bound of last resort) is copied where the
source has it; a model without one gets the gateway's default (``DEFAULT_MAX_INPUT_TOKENS``).
"""

from __future__ import annotations

import json
import sys
from decimal import Decimal

O200K = ("gpt-5", "gpt-6", "gpt-4.1", "gpt-4o", "o1", "o3", "o4", "chat-latest", "gpt-audio",
         "gpt-daybreak", "daybreak", "gpt-rosalind", "computer-use")
DEFAULT_MAX_OUTPUT = 128_000


def per_million(value: float | None) -> str | None:
    if value is None:
        return None
    d = Decimal(repr(value)) * 1_000_000
    text = format(d.normalize(), "f")
    return text


def encoding_for(name: str) -> str:
    return "o200k_base" if name.startswith(O200K) else "cl100k_base"


ANTHROPIC_DEFAULT = "tools/data/anthropic-prices.json"
ANTHROPIC_FIELDS = ("input_cost_per_token", "output_cost_per_token",
                    "cache_creation_input_token_cost", "cache_creation_input_token_cost_above_1hr",
                    "cache_read_input_token_cost", "max_output_tokens", "max_input_tokens",
                    "input_cost_per_token_above_100k_tokens", "provider_specific_entry")


def _base(name: str, names: list[str]) -> str | None:
    return next((b for b in sorted(names, key=len, reverse=True)
                 if b != name and name.startswith(b + "-")), None)


def anthropic_lines(models: dict[str, dict]) -> list[str]:  # type: ignore[type-arg]
    """Anthropic entries: input, cache reads and writes (5 m, 1 h), output, windows, web
    search per request, the long-context tier and inference-geography multipliers."""
    out: list[str] = []
    names = sorted(n for n in models if models[n].get("mode", "chat") == "chat")
    for name in names:
        m = models[name]
        base = _base(name, names)
        if base and all(models[base].get(f) == m.get(f) for f in ANTHROPIC_FIELDS):
            continue
        out.append(f"  {name}:" + (f"  # deprecated {m['deprecation_date']}"
                                   if m.get("deprecation_date") else ""))
        out.append(f"    input: \"{per_million(m['input_cost_per_token'])}\"")
        out.append(f"    cache_read: \"{per_million(m['cache_read_input_token_cost'])}\"")
        out.append(f"    cache_write_5m: \"{per_million(m['cache_creation_input_token_cost'])}\"")
        out.append("    cache_write_1h: "
                   f"\"{per_million(m['cache_creation_input_token_cost_above_1hr'])}\"")
        out.append(f"    output: \"{per_million(m['output_cost_per_token'])}\"")
        out.append(f"    max_output_tokens: {m.get('max_output_tokens') or DEFAULT_MAX_OUTPUT}")
        if m.get("max_input_tokens"):
            out.append(f"    max_input_tokens: {m['max_input_tokens']}")
        search = m.get("search_context_cost_per_query")
        if isinstance(search, dict) and search:  # the dearest context size: a bound
            out.append(f"    web_search_usd: \"{Decimal(repr(max(search.values()))).normalize()}\"")
        geo = m.get("provider_specific_entry")
        if isinstance(geo, dict) and geo:
            out.append("    inference_geo: {" + ", ".join(
                f"{region}: \"{Decimal(repr(factor))}\"" for region, factor in sorted(
                    geo.items())) + "}")
        if m.get("input_cost_per_token_above_100k_tokens") is not None:
            out.append("    long_context: {above_tokens: 100000, "
                       f"input: \"{per_million(m['input_cost_per_token_above_100k_tokens'])}\", "
                       "output: "
                       f"\"{per_million(m['output_cost_per_token_above_100k_tokens'])}\",")
            out.append("      cache_read: "
                       f"\"{per_million(m['cache_read_input_token_cost_above_100k_tokens'])}\", "
                       "cache_write_5m: "
                       f"\"{per_million(m['cache_creation_input_token_cost_above_100k_tokens'])}\""
                       ",")
            out.append("      cache_write_1h: \"" + str(per_million(
                m["cache_creation_input_token_cost_above_1hr_above_100k_tokens"])) + "\"}")
    return out


def main(path: str, anthropic: str | None = ANTHROPIC_DEFAULT) -> None:
    models = json.load(open(path))["models"]
    out = ["# USD per 1M tokens. Generated by tools/gen_pricing.py from openai-prices.json;",
           "# edit freely. Dated snapshots resolve to their base entry by longest prefix, so a",
           "# snapshot is listed only where its prices differ from the base entry.",
           "models:"]
    names = sorted(n for n in models if not n.startswith("ft:") and "/" not in n)
    fields = ("input_cost_per_token", "cache_read_input_token_cost", "output_cost_per_token",
              "max_output_tokens", "max_input_tokens")
    for name in names:
        m = models[name]
        base = next((b for b in sorted(names, key=len, reverse=True)
                     if b != name and name.startswith(b + "-")), None)
        if base and all(models[base].get(f) == m.get(f) for f in fields):
            continue
        mode = m.get("mode", "chat")
        out.append(f"  {name}:")
        out.append(f"    input: \"{per_million(m['input_cost_per_token'])}\"")
        if mode != "embedding":
            cached = per_million(m.get("cache_read_input_token_cost"))
            if cached is not None:
                out.append(f"    cached_input: \"{cached}\"")
            out.append(f"    output: \"{per_million(m['output_cost_per_token'])}\"")
            out.append(f"    max_output_tokens: {m.get('max_output_tokens') or DEFAULT_MAX_OUTPUT}")
        else:
            out.append("    kind: embedding")
        if m.get("max_input_tokens"):  # the context window; absent: the gateway's default
            out.append(f"    max_input_tokens: {m['max_input_tokens']}")
        out.append(f"    encoding: {encoding_for(name)}")
        tiers = []
        for tier in ("flex", "priority"):
            i, o = m.get(f"input_cost_per_token_{tier}"), m.get(f"output_cost_per_token_{tier}")
            if i is not None and o is not None:
                tiers.append(f"      {tier}: {{input: \"{per_million(i)}\", "
                             f"output: \"{per_million(o)}\"}}")
        if tiers:
            out.append("    service_tiers:")
            out.extend(tiers)
    if anthropic:
        out.append("  # Anthropic (tools/data/anthropic-prices.json): cache_read, cache_write_5m")
        out.append("  # and cache_write_1h per 1M tokens; web_search_usd per search.")
        out.extend(anthropic_lines(json.load(open(anthropic))))
    print("\n".join(out))


def write_both(path: str, anthropic: str | None = ANTHROPIC_DEFAULT) -> None:
    """Generate once and write the same bytes to the repository's and the package's table."""
    import contextlib
    import io
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        main(path, anthropic)
    for target in (root / "config" / "pricing.yaml", root / "gateway" / "data" / "pricing.yaml"):
        target.write_text(buffer.getvalue(), encoding="utf-8")
        print(f"wrote {target}")


if __name__ == "__main__":
    args = sys.argv[1:]
    extra = ANTHROPIC_DEFAULT
    if "--anthropic" in args:
        at = args.index("--anthropic")
        extra = args[at + 1]
        del args[at:at + 2]
    if args[:1] == ["--write"]:
        write_both(args[1], extra)
    else:
        main(args[0], extra)
