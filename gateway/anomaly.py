"""``spend.anomaly`` (SPEC "Alerts"): an hour's spend in a scope above ``factor`` × the scope's
trailing 7-day hourly mean. Pure arithmetic over ledger entries; the service that reads the
ledger and emits events is ``AnomalyWatch``.

No storms: a scope needs ``MIN_HISTORY_H`` hours of history (from its first spend in the
window) before it can alert, and its event id is stable per scope and hour, so one hour gives
one event per scope however often (and on however many replicas) it is checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from gateway.ledger import LedgerEntry
from gateway.money import format_usd

if TYPE_CHECKING:
    from gateway.services import Gateway

log = logging.getLogger("costwall.alerts")

WINDOW_H = 7 * 24
MIN_HISTORY_H = 24
CHECK_S = 300.0

ScopeKey = tuple[str, str]


def _scopes(e: LedgerEntry) -> list[ScopeKey]:
    out = [("global", ""), ("tenant", e.tenant), ("agent", e.agent), ("key", e.key_name)]
    if e.campaign:
        out.append(("campaign", e.campaign))
    return out


def _cost(e: LedgerEntry) -> int:
    return e.reserved if e.state == "pending" else e.cost


def detect(entries: Iterable[LedgerEntry], now: datetime, factor: int
           ) -> list[tuple[ScopeKey, int, int]]:
    """(scope, this hour's spend, trailing hourly mean) for each scope whose spend in the hour
    containing ``now`` exceeds ``factor`` × its mean over the 7 days before that hour."""
    hour = now.replace(minute=0, second=0, microsecond=0)
    start = hour - timedelta(hours=WINDOW_H)
    current: dict[ScopeKey, int] = defaultdict(int)
    past: dict[ScopeKey, int] = defaultdict(int)
    first: dict[ScopeKey, datetime] = {}
    for e in entries:
        if e.ts < start or e.ts >= hour + timedelta(hours=1):
            continue
        for scope in _scopes(e):
            if e.ts >= hour:
                current[scope] += _cost(e)
            else:
                past[scope] += _cost(e)
                first[scope] = min(first.get(scope, e.ts), e.ts)
    found = []
    for scope, spent in current.items():
        if scope not in first:
            continue
        history_h = (hour - first[scope].replace(minute=0, second=0, microsecond=0)) \
            // timedelta(hours=1)
        if history_h < MIN_HISTORY_H:
            continue
        hours = min(WINDOW_H, history_h)
        # spent > factor * past / hours, in integers (no float money)
        if spent * hours > factor * past[scope]:
            found.append((scope, spent, past[scope] // hours))
    return sorted(found)


def anomaly_watch(gw: Gateway) -> Callable[[Any], AsyncIterator[None]]:
    """``cleanup_ctx``: every ``CHECK_S`` seconds, ``spend.anomaly`` events for new anomalies."""

    async def run(_app: Any) -> AsyncIterator[None]:
        alerts = gw.alerts
        factor = gw.settings.alerts.anomaly_factor
        task = None
        if alerts is not None and alerts.enabled and factor:
            task = asyncio.create_task(_loop(gw, factor), name="costwall-anomaly")
        yield
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return run


async def check(gw: Gateway, factor: int) -> int:
    """One check; returns how many events were recorded."""
    assert gw.alerts is not None
    now = gw.clock()
    periods = {gw.budgets.current_period()}
    periods.add((now - timedelta(hours=WINDOW_H + 1)).strftime("%Y-%m"))
    entries: list[LedgerEntry] = []
    for period in sorted(periods):
        entries += await gw.ledger.entries(period)
    hour = now.replace(minute=0, second=0, microsecond=0)
    found = detect(entries, now, factor)
    from gateway.alerts import event_id

    for (scope, ident), spent, mean in found:
        label = hour.isoformat(timespec="minutes")
        gw.alerts.emit("spend.anomaly", event_id("spend.anomaly", scope, ident, label), {
            "scope": scope, "id": ident, "window": "hourly", "period": label,
            "spent_usd": format_usd(spent), "mean_usd": format_usd(mean), "factor": factor})
    return len(found)


async def _loop(gw: Gateway, factor: int) -> None:
    while True:
        try:
            await check(gw, factor)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("anomaly check failed: %s", type(exc).__name__)
        await asyncio.sleep(CHECK_S)
