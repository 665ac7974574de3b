"""Budgets: the ``Budgets`` interface, the period books both implementations keep in memory,
and ``BudgetEngine``, the local (single-process) implementation.

The arithmetic is pure and lives in ``gateway.budget_rules`` (re-exported here); the shared
implementation for replicas is ``gateway.store.pg_budgets.SharedBudgets``. ``BudgetEngine``
only does I/O through an injected coroutine that loads a new period's spend, so it is tested
without a server or a database.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Protocol
from zoneinfo import ZoneInfo

from gateway.budget_rules import (
    GLOBAL,
    Admission,
    ClampRequest,
    Crossing,
    PeriodBook,
    Reservation,
    ScopeKey,
    ScopeState,
    ScopeStatus,
    WarnRule,
    admit,
    describe,
    month_after,
    period_bounds,
    period_of,
    scopes_for,
)

__all__ = [
    "GLOBAL",
    "Admission",
    "Books",
    "BudgetEngine",
    "Budgets",
    "ClampRequest",
    "Crossing",
    "PeriodBook",
    "Reservation",
    "ScopeKey",
    "ScopeState",
    "ScopeStatus",
    "SpendLoader",
    "WarnRule",
    "admit",
    "describe",
    "month_after",
    "period_bounds",
    "period_of",
    "scopes_for",
]

SpendLoader = Callable[[str], Awaitable[Mapping[ScopeKey, int]]]


class Budgets(Protocol):
    """What the request path, the admin and the metrics use; local or shared."""

    limits: dict[ScopeKey, int]
    warn_at: tuple[Decimal, ...]
    rule: WarnRule

    def current_period(self) -> str: ...

    async def book(self, period: str | None = None) -> PeriodBook: ...

    async def reserve(self, scopes: Iterable[ScopeKey], amount: int, *, force: bool = False,
                      clamp: ClampRequest | None = None) -> Reservation: ...

    def settle(self, reservation: Reservation, actual: int) -> list[Crossing]: ...

    def remaining(self, reservation: Reservation) -> int | None: ...

    def warnings(self, reservation: Reservation) -> list[str]: ...

    def status(self, period: str | None = None) -> list[ScopeStatus]: ...

    async def set_limit(self, key: ScopeKey, limit: int | None) -> None: ...


class Books:
    """The in-memory books of the limited scopes, one per month, and what is read from them.

    ``limits`` maps (scope, id) to pico-USD; scopes without a limit are not tracked (so
    free-form campaign ids cost no memory).
    """

    def __init__(self, limits: Mapping[ScopeKey, int], tz: ZoneInfo, warn_at: Iterable[Decimal],
                 clock: Callable[[], datetime]):
        self.limits: dict[ScopeKey, int] = dict(limits)
        self.tz = tz
        self.rule = WarnRule.of(warn_at)
        self.warn_at = self.rule.thresholds
        self.clock = clock
        self.periods: dict[str, PeriodBook] = {}
        self._period_span: tuple[datetime, datetime, str] | None = None

    def current_period(self) -> str:
        """The month of ``clock()``; its UTC bounds are kept, so that on every request a
        comparison replaces the time zone conversion."""
        now = self.clock()
        span = self._period_span
        if span is not None and now.tzinfo is not None and span[0] <= now < span[1]:
            return span[2]
        period = period_of(now, self.tz)
        if now.tzinfo is not None:
            self._period_span = (*period_bounds(period, self.tz), period)
        return period

    def drop_old(self, current: str) -> None:
        """Forget months before ``current`` that hold no reservation any more."""
        for period, book in list(self.periods.items()):
            if period < current and not any(s.reserved for s in book.states.values()):
                del self.periods[period]

    def passed(self, key: ScopeKey, state: ScopeState) -> set[tuple[ScopeKey, Decimal]]:
        """The thresholds ``state`` has already passed (not reported again)."""
        n = self.rule.passed(state.spent, state.limit)
        return {(key, t) for t in self.warn_at[:n]}

    def apply(self, book: PeriodBook, key: ScopeKey, state: ScopeState, amount: int,
              actual: int, crossings: list[Crossing]) -> None:
        """Replace ``amount`` reserved by ``actual`` spent; note newly crossed thresholds."""
        state.reserved -= amount
        state.spent += actual
        spent, limit = state.spent, state.limit
        n = self.rule.passed(spent, limit)
        for t in self.warn_at[:n] if n else ():
            passed = (key, t)
            if passed not in book.crossed:
                book.crossed.add(passed)
                crossings.append(Crossing(key[0], key[1], book.period, t, limit, spent))

    def remaining(self, reservation: Reservation) -> int | None:
        """What the tightest of the request's scopes has left (None: no limited scope)."""
        book = self.periods.get(reservation.period)
        if book is None or not reservation.scopes:
            return None
        return min(book.states[k].free for k in reservation.scopes if k in book.states)

    def warnings(self, reservation: Reservation) -> list[str]:
        """Header values ``scope:id NN%`` for the request's scopes past a warn threshold."""
        book = self.periods.get(reservation.period)
        if book is None or not self.warn_at:
            return []
        out = []
        warns = self.rule.warns
        for key in reservation.scopes:
            state = book.states.get(key)
            if state and state.limit and warns(state.spent, state.limit):
                percent = (Decimal(state.spent) * 100 / state.limit).quantize(Decimal(1))
                out.append(f"{key[0]}:{key[1]} {percent}%")
        return out

    def status(self, period: str | None = None) -> list[ScopeStatus]:
        """Every limited scope of a loaded period (call ``book`` first to load one)."""
        book = self.periods.get(period or self.current_period())
        if book is None:
            return []
        return [
            ScopeStatus(k[0], k[1], book.period, s.limit, s.spent, s.reserved)
            for k, s in sorted(book.states.items())
        ]


class BudgetEngine:
    """The local implementation of ``Budgets``: admission against in-memory books.

    ``load_spend(period)`` returns the ledger's spend per scope for a period, used when a
    period is first touched and when a limit is added.
    """

    def __init__(
        self,
        limits: Mapping[ScopeKey, int],
        tz: ZoneInfo,
        warn_at: Iterable[Decimal],
        load_spend: SpendLoader,
        near_cap: str = "reject",
        min_output_tokens: int = 16,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ):
        books = self.books = Books(limits, tz, warn_at, clock)
        self.limits, self.tz, self.clock = books.limits, tz, clock
        self.rule, self.warn_at = books.rule, books.warn_at
        self.policy = Admission(near_cap, min_output_tokens)
        self.near_cap, self.min_output_tokens = near_cap, min_output_tokens
        self._load_spend = load_spend
        self._books = books.periods
        self._book_lock = asyncio.Lock()
        # The reads are the books' own methods (bound once: no extra call per request).
        self.current_period = books.current_period
        self.remaining = books.remaining
        self.warnings = books.warnings
        self.status = books.status

    async def book(self, period: str | None = None) -> PeriodBook:
        """The book of ``period`` (default: now), loaded from the ledger on first use."""
        period = period or self.current_period()
        book = self._books.get(period)
        if book is not None:
            return book
        async with self._book_lock:
            book = self._books.get(period)
            if book is None:
                book = self._books[period] = await self._load_book(period)
                self.books.drop_old(period)
        return book

    async def _load_book(self, period: str) -> PeriodBook:
        """A new period's book with the spend the ledger already holds for it."""
        spend = await self._load_spend(period)
        book = PeriodBook(period)
        for key, limit in self.limits.items():
            state = ScopeState(limit, spend.get(key, 0))
            book.states[key] = state
            book.crossed.update(self.books.passed(key, state))
        return book

    async def reserve(
        self,
        scopes: Iterable[ScopeKey],
        amount: int,
        *,
        force: bool = False,
        clamp: ClampRequest | None = None,
    ) -> Reservation:
        """Reserve ``amount`` in every limited scope, or raise BudgetExceeded naming one
        (``gateway.budget_rules.admit``)."""
        return admit(self.policy, await self.book(), scopes, amount, force, clamp)

    def settle(self, reservation: Reservation, actual: int) -> list[Crossing]:
        """Replace a reservation by the actual cost; return newly crossed warn thresholds."""
        if reservation.settled:
            return []
        reservation.settled = True
        book = self._books.get(reservation.period)
        if book is None:  # the period was dropped: nothing reserved there any more
            return []
        crossings: list[Crossing] = []
        for key in reservation.scopes:
            state = book.states.get(key)
            if state is not None:
                self.books.apply(book, key, state, reservation.amount, actual, crossings)
        return crossings

    async def set_limit(self, key: ScopeKey, limit: int | None) -> None:
        """Add, change or remove a scope's limit; takes effect for the next reservation."""
        if limit is None:
            self.limits.pop(key, None)
            for book in self._books.values():
                state = book.states.get(key)
                if state is not None and not state.reserved:
                    del book.states[key]
            return
        self.limits[key] = limit
        for book in list(self._books.values()):
            state = book.states.get(key)
            if state is None:
                spend = await self._load_spend(book.period)
                state = book.states.setdefault(key, ScopeState(limit, spend.get(key, 0)))
            state.limit = limit
            book.crossed = {c for c in book.crossed if c[0] != key} | self.books.passed(key, state)
