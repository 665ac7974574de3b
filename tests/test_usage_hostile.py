"""Usage is never trusted blindly, overshoot is recorded and never hidden, nothing overflows.

A misbehaving upstream (``tests.hostile``) reports malformed, absurd or larger-than-reserved
usages; the gateway answers the client normally, charges by counting what it cannot believe,
flags and audits what it must believe but did not reserve, and keeps every report working.
"""

from __future__ import annotations

import csv as csvlib
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.budget import GLOBAL
from gateway.estimate import Estimate, estimate
from gateway.ledger import COLUMNS
from gateway.money import format_usd, to_pico
from gateway.pricing import Usage
from gateway.store.interfaces import Ledger
from gateway.store.sqlite import SqliteLedger, _row
from gateway.tokens import count_text, encoding
from gateway.usage import (
    DEFAULT_CONTEXT_TOKENS,
    TOKEN_CEILING,
    InvalidUsage,
    UsageBounds,
    check_usage,
    usage_bounds,
    usage_from_body,
    usage_from_responses,
)
from tests.harness import ADMIN_TOKEN, Stack
from tests.hostile import Hostile, hostile_stack, settled_rows
from tests.test_ledger_contract import Backend, backend, entry, settled  # noqa: F401

MESSAGES = [{"role": "user", "content": "Say hello politely."}]
TEXT = "Hello there!"
BEARER = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

# -- the rule, pure ----------------------------------------------------------------------------
MALFORMED = {
    "negative": b'{"prompt_tokens": -5, "completion_tokens": 3}',
    "float": b'{"prompt_tokens": 12.0, "completion_tokens": 3}',
    "float-1e13": b'{"prompt_tokens": 1e13, "completion_tokens": 1e13}',
    "string": b'{"prompt_tokens": "12", "completion_tokens": "3"}',
    "bool": b'{"prompt_tokens": true, "completion_tokens": 3}',
    "empty": b"{}",
    "only-total": b'{"total_tokens": 15}',
    "no-completion": b'{"prompt_tokens": 12, "total_tokens": 12}',
    "not-an-object": b'"lots"',
    "list": b"[12, 3]",
    "cached-above-prompt": b'{"prompt_tokens": 5, "completion_tokens": 3, '
                           b'"prompt_tokens_details": {"cached_tokens": 6}}',
    "reasoning-above-completion": b'{"prompt_tokens": 5, "completion_tokens": 3, '
                                  b'"completion_tokens_details": {"reasoning_tokens": 4}}',
    "details-not-object": b'{"prompt_tokens": 5, "completion_tokens": 3, '
                          b'"prompt_tokens_details": 2}',
    "2**63-1": b'{"prompt_tokens": 9223372036854775807, "completion_tokens": 3}',
    "1e13-int": b'{"prompt_tokens": 10000000000000, "completion_tokens": 10000000000000}',
    "2**64 (not JSON orjson reads)": b'{"prompt_tokens": 18446744073709551616, '
                                     b'"completion_tokens": 3}',
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_usages_are_refused(raw: bytes) -> None:
    with pytest.raises(InvalidUsage) as exc:
        usage_from_body("chat", b'{"choices": [], "usage": ' + raw + b"}")
    assert "Say hello" not in str(exc.value)


def test_well_formed_usages_are_read() -> None:
    body = (b'{"usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19, '
            b'"prompt_tokens_details": {"cached_tokens": 4, "audio_tokens": 0}, '
            b'"completion_tokens_details": {"reasoning_tokens": 7}}}')
    assert usage_from_body("chat", body) == Usage(12, 4, 7, 7)
    assert usage_from_body("chat", b'{"usage": {"prompt_tokens": 0, "completion_tokens": 0, '
                           b'"prompt_tokens_details": null}}') == Usage()
    assert usage_from_body("chat", b'{"usage": null}') is None
    assert usage_from_body("embeddings", b'{"usage": {"prompt_tokens": 8, '
                           b'"total_tokens": 8}}') == Usage(8)
    assert usage_from_responses({"input_tokens": 3, "output_tokens": 2}) == Usage(3, 0, 2)
    with pytest.raises(InvalidUsage):
        usage_from_responses({"input_tokens": 3, "total_tokens": 5})
    with pytest.raises(InvalidUsage):
        usage_from_body("chat", b'{"usage": {"prompt_tokens": %d, "completion_tokens": 0}}'
                        % (TOKEN_CEILING + 1))


def test_bounds_are_the_context_window_and_the_output_bound() -> None:
    price = SimpleNamespace(max_output_tokens=16_384)  # no max_input_tokens: the fallback
    bounds = usage_bounds(price, Estimate(prompt_tokens=40, output_tokens=100, choices=2))  # type: ignore[arg-type]
    assert bounds == UsageBounds(DEFAULT_CONTEXT_TOKENS, 2 * 16_384)
    sized = SimpleNamespace(max_output_tokens=1_000, max_input_tokens=128_000)
    # A request allowing more than the model's output limit is bounded by what it allows.
    assert usage_bounds(sized, Estimate(200_000, 5_000, 3)) == UsageBounds(200_000, 15_000)  # type: ignore[arg-type]
    assert check_usage(Usage(128_000, 0, 3_000), usage_bounds(sized, Estimate(10, 10, 3))) \
        is None  # type: ignore[arg-type]
    assert "prompt" in str(check_usage(Usage(128_001, 0, 1), UsageBounds(128_000, 3_000)))
    assert "completion" in str(check_usage(Usage(1, 0, 3_001), UsageBounds(128_000, 3_000)))
    huge = SimpleNamespace(max_output_tokens=10**9, max_input_tokens=10**12)
    assert usage_bounds(huge, Estimate(1, 1, 128)) == UsageBounds(TOKEN_CEILING, TOKEN_CEILING)  # type: ignore[arg-type]


# -- through the gateway ------------------------------------------------------------------------
@pytest.fixture
def capped(make_stack: Any) -> Iterator[tuple[Stack, Hostile]]:
    stack: Stack = make_stack(budgets={"global": {"monthly_usd": "5"},
                                       "tenants": {"acme": {"monthly_usd": "1"}}})
    hostile = hostile_stack(stack)
    yield stack, hostile
    hostile.close()


def metric(stack: Stack, name: str, **labels: str) -> float:
    text = stack.request("GET", "/metrics").body.decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and labels.items() <= s.labels.items():
                total += s.value
    return total


def expected_counted(stack: Stack, text: str, max_tokens: int = 50) -> Usage:
    price = stack.gw.prices.lookup("gpt-4o-mini")
    assert price is not None
    est = estimate("chat", {"model": "gpt-4o-mini", "messages": MESSAGES,
                            "max_tokens": max_tokens}, price)
    return Usage(est.prompt_tokens, 0, count_text(text, encoding(price.encoding)))


UNTRUSTED = ("negative", "float", "string", "empty", "only-total", "2**63-1", "1e13-int")


@pytest.mark.parametrize("case", UNTRUSTED)
def test_malformed_usage_is_charged_by_counting(capped: tuple[Stack, Hostile], case: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    stack, hostile = capped
    hostile.plan.usage = MALFORMED[case]
    with caplog.at_level(logging.WARNING, logger="costwall.usage"):
        raw = stack.client().chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=50)
    assert raw.parse().choices[0].message.content == TEXT
    [row] = settled_rows(stack)
    price = stack.gw.prices.lookup("gpt-4o-mini")
    assert price is not None
    counted = expected_counted(stack, TEXT)
    assert row.usage_source == "invalid"
    assert (row.prompt_tokens, row.completion_tokens) == (counted.prompt_tokens,
                                                          counted.completion_tokens)
    assert row.cost == price.cost(counted) > 0 and row.cost <= row.reserved
    assert raw.headers["x-costwall-cost-usd"] == format_usd(row.cost)
    assert metric(stack, "costwall_usage_invalid_total", endpoint="chat") == 1
    assert "not believed" in caplog.text and "Say hello" not in caplog.text


def test_malformed_usage_in_a_stream_is_counted_and_still_stripped(
        capped: tuple[Stack, Hostile]) -> None:
    stack, hostile = capped
    hostile.plan.usage = MALFORMED["float-1e13"]
    hostile.plan.newline = b"\r\n"
    chunks = list(stack.client().chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=50, stream=True))
    assert all(c.choices and c.usage is None for c in chunks)
    [row] = settled_rows(stack)
    assert row.usage_source == "invalid"
    assert row.completion_tokens == expected_counted(stack, TEXT).completion_tokens


def test_malformed_usage_with_nothing_to_count_is_charged_the_reserved_bound(
        capped: tuple[Stack, Hostile]) -> None:
    stack, hostile = capped
    hostile.plan.usage = MALFORMED["empty"]
    hostile.plan.text = []
    stack.client().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                           max_tokens=50)
    [row] = settled_rows(stack)
    assert (row.usage_source, row.cost) == ("invalid", row.reserved) and row.cost > 0


def test_absurd_usages_leave_the_gateway_healthy_and_restartable(
        capped: tuple[Stack, Hostile]) -> None:
    stack, hostile = capped
    client = stack.client()
    for case in ("2**63-1", "1e13-int", "1e13-int", "float-1e13"):
        hostile.plan.usage = MALFORMED[case]
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=50)
        cost = raw.headers["x-costwall-cost-usd"]
        assert raw.http_response.status_code == 200 and to_pico(cost) < to_pico("0.001")
    # Later requests are admitted (not refused by a corrupted in-memory spend).
    hostile.plan.usage = b'{"prompt_tokens": 12, "completion_tokens": 3}'
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=50)
    rows = settled_rows(stack, 5)
    assert len(rows) == 5 and {r.state for r in rows} == {"settled"}
    assert [r.usage_source for r in rows].count("invalid") == 4
    assert sum(r.cost for r in rows) == sum(s.spent for s in stack.gw.budgets.status()
                                            if (s.scope, s.id) == GLOBAL)
    month = stack.gw.budgets.current_period()
    for path in ("/admin", f"/admin/api/usage?month={month}&group_by=model",
                 f"/admin/invoices/{month}.csv", "/admin/api/budget"):
        assert stack.request("GET", path, headers=BEARER).status == 200, path
    stack.restart()
    assert stack.request("GET", "/readyz").status == 200
    client = stack.client()
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=50)
    assert len(settled_rows(stack, 6)) == 6


def test_sqlite_sums_past_64_bits_stay_exact(capped: tuple[Stack, Hostile]) -> None:
    """Rows an older costwall could write (1e13-token answers): reports and the budget load at
    start must not die on SQLite's integer overflow."""
    stack, _ = capped
    month = stack.gw.budgets.current_period()
    ledger: Ledger = stack.gw.ledger
    big = 2**62 + 12345
    for n in range(3):
        e = entry(n, period=month, ts=stack.gw.clock())
        ledger.settle(replace(settled(e, big), prompt_tokens=big, completion_tokens=big))
    stack.flush()
    [row] = stack.lt.run(ledger.usage(month, "tenant"))
    assert (row.cost, row.prompt_tokens, row.completion_tokens) == (3 * big,) * 3
    assert stack.lt.run(ledger.spend_by_scope(month))[GLOBAL] == 3 * big
    for path in ("/admin", f"/admin/api/usage?month={month}&group_by=day",
                 f"/admin/invoices/{month}.csv"):
        assert stack.request("GET", path, headers=BEARER).status == 200, path
    stack.restart()  # the budget book loads the month's spend: 3 x 2**62 > 2**63 - 1
    assert stack.request("GET", "/readyz").status == 200
    with pytest.raises(openai.APIStatusError) as exc:  # far over every cap now
        stack.client().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                               max_tokens=50)
    assert exc.value.status_code == 402


def test_overshoot_is_charged_flagged_audited_counted_and_shown(
        capped: tuple[Stack, Hostile]) -> None:
    stack, hostile = capped
    # A believable usage (within the context window) far above the prompt estimate.
    hostile.plan.usage = b'{"prompt_tokens": 50000, "completion_tokens": 40}'
    raw = stack.client().chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=50,
        extra_headers={"X-Costwall-Campaign": "spring"})
    [row] = settled_rows(stack)
    price = stack.gw.prices.lookup("gpt-4o-mini")
    assert price is not None
    actual = price.cost(Usage(50_000, 0, 40))
    assert (row.usage_source, row.cost) == ("upstream", actual)
    assert row.overshoot == actual - row.reserved > 0
    assert raw.headers["x-costwall-cost-usd"] == format_usd(actual)
    # The audit trail, in both views.
    [event] = list(stack.gw.audit.events("overshoot"))
    assert event["request_id"] == row.id and event["overshoot_usd"] == format_usd(row.overshoot)
    assert event["scope"] == "global:global tenant:acme" and event["campaign"] == "spring"
    md = (stack.gw.audit.dir / "overshoot-executions.md").read_text()
    assert row.id in md and format_usd(row.overshoot) in md
    # The metric, per capped scope kind (campaign "spring" has no cap: not counted).
    usd = float(format_usd(row.overshoot))
    for scope in ("global", "tenant"):
        assert metric(stack, "costwall_budget_overshoot_usd_total", scope=scope) == \
            pytest.approx(usd)
    assert metric(stack, "costwall_budget_overshoot_usd_total", scope="campaign") == 0
    # The admin API and pages.
    budget = stack.request("GET", "/admin/api/budget", headers=BEARER).json()
    tenant = next(s for s in budget["scopes"] if (s["scope"], s["id"]) == ("tenant", "acme"))
    assert (tenant["overshoot_usd"], tenant["overshoot_requests"]) == (
        format_usd(row.overshoot), 1)
    page = stack.request("GET", "/admin", headers=BEARER).body.decode()
    assert 'id="overshoot"' in page and "kind=overshoot" in page
    month = stack.gw.budgets.current_period()
    csv = stack.request("GET", f"/admin/invoices/{month}.csv", headers=BEARER).body.decode()
    header, line = csvlib.reader(csv.splitlines()[:2])
    assert line[header.index("overshoot_usd")] == format_usd(row.overshoot)
    logs = stack.request("GET", "/admin/api/logs/overshoot", headers=BEARER).json()
    assert row.id in str(logs)
    assert row.id in stack.request("GET", "/admin/logs?kind=overshoot",
                                   headers=BEARER).body.decode()


def test_no_overshoot_no_trace(capped: tuple[Stack, Hostile]) -> None:
    stack, _ = capped
    stack.client().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                           max_tokens=50)
    [row] = settled_rows(stack)
    assert row.overshoot == 0 and not list(stack.gw.audit.events("overshoot"))
    assert 'id="overshoot"' not in stack.request("GET", "/admin", headers=BEARER).body.decode()


# -- the ledger, both backends -------------------------------------------------------------------
async def test_overshoot_column_and_totals(backend: Backend) -> None:  # noqa: F811
    ledger = await backend.open()
    rows = [settled(entry(1, campaign="spring"), 900, overshoot=400),
            settled(entry(2, tenant="globex", agent="research", key_name="globex"), 50,
                    overshoot=20),
            settled(entry(3), 10)]
    for row in rows:
        await ledger.begin(entry(int(row.id[-4:])))
        ledger.settle(row)
    await ledger.flush()
    stored = {r.id: r.overshoot for r in await ledger.entries("2026-11")}
    assert stored == {"cw-0001": 400, "cw-0002": 20, "cw-0003": 0}
    found = await ledger.overshoot("2026-11")
    assert found[GLOBAL] == (420, 2)
    assert found[("tenant", "acme")] == (400, 1) and found[("campaign", "spring")] == (400, 1)
    assert found[("agent", "research")] == (20, 1)
    assert await ledger.overshoot("2026-10") == {}


def test_an_output_limit_no_ledger_row_can_hold_is_a_400(make_stack: Any) -> None:
    """Without caps a reservation of max_tokens=10**17 x 128 choices would be granted, its
    pending row would not fit a 64-bit column, and the journal would keep it for a recovery
    that could never store it."""
    stack: Stack = make_stack()
    with pytest.raises(openai.BadRequestError) as exc:
        stack.client().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                               max_tokens=10**17, n=128)
    assert exc.value.body["param"] == "max_tokens"  # type: ignore[index]
    assert stack.state.total_requests == 0 and stack.rows() == []
    stack.client().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                           max_tokens=10**6)  # large but storable: forwarded
    stack.restart()
    assert stack.request("GET", "/readyz").status == 200


async def test_journal_rows_written_before_the_overshoot_column_are_recovered(
        tmp_path: Path) -> None:
    """A crash under the previous version leaves journal rows one field short: the upgrade's
    recovery still settles them at their reserved amount."""
    path = tmp_path / "ledger.db"
    old_row = list(_row(replace(entry(7), replica="local")))[:-1]
    assert len(old_row) == len(COLUMNS) - 1
    path.with_name("ledger.db.journal.1").write_bytes(orjson.dumps(old_row) + b"\n")
    ledger = SqliteLedger(path)
    await ledger.start()
    try:
        assert await ledger.recover() == 1
        [row] = await ledger.entries("2026-11")
        assert (row.id, row.state, row.cost, row.usage_source, row.overshoot) == (
            "cw-0007", "settled", 10_000, "reserved", 0)
    finally:
        await ledger.close()
