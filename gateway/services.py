"""The gateway's long-lived parts, wired once by ``create_app`` and kept in typed app state.

``Gateway`` is the one object handlers reach through ``request.app[GATEWAY]``; it also owns
the side effects of a decision (audit lines, metrics), so the request path only says *what*
happened. Recording an audit event only queues it (``AuditTrail.record`` never raises and never
touches a file), so it cannot change a request's answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web

from gateway.alerts import Alerts, event_id
from gateway.audit import AuditRow, AuditTrail
from gateway.budget import Budgets, Crossing
from gateway.config import Settings
from gateway.errors import BudgetExceeded
from gateway.keys import KeyRing
from gateway.metrics import Metrics
from gateway.money import PICO_PER_USD, format_usd
from gateway.pricing import PriceTable
from gateway.rates import Rates
from gateway.routing import Router
from gateway.store.interfaces import Ledger

if TYPE_CHECKING:
    from gateway.call import Call

OVERRIDE_SETTING = "override.global"
access_log = logging.getLogger("costwall.access")
log = logging.getLogger("costwall.usage")


@dataclass(slots=True)
class OverrideState:
    """The global override switch; persisted in the ledger's settings table."""

    enabled: bool = False
    reason: str | None = None
    actor: str | None = None
    changed_at: str | None = None

    def reason_if_on(self) -> str | None:
        return f"global override: {self.reason or 'enabled'}" if self.enabled else None

    def to_json(self) -> str:
        return orjson.dumps({"enabled": self.enabled, "reason": self.reason,
                             "actor": self.actor, "changed_at": self.changed_at}).decode()

    @classmethod
    def from_json(cls, text: str) -> OverrideState:
        data = orjson.loads(text)
        return cls(bool(data.get("enabled")), data.get("reason"), data.get("actor"),
                   data.get("changed_at"))


@dataclass
class Overrides:
    state: OverrideState = field(default_factory=OverrideState)

    def reason(self) -> str | None:
        return self.state.reason_if_on()


@dataclass
class Gateway:
    """Everything the request path and the admin need, for one app instance."""

    settings: Settings
    prices: PriceTable
    ledger: Ledger
    budgets: Budgets
    keys: KeyRing
    audit: AuditTrail
    metrics: Metrics
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    overrides: Overrides = field(default_factory=Overrides)
    # One pooled session per upstream (``upstreams[].name``), set at startup.
    sessions: dict[str, aiohttp.ClientSession] = field(default_factory=dict)
    router: Router = None  # type: ignore[assignment]  # set by ``build_gateway``
    inflight: int = 0
    extras: dict[str, Any] = field(default_factory=dict)
    # Starts the task that follows admin changes made by other replicas (shared stores).
    follow: Callable[[Gateway], asyncio.Task[None]] | None = None
    alerts: Alerts | None = None  # set by ``build_gateway``
    rates: Rates | None = None  # None: no rate limit configured (``gateway.rates``)

    # -- label hygiene: only configured names become metric labels ----------------------------
    def agent_label(self, agent: str) -> str:
        return agent if agent in self.keys.agents or ("agent", agent) in \
            self.budgets.limits else "other"

    # -- what happened to a request -----------------------------------------------------------
    def record_blocked(self, call: Call, exc: BudgetExceeded) -> None:
        self.metrics.child(self.metrics.requests, "blocked", call.price.name).inc()
        # The Markdown table keeps its columns (the reason names the window); the JSON event
        # also carries it.
        self.audit.record("blocked", {
            **self._execution(call, exc.scope, exc.scope_id, exc.limit, exc.spent,
                              exc.estimate, exc.message),
            "window": exc.window, "period": exc.period})
        if self.alerts is not None and self.alerts.enabled and exc.scope \
                and self._alerted(exc.scope, exc.scope_id):
            # Once per scope and period of a window: the id is the same for every later
            # refusal (the period id names its window).
            period = exc.period
            self.alerts.emit("budget.exhausted", event_id(
                "budget.exhausted", exc.scope, exc.scope_id, period), {
                    "scope": exc.scope, "id": exc.scope_id, "window": exc.window,
                    "period": period,
                    "limit_usd": format_usd(exc.limit) if exc.limit is not None else None,
                    "spent_usd": format_usd(exc.spent) if exc.spent is not None else None})

    def record_settled(self, call: Call, cost: int, crossings: list[Crossing]) -> None:
        model = call.price.name
        if call.entry is None:  # the ledger could not record it (503): never forwarded
            outcome = "unavailable"
        elif call.status >= 400 or call.status == 0:
            outcome = "upstream_error"
        elif call.override_reason is not None:
            outcome = "override"
        else:
            outcome = "allowed"
        metrics = self.metrics
        metrics.child(metrics.requests, outcome, model).inc()
        # Also when usage is unknown (charged at the reserved bound): the counter follows the
        # ledger's cost.
        metrics.charged(call.key.tenant, self.agent_label(call.agent), model, call.usage, cost)
        # One line per forwarded request: facts only, never bodies or keys (gateway.logs).
        # The fields are only gathered when the line will be emitted (it is ~6 % of the CPU
        # of a request).
        if access_log.isEnabledFor(logging.INFO):
            access_log.info("settled", extra={
                "outcome": outcome, "endpoint": call.endpoint, "model": call.model[:100],
                "status": call.status, "stream": call.stream, "tenant": call.key.tenant,
                "key": call.key.name, "agent": call.agent, "campaign": call.campaign,
                "cost_usd": format_usd(cost), "usage_source": call.usage_source,
                "ms": int((time.perf_counter() - call.started) * 1000)})
        if call.upstream_seconds:
            metrics.child(metrics.upstream_duration, call.endpoint).observe(
                call.upstream_seconds)
        if call.override_reason is not None:
            b = call.blocked_by
            self.audit.record("override", self._execution(
                call, b.scope if b else "", b.scope_id if b else "", b.limit if b else None,
                b.spent if b else None, call.reservation.amount if call.reservation else 0,
                call.override_reason))
        self.record_crossings(crossings)

    def record_invalid_usage(self, call: Call, problem: str) -> None:
        """An upstream usage that was not believed: a warning (facts only) and a metric."""
        self.metrics.child(self.metrics.usage_invalid, call.endpoint).inc()
        log.warning("upstream usage not believed (request %s, model %s, status %s): %s",
                    call.id, call.price.name, call.status, problem)

    def record_overshoot(self, call: Call, cost: int, overshoot: int) -> None:
        """A request charged ``overshoot`` pico-USD beyond its reservation: the upstream
        billed past the admission bound. Audit event, log line and, per capped scope of
        the request, ``costwall_budget_overshoot_usd_total``."""
        scopes = call.reservation.scopes if call.reservation else ()
        capped = [k for k in scopes if self.budgets.limits.of(k)]
        usd = overshoot / PICO_PER_USD
        for scope in dict.fromkeys(s for s, _ in capped):
            self.metrics.child(self.metrics.overshoot, scope).inc(usd)
        log.warning("overshoot: request %s (model %s) cost $%s, $%s beyond its reserved "
                    "bound", call.id, call.price.name, format_usd(cost), format_usd(overshoot))
        self.audit.record("overshoot", {
            "request_id": call.id, "tenant": call.key.tenant, "agent": call.agent,
            "campaign": call.campaign, "task": call.task, "model": call.model,
            "usage_source": call.usage_source,
            "reserved_usd": format_usd(cost - overshoot), "cost_usd": format_usd(cost),
            "overshoot_usd": format_usd(overshoot),
            "scope": " ".join(f"{s}:{i}" for s, i in capped)})

    def record_crossings(self, crossings: list[Crossing]) -> None:
        """Metrics and one audit line per newly crossed warn threshold.

        Called from ``record_settled``, and by the shared (PostgreSQL) budget engine once
        the database has confirmed that this replica is the one to report a crossing.
        """
        for c in crossings:
            # End user ids never become metric labels (unbounded): their crossings are
            # counted under the id "user".
            ident = "user" if c.scope == "user" else c.id
            self.metrics.child(self.metrics.warnings, c.scope, ident).inc()
            self.audit.record("warning", {
                "scope": c.scope, "id": c.id, "window": c.window, "period": c.period,
                "threshold": f"{int(c.threshold * 100)}%", "limit_usd": format_usd(c.limit),
                "spent_usd": format_usd(c.spent)})
            self._threshold_alert(c)

    def _alerted(self, scope: str, ident: str) -> bool:
        """Budget alerts are for scopes someone named: an end user under the
        ``users_default`` template (there may be thousands, each crossing every day) is
        audit-logged but raises no alert; a user with caps of their own does."""
        return scope != "user" or (scope, ident) in self.budgets.limits

    def _threshold_alert(self, c: Crossing) -> None:
        if self.alerts is not None and self.alerts.enabled and self._alerted(c.scope, c.id):
            self.alerts.emit("budget.threshold", event_id(
                "budget.threshold", c.scope, c.id, c.period, c.threshold), {
                    "scope": c.scope, "id": c.id, "window": c.window, "period": c.period,
                    "limit_usd": format_usd(c.limit), "spent_usd": format_usd(c.spent),
                    "threshold": str(c.threshold)})

    async def catch_up_crossings(self) -> int:
        """Record ``budget.threshold`` again for every threshold the current period of
        each window has passed; return how many. Each has its stable id, so the outbox keeps
        the ones it holds and gains only one that a crash lost between being recorded (in
        memory) and being stored. Run once by the alerts sender when it starts."""
        await self.budgets.load_current()
        books = self.budgets.books
        rule = self.budgets.rule
        found = [Crossing(scope, ident, book.period, t, state.limit, state.spent)
                 for span in books.current_spans()
                 if (book := books.periods.get(span.period)) is not None
                 for (scope, ident), state in sorted(book.states.items())
                 for t in rule.thresholds[:rule.passed(state.spent, state.limit)]]
        for c in found:
            self._threshold_alert(c)
        return len(found)

    def _execution(self, call: Call, scope: str, scope_id: str, limit: int | None,
                   spent: int | None, estimate: int, reason: str) -> dict[str, Any]:
        return {
            "request_id": call.id, "tenant": call.key.tenant, "agent": call.agent,
            "campaign": call.campaign, "task": call.task, "model": call.model,
            "estimate_usd": format_usd(estimate), "scope": f"{scope}:{scope_id}" if scope else "",
            "limit_usd": format_usd(limit) if limit is not None else "",
            "spent_usd": format_usd(spent) if spent is not None else "", "reason": reason,
        }

    def record_admin(self, actor: str, action: str, target: str, detail: str = "",
                     reason: str = "") -> None:
        self.audit.record("admin", self._admin_fields(actor, action, target, detail, reason))

    def admin_row(self, actor: str, action: str, target: str, detail: str = "",
                  reason: str = "") -> AuditRow:
        """An admin event to commit with the change it describes (``admin.ops``)."""
        return self.audit.row("admin", self._admin_fields(actor, action, target, detail, reason))

    @staticmethod
    def _admin_fields(actor: str, action: str, target: str, detail: str,
                      reason: str) -> dict[str, Any]:
        return {"actor": actor, "action": action, "target": target, "detail": detail,
                "reason": reason}


GATEWAY = web.AppKey("gateway", Gateway)
