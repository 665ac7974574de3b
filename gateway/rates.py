"""Rate limits on the request path: admission before the budget, settlement with the request.

``open_rates`` returns None when no rate limit is configured, so the request path pays one
attribute check and nothing else. Otherwise ``Gateway.rates`` is

- ``LocalRates`` (SQLite: one process): the windows of ``gateway.ratelimit`` in memory, no
  I/O and no await that suspends on the request path;
- ``gateway.store.pg_rates.SharedRates`` (PostgreSQL): the same windows, kept in the database
  and decided in a group-committed transaction, so every replica counts against one limit.

The proxy calls ``admit`` just before the budget reservation (a rate-limited request is never
reserved, forwarded or charged) and closes the ticket in ``settle`` (``RateTicket.close``),
which runs once however the request ends; a request refused or failed before forwarding
gives its counts back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from gateway.errors import RateLimited
from gateway.ratelimit import (
    CACHE_MAX,
    Counting,
    RateKey,
    RatePlan,
    RateTicket,
    Refusal,
    ScopeId,
    Slot,
    Window,
    bound_tokens,
    correction,
    refuse,
    scope_kinds,
    take,
    tightest,
)
from gateway.store.urls import backend_of

if TYPE_CHECKING:
    from gateway.call import Call
    from gateway.config import Settings
    from gateway.metrics import Metrics

SWEEP_EVERY_S = 60.0  # drop idle windows (end users come and go) about once a minute


class Rates(Protocol):
    """What the request path and the app need of a rate limiter."""

    plan: RatePlan

    async def admit(self, call: Call) -> None:
        """Count the request in every limit of its scopes (``call.rate``), or raise 429."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class LocalRates:
    """The limits of one process, in memory (SQLite, and PostgreSQL's fail-open fallback)."""

    def __init__(self, plan: RatePlan, metrics: Metrics, clock: Callable[[], datetime]):
        self.plan = plan
        self.metrics = metrics
        self.clock = clock
        self.windows: dict[RateKey, Window] = {}
        self.inflight: dict[ScopeId, int] = {}
        # (tenant, agent, key, end user) -> its windows (with their state) and slots: a
        # request of a known combination does one lookup. Cleared with every sweep.
        self._needs: dict[tuple[str, str, str, str | None],
                          tuple[list[Counting], list[Slot]]] = {}
        self._sweep_at = 0.0
        for scope, kind in scope_kinds(plan):  # series at 0, so increase() sees the first
            metrics.child(metrics.rate_limited, scope, kind)

    async def admit(self, call: Call) -> None:
        call.rate = self.admit_now(call)

    def refused(self, call: Call, refusal: Refusal) -> RateLimited:
        """Count a refusal (``costwall_rate_limited_total``, ``requests_total`` as
        ``rate_limited``) and make its 429."""
        metrics = self.metrics
        metrics.child(metrics.rate_limited, refusal.scope, refusal.kind).inc()
        metrics.child(metrics.requests, "rate_limited", call.price.name).inc()
        return RateLimited(refusal.message(), refusal.headers())

    def admit_now(self, call: Call) -> RateTicket | None:
        """Admit or raise, synchronously: plain arithmetic on this process's windows."""
        key = call.key
        scopes = (key.tenant, call.agent, key.name, call.user)
        found = self._needs.get(scopes)
        if found is None:
            found = self._resolve(scopes)
        if not found[0] and not found[1]:
            return None
        now = self.clock().timestamp()
        if now >= self._sweep_at:
            self.sweep(now)  # may drop the windows just found: resolve them again
            found = self._resolve(scopes)
        windows, slots = found
        tokens = bound_tokens(call.estimate)
        inflight = self.inflight
        held = [(slot, inflight.get(slot[0], 0)) for slot in slots] if slots else []
        refusal = refuse(now, windows, held, tokens)
        if refusal is not None:
            raise self.refused(call, refusal)
        for scope, _ in slots:
            inflight[scope] = inflight.get(scope, 0) + 1
        return RateTicket(self, take(now, windows, tokens), [scope for scope, _ in slots],
                          tightest(now, windows))

    def _resolve(self, scopes: tuple[str, str, str, str | None]
                 ) -> tuple[list[Counting], list[Slot]]:
        windows, slots = self.plan.needs(*scopes)
        if len(self._needs) >= CACHE_MAX:
            self._needs.clear()
        found = self._needs[scopes] = ([(k, limit, self._window(k)) for k, limit in windows],
                                       slots)
        return found

    def _window(self, key: RateKey) -> Window:
        window = self.windows.get(key)
        if window is None:
            window = self.windows[key] = Window()
        return window

    def settle(self, ticket: RateTicket, sent: bool, tokens: int | None) -> None:
        """Correct or take back what the ticket counted; free its slots."""
        for key, amount, bucket in ticket.counted:
            delta = correction(key[2], amount, sent, tokens)
            window = self.windows.get(key) if delta else None
            if window is not None:
                window.correct(bucket, delta)
        inflight = self.inflight
        for scope in ticket.held:
            left = inflight.get(scope, 0) - 1
            if left > 0:
                inflight[scope] = left
            else:
                inflight.pop(scope, None)

    def sweep(self, now: float) -> None:
        """Forget windows with nothing left in them (one per end user who came and went)."""
        self._sweep_at = now + SWEEP_EVERY_S
        self._needs.clear()  # it holds windows: resolved again on the next request
        for key in [k for k, w in self.windows.items() if w.idle(now)]:
            del self.windows[key]

    async def start(self) -> None:
        """Nothing to open: the windows live in this process."""

    async def close(self) -> None:
        """Nothing to close."""


def open_rates(settings: Settings, metrics: Metrics, clock: Callable[[], datetime],
               replica: str | None = None) -> Rates | None:
    """The rate limiter ``settings`` ask for, None when no rate limit is configured.

    With PostgreSQL the replicas share the limits (``SharedRates``, ``replica`` is this
    process's id in the ``replicas`` table); ``rate_limits.on_store_error`` says what happens
    while that store cannot be reached.
    """
    config = settings.rate_limits
    plan = config.plan
    if not plan:
        return None
    local = LocalRates(plan, metrics, clock)
    if backend_of(settings.database) == "sqlite":
        return local
    from gateway.store.pg_rates import SharedRates

    return SharedRates(settings.database, replica, local,
                       fail_open=config.on_store_error == "open",
                       reclaim_after_s=settings.db_reclaim_after_s)


def rates_ctx(rates: Rates) -> Callable[[web.Application], AsyncIterator[None]]:
    """Open the limiter's store with the app (after the ledger) and close it before."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        await rates.start()
        yield
        await rates.close()

    return ctx


def describe(rates: Rates | None) -> list[dict[str, Any]]:
    """The configured limits, for the admin API."""
    return rates.plan.describe() if rates is not None else []
