"""Prometheus metrics with bounded labels, on an injectable registry (a fresh one per test).

Label values come only from configured names (scopes, key tenants and agents, priced models);
anything free-form from a request header is folded into ``other``. Exact money stays in the
ledger; the float counters here are for dashboards and alerts.

Budget gauges are computed at scrape time by ``BudgetView`` from this replica's live book of
the current month and, when several replicas share the database, the ledger's spend for the
month, so that they are right after a restart, after a month rollover and on every replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.budget import ScopeKey, ScopeStatus
from gateway.money import to_usd
from gateway.pricing import Usage

if TYPE_CHECKING:
    from gateway.budget import BudgetEngine, SpendLoader

log = logging.getLogger("costwall.metrics")

OUTCOMES = ("allowed", "blocked", "override", "upstream_error", "rejected")
TOKEN_KINDS = ("prompt", "cached", "completion", "reasoning")
# Seconds. Fine steps at the low end resolve a 20 ms embedding (and the gateway's own few ms);
# coarse steps at the high end still separate a 2-minute reasoning stream from a 5-minute one.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
                    600, 1800)


class BudgetView:
    """Per-scope limit, spend and reservations of the current month, as the gauges show them.

    ``refresh`` (awaited before each scrape, at most once per ``min_interval``) makes sure the
    engine has the current month's book loaded, so a month rollover shows up without waiting
    for a request. The book was loaded from the ledger and then follows every settlement of
    this replica, so with a ledger that only this process writes (SQLite) it *is* the ledger's
    spend and nothing more is read.

    With a shared ledger (``shared_spend``, e.g. PostgreSQL behind several replicas) refresh
    also reads the month's spend per scope from it, and ``rows`` reports ``spent = max(own
    book's spent, ledger spend − own reservations)``: the ledger holds what other replicas
    spent and counts in-flight requests at their reserved amount (this replica's are exported
    separately as ``reserved``); the book is never behind this replica's own settlements, which
    reach the ledger a few milliseconds later. That read is one aggregate over the month's rows
    (about 0.4 s for 200k rows on SQLite), hence ``min_interval``.
    """

    def __init__(self, budgets: BudgetEngine, shared_spend: SpendLoader | None = None,
                 min_interval: float = 5.0, timeout: float = 5.0):
        self.budgets = budgets
        self.shared_spend = shared_spend
        self.min_interval = min_interval
        self.timeout = timeout
        self._ledger: tuple[str, Mapping[ScopeKey, int]] | None = None
        self._refreshed = float("-inf")
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        """Load the current month's book and ledger spend; errors keep the last snapshot."""
        if time.monotonic() - self._refreshed < self.min_interval:
            return
        async with self._lock:
            if time.monotonic() - self._refreshed < self.min_interval:
                return
            period = self.budgets.current_period()
            try:
                async with asyncio.timeout(self.timeout):
                    await self.budgets.book(period)
                    if self.shared_spend is not None:
                        self._ledger = (period, dict(await self.shared_spend(period)))
            except Exception as exc:
                log.warning("budget gauges: could not read the ledger (%s); showing this "
                            "replica's own view", type(exc).__name__)
            self._refreshed = time.monotonic()

    def rows(self) -> list[ScopeStatus]:
        """One status per limited scope of the current month (configured scopes only)."""
        period = self.budgets.current_period()
        own = {(s.scope, s.id): s for s in self.budgets.status(period)}
        ledger = self._ledger[1] if self._ledger and self._ledger[0] == period else {}
        out = []
        for key, limit in sorted(self.budgets.limits.items()):
            mine = own.get(key)
            spent = mine.spent if mine else 0
            reserved = mine.reserved if mine else 0
            if key in ledger:
                spent = max(spent, ledger[key] - reserved)
            out.append(ScopeStatus(key[0], key[1], period, mine.limit if mine else limit,
                                   spent, reserved))
        return out


class BudgetCollector(Collector):
    """Budget gauges computed at scrape time from a source of ``ScopeStatus`` rows."""

    def __init__(self, status: Callable[[], Iterable[ScopeStatus]]):
        self._status = status

    def collect(self) -> Iterator[GaugeMetricFamily]:
        limit = GaugeMetricFamily("costwall_budget_limit_usd", "Monthly budget limit (USD).",
                                  labels=["scope", "id"])
        spent = GaugeMetricFamily("costwall_budget_spent_usd",
                                  "Spend recorded this month (USD), all replicas.",
                                  labels=["scope", "id"])
        reserved = GaugeMetricFamily("costwall_budget_reserved_usd",
                                     "Upper bound reserved by this replica's in-flight "
                                     "requests (USD).", labels=["scope", "id"])
        ratio = GaugeMetricFamily("costwall_budget_utilization_ratio",
                                  "Spent / limit this month (0..1, above 1 after overrides).",
                                  labels=["scope", "id"])
        for s in self._status():
            labels = [s.scope, s.id]
            limit.add_metric(labels, float(to_usd(s.limit)))
            spent.add_metric(labels, float(to_usd(s.spent)))
            reserved.add_metric(labels, float(to_usd(s.reserved)))
            ratio.add_metric(labels, float(s.utilization))
        yield from (limit, spent, reserved, ratio)


class StateCollector(Collector):
    """Gauges read from the running gateway at scrape time (in-flight requests, override)."""

    def __init__(self, inflight: Callable[[], int], override: Callable[[], bool]):
        self._inflight = inflight
        self._override = override

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("costwall_inflight_requests",
                                "Proxied requests being served right now.",
                                value=self._inflight())
        yield GaugeMetricFamily("costwall_override_enabled",
                                "1 while the global budget override is on.",
                                value=1 if self._override() else 0)


class Metrics:
    """The gateway's metric families; ``registry`` is what ``/metrics`` exposes."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("costwall_requests", "Requests by outcome.",
                                ["outcome", "model"], registry=r)
        self.spend = Counter("costwall_spend_usd", "Spend charged (USD).",
                             ["tenant", "agent", "model"], registry=r)
        self.tokens = Counter("costwall_tokens", "Tokens charged by kind.", ["model", "kind"],
                              registry=r)
        self.request_duration = Histogram(
            "costwall_request_duration_seconds",
            "Time from receiving a proxied request to its last byte sent.",
            ["endpoint"], buckets=DURATION_BUCKETS, registry=r)
        self.upstream_duration = Histogram(
            "costwall_upstream_duration_seconds",
            "Time from sending a request upstream to the end of its answer.",
            ["endpoint"], buckets=DURATION_BUCKETS, registry=r)
        self.warnings = Counter("costwall_budget_warnings", "Warn thresholds crossed.",
                                ["scope", "id"], registry=r)
        self.budget_view: BudgetView | None = None
        self._expose = make_aiohttp_handler(r)

    def watch_budgets(self, view: BudgetView) -> None:
        """Export the budget gauges of ``view`` (refreshed before each scrape)."""
        self.budget_view = view
        self.registry.register(BudgetCollector(view.rows))

    def watch_state(self, inflight: Callable[[], int], override: Callable[[], bool]) -> None:
        self.registry.register(StateCollector(inflight, override))

    async def handle(self, request: web.Request) -> web.Response:
        """``GET /metrics``: refresh the budget view, then the usual text exposition."""
        if self.budget_view is not None:
            await self.budget_view.refresh()
        return await self._expose(request)

    def charged(self, tenant: str, agent: str, model: str, usage: Usage | None,
                cost: int) -> None:
        """Count a settled request's cost and (when known) its tokens by kind."""
        if cost > 0:
            self.spend.labels(tenant, agent, model).inc(float(to_usd(cost)))
        if usage is None:
            return
        cached = min(usage.cached_tokens, usage.prompt_tokens)
        reasoning = min(usage.reasoning_tokens, usage.completion_tokens)
        for kind, count in (("prompt", usage.prompt_tokens - cached), ("cached", cached),
                            ("completion", usage.completion_tokens - reasoning),
                            ("reasoning", reasoning)):
            if count > 0:
                self.tokens.labels(model, kind).inc(count)
