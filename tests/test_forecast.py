"""The month-end forecast: the pure projection, its backtest bound, and the admin API, the
gauge and the dashboard of a real gateway whose clock walks through a month of traffic."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from gateway.forecast import MonthClock, project
from gateway.forecast_service import forecasts
from tests.harness import ADMIN_TOKEN, FINANCE_TOKEN, Stack
from tools import forecast_backtest as backtest

USD = 10**12
MSG = [{"role": "user", "content": "hello"}]
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
FINANCE = {"Authorization": f"Bearer {FINANCE_TOKEN}"}


# -- the pure projection -----------------------------------------------------------------------
def test_steady_pace_projects_the_month_and_the_day_it_runs_out() -> None:
    daily = {d: 10 * USD for d in range(1, 11)}
    p = project(100 * USD, 200 * USD, daily, 30, 11, Fraction(0))
    assert p.projected == 300 * USD and p.rate == 10 * USD
    assert p.exhausts_day == 20 and p.exhausts_fraction == 1
    assert sum(amount for _, amount in p.curve) == 200 * USD
    assert project(100 * USD, 400 * USD, daily, 30, 11, Fraction(0)).exhausts_day is None


def test_half_a_day_counts_half_and_an_exhausted_scope_is_exhausted_now() -> None:
    daily = {1: 10 * USD, 2: 10 * USD, 3: 5 * USD}
    p = project(25 * USD, 30 * USD, daily, 30, 3, Fraction(1, 2))
    assert p.projected == 25 * USD + 5 * USD + 27 * 10 * USD
    assert (p.exhausts_day, p.exhausts_fraction) == (3, Fraction(1))
    done = project(31 * USD, 30 * USD, daily, 30, 3, Fraction(1, 2))
    assert (done.exhausts_day, done.exhausts_fraction) == (3, Fraction(1, 2))


def test_weekends_are_projected_as_weekends() -> None:
    # 14 days from a Monday: weekdays 100, weekends 10; the rest of the month keeps the shape.
    daily = {d: (10 if (d - 1) % 7 >= 5 else 100) * USD for d in range(1, 15)}
    p = project(sum(daily.values()), None, daily, 30, 15, Fraction(0), first_weekday=0)
    assert p.method == "blend7-weekday"
    curve = dict(p.curve)
    assert curve[20] == curve[21] == 10 * USD and curve[22] == curve[30] == 100 * USD
    assert p.projected == 2 * sum(daily.values()) + 2 * 100 * USD
    flat = project(sum(daily.values()), None, daily, 30, 15, Fraction(0), weekday=False)
    assert flat.projected < p.projected


def test_an_isolated_spike_is_not_extrapolated_but_a_new_level_is() -> None:
    spike = {d: (1000 if d == 3 else 100) * USD for d in range(1, 11)}
    p = project(sum(spike.values()), None, spike, 30, 11, Fraction(0))
    assert p.rate < 110 * USD  # the spike counts as 3x the median day, not 10x
    level = {d: (100 if d <= 5 else 1000) * USD for d in range(1, 11)}
    q = project(sum(level.values()), None, level, 30, 11, Fraction(0))
    assert q.rate > 600 * USD


def test_month_clock_of_past_current_and_future_months() -> None:
    now = datetime(2026, 11, 10, 18, tzinfo=UTC)
    c = MonthClock.of("2026-11", now)
    assert (c.days_in_month, c.now_day, c.day_fraction, c.first_weekday) == (
        30, 10, Fraction(3, 4), 6)
    assert MonthClock.of("2026-10", now).day_fraction == 1
    assert c.instant(20, Fraction(1, 2)) == datetime(2026, 11, 20, 12, tzinfo=UTC)


def test_backtest_error_stays_within_the_documented_bound() -> None:
    """docs/forecast.md: from day 15 on, under 12 % in every synthetic scenario but growth."""
    seeds = 30
    for name, scenario in backtest.SCENARIOS.items():
        months = [backtest.month(scenario, seed) for seed in range(seeds)]
        for checkpoint in (15, 20, 25):
            err = sum(backtest.error(m, checkpoint) for m in months) / seeds
            bound = 0.25 if name.startswith("growing") else 0.12
            assert err < bound, (name, checkpoint, err)


# -- through a real gateway --------------------------------------------------------------------
class Clock:
    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(scope="module")
def month(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Clock, int]]:
    """Nine days of November with two requests a day (acme-content), then day 10 at noon."""
    clock = Clock(datetime(2026, 11, 1, 9, tzinfo=UTC))
    stack = Stack(tmp_path_factory.mktemp("forecast"), clock=clock,
                  budgets={"global": {"monthly_usd": "100"},
                           "tenants": {"acme": {"monthly_usd": "50"}}})
    try:
        raw = stack.client().chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MSG, max_tokens=20)
        cost = int(Decimal(raw.headers["X-Costwall-Cost-Usd"]) * USD)
        for day in range(1, 10):
            clock.now = datetime(2026, 11, day, 10, tzinfo=UTC)
            for _ in range(2 if day > 1 else 1):
                stack.client().chat.completions.create(model="gpt-4o-mini", messages=MSG,
                                                       max_tokens=20)
        stack.flush()
        clock.now = datetime(2026, 11, 10, 12, tzinfo=UTC)
        # A cap the month will pass around day 15 at this pace (2 requests a day).
        cap = str(Decimal(30 * cost) / USD)
        put = stack.request("PUT", "/admin/api/budgets/agent/content", headers=ADMIN,
                            json={"monthly_usd": cap})
        assert put.status == 200, put.body
        yield stack, clock, cost
    finally:
        stack.close()


def forecast(stack: Stack, query: str = "") -> Any:
    reply = stack.request("GET", f"/admin/api/forecast{query}", headers=FINANCE)
    assert reply.status == 200, reply.body
    return reply.json()


def test_api_projects_every_capped_scope(month: tuple[Stack, Clock, int]) -> None:
    stack, _, cost = month
    body = forecast(stack)
    assert body["period"] == "2026-11"
    scopes = {(s["scope"], s["id"]): s for s in body["scopes"]}
    assert set(scopes) == {("global", "global"), ("tenant", "acme"), ("agent", "content")}
    for s in scopes.values():
        assert set(s) >= {"scope", "id", "limit_usd", "spent_usd", "projected_usd",
                          "exhausts_at", "method"}
        assert s["method"] == "blend7"  # under 14 complete days: no weekday factors yet
    agent = scopes[("agent", "content")]
    spent = int(Decimal(agent["spent_usd"]) * USD)
    assert spent == 18 * cost
    projected = int(Decimal(agent["projected_usd"]) * USD)
    # 17 complete-day requests over 9 days, then 20.5 days at 2 a day: about 59 requests.
    assert 55 * cost <= projected <= 62 * cost
    assert agent["exhausts_at"] is not None
    assert agent["exhausts_at"].startswith("2026-11-1")  # mid-month
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", agent["exhausts_at"])
    assert scopes[("global", "global")]["exhausts_at"] is None
    assert scopes[("tenant", "acme")]["projected_usd"] == agent["projected_usd"]


def test_api_bad_and_past_months(month: tuple[Stack, Clock, int]) -> None:
    stack, _, _ = month
    for query in ("?month=2026-13", "?month=../x", "?month=2027-01"):
        reply = stack.request("GET", f"/admin/api/forecast{query}", headers=ADMIN)
        assert reply.status == 400, (query, reply.body)
        assert reply.json()["error"]["param"] == "month"
    past = forecast(stack, "?month=2026-10")
    assert all(s["method"] == "closed" and s["exhausts_at"] is None for s in past["scopes"])
    assert all(s["projected_usd"] == s["spent_usd"] for s in past["scopes"])
    assert stack.request("GET", "/admin/api/forecast").status == 401


def test_gauge_and_dashboard_show_the_projection(month: tuple[Stack, Clock, int]) -> None:
    stack, _, _ = month
    body = forecast(stack)
    agent = next(s for s in body["scopes"] if s["scope"] == "agent")
    deadline = time.monotonic() + 5
    while True:
        metrics = stack.request("GET", "/metrics").body.decode()
        found = re.search(r'costwall_budget_projected_usd\{id="content",scope="agent"\} (\S+)',
                          metrics)
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert found is not None, metrics
    assert abs(Decimal(found.group(1)) - Decimal(agent["projected_usd"])) < Decimal("1e-9")
    page = stack.request("GET", "/admin", headers=ADMIN).body.decode()
    assert 'data-label="Projected"' in page
    assert page.count('class="bar-projected"') >= 2 * 21  # both drawings, days 10..30
    assert "projected:" in page


def test_a_month_too_large_to_scan_uses_the_global_shape(month: tuple[Stack, Clock, int]
                                                        ) -> None:
    stack, _, _ = month
    service = forecasts(stack.gw)
    scan_max = service.scan_max
    service.scan_max = 10  # this month has 18 requests: past the bound
    try:
        stack.request("PUT", "/admin/api/budgets/key/acme-content", headers=ADMIN,
                      json={"monthly_usd": "100"})  # a cap change: computed again
        scopes = {(s["scope"], s["id"]): s for s in forecast(stack)["scopes"]}
    finally:
        service.scan_max = scan_max
        stack.request("DELETE", "/admin/api/budgets/key/acme-content", headers=ADMIN)
    assert scopes[("agent", "content")]["method"] == "blend7/global-shape"
    assert scopes[("key", "acme-content")]["method"] == "blend7/global-shape"
    assert scopes[("global", "global")]["method"] == "blend7"
    # All of this month's traffic is acme-content's: the shape gives the same projection.
    assert scopes[("agent", "content")]["projected_usd"] == \
        scopes[("global", "global")]["projected_usd"]


def test_agent_projections_follow_a_burst_at_once(tmp_path: Path) -> None:
    """Agent scopes are projected from a scan of the month's entries that is reused for a
    while; one made before a burst of traffic (at start-up, say) is not reused after it."""
    clock = Clock(datetime(2026, 11, 1, 9, tzinfo=UTC))
    stack = Stack(tmp_path, clock=clock, budgets={"agents": {"content": {"monthly_usd": "50"}}})
    try:
        assert forecast(stack)["scopes"][0]["projected_usd"] == "0"  # an empty month, scanned
        for day in range(1, 10):
            clock.now = datetime(2026, 11, day, 10, tzinfo=UTC)
            stack.client().chat.completions.create(model="gpt-4o-mini", messages=MSG,
                                                   max_tokens=20)
        stack.flush()
        clock.now = datetime(2026, 11, 10, 12, tzinfo=UTC)
        [agent] = stack.lt.run(forecasts(stack.gw).month(max_age=0))  # not the 5 s cache
        # nine days at one request a day: about 30 by the month's end
        assert agent.projection.spent > 0
        assert agent.projection.projected > 3 * agent.projection.spent, agent
    finally:
        stack.close()
