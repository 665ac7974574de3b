"""Budgets: the ``Budgets`` interface, the period books both implementations keep in memory,
and ``BudgetEngine``, the local (single-process) implementation.

The arithmetic is pure and lives in ``gateway.budget_rules`` (re-exported here) and
``gateway.windows``; the shared implementation for replicas is
``gateway.store.pg_budgets.SharedBudgets``. ``BudgetEngine`` only does I/O through an
injected coroutine that loads a period's spend, so it is tested without a server or a
database.

Time only moves forward here: ``Books.now`` never returns an instant before one it already
returned, so a clock stepped back (NTP) cannot re-open a period that has ended, and a request
is never counted in a period before the one of a request admitted earlier.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from gateway.budget_rules import (
    GLOBAL,
    Admission,
    ClampRequest,
    Crossing,
    Limits,
    PeriodBook,
    Reservation,
    ScopeKey,
    ScopeState,
    ScopeStatus,
    SlotKey,
    WarnRule,
    admit,
    describe,
    month_after,
    period_bounds,
    period_of,
    scopes_for,
)
from gateway.errors import BudgetExceeded
from gateway.windows import WINDOWS, Span, SpanCache, span_by_id, window_of

__all__ = [
    "GLOBAL",
    "Admission",
    "Books",
    "BudgetEngine",
    "Budgets",
    "ClampRequest",
    "Crossing",
    "Limits",
    "PeriodBook",
    "Reservation",
    "ScopeKey",
    "ScopeState",
    "ScopeStatus",
    "SlotKey",
    "Span",
    "SpendLoader",
    "WarnRule",
    "admit",
    "apply_caps",
    "describe",
    "month_after",
    "period_bounds",
    "period_of",
    "scopes_for",
]

SpendLoader = Callable[[Span], Awaitable[Mapping[ScopeKey, int]]]


class Budgets(Protocol):
    """What the request path, the admin and the metrics use; local or shared."""

    limits: Limits
    warn_at: tuple[Decimal, ...]
    rule: WarnRule
    books: Books

    def current_period(self) -> str: ...

    async def book(self, period: str | None = None) -> PeriodBook: ...

    async def load_current(self) -> None: ...

    async def reserve(self, scopes: Iterable[ScopeKey], amount: int, *, force: bool = False,
                      clamp: ClampRequest | None = None) -> Reservation: ...

    def settle(self, reservation: Reservation, actual: int) -> list[Crossing]: ...

    def remaining(self, reservation: Reservation) -> int | None: ...

    def warnings(self, reservation: Reservation) -> list[str]: ...

    def status(self, period: str | None = None) -> list[ScopeStatus]: ...

    async def set_limit(self, key: ScopeKey, limit: int | None,
                        window: str = "monthly") -> None: ...


class Books:
    """The in-memory books of the limited scopes, one per period of each window, and what is
    read from them.

    ``limits`` holds the caps per scope and window; scopes without a limit are not tracked
    (so free-form campaign ids cost no memory).
    """

    def __init__(self, limits: Limits | Mapping[ScopeKey, Any], tz: ZoneInfo,
                 warn_at: Iterable[Decimal], clock: Callable[[], datetime]):
        self.limits = Limits.coerce(limits)
        self.tz = tz
        self.rule = WarnRule.of(warn_at)
        self.warn_at = self.rule.thresholds
        self.clock = clock
        self.periods: dict[str, PeriodBook] = {}
        self.spans = SpanCache(tz)
        self._latest: datetime | None = None

    def now(self) -> datetime:
        """``clock()``, but never earlier than an instant already handed out."""
        now = self.clock()
        latest = self._latest
        if latest is not None and now.tzinfo is not None and now < latest:
            return latest
        self._latest = now
        return now

    def observe(self, moment: datetime) -> None:
        """Time has been seen at ``moment`` (e.g. the ledger's newest row at start)."""
        if self._latest is None or moment > self._latest:
            self._latest = moment

    def current_period(self) -> str:
        """The calendar month of ``now()`` (the ledger rows' ``period``)."""
        now = self.now()
        if now.tzinfo is None:  # a naive test clock: no spans to cache
            return period_of(now.replace(tzinfo=UTC), self.tz)
        return self.spans.get("monthly", now).period

    def span(self, period: str) -> Span:
        """The span a period id names (the book's own when it is loaded)."""
        book = self.periods.get(period)
        if book is not None and book.span is not None:
            return book.span
        return span_by_id(period, self.tz)

    def current_spans(self) -> list[Span]:
        """The current period of every window a limit uses (the month always)."""
        now = self.now()
        windows = ("monthly", *(w for w in self.limits.windows() if w != "monthly"))
        return [self.spans.get(w, now) for w in windows]

    def drop_old(self) -> None:
        """Forget periods that have ended and hold no reservation any more."""
        now = self._latest
        if now is None:
            return
        for period, book in list(self.periods.items()):
            if book.span is not None and book.span.end <= now \
                    and not any(s.reserved for s in book.states.values()):
                del self.periods[period]

    def passed(self, key: ScopeKey, state: ScopeState) -> set[tuple[ScopeKey, Decimal]]:
        """The thresholds ``state`` has already passed (not reported again)."""
        n = self.rule.passed(state.spent, state.limit)
        return {(key, t) for t in self.warn_at[:n]}

    def track(self, book: PeriodBook, key: ScopeKey, limit: int) -> ScopeState:
        """Start tracking ``key`` in ``book`` from the spend the book was loaded with."""
        state = book.states[key] = ScopeState(limit, book.base.get(key, 0))
        book.crossed.update(self.passed(key, state))
        return state

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

    def _state(self, slot: SlotKey) -> ScopeState | None:
        book = self.periods.get(slot[0])
        return None if book is None else book.states.get((slot[1], slot[2]))

    def remaining(self, reservation: Reservation) -> int | None:
        """What the tightest of the request's slots has left (None: no limited slot)."""
        free = [s.free for s in map(self._state, reservation.slots) if s is not None]
        return min(free) if free else None

    def warnings(self, reservation: Reservation) -> list[str]:
        """Header values for the request's slots past a warn threshold: ``scope:id NN%``,
        followed by the window's name for every window but the month."""
        if not self.warn_at:
            return []
        out = []
        warns = self.rule.warns
        for slot in reservation.slots:
            state = self._state(slot)
            if state and state.limit and warns(state.spent, state.limit):
                percent = (Decimal(state.spent) * 100 / state.limit).quantize(Decimal(1))
                window = window_of(slot[0])
                suffix = "" if window == "monthly" else f" {window}"
                out.append(f"{slot[1]}:{slot[2]} {percent}%{suffix}")
        return out

    def status(self, period: str | None = None) -> list[ScopeStatus]:
        """Every tracked scope of a loaded period, or (``None``) of every current window's
        period (call ``book``/``load_current`` first to load them)."""
        periods = [period] if period else [s.period for s in self.current_spans()]
        out: list[ScopeStatus] = []
        for p in periods:
            book = self.periods.get(p)
            if book is None:
                continue
            span = book.span
            window = book.window
            out.extend(ScopeStatus(k[0], k[1], p, s.limit, s.spent, s.reserved, window,
                                   span.end if span is not None else None)
                       for k, s in sorted(book.states.items()))
        return out

    def resets(self, exc: BudgetExceeded) -> BudgetExceeded:
        """``exc`` with the end of its period filled in."""
        exc.resets_at = self.span(exc.period).end
        return exc


class BudgetEngine:
    """The local implementation of ``Budgets``: admission against in-memory books.

    ``load_spend(span)`` returns the ledger's spend per scope in a period, used when a
    period is first touched and when a limit is added.
    """

    def __init__(
        self,
        limits: Limits | Mapping[ScopeKey, Any],
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
        """The book of ``period`` (default: this month), loaded from the ledger on first use."""
        return await self._book(self.books.span(period or self.current_period()))

    async def load_current(self) -> None:
        """Load the current period of every window in use (status, gauges, the admin)."""
        for span in self.books.current_spans():
            await self._book(span)

    async def _book(self, span: Span) -> PeriodBook:
        book = self._books.get(span.period)
        if book is not None:
            return book
        async with self._book_lock:
            book = self._books.get(span.period)
            if book is None:
                book = self._books[span.period] = await self._load_book(span)
                self.books.drop_old()
        return book

    async def _load_book(self, span: Span) -> PeriodBook:
        """A period's book with the spend the ledger already holds for it."""
        spend = await self._load_spend(span)
        book = PeriodBook(span.period, span=span, base=spend)
        for key, window, limit in self.limits.items():
            if window == span.window:
                self.books.track(book, key, limit)
        return book

    async def reserve(
        self,
        scopes: Iterable[ScopeKey],
        amount: int,
        *,
        force: bool = False,
        clamp: ClampRequest | None = None,
    ) -> Reservation:
        """Reserve ``amount`` in every limited window of every scope, or raise
        BudgetExceeded naming one (``gateway.budget_rules.admit``)."""
        books = self.books
        now = books.now()
        spans = books.spans
        periods = self._books
        limits = self.limits
        states: dict[SlotKey, ScopeState] = {}
        for key in scopes:
            caps = limits.of(key)
            if not caps:
                continue
            for window, limit in caps.items():
                span = spans.get(window, now)
                book = periods.get(span.period)
                if book is None:
                    book = await self._book(span)
                state = book.states.get(key)
                if state is None:  # e.g. an end user's first request under users_default
                    state = books.track(book, key, limit)
                states[(span.period, key[0], key[1])] = state
        month = spans.get("monthly", now).period
        try:
            return admit(self.policy, states, amount, force, clamp, month, now)
        except BudgetExceeded as exc:
            raise books.resets(exc) from None

    def settle(self, reservation: Reservation, actual: int) -> list[Crossing]:
        """Replace a reservation by the actual cost; return newly crossed warn thresholds."""
        if reservation.settled:
            return []
        reservation.settled = True
        crossings: list[Crossing] = []
        for slot in reservation.slots:
            book = self._books.get(slot[0])
            if book is None:  # the period was dropped: nothing reserved there any more
                continue
            key = (slot[1], slot[2])
            state = book.states.get(key)
            if state is not None:
                self.books.apply(book, key, state, reservation.amount, actual, crossings)
        return crossings

    async def set_limit(self, key: ScopeKey, limit: int | None,
                        window: str = "monthly") -> None:
        """Add, change or remove one window's cap of a scope; takes effect for the next
        reservation."""
        self.limits.set(key, window, limit)
        for book in list(self._books.values()):
            if book.window != window:
                continue
            state = book.states.get(key)
            now_limit = self.limits.get(key, window)
            if now_limit is None:
                if state is not None and not state.reserved:
                    del book.states[key]
                continue
            if state is None:
                assert book.span is not None
                spend = await self._load_spend(book.span)
                state = book.states.setdefault(key, ScopeState(now_limit, spend.get(key, 0)))
            state.limit = now_limit
            book.crossed = {c for c in book.crossed if c[0] != key} | self.books.passed(key, state)


async def apply_caps(budgets: Budgets, configured: Limits,
                     stored: Mapping[ScopeKey, Mapping[str, int | None]]) -> None:
    """Make ``budgets``' limits the configured caps as the admins changed them (``stored``:
    per scope and window, None where a cap was removed), one window at a time.

    Used at start and whenever another replica announces a change, so every replica arrives
    at the same limits from the same rows, whatever it had before.
    """
    desired = Limits(configured.caps, configured.user_default)
    for key, changes in stored.items():
        for window, limit in changes.items():
            desired.set(key, window, limit)
    live = budgets.limits
    for key in set(live.caps) | set(desired.caps):
        want = desired.caps.get(key, {})
        for window in WINDOWS:
            # Compared with the live caps each time: changing one window of an end user
            # without caps of their own starts from the users_default template.
            if live.caps.get(key, {}).get(window) != want.get(window):
                await budgets.set_limit(key, want.get(window), window)
