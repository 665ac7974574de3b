"""The per-request fast paths give exactly what the plain implementations they replaced gave."""

from __future__ import annotations

import logging
import random
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from gateway import logs
from gateway.budget import BudgetEngine, PeriodBook, Reservation, ScopeState
from gateway.config import ConfigError, load_settings
from gateway.headers import REDACTED, client_response_headers, upstream_request_headers
from gateway.money import _format_usd_decimal, format_usd
from gateway.windows import Span


def test_format_usd_matches_decimal_on_edges_and_random_values() -> None:
    edges = [0, 1, -1, 10**12, 10**12 + 1, 10**12 - 1, 150_000_000, 1500, 10**27,
             10**28 - 1, 10**28, 10**28 + 1, 10**30 + 7, -(10**12) - 1, 10**15 * 10**12]
    rng = random.Random(8)
    values = list(edges)
    for _ in range(20_000):
        values.append(rng.randint(0, 10 ** rng.randint(0, 32)))
        values.append(-rng.randint(0, 10 ** rng.randint(0, 20)))
        values.append(rng.randint(0, 99) * 10 ** rng.randint(0, 30))
    assert [v for v in values if format_usd(v) != _format_usd_decimal(v)] == []
    assert format_usd(0) == "0" and format_usd(10**12) == "1"
    assert format_usd(10**12 + 1) == "1.000000000001"
    assert format_usd(150_000_000) == "0.00015" and format_usd(-1500) == "-0.0000000015"


# The one-pass header filters against the two-pass originals they replaced.
def _named(pairs: list[tuple[str, str]]) -> set[str]:
    return {v.strip().lower() for n, value in pairs if n.lower() == "connection"
            for v in value.split(",") if v.strip()}


def _old_request(pairs: list[tuple[str, str]], key: str | None) -> list[tuple[str, str]]:
    from gateway.headers import _REQUEST_DROP
    drop = _REQUEST_DROP | _named(pairs)
    out = [(n, v) for n, v in pairs
           if n.lower() not in drop and not n.lower().startswith("x-costwall-")]
    out.append(("Accept-Encoding", "identity"))
    if key:
        out.append(("Authorization", f"Bearer {key}"))
    return out


def _old_response(pairs: list[tuple[str, str]], key: str | None) -> list[tuple[str, str]]:
    from gateway.headers import _RESPONSE_DROP
    drop = _RESPONSE_DROP | _named(pairs)
    out = [(n, v) for n, v in pairs if n.lower() not in drop]
    return [(n, v.replace(key, REDACTED)) for n, v in out] if key else out


def test_header_filters_match_the_two_pass_originals() -> None:
    rng = random.Random(3)
    names = ["Content-Type", "connection", "Connection", "Keep-Alive", "X-Foo", "x-foo",
             "X-Costwall-Agent", "Authorization", "Host", "Date", "Server", "Retry-After",
             "Content-Length", "TE", "Upgrade", "X-Request-Id", "Set-Cookie", "Cookie"]
    values = ["a", "X-Foo, retry-after", "keep-alive", " x-request-id ,", "sk-up-1 echo",
              "", "close", "Bearer sk-up-1"]
    for _ in range(3000):
        pairs = [(rng.choice(names), rng.choice(values)) for _ in range(rng.randint(0, 9))]
        key = rng.choice([None, "", "sk-up-1"])
        assert upstream_request_headers(pairs, key) == _old_request(pairs, key)
        assert client_response_headers(pairs, key) == _old_response(pairs, key)


def test_warnings_and_crossings_compare_exactly_at_the_threshold() -> None:
    async def no_spend(span: Span) -> dict:
        return {}

    engine = BudgetEngine({("global", "global"): 1000}, ZoneInfo("UTC"),
                          [Decimal("0.8"), Decimal("0.5")], no_spend)
    book = engine._books["2026-11"] = PeriodBook("2026-11")
    book.states[("global", "global")] = ScopeState(1000)
    r = Reservation("2026-11", (("2026-11", "global", "global"),), 499)
    book.states[("global", "global")].reserved = 499
    assert engine.settle(r, 499) == [] and engine.warnings(r) == []
    r = Reservation("2026-11", (("2026-11", "global", "global"),), 1)
    book.states[("global", "global")].reserved = 1
    [half] = engine.settle(r, 1)  # 500 of 1000: exactly 50 %
    assert (half.threshold, half.spent, engine.warnings(r)) == (Decimal("0.5"), 500,
                                                                ["global:global 50%"])
    r = Reservation("2026-11", (("2026-11", "global", "global"),), 700)
    book.states[("global", "global")].reserved = 700
    crossed = engine.settle(r, 700)  # 1200: past 80 % (50 % already reported)
    assert [c.threshold for c in crossed] == [Decimal("0.8")]
    assert engine.warnings(r) == ["global:global 120%"]


def test_access_log_switch(tmp_path: Path) -> None:
    (tmp_path / "on.yaml").write_text("{}\n")
    (tmp_path / "off.yaml").write_text("logging: {access: false}\n")
    (tmp_path / "bad.yaml").write_text("logging: {access: maybe}\n")
    assert load_settings(tmp_path / "on.yaml", {})[0].access_log is True
    assert load_settings(tmp_path / "off.yaml", {})[0].access_log is False
    with pytest.raises(ConfigError, match=r"logging\.access"):
        load_settings(tmp_path / "bad.yaml", {})
    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.logProcesses
    access = logging.getLogger("costwall.access")
    try:
        logs.configure("text", "INFO", access=False)
        assert not access.isEnabledFor(logging.INFO) and access.isEnabledFor(logging.WARNING)
        logs.configure("json", "INFO")
        assert access.isEnabledFor(logging.INFO)
    finally:
        root.handlers[:], logging.logProcesses = saved[0], saved[2]
        root.setLevel(saved[1])
        access.setLevel(logging.NOTSET)
