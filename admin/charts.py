"""The daily spend chart as plain geometry, drawn by a template as inline SVG.

Server-side so the page needs no chart library and no script; the template escapes every
label. Pure: a month and its spend per day in, bars, axis ticks and grid lines out.

>>> chart = daily_chart("2026-02", {"2026-02-03": 5 * 10**12})
>>> len(chart.bars), chart.bars[2].cost, chart.peak
(28, 5000000000000, 5000000000000)
"""

from __future__ import annotations

import calendar
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal

from admin.fmt import usd

_NICE = (Decimal(1), Decimal(2), Decimal("2.5"), Decimal(5), Decimal(10))


@dataclass(frozen=True, slots=True)
class Bar:
    date: str
    day: int
    cost: int
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True, slots=True)
class Tick:
    pos: float
    label: str


@dataclass(frozen=True, slots=True)
class DailyChart:
    """Everything the SVG needs, in viewBox units."""

    width: int
    height: int
    left: int
    top: int
    bottom: int  # y of the x axis
    right: int   # x where the plot ends
    bars: tuple[Bar, ...]
    xticks: tuple[Tick, ...]
    grid: tuple[Tick, ...]
    total: int
    peak: int
    ghosts: tuple[Bar, ...] = ()  # the projection: spend still to come, stacked on each day
    projected_total: int = 0


def nice_ceiling(pico: int) -> int:
    """The smallest 1/2/2.5/5 x 10^k amount at or above ``pico`` (an axis maximum)."""
    if pico <= 0:
        return 10**12  # an empty month still gets a $1 axis
    amount = Decimal(pico).scaleb(-12)
    base = Decimal(1).scaleb(amount.adjusted())
    for m in _NICE:
        if m * base >= amount:
            return int((m * base).scaleb(12))
    return int((10 * base).scaleb(12))  # pragma: no cover - 10 * base always fits


def daily_chart(period: str, by_day: Mapping[str, int], width: int = 720,
                height: int = 240, left: int = 72,
                projected: Mapping[int, int] | None = None) -> DailyChart:
    """Bars for every day of ``period`` (``YYYY-MM``) from spend keyed ``YYYY-MM-DD``.

    ``width``/``height`` are viewBox units. A phone shows a narrower chart (e.g. 360 wide)
    at about its own size, so its labels stay legible; ``left`` leaves room for the amounts.

    Days outside the month (the ledger groups by UTC day; a budget time zone other than UTC
    shifts a few hours across the edges) are added to the nearest day of the month, so the
    bars always sum to the month's spend. ``projected`` (day of month → spend still to come,
    from ``gateway.forecast``) adds outlined bars stacked on the days it names.
    """
    year, month = int(period[:4]), int(period[5:7])
    ndays = calendar.monthrange(year, month)[1]
    costs = [0] * ndays
    for date, cost in by_day.items():
        if date[:7] < period:
            index = 0
        elif date[:7] > period:
            index = ndays - 1
        else:
            index = min(max(int(date[8:10]) - 1, 0), ndays - 1)
        costs[index] += int(cost)
    top, right, bottom = 12, width - 8, height - 26
    plot_w, plot_h = right - left, bottom - top
    ahead = [0] * ndays
    for day, cost in (projected or {}).items():
        if 1 <= day <= ndays:
            ahead[day - 1] += int(cost)
    peak = max(costs)
    axis_max = nice_ceiling(max(c + a for c, a in zip(costs, ahead, strict=True)))
    slot = plot_w / ndays
    bars = []
    for i, cost in enumerate(costs):
        h = plot_h * cost / axis_max if cost else 0.0
        if cost and h < 1.5:
            h = 1.5  # a day with any spend stays visible
        x = left + i * slot + slot * 0.15
        bars.append(Bar(f"{period}-{i + 1:02d}", i + 1, cost, round(x, 2), round(bottom - h, 2),
                        round(slot * 0.7, 2), round(h, 2)))
    ghosts = []
    for i, cost in enumerate(ahead):
        if cost <= 0:
            continue
        base = bars[i].y
        h = max(plot_h * cost / axis_max, 1.5)
        ghosts.append(Bar(f"{period}-{i + 1:02d}", i + 1, cost, bars[i].x, round(base - h, 2),
                          bars[i].width, round(h, 2)))
    labelled = sorted({1, 5, 10, 15, 20, 25, ndays})
    xticks = tuple(Tick(round(left + (d - 0.5) * slot, 2), str(d)) for d in labelled)
    grid = tuple(Tick(round(bottom - plot_h * q / 4, 2), usd(axis_max * q // 4))
                 for q in range(5))
    return DailyChart(width, height, left, top, bottom, right, tuple(bars), xticks, grid,
                      sum(costs), peak, tuple(ghosts), sum(costs) + sum(ahead))
