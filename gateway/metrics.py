"""Prometheus metrics with bounded labels, on an injectable registry (a fresh one per test).

Label values come only from configured names (scopes, key tenants and agents, priced models);
anything free-form from a request header is folded into ``other``. Exact money stays in the
ledger; the float counters here are for dashboards and alerts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.budget import ScopeStatus
from gateway.money import to_usd
from gateway.pricing import Usage

OUTCOMES = ("allowed", "blocked", "override", "upstream_error", "rejected")
# From a 20 ms embedding to a many-minute reasoning stream.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
                    600, 1800)


class BudgetCollector(Collector):
    """Budget gauges computed at scrape time from the engine's current-period state."""

    def __init__(self, status: Callable[[], Iterable[ScopeStatus]]):
        self._status = status

    def collect(self) -> Iterator[GaugeMetricFamily]:
        limit = GaugeMetricFamily("costwall_budget_limit_usd", "Monthly budget limit (USD).",
                                  labels=["scope", "id"])
        spent = GaugeMetricFamily("costwall_budget_spent_usd",
                                  "Spend recorded this month (USD).", labels=["scope", "id"])
        reserved = GaugeMetricFamily("costwall_budget_reserved_usd",
                                     "Cost reserved by in-flight requests (USD).",
                                     labels=["scope", "id"])
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
            "costwall_request_duration_seconds", "Time from request to last byte sent.",
            ["endpoint"], buckets=DURATION_BUCKETS, registry=r)
        self.upstream_duration = Histogram(
            "costwall_upstream_duration_seconds", "Time spent waiting on the upstream.",
            ["endpoint"], buckets=DURATION_BUCKETS, registry=r)
        self.warnings = Counter("costwall_budget_warnings", "Warn thresholds crossed.",
                                ["scope", "id"], registry=r)

    def watch_budgets(self, status: Callable[[], Iterable[ScopeStatus]]) -> None:
        self.registry.register(BudgetCollector(status))

    def charged(self, tenant: str, agent: str, model: str, usage: Usage, cost: int) -> None:
        self.spend.labels(tenant, agent, model).inc(float(to_usd(cost)))
        cached = min(usage.cached_tokens, usage.prompt_tokens)
        for kind, count in (("prompt", usage.prompt_tokens - cached), ("cached", cached),
                            ("completion", usage.completion_tokens - usage.reasoning_tokens),
                            ("reasoning", usage.reasoning_tokens)):
            if count > 0:
                self.tokens.labels(model, kind).inc(count)
