"""Pure core: money, prices, token counts, SSE metering, budget arithmetic, config loading."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from gateway import tokens
from gateway.budget import BudgetEngine, ClampRequest, period_bounds, period_of
from gateway.config import ConfigError, hash_key, load_settings
from gateway.errors import BudgetExceeded
from gateway.money import MoneyError, format_usd, to_pico
from gateway.pricing import Usage, load_price_table, parse_price_table
from gateway.usage import InvalidUsage, StreamMeter, usage_from_body
from tests.harness import ROOT

PRICES, PROBLEMS = load_price_table(ROOT / "config" / "pricing.yaml")


# -- money and prices ---------------------------------------------------------------------------
def test_money_is_exact_and_refuses_floats() -> None:
    assert to_pico("0.1") + to_pico("0.2") == to_pico("0.3")
    assert format_usd(to_pico("1234.5")) == "1234.5" and format_usd(0) == "0"
    for bad in (0.1, "abc", "-1", "NaN", "1e-13", True, "1e999999", "Infinity"):
        with pytest.raises(MoneyError):
            to_pico(bad)


def test_shipped_price_table_is_valid_and_resolves_snapshots() -> None:
    assert PROBLEMS == [] and len(PRICES) > 50
    for snapshot, base in [("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
                           ("gpt-4.1-2025-04-14", "gpt-4.1"), ("o3-2025-04-16", "o3"),
                           ("gpt-5-mini-2025-08-07", "gpt-5-mini")]:
        assert PRICES.lookup(snapshot).name == base  # type: ignore[union-attr]
    # A dated snapshot with its own prices keeps them.
    assert PRICES.lookup("gpt-4o-2024-05-13").name == "gpt-4o-2024-05-13"  # type: ignore
    assert PRICES.lookup("gpt-4") is not None and PRICES.lookup("gpt-4o") is not None
    assert PRICES.lookup("gpt-4-imaginary").name == "gpt-4"  # type: ignore[union-attr]
    assert PRICES.lookup("gpt-4oo") is None  # prefixes stop at a dash
    assert PRICES.lookup("text-embedding-3-small").kind == "embedding"  # type: ignore


def test_cost_formula_cached_and_reasoning() -> None:
    price = PRICES.lookup("gpt-5")
    assert price is not None  # 1.25 in, 0.125 cached, 10 out per 1M
    usage = Usage(prompt_tokens=1000, cached_tokens=400, completion_tokens=300,
                  reasoning_tokens=200)
    expected = (600 * Decimal("1.25") + 400 * Decimal("0.125") + 300 * Decimal(10)) / 10**6
    assert Decimal(format_usd(price.cost(usage))) == expected
    # Flex tier halves the price; cached input follows in proportion.
    flex = price.cost(usage, "flex")
    assert flex * 2 == price.cost(usage)
    assert price.upper_bound(10, 5) == 10 * price.input + 5 * price.output


def test_price_table_validation_lists_every_problem() -> None:
    _, problems = parse_price_table({"models": {
        "a": {"input": 0.1, "output": "1"},
        "b": {"input": "0.0000001", "output": "x", "encoding": "p50k"},
        "c": {"output": "1", "colour": "red"},
    }})
    text = "\n".join(problems)
    for fragment in ("models.a.input", "binary float", "6 decimal places", "models.b.output",
                     "models.b.encoding", "'input' price is required", "unknown field"):
        assert fragment in text


# -- tokens ---------------------------------------------------------------------------------------
def test_encodings_are_bundled_and_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    enc = tokens.encoding("o200k_base")
    assert enc.encode_ordinary("hello world") == [24912, 2375]
    assert tokens.count_text("hello world", tokens.encoding("cl100k_base")) == 2
    bad = tmp_path / "tiktoken"
    bad.mkdir()
    (bad / "SHA256SUMS").write_text("00  cl100k_base.tiktoken\n")
    (bad / "cl100k_base.tiktoken").write_bytes(b"aGk= 0\n")
    monkeypatch.setattr(tokens, "DATA_DIR", bad)
    monkeypatch.setattr(tokens, "_cache", {})
    with pytest.raises(tokens.EncodingFileError, match="SHA-256"):
        tokens.encoding("cl100k_base")


def test_chat_formula() -> None:
    enc = tokens.encoding("o200k_base")
    messages = [{"role": "user", "content": "hello world"}]
    # 3 priming + 3 per message + "user" (1) + "hello world" (2)
    assert tokens.count_messages(messages, enc) == 9
    named = [{"role": "user", "name": "ana", "content": "hello world"}]
    assert tokens.count_messages(named, enc) == 9 + 1 + len(enc.encode("ana"))
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello world"},
                                          {"type": "image_url", "image_url": {"url": "x"}}]}]
    found: list = []
    assert tokens.count_messages(parts, enc, uncounted=found) == 9
    assert found == [parts[0]["content"][1]]
    assert tokens.count_messages(messages, enc, tools=[{"type": "function"}]) > 9 + 12


# -- SSE ------------------------------------------------------------------------------------------
def test_stream_meter_strips_usage_chunk_and_survives_split_events() -> None:
    events = (b'data: {"choices":[{"delta":{"content":"Hel"}}],"usage":null}\n\n'
              b'data: {"choices":[{"delta":{"content":"lo"}}],"usage":null}\n\n'
              b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,'
              b'"prompt_tokens_details":{"cached_tokens":1}}}\n\n'
              b'data: [DONE]\n\n')
    meter = StreamMeter("chat", strip_usage_chunk=True)
    out = b"".join(meter.feed(events[i:i + 7]) for i in range(0, len(events), 7))
    out += meter.finish()
    assert b'"choices":[]' not in out and out.endswith(b"data: [DONE]\n\n")
    assert meter.usage == Usage(5, 1, 2, 0) and meter.streamed_text == "Hello"
    keep = StreamMeter("chat")
    assert keep.feed(events) == events


def test_responses_usage_from_final_events() -> None:
    meter = StreamMeter("responses")
    meter.feed(b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
               b'"delta":"Hi"}\n\nevent: response.incomplete\ndata: {"type":'
               b'"response.incomplete","response":{"usage":{"input_tokens":4,"output_tokens":9,'
               b'"output_tokens_details":{"reasoning_tokens":3}}}}\n\n')
    assert meter.usage == Usage(4, 0, 9, 3) and meter.streamed_text == "Hi"
    assert usage_from_body("embeddings", b'{"usage": {"prompt_tokens": 2}}') == Usage(2)
    assert usage_from_body("chat", b'{"id": "x"}') is None
    # A chat usage without completion_tokens, or a body that says usage but is not JSON,
    # is not believed (gateway.usage.InvalidUsage; tests/test_usage_hostile.py).
    with pytest.raises(InvalidUsage):
        usage_from_body("chat", b'{"usage": {"prompt_tokens": 2}}')
    with pytest.raises(InvalidUsage):
        usage_from_body("chat", b"not json with \"usage\"")


# -- budgets --------------------------------------------------------------------------------------
def engine(limits: dict, spend: dict | None = None, **kwargs: object) -> BudgetEngine:
    async def load(period: str) -> dict:
        return dict(spend or {})

    return BudgetEngine(limits, ZoneInfo("UTC"), [Decimal("0.5"), Decimal("0.8")], load,
                        **kwargs)  # type: ignore[arg-type]


def test_periods_follow_the_time_zone() -> None:
    tz = ZoneInfo("America/New_York")
    assert period_of(datetime(2026, 12, 1, 3, 0, tzinfo=UTC), tz) == "2026-11"
    start, end = period_bounds("2026-12", tz)
    assert start == datetime(2026, 12, 1, 5, 0, tzinfo=UTC)
    assert end == datetime(2027, 1, 1, 5, 0, tzinfo=UTC)


def test_reserve_settle_never_exceeds_limit() -> None:
    async def run() -> None:
        e = engine({("global", "global"): 100, ("tenant", "a"): 60}, {("tenant", "a"): 10})
        scopes = [("global", "global"), ("tenant", "a"), ("agent", "x")]
        r1 = await e.reserve(scopes, 40)
        with pytest.raises(BudgetExceeded) as info:
            await e.reserve(scopes, 20)
        assert (info.value.scope, info.value.spent, info.value.reserved) == ("tenant", 10, 40)
        assert e.settle(r1, 30) != []  # tenant a passed 50% of 60
        assert e.settle(r1, 30) == []  # settling twice is a no-op
        assert e.remaining(r1) == 20
        r2 = await e.reserve(scopes, 20)
        crossings = e.settle(r2, 20)
        assert [(c.scope, str(c.threshold)) for c in crossings] == [("global", "0.5"),
                                                                 ("tenant", "0.8")]
        forced = await e.reserve(scopes, 50, force=True)
        e.settle(forced, 50)
        [g, t] = e.status()
        assert (g.spent, t.spent, t.reserved) == (100, 110, 0)
        assert e.warnings(forced) == ["global:global 100%", "tenant:a 183%"]

    asyncio.run(run())


def test_clamp_lowers_output_to_what_fits() -> None:
    async def run() -> None:
        e = engine({("global", "global"): 1000}, near_cap="clamp", min_output_tokens=4)
        clamp = ClampRequest(prompt_cost=100, output_price=10, requested_tokens=500)
        r = await e.reserve([("global", "global")], 100 + 500 * 10, clamp=clamp)
        assert r.clamped_tokens == 90 and r.amount == 1000
        e.settle(r, 1000 - 7 * 10)
        with pytest.raises(BudgetExceeded):  # 70 left: 100 prompt does not fit at all
            await e.reserve([("global", "global")], 5100, clamp=clamp)

    asyncio.run(run())


def test_new_limit_loads_its_spend_and_removal_frees() -> None:
    async def run() -> None:
        e = engine({}, {("campaign", "c"): 70})
        await e.book()
        await e.set_limit(("campaign", "c"), 100)
        with pytest.raises(BudgetExceeded):
            await e.reserve([("campaign", "c")], 31)
        await e.set_limit(("campaign", "c"), None)
        assert (await e.reserve([("campaign", "c")], 10**9)).scopes == ()

    asyncio.run(run())


# -- config ---------------------------------------------------------------------------------------
def test_config_lists_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("""
server: {port: 99999}
database: mysql://x
budgets:
  timezone: Mars/Olympus
  near_cap: sometimes
  global: {monthly_usd: -5}
  tenants: {acme: {monthly_usd: abc}}
keys:
  - {name: a, tenant: acme}
  - {name: a, key: k, tenant: "bad tenant"}
colour: blue
""")
    with pytest.raises(ConfigError) as info:
        load_settings(path, {})
    text = "\n".join(info.value.problems)
    for fragment in ("server.port", "database", "budgets.timezone", "budgets.near_cap",
                     "budgets.global.monthly_usd", "budgets.tenants.acme", "keys[0]",
                     "duplicate key name", "keys[1].tenant", "colour: unknown setting"):
        assert fragment in text, fragment
    assert len(info.value.problems) >= 10


def test_config_env_wins_and_money_stays_exact(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("budgets: {global: {monthly_usd: 0.1}, tenants: {t: {monthly_usd: 3}}}\n"
                    "keys: [{name: k, key: sk-cw-x, tenant: t}]\n")
    settings, warnings = load_settings(path, {"MAX_MONTHLY_BUDGET": "12.34",
                                              "ALLOW_BUDGET_OVERRIDE": "true",
                                              "COSTWALL_DB": "sqlite:///x.db"})
    assert settings.budgets.limits[("global", "global")]["monthly"] == to_pico("12.34")
    assert settings.budgets.limits[("tenant", "t")]["monthly"] == to_pico(3)
    assert settings.override_allow and settings.database == "sqlite:///x.db"
    assert settings.keys[0].key_sha256 == hash_key("sk-cw-x")
    assert any("OPENAI_API_KEY" in w for w in warnings)
    settings, _ = load_settings(path, {})
    # YAML 0.1 is read exactly
    assert settings.budgets.limits[("global", "global")]["monthly"] == to_pico("0.1")


def test_check_command(tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "gateway.cli", "check"], capture_output=True,
                        text=True, cwd=ROOT, env={"PATH": "/usr/bin:/bin"})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "warning: upstream key" in ok.stdout and "ok: configuration valid" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("budgets: {near_cap: maybe, global: {monthly_usd: x}}\n")
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "check", "--config", str(bad)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 1 and "2 problem(s) found" in out.stdout
