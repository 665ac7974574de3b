"""Prometheus metrics with bounded labels, on an injectable registry (a fresh one per test).

Label values come only from configured names (scopes, key tenants and agents, priced models);
anything free-form from a request header is folded into ``other``. Exact money stays in the
ledger; the float counters here are for dashboards and alerts.

Budget gauges are computed at scrape time by ``BudgetView`` from the budget engine's book of
the current month, which it loads when a month starts, so that they are right after a
restart, after a month rollover and (PostgreSQL) on every replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.budget import ScopeStatus
from gateway.endpoints import NAMES as ENDPOINT_NAMES
from gateway.money import PICO_PER_USD, to_usd
from gateway.pricing import Usage

if TYPE_CHECKING:
    from gateway.budget import Budgets

log = logging.getLogger("costwall.metrics")

OUTCOMES = ("allowed", "blocked", "override", "upstream_error", "rejected", "rate_limited")
TOKEN_KINDS = ("prompt", "cached", "completion", "reasoning")
# Seconds. Fine steps at the low end resolve a 20 ms embedding (and the gateway's own few ms);
# coarse steps at the high end still separate a 2-minute reasoning stream from a 5-minute one.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
                    600, 1800)


class BudgetView:
    """Per-scope limit, spend and reservations of the current month, as the gauges show them.

    The engine's book is the source: loaded from the database when a month is first touched,
    then kept current by every settlement (and, with PostgreSQL, mirrored from the shared
    budget rows by ``pg_sync``, so it shows what the other replicas spent too). The one thing
    a book cannot do by itself is appear: right after a month rollover no request may have
    touched the new month yet. ``refresh``, awaited before each scrape (at most once per
    ``min_interval``), loads the current month's book so the gauges move to the new month on
    time. If that fails (database down), the current month's gauges are left out rather than
    shown as zero.
    """

    def __init__(self, budgets: Budgets, min_interval: float = 1.0, timeout: float = 5.0):
        self.budgets = budgets
        self.min_interval = min_interval
        self.timeout = timeout
        self._refreshed = float("-inf")
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        """Make sure the current month's book is loaded; errors are logged, not raised."""
        if time.monotonic() - self._refreshed < self.min_interval:
            return
        async with self._lock:
            if time.monotonic() - self._refreshed < self.min_interval:
                return
            try:
                async with asyncio.timeout(self.timeout):
                    await self.budgets.load_current()
            except Exception as exc:
                log.warning("budget gauges: could not load this month's budgets (%s)",
                            type(exc).__name__)
            self._refreshed = time.monotonic()

    def rows(self) -> list[ScopeStatus]:
        """One status per limited scope in the current period of each of its windows.

        End users are left out: their ids are unbounded and never become labels (their
        windows are on the admin pages and in ``GET /admin/api/budget``)."""
        return [s for s in self.budgets.status() if s.scope != "user"]


class BudgetCollector(Collector):
    """Budget gauges computed at scrape time from a source of ``ScopeStatus`` rows."""

    def __init__(self, status: Callable[[], Iterable[ScopeStatus]]):
        self._status = status

    def collect(self) -> Iterator[GaugeMetricFamily]:
        names = ["scope", "id", "window"]
        limit = GaugeMetricFamily("costwall_budget_limit_usd",
                                  "Budget limit of the window's current period (USD).",
                                  labels=names)
        spent = GaugeMetricFamily("costwall_budget_spent_usd",
                                  "Spend recorded in the window's current period (USD).",
                                  labels=names)
        reserved = GaugeMetricFamily("costwall_budget_reserved_usd",
                                     "Upper bound reserved by requests in flight (USD).",
                                     labels=names)
        ratio = GaugeMetricFamily("costwall_budget_utilization_ratio",
                                  "Spent / limit in the window's current period (0..1, above 1 "
                                  "after overrides).", labels=names)
        for s in self._status():
            labels = [s.scope, s.id, s.window]
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
        # Counted once for each capped scope (global, tenant, agent, campaign, key) of a
        # request charged beyond its reservation. The label is the scope's kind, as SPEC
        # names it; which tenant or agent is in the ledger, the audit log and /admin.
        self.overshoot = Counter(
            "costwall_budget_overshoot_usd",
            "Charged beyond the reserved upper bound (USD), per kind of capped scope: an "
            "upstream billed past the documented bound.", ["scope"], registry=r)
        self.alerts = Counter("costwall_alerts", "Alert delivery attempts by outcome (sent, "
                              "retry, failed).", ["channel", "type", "outcome"], registry=r)
        # The scope's kind only (never a tenant, key or end user id): the 429's message names it.
        self.rate_limited = Counter(
            "costwall_rate_limited", "Requests refused by a rate limit (429), by scope kind "
            "(global, tenant, agent, key, user) and limit kind (rpm, tpm, concurrent).",
            ["scope", "kind"], registry=r)
        self.usage_invalid = Counter(
            "costwall_usage_invalid",
            "Upstream usages not believed (malformed or beyond what the request allows).",
            ["endpoint"], registry=r)
        # Present at 0 from the start, so that ``increase()`` in an alert rule sees the first
        # overshoot or invalid usage (a series born at 1 has no increase to show).
        for scope in ("global", "tenant", "agent", "campaign", "key"):
            self.overshoot.labels(scope)
        for endpoint in ENDPOINT_NAMES:
            self.usage_invalid.labels(endpoint)
        self.budget_view: BudgetView | None = None
        self._expose = make_aiohttp_handler(r)
        # ``.labels()`` validates and hashes its arguments under a lock on every call (a few
        # µs, several times per request); label sets are bounded, so their children are kept.
        self._children: dict[tuple[object, ...], Any] = {}

    def child(self, metric: Counter | Histogram, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached per label tuple (never removed from here)."""
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def watch_budgets(self, view: BudgetView) -> None:
        """Export the budget gauges of ``view`` (refreshed before each scrape)."""
        self.budget_view = view
        self.registry.register(BudgetCollector(view.rows))

    def watch_state(self, inflight: Callable[[], int], override: Callable[[], bool]) -> None:
        self.registry.register(StateCollector(inflight, override))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """``GET /metrics``: refresh the budget view, then the usual text exposition."""
        if self.budget_view is not None:
            await self.budget_view.refresh()
        return await self._expose(request)

    def charged(self, tenant: str, agent: str, model: str, usage: Usage | None,
                cost: int) -> None:
        """Count a settled request's cost and (when known) its tokens by kind."""
        if cost > 0:
            self.child(self.spend, tenant, agent, model).inc(cost / PICO_PER_USD)
        if usage is None:
            return
        cached = min(usage.cached_tokens, usage.prompt_tokens)
        reasoning = min(usage.reasoning_tokens, usage.completion_tokens)
        for kind, count in (("prompt", usage.prompt_tokens - cached), ("cached", cached),
                            ("completion", usage.completion_tokens - reasoning),
                            ("reasoning", reasoning)):
            if count > 0:
                self.child(self.tokens, model, kind).inc(count)
