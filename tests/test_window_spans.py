"""Budget windows as pure arithmetic: spans tile time in every zone, ids round-trip, DST days
are 23 or 25 hours, the repeated hour is two windows, and the limits/admission rules that
use them (``gateway.windows``, ``gateway.budget_rules``, ``gateway.budget``)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.budget import BudgetEngine
from gateway.budget_rules import GLOBAL, Admission, Limits, ScopeState, admit
from gateway.errors import BudgetExceeded
from gateway.windows import WINDOWS, Span, span_by_id, span_of, window_of

ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe",
         "Pacific/Chatham", "America/Santiago", "Asia/Tokyo", "Pacific/Apia"]
instants = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2060, 1, 1),
                        timezones=st.just(UTC))


@settings(max_examples=300, deadline=None)
@given(moment=instants, zone=st.sampled_from(ZONES), window=st.sampled_from(WINDOWS))
def test_spans_hold_their_instant_round_trip_and_tile(moment: datetime, zone: str,
                                                      window: str) -> None:
    tz = ZoneInfo(zone)
    span = span_of(window, moment, tz)
    assert span.start <= moment < span.end, (span, moment)
    assert window_of(span.period) == window
    assert span_by_id(span.period, tz) == span
    # The next period starts exactly where this one ends: no gap, no overlap, no reset job.
    after = span_of(window, span.end, tz)
    assert after.start == span.end and after.period != span.period
    before = span_of(window, span.start - timedelta(microseconds=1), tz)
    assert before.end == span.start
    # Ledger reads use the months a span overlaps (the local months of its first and last
    # instant), never fewer.
    local_months = {f"{d.year:04d}-{d.month:02d}" for d in
                    (span.start.astimezone(tz), (span.end - timedelta(microseconds=1))
                     .astimezone(tz))}
    assert set(span.months) == local_months


def test_dst_days_are_23_and_25_hours_and_the_repeated_hour_is_two_windows() -> None:
    ny = ZoneInfo("America/New_York")
    spring = span_of("daily", datetime(2026, 3, 8, 12, tzinfo=UTC), ny)
    autumn = span_of("daily", datetime(2026, 11, 1, 12, tzinfo=UTC), ny)
    assert spring.end - spring.start == timedelta(hours=23)
    assert autumn.end - autumn.start == timedelta(hours=25)
    first = span_of("hourly", datetime(2026, 11, 1, 5, 30, tzinfo=UTC), ny)
    second = span_of("hourly", datetime(2026, 11, 1, 6, 30, tzinfo=UTC), ny)
    assert (first.period, second.period) == ("2026-11-01T01-04:00", "2026-11-01T01-05:00")
    assert first.end == second.start and second.end - second.start == timedelta(hours=1)
    # The hour skipped in spring has no window; the hour before it ends where 03:00 starts.
    before = span_of("hourly", datetime(2026, 3, 8, 6, 30, tzinfo=UTC), ny)
    assert before.period == "2026-03-08T01" and span_of("hourly", before.end, ny).period \
        == "2026-03-08T03"


def test_period_ids_of_the_contract() -> None:
    tz = ZoneInfo("UTC")
    moment = datetime(2026, 11, 29, 14, 30, tzinfo=UTC)
    assert [span_of(w, moment, tz).period for w in WINDOWS] == [
        "2026-11", "2026-W48", "2026-11-29", "2026-11-29T14"]
    # ISO weeks: 2027-01-01 is in week 53 of 2026, Monday 2026-12-28.
    week = span_of("weekly", datetime(2027, 1, 1, tzinfo=UTC), tz)
    assert (week.period, week.start.date().isoformat(), week.months) == (
        "2026-W53", "2026-12-28", ("2026-12", "2027-01"))


def test_limits_give_users_the_template_and_fall_back_to_it() -> None:
    limits = Limits({GLOBAL: {"monthly": 100}}, {"daily": 5, "monthly": 50})
    alice = ("user", "alice")
    assert limits.of(alice) == {"daily": 5, "monthly": 50} and alice not in limits
    limits.set(alice, "daily", 9)  # starts from the template: the monthly cap stays
    assert limits.of(alice) == {"daily": 9, "monthly": 50} and alice in limits
    limits.set(alice, "daily", None)
    limits.set(alice, "monthly", None)  # all of her own removed: the template again
    assert limits.of(alice) == {"daily": 5, "monthly": 50} and alice not in limits
    limits.set(("tenant", "acme"), "hourly", 3)
    assert limits.windows() == ("monthly", "daily", "hourly")
    limits.set(("tenant", "acme"), "hourly", None)
    assert limits.of(("tenant", "acme")) is None


def test_admit_refuses_on_the_tightest_slot_of_any_window() -> None:
    month = ScopeState(1000, spent=100)
    day = ScopeState(50, spent=40)
    states = {("2026-11", "global", "global"): month, ("2026-11-29", "tenant", "acme"): day}
    with pytest.raises(BudgetExceeded) as refused:
        admit(Admission(), states, 20, period="2026-11")
    assert (refused.value.scope, refused.value.window, refused.value.period) == (
        "tenant", "daily", "2026-11-29")
    assert (month.reserved, day.reserved) == (0, 0)  # nothing taken anywhere
    taken = admit(Admission(), states, 10, period="2026-11")
    assert (month.reserved, day.reserved) == (10, 10) and len(taken.slots) == 2


async def test_engine_counts_each_window_from_the_ledger_and_settles_in_all() -> None:
    loads: list[str] = []

    async def spend(span: Span) -> dict[tuple[str, str], int]:
        loads.append(span.period)
        return {GLOBAL: 7, ("user", "bob"): 3} if span.period == "2026-11-30" else {}

    now = [datetime(2026, 11, 29, 23, 30, tzinfo=UTC)]  # 00:30 on the 30th in Berlin
    engine = BudgetEngine(Limits({GLOBAL: {"daily": 100, "monthly": 1000}}, {"daily": 10}),
                          ZoneInfo("Europe/Berlin"), [Decimal("0.5")], spend,
                          clock=lambda: now[0])
    r = await engine.reserve([GLOBAL, ("user", "bob")], 5)
    assert sorted(r.slots) == [("2026-11", "global", "global"),
                               ("2026-11-30", "global", "global"),
                               ("2026-11-30", "user", "bob")]
    assert sorted(loads) == ["2026-11", "2026-11-30"]  # one read per period, not per scope
    [crossing] = engine.settle(r, 4)  # bob: 3 + 4 = 7 of 10, past 50 %
    assert (crossing.scope, crossing.window, crossing.spent) == ("user", "daily", 7)
    with pytest.raises(BudgetExceeded) as refused:
        await engine.reserve([GLOBAL, ("user", "bob")], 4)
    assert refused.value.resets_at == datetime(2026, 11, 30, 23, tzinfo=UTC)
    # The clock steps back an hour (NTP): the day that has begun is not left again.
    now[0] -= timedelta(hours=1)
    assert engine.books.now() == datetime(2026, 11, 29, 23, 30, tzinfo=UTC)
    with pytest.raises(BudgetExceeded):
        await engine.reserve([("user", "bob")], 4)
    # The next day starts from zero with no reset job; the ended day is dropped once idle.
    now[0] = datetime(2026, 11, 30, 23, 0, tzinfo=UTC)
    r = await engine.reserve([("user", "bob")], 9)
    assert r.slots == (("2026-12-01", "user", "bob"),)
    assert "2026-11-30" not in engine.books.periods


async def test_fifty_first_requests_of_a_new_user_meet_one_state() -> None:
    async def spend(span: Span) -> dict[tuple[str, str], int]:
        await asyncio.sleep(0.01)  # the first requests all wait for the one load
        return {}

    engine = BudgetEngine(Limits({}, {"daily": 100}), ZoneInfo("UTC"), [], spend)
    results = await asyncio.gather(*(engine.reserve([("user", "new")], 7) for _ in range(50)),
                                   return_exceptions=True)
    granted = [r for r in results if not isinstance(r, BaseException)]
    assert len(granted) == 14  # 14 * 7 = 98 <= 100 < 105
    assert all(isinstance(r, BudgetExceeded) for r in results if r not in granted)
