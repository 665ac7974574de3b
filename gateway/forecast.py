"""Month-end spend projection per scope (pure: no I/O, money in integer pico-USD).

The method (``blend7-weekday``), chosen on the backtest in ``docs/forecast.md``:

1. Complete days of the month so far give a daily series. Isolated days above 3x its median
   (at most one in seven) count as 3x the median: a one-day spike must not be extrapolated
   over the rest of the month, while a level that stays up is a new pace.
2. With at least 14 complete days (two of every weekday) each weekday gets a factor: its
   mean over the overall mean, so a weekday/weekend pattern is projected as one (the series
   is divided by the factors before averaging). Fewer days: factor 1.
3. The daily rate blends the month-to-date mean of that series with the mean of its last 7
   days: ``rate = 0.3 * mtd + 0.7 * last7`` (recent pace dominates: a quiet start or a
   growing spend is followed; the month's mean steadies it). Before the first complete day
   the pace so far today is used.
4. Projection = spent so far + the rest of today + every remaining day, each at
   ``rate * factor(weekday)``. ``exhausts_at`` walks the same curve to the instant the
   projected spend reaches the limit (null if it does not within the month; the current
   time when the scope is already at its limit).

>>> f = project(spent=10 * 10**12, limit=100 * 10**12, daily={1: 5 * 10**12, 2: 5 * 10**12},
...             days_in_month=30, now_day=3, day_fraction=Fraction(0))
>>> f.projected // 10**12, f.exhausts_day
(150, 20)
"""

from __future__ import annotations

import calendar
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from fractions import Fraction
from statistics import median

RECENT_DAYS = 7
RECENT_WEIGHT = Fraction(7, 10)
WEEKDAY_MIN_DAYS = 14
SHRINK = 0  # pseudo-observations pulling weekday factors toward 1 (the backtest wants none)
SPIKE_CAP = 3  # a day above this many times the median counts as this many times it
METHOD = "blend7-weekday"


@dataclass(frozen=True, slots=True)
class Projection:
    """A month-end projection. ``exhausts_day`` (1-based) and ``exhausts_fraction`` say when
    the projected spend reaches the limit, or are None."""

    spent: int
    projected: int
    rate: int  # pico-USD per (average) day
    method: str
    exhausts_day: int | None = None
    exhausts_fraction: Fraction = Fraction(0)
    curve: tuple[tuple[int, int], ...] = ()  # (day, projected spend still to come that day)


def _weekday_factors(daily: list[Fraction], first_weekday: int) -> list[Fraction]:
    """Factor per weekday (0 = Monday) from complete days ``daily`` (day 1 first)."""
    if len(daily) < WEEKDAY_MIN_DAYS or not any(daily):
        return [Fraction(1)] * 7
    mean = Fraction(sum(daily), len(daily))
    sums, counts = [Fraction(0)] * 7, [0] * 7
    for i, cost in enumerate(daily):
        w = (first_weekday + i) % 7
        sums[w] += cost
        counts[w] += 1
    factors = []
    for w in range(7):
        raw = Fraction(sums[w], counts[w]) / mean if counts[w] else Fraction(1)
        factors.append((counts[w] * raw + SHRINK) / (counts[w] + SHRINK))
    return factors


def _cap_spikes(days: list[int], times: int = SPIKE_CAP) -> list[Fraction]:
    """Days above ``SPIKE_CAP`` x the median count as that much, when they are isolated
    (at most one day in seven): a level that stays up is a new pace, not a spike."""
    values = [Fraction(d) for d in days]
    if len(values) < 3:
        return values
    cap = times * Fraction(median(values))
    if cap <= 0 or sum(v > cap for v in values) > max(1, len(values) // 7):
        return values
    return [min(v, cap) for v in values]


def project(spent: int, limit: int | None, daily: Mapping[int, int], days_in_month: int,
            now_day: int, day_fraction: Fraction, first_weekday: int = 0,
            recent_weight: Fraction = RECENT_WEIGHT, weekday: bool = True,
            spike_cap: int | None = SPIKE_CAP) -> Projection:
    """Project a month: ``daily`` maps day-of-month to spend, ``now_day`` is today (1-based)
    and ``day_fraction`` how much of it has passed; ``first_weekday`` is day 1's weekday."""
    complete = [int(daily.get(d, 0)) for d in range(1, now_day)]
    today = int(daily.get(now_day, 0))
    capped = _cap_spikes(complete, spike_cap) if spike_cap else list(map(Fraction, complete))
    factors = (_weekday_factors(capped, first_weekday) if weekday
               else [Fraction(1)] * 7)
    by_weekday = weekday and len(complete) >= WEEKDAY_MIN_DAYS and any(complete)
    method = METHOD if by_weekday else "blend7"

    def factor(day: int) -> Fraction:
        return factors[(first_weekday + day - 1) % 7]

    if complete:
        flat = [Fraction(c) / factor(i + 1) if factor(i + 1) else Fraction(c)
                for i, c in enumerate(capped)]
        mtd = sum(flat) / len(flat)
        recent = flat[-RECENT_DAYS:]
        rate = (1 - recent_weight) * mtd + recent_weight * (sum(recent) / len(recent))
    elif day_fraction > 0:  # the first day: its pace so far
        rate = Fraction(today) / day_fraction
        method = "today"
    else:
        rate = Fraction(0)
        method = "no-data"
    # The curve: the rest of today, then whole days to the month's end.
    steps = [(now_day, (1 - day_fraction) * rate * factor(now_day), day_fraction)]
    steps += [(d, rate * factor(d), Fraction(0)) for d in range(now_day + 1, days_in_month + 1)]
    projected = spent + int(sum(amount for _, amount, _ in steps))
    exhausts_day, exhausts_fraction = None, Fraction(0)
    if limit is not None:
        if spent >= limit:
            exhausts_day, exhausts_fraction = now_day, day_fraction
        else:
            left = Fraction(limit - spent)
            for day, amount, start in steps:
                if amount > 0 and amount >= left:
                    exhausts_day = day
                    exhausts_fraction = Fraction(start + (1 - start) * left / amount)
                    break
                left = Fraction(left - amount)
    curve = tuple((day, int(amount)) for day, amount, _ in steps)
    return Projection(spent, projected, int(rate), method, exhausts_day, exhausts_fraction,
                      curve)


@dataclass(frozen=True, slots=True)
class MonthClock:
    """Where ``now`` falls in a month of UTC days (the ledger groups spend by UTC day)."""

    days_in_month: int
    now_day: int
    day_fraction: Fraction
    first_weekday: int
    year: int
    month: int

    @classmethod
    def of(cls, period: str, now: datetime) -> MonthClock:
        """``now`` inside ``period``; a past month is seen from its end, a future one from
        its start."""
        year, month = int(period[:4]), int(period[5:7])
        ndays = calendar.monthrange(year, month)[1]
        now = now.astimezone(UTC)
        current = f"{now.year:04d}-{now.month:02d}"
        first = date(year, month, 1).weekday()
        if period < current:
            return cls(ndays, ndays, Fraction(1), first, year, month)
        if period > current:
            return cls(ndays, 1, Fraction(0), first, year, month)
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        passed = Fraction(int((now - midnight).total_seconds() * 1000), 86_400_000)
        return cls(ndays, now.day, passed, first, year, month)

    def instant(self, day: int, fraction: Fraction) -> datetime:
        """The UTC instant ``fraction`` of the way through ``day`` of this month."""
        start = datetime(self.year, self.month, day, tzinfo=UTC)
        return start + timedelta(milliseconds=int(fraction * 86_400_000))


def daily_from_rows(period: str, by_date: Mapping[str, int]) -> dict[int, int]:
    """Spend keyed ``YYYY-MM-DD`` (the ledger's day groups) as day-of-month → spend."""
    out: dict[int, int] = {}
    for key, cost in by_date.items():
        if key[:7] == period and len(key) >= 10 and key[8:10].isdigit():
            day = int(key[8:10])
            out[day] = out.get(day, 0) + int(cost)
    return out


def iso(moment: datetime | None) -> str | None:
    """ISO 8601 UTC with a ``Z``, or None."""
    if moment is None:
        return None
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
