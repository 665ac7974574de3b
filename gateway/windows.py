"""Budget windows: calendar-aligned hours, days, ISO weeks and months in the budget time zone.

Pure functions of an instant and a time zone; no I/O. A window's *period id* names one
occurrence of it (``2026-11`` a month, ``2026-W48`` an ISO week, ``2026-11-29`` a day,
``2026-11-29T14`` an hour) and is what budget books, the shared ``budget_usage`` rows and
warn crossings are keyed by: the formats never collide, so one id also tells its window.

There is no reset job anywhere: a request is counted in the period its admission instant
falls in, so a window that ends simply stops receiving requests. Local wall-clock rules make
days 23 or 25 hours long across a DST change; the hour repeated when clocks go back is two
different hourly windows, told apart by their UTC offset (``2026-11-01T01-04:00`` and
``2026-11-01T01-05:00``), so no hourly window is ever two hours long.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

# Longest first: the order in which config, the admin and the API list them.
WINDOWS = ("monthly", "weekly", "daily", "hourly")
# The config / admin API field of each window (``monthly_usd: 200``).
FIELDS = {f"{w}_usd": w for w in WINDOWS}


@dataclass(frozen=True, slots=True)
class Span:
    """One occurrence of a window: its id and its UTC bounds (start inclusive, end
    exclusive), plus the ledger months (``YYYY-MM``) it overlaps, so reading its spend can
    use the ledger's ``(period, ts)`` index.

    >>> s = span_of("daily", datetime(2026, 11, 29, 23, 30, tzinfo=UTC), ZoneInfo("Asia/Tokyo"))
    >>> s.period, s.start.isoformat(), s.end.isoformat(), s.months
    ('2026-11-30', '2026-11-29T15:00:00+00:00', '2026-11-30T15:00:00+00:00', ('2026-11',))
    """

    window: str
    period: str
    start: datetime
    end: datetime
    months: tuple[str, ...]

    def holds(self, moment: datetime) -> bool:
        return self.start <= moment < self.end


def _month_id(day: date) -> str:
    return f"{day.year:04d}-{day.month:02d}"


def _midnight(day: date, tz: ZoneInfo) -> datetime:
    """The UTC instant a local day starts (a midnight that does not exist, in a zone that
    springs forward at 00:00, maps to the instant of the change)."""
    return datetime(day.year, day.month, day.day, tzinfo=tz).astimezone(UTC)


def _first_of_next_month(day: date) -> date:
    return date(day.year + day.month // 12, day.month % 12 + 1, 1)


def _days_span(window: str, period: str, first: date, after: date, tz: ZoneInfo) -> Span:
    """A span of whole local days ``first`` .. ``after`` (exclusive)."""
    last = after - timedelta(days=1)
    months = tuple(dict.fromkeys((_month_id(first), _month_id(last))))
    return Span(window, period, _midnight(first, tz), _midnight(after, tz), months)


def _hour_span(local: datetime, tz: ZoneInfo) -> Span:
    """The hourly span whose local wall-clock hour starts at ``local`` (an aware, floored
    datetime whose ``fold`` says which of a repeated hour it is)."""
    period = f"{local.year:04d}-{local.month:02d}-{local.day:02d}T{local.hour:02d}"
    other = local.replace(fold=1 - local.fold)
    offset = local.utcoffset()
    if offset is not None and other.utcoffset() != offset:  # the hour happens twice
        seconds = int(offset.total_seconds())
        sign = "-" if seconds < 0 else "+"
        hours, minutes = divmod(abs(seconds) // 60, 60)
        period += f"{sign}{hours:02d}:{minutes:02d}"
    start = local.astimezone(UTC)
    return Span("hourly", period, start, start + timedelta(hours=1), (_month_id(local.date()),))


def span_of(window: str, moment: datetime, tz: ZoneInfo) -> Span:
    """The occurrence of ``window`` that ``moment`` (aware) falls in.

    >>> berlin = ZoneInfo("Europe/Berlin")
    >>> span_of("weekly", datetime(2026, 12, 31, 12, tzinfo=UTC), berlin).period
    '2026-W53'
    >>> span_of("hourly", datetime(2026, 10, 25, 0, 30, tzinfo=UTC), berlin).period
    '2026-10-25T02+02:00'
    >>> span_of("hourly", datetime(2026, 10, 25, 1, 30, tzinfo=UTC), berlin).period
    '2026-10-25T02+01:00'
    """
    local = moment.astimezone(tz)
    day = local.date()
    if window == "monthly":
        first = day.replace(day=1)
        return _days_span(window, _month_id(day), first, _first_of_next_month(day), tz)
    if window == "daily":
        return _days_span(window, day.isoformat(), day, day + timedelta(days=1), tz)
    if window == "weekly":
        year, week, weekday = day.isocalendar()
        monday = day - timedelta(days=weekday - 1)
        return _days_span(window, f"{year:04d}-W{week:02d}", monday,
                          monday + timedelta(days=7), tz)
    if window == "hourly":
        return _hour_span(local.replace(minute=0, second=0, microsecond=0), tz)
    raise ValueError(f"unknown budget window {window!r}")


def window_of(period: str) -> str:
    """The window a period id belongs to (the formats never collide).

    >>> [window_of(p) for p in ("2026-11", "2026-W48", "2026-11-29", "2026-11-29T14")]
    ['monthly', 'weekly', 'daily', 'hourly']
    """
    if "T" in period:
        return "hourly"
    if "W" in period:
        return "weekly"
    return "daily" if len(period) == 10 else "monthly"


def span_by_id(period: str, tz: ZoneInfo) -> Span:
    """The span a period id names (the inverse of ``span_of(...).period``).

    >>> span_by_id("2026-W01", ZoneInfo("UTC")).start.isoformat()
    '2025-12-29T00:00:00+00:00'
    """
    window = window_of(period)
    if window == "monthly":
        return span_of(window, datetime(int(period[:4]), int(period[5:7]), 1, 12, tzinfo=tz),
                       tz)
    if window == "daily":
        return span_of(window, datetime.fromisoformat(period).replace(hour=12, tzinfo=tz), tz)
    if window == "weekly":
        monday = date.fromisocalendar(int(period[:4]), int(period[6:8]), 1)
        return span_of(window, datetime(monday.year, monday.month, monday.day, 12,
                                        tzinfo=tz), tz)
    local = datetime.fromisoformat(period[:13]).replace(tzinfo=tz)
    for fold in (0, 1):
        span = span_of(window, local.replace(fold=fold), tz)
        if span.period == period:
            return span
    raise ValueError(f"no hour {period!r} in {tz.key}")


class SpanCache:
    """The current span of each window, recomputed only when the instant leaves it: on the
    request path a comparison replaces the time zone arithmetic."""

    __slots__ = ("_spans", "tz")

    def __init__(self, tz: ZoneInfo):
        self.tz = tz
        self._spans: dict[str, Span] = {}

    def get(self, window: str, moment: datetime) -> Span:
        span = self._spans.get(window)
        if span is None or not span.start <= moment < span.end:
            span = self._spans[window] = span_of(window, moment, self.tz)
        return span
