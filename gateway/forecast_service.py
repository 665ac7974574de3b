"""Forecasts of every capped scope, read from the ledger off the request path.

``ForecastService.month`` reads a month's daily spend once per ``ttl`` seconds (the admin
API, the dashboard and the Prometheus scrape share the result) and projects each scope with a
monthly limit through the pure ``gateway.forecast``. Daily series: ``usage(period, "day")``
for the global scope and ``usage(period, "day", tenant)`` per capped tenant; agent, campaign
and key scopes are summed from one pass over ``entries(period)`` (reused for ``SCAN_TTL_S``
unless the month's requests have grown by more than ``RESCAN_GROWTH`` since, so the cost of
scans stays proportional to the month's rows and a burst is seen at once) while the month has
at most ``ENTRY_SCAN_MAX`` requests, beyond which they follow the global
scope's daily shape scaled to their own spend (``method`` then ends in ``/global-shape``).

It also prepares the ``budget.forecast_exceeded`` event (``forecast_exceeded_event``) for the
alerts outbox; until that exists a first crossing per scope and month is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.budget import GLOBAL, ScopeKey
from gateway.forecast import MonthClock, Projection, daily_from_rows, iso, project
from gateway.money import format_usd, to_usd
from gateway.store.interfaces import Ledger

log = logging.getLogger("costwall.forecast")
# Reading a month's entries costs ~70 µs a row and stalls the event loop up to ~3 ms per
# 1,000 rows (measured: 50,000 rows, 3.5 s, longest stall 145 ms), so the scan is bounded and
# reused for SCAN_TTL_S; larger months use the global daily shape instead.
ENTRY_SCAN_MAX = 20_000
SCAN_TTL_S = 300.0
RESCAN_GROWTH = 20  # a reused scan may miss at most 1/20 (5 %) of the month's requests
TTL_S = 60.0
VIEW_MAX_AGE_S = 5.0  # the admin API and dashboard: a person looking wants it current
REARM_MARGIN = 10  # percent below the limit the projection must fall to re-arm the event


@dataclass(frozen=True, slots=True)
class ScopeForecast:
    """One capped scope's projection for a month."""

    scope: str
    id: str
    period: str
    limit: int
    projection: Projection
    exhausts_at: str | None

    def as_json(self) -> dict[str, Any]:
        p = self.projection
        return {"scope": self.scope, "id": self.id, "period": self.period,
                "limit_usd": format_usd(self.limit), "spent_usd": format_usd(p.spent),
                "projected_usd": format_usd(p.projected), "exhausts_at": self.exhausts_at,
                "daily_rate_usd": format_usd(p.rate), "method": p.method}


def forecast_exceeded_event(f: ScopeForecast, arm: int = 0) -> dict[str, Any]:
    """The ``budget.forecast_exceeded`` event (SPEC "Alerts"): its id is stable for the same
    scope, month and arming (``arm`` counts re-arms after falling back below the margin)."""
    ident = hashlib.sha256(
        f"budget.forecast_exceeded|{f.scope}|{f.id}|{f.period}|{arm}".encode()).hexdigest()
    return {"type": "budget.forecast_exceeded", "id": f"evt_{ident[:32]}",
            "data": {"scope": f.scope, "id": f.id, "window": "monthly", "period": f.period,
                     "limit_usd": format_usd(f.limit),
                     "spent_usd": format_usd(f.projection.spent),
                     "projected_usd": format_usd(f.projection.projected),
                     "exhausts_at": f.exhausts_at}}


class ForecastService:
    """Cached month forecasts for the admin API, the dashboard and the gauge."""

    def __init__(self, ledger: Ledger, limits: Callable[[], dict[ScopeKey, int]],
                 clock: Callable[[], datetime], current: Callable[[], str],
                 ttl: float = TTL_S):
        self.ledger, self._limits, self.clock, self._current = ledger, limits, clock, current
        self.ttl = ttl
        self.scan_max = ENTRY_SCAN_MAX
        # period -> (monotonic time, the limits it was computed for, forecasts)
        self._cache: dict[str, tuple[float, dict[ScopeKey, int], list[ScopeForecast]]] = {}
        self._lock = asyncio.Lock()
        self._fired: dict[ScopeKey, tuple[str, int, bool]] = {}  # period, arm, above
        # Receives ``budget.forecast_exceeded`` events (``gateway.alerts.Alerts.emit_event``).
        self.on_event: Callable[[dict[str, Any]], None] | None = None
        # (period, scopes) -> (monotonic time, the month's requests then, daily series)
        self._scans: dict[tuple[str, frozenset[ScopeKey]],
                          tuple[float, int, dict[ScopeKey, dict[int, int]]]] = {}

    async def month(self, period: str | None = None, max_age: float | None = None
                    ) -> list[ScopeForecast]:
        """Forecasts of ``period`` (default: this month), at most ``max_age`` seconds old
        (default ``ttl``; the admin views ask for fresher ones than the gauge)."""
        max_age = self.ttl if max_age is None else max_age
        period = period or self._current()
        async with self._lock:
            limits = self._limits()
            hit = self._cache.get(period)
            if hit is not None and time.monotonic() - hit[0] < max_age and hit[1] == limits:
                return hit[2]  # a cap changed: computed again at once
            result = await self._compute(period, limits)
            current = self._current()  # keep this month's (the gauge reads it) and this one
            self._cache = {k: v for k, v in self._cache.items() if k == current}
            self._cache[period] = (time.monotonic(), limits, result)
        if period == self._current():
            self._note_crossings(result)
        return result

    async def daily(self, period: str) -> dict[int, int]:
        """The global daily series of ``period`` (for the dashboard chart)."""
        rows = await self.ledger.usage(period, "day")
        return daily_from_rows(period, {r.group: r.cost for r in rows})

    async def _compute(self, period: str, limits: dict[ScopeKey, int]
                       ) -> list[ScopeForecast]:
        if not limits:
            return []
        clock = MonthClock.of(period, self.clock())
        closed = period < self._current()
        spend = await self.ledger.spend_by_scope(period)
        day_rows = await self.ledger.usage(period, "day")
        series: dict[ScopeKey, dict[int, int]] = {
            GLOBAL: daily_from_rows(period, {r.group: r.cost for r in day_rows})}
        for scope, ident in limits:
            if scope == "tenant":
                rows = await self.ledger.usage(period, "day", tenant=ident)
                series[(scope, ident)] = daily_from_rows(period, {r.group: r.cost for r in rows})
        others = [k for k in limits if k[0] not in ("global", "tenant")]
        shaped = False
        if others:
            requests = sum(r.requests for r in day_rows)
            if requests <= self.scan_max:
                series.update(await self._scan(period, others, requests))
            else:
                shaped = True
        out = []
        for key in sorted(limits):
            spent = spend.get(key, 0)
            daily = series.get(key)
            suffix = ""
            if daily is None:  # the global shape, scaled to this scope's spend
                total = sum(series[GLOBAL].values())
                daily = {d: c * spent // total for d, c in series[GLOBAL].items()} if total \
                    else {}
                suffix = "/global-shape" if shaped else ""
            p = project(spent, limits[key], daily, clock.days_in_month, clock.now_day,
                        clock.day_fraction, clock.first_weekday)
            if suffix:
                p = Projection(p.spent, p.projected, p.rate, p.method + suffix,
                               p.exhausts_day, p.exhausts_fraction)
            when = None
            if p.exhausts_day is not None and not closed:
                when = iso(clock.instant(p.exhausts_day, p.exhausts_fraction))
            if closed:
                p = Projection(p.spent, p.spent, p.rate, "closed")
            out.append(ScopeForecast(key[0], key[1], period, limits[key], p, when))
        return out

    async def _scan(self, period: str, keys: list[ScopeKey], requests: int
                    ) -> dict[ScopeKey, dict[int, int]]:
        """Daily spend of agent/campaign/key scopes from one pass over the month's entries
        (``requests`` of them), or the last pass while it is recent and nearly complete."""
        wanted = frozenset(keys)
        hit = self._scans.get((period, wanted))
        if hit is not None and time.monotonic() - hit[0] < SCAN_TTL_S and \
                requests <= hit[1] + hit[1] // RESCAN_GROWTH:
            return hit[2]
        result = await self._scan_now(period, wanted)
        self._scans = {(period, wanted): (time.monotonic(), requests, result)}
        return result

    async def _scan_now(self, period: str, wanted: frozenset[ScopeKey]
                        ) -> dict[ScopeKey, dict[int, int]]:
        keys = sorted(wanted)
        found: dict[ScopeKey, dict[int, int]] = {k: {} for k in keys}
        for e in await self.ledger.entries(period):
            if e.period != period:
                continue
            day = e.ts.day if f"{e.ts.year:04d}-{e.ts.month:02d}" == period else None
            if day is None:
                continue
            cost = e.reserved if e.state == "pending" else e.cost
            for key in (("agent", e.agent), ("campaign", e.campaign or ""),
                        ("key", e.key_name)):
                if key in wanted:
                    found[key][day] = found[key].get(day, 0) + cost
        return found

    def _note_crossings(self, forecasts: list[ScopeForecast]) -> None:
        """Log the first time a projection passes its limit (per scope and month), re-armed
        once it falls ``REARM_MARGIN`` % below; the alerts outbox will send the event."""
        for f in forecasts:
            key = (f.scope, f.id)
            period, arm, above = self._fired.get(key, (f.period, 0, False))
            if period != f.period:
                arm, above = 0, False
            projected = f.projection.projected
            if not above and projected > f.limit:
                event = forecast_exceeded_event(f, arm)
                log.warning("forecast: %s:%s projected $%s by month end, above its limit $%s "
                            "(event %s)", f.scope, f.id, format_usd(projected),
                            format_usd(f.limit), event["id"])
                if self.on_event is not None:
                    self.on_event(event)
                above = True
            elif above and projected * 100 < f.limit * (100 - REARM_MARGIN):
                above, arm = False, arm + 1
            self._fired[key] = (f.period, arm, above)

    def collector(self) -> ForecastCollector:
        return ForecastCollector(self)


class ForecastCollector(Collector):
    """``costwall_budget_projected_usd{scope,id}`` from the last computed forecast."""

    def __init__(self, service: ForecastService):
        self.service = service

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("costwall_budget_projected_usd",
                                  "Projected month-end spend at the current pace (USD).",
                                  labels=["scope", "id"])
        current = self.service._current()
        hit = self.service._cache.get(current)
        for f in hit[2] if hit else []:
            gauge.add_metric([f.scope, f.id], float(to_usd(f.projection.projected)))
        yield gauge


FORECASTS = "forecast.service"  # key in ``Gateway.extras``


def forecasts(gw: Any) -> ForecastService:
    """The gateway's forecast service (created by ``setup_forecast``)."""
    return gw.extras[FORECASTS]  # type: ignore[no-any-return]


def setup_forecast(gw: Any) -> Callable[[Any], Any]:
    """Create the service, export its gauge, and return the ``cleanup_ctx`` that refreshes
    it at start and every ``TTL_S`` seconds (so a scrape only reads the cache)."""
    service = ForecastService(
        gw.ledger, lambda: {k: caps["monthly"] for k, caps in gw.budgets.limits.caps.items()
                            if "monthly" in caps},
        gw.clock, gw.budgets.current_period)
    gw.extras[FORECASTS] = service
    if gw.alerts is not None:
        service.on_event = gw.alerts.emit_event
    gw.metrics.registry.register(service.collector())

    async def refresh(_app: Any) -> Any:
        async def loop() -> None:
            while True:
                try:
                    await service.month()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the database is down: the gauge keeps its value
                    log.warning("forecast refresh failed: %s", type(exc).__name__)
                await asyncio.sleep(service.ttl)

        task = asyncio.create_task(loop(), name="costwall-forecast")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return refresh
