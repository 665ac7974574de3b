"""Budget arithmetic: scopes, calendar-month periods, reservations, clamping, warnings.

Pure and synchronous apart from ``BudgetEngine.book`` loading a new period's spend through an
injected coroutine, so the engine is tested without a server or a database. The invariant it
keeps: for every limited scope, ``spent + reserved <= limit`` unless a request was forced
through by an override, and a request is only forwarded once its upper bound is reserved.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from gateway.errors import BudgetExceeded
from gateway.money import format_usd

ScopeKey = tuple[str, str]
GLOBAL: ScopeKey = ("global", "global")
SpendLoader = Callable[[str], Awaitable[Mapping[ScopeKey, int]]]


def period_of(moment: datetime, tz: ZoneInfo) -> str:
    """The calendar month (``YYYY-MM``) ``moment`` falls in, in the budget time zone."""
    local = moment.astimezone(tz)
    return f"{local.year:04d}-{local.month:02d}"


def period_bounds(period: str, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """UTC start (inclusive) and end (exclusive) of a ``YYYY-MM`` month in ``tz``."""
    year, month = int(period[:4]), int(period[5:7])
    start = datetime(year, month, 1, tzinfo=tz)
    end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=tz)
    return start.astimezone(UTC), end.astimezone(UTC)


def scopes_for(tenant: str, agent: str, campaign: str | None, key_name: str) -> list[ScopeKey]:
    """Every scope a request belongs to, tightest-first order does not matter here."""
    keys: list[ScopeKey] = [GLOBAL, ("tenant", tenant), ("agent", agent), ("key", key_name)]
    if campaign:
        keys.append(("campaign", campaign))
    return keys


@dataclass(slots=True)
class ScopeState:
    limit: int
    spent: int = 0
    reserved: int = 0

    @property
    def free(self) -> int:
        return self.limit - self.spent - self.reserved


@dataclass(frozen=True, slots=True)
class ScopeStatus:
    """What admins, metrics and headers see of one scope in one period."""

    scope: str
    id: str
    period: str
    limit: int
    spent: int
    reserved: int

    @property
    def utilization(self) -> Decimal:
        if self.limit <= 0:
            return Decimal(1) if self.spent > 0 else Decimal(0)
        return Decimal(self.spent) / Decimal(self.limit)


@dataclass(frozen=True, slots=True)
class Crossing:
    """A scope passed a warn threshold in a period (audit-logged once)."""

    scope: str
    id: str
    period: str
    threshold: Decimal
    limit: int
    spent: int


@dataclass(frozen=True, slots=True)
class ClampRequest:
    """What admission needs to lower the output limit instead of refusing."""

    prompt_cost: int        # upper bound of the prompt's cost
    output_price: int       # pico-USD per output token (highest tier)
    requested_tokens: int   # the request's (or model's) output bound per choice
    choices: int = 1


@dataclass(slots=True)
class Reservation:
    period: str
    scopes: tuple[ScopeKey, ...]
    amount: int
    forced: bool = False
    clamped_tokens: int | None = None
    settled: bool = False


@dataclass(slots=True)
class PeriodBook:
    """Spend and reservations of the limited scopes in one month."""

    period: str
    states: dict[ScopeKey, ScopeState] = field(default_factory=dict)
    crossed: set[tuple[ScopeKey, Decimal]] = field(default_factory=set)


class BudgetEngine:
    """In-memory admission control over monthly per-scope limits.

    ``limits`` maps (scope, id) to pico-USD; scopes without a limit are not tracked (so
    free-form campaign ids cost no memory). ``load_spend(period)`` returns the ledger's spend
    per scope for a period, used when a period is first touched and when a limit is added.
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
        self.limits: dict[ScopeKey, int] = dict(limits)
        self.tz = tz
        self.warn_at = tuple(sorted(warn_at))
        # (threshold, numerator, denominator): ``spent >= t * limit`` as an exact integer
        # comparison, checked per scope on every request (Decimal arithmetic cost µs there).
        self._warn_ratios = tuple((t, *t.as_integer_ratio()) for t in self.warn_at)
        self.near_cap = near_cap
        self.min_output_tokens = min_output_tokens
        self.clock = clock
        self._load_spend = load_spend
        self._books: dict[str, PeriodBook] = {}
        self._book_lock = asyncio.Lock()
        self._period_span: tuple[datetime, datetime, str] | None = None

    # -- periods -----------------------------------------------------------------------------
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
                self._drop_old_books(period)
        return book

    async def _load_book(self, period: str) -> PeriodBook:
        """A new period's book with the spend the ledger already holds for it."""
        spend = await self._load_spend(period)
        book = PeriodBook(period)
        for key, limit in self.limits.items():
            state = ScopeState(limit, spend.get(key, 0))
            book.states[key] = state
            book.crossed.update(self._passed(key, state))
        return book

    def _drop_old_books(self, current: str) -> None:
        for period, book in list(self._books.items()):
            if period < current and not any(s.reserved for s in book.states.values()):
                del self._books[period]

    def _passed(self, key: ScopeKey, state: ScopeState) -> set[tuple[ScopeKey, Decimal]]:
        spent, limit = state.spent, state.limit
        return {(key, t) for t, num, den in self._warn_ratios if spent * den >= num * limit}

    # -- admission ---------------------------------------------------------------------------
    async def reserve(
        self,
        scopes: Iterable[ScopeKey],
        amount: int,
        *,
        force: bool = False,
        clamp: ClampRequest | None = None,
    ) -> Reservation:
        """Reserve ``amount`` in every limited scope, or raise BudgetExceeded naming one.

        With ``force`` (an override) the reservation is taken even past the limit. With a
        ``clamp`` request and ``near_cap: clamp``, a request that does not fit is reserved at
        the largest output bound every scope still affords (at least ``min_output_tokens``).
        """
        return self.admit(await self.book(), scopes, amount, force=force, clamp=clamp)

    def admit(
        self,
        book: PeriodBook,
        scopes: Iterable[ScopeKey],
        amount: int,
        *,
        force: bool = False,
        clamp: ClampRequest | None = None,
    ) -> Reservation:
        """The admission decision of ``reserve`` against ``book`` (which it updates).

        Synchronous and pure apart from ``book``, so a shared engine can run it against rows
        it holds locked in a database transaction.
        """
        limited = tuple(k for k in dict.fromkeys(scopes) if k in book.states)
        states = [book.states[k] for k in limited]
        clamped: int | None = None
        if not force and states:
            tightest_key, tightest = min(
                zip(limited, states, strict=True), key=lambda ks: ks[1].free)
            if amount > tightest.free:
                if clamp is None or self.near_cap != "clamp" or clamp.output_price <= 0:
                    raise self._exceeded(book.period, tightest_key, tightest, amount)
                per_choice = (tightest.free - clamp.prompt_cost) // (
                    clamp.output_price * max(clamp.choices, 1)
                )
                if per_choice < min(self.min_output_tokens, clamp.requested_tokens):
                    raise self._exceeded(book.period, tightest_key, tightest, amount)
                clamped = min(per_choice, clamp.requested_tokens)
                amount = clamp.prompt_cost + clamped * clamp.output_price * max(clamp.choices, 1)
        for state in states:
            state.reserved += amount
        return Reservation(book.period, limited, amount, force, clamped)

    def _exceeded(
        self, period: str, key: ScopeKey, state: ScopeState, amount: int
    ) -> BudgetExceeded:
        return BudgetExceeded(
            scope=key[0], scope_id=key[1], period=period, limit=state.limit,
            spent=state.spent, reserved=state.reserved, estimate=amount,
        )

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
            if state is None:
                continue
            state.reserved -= reservation.amount
            state.spent += actual
            spent, limit = state.spent, state.limit
            for t, num, den in self._warn_ratios:
                if spent * den < num * limit:
                    break  # thresholds are sorted: the higher ones are not passed either
                passed = (key, t)
                if passed not in book.crossed:
                    book.crossed.add(passed)
                    crossings.append(Crossing(key[0], key[1], book.period, t, limit, spent))
        return crossings

    # -- reads -------------------------------------------------------------------------------
    def remaining(self, reservation: Reservation) -> int | None:
        """What the tightest of the request's scopes has left (None: no limited scope)."""
        book = self._books.get(reservation.period)
        if book is None or not reservation.scopes:
            return None
        return min(book.states[k].free for k in reservation.scopes if k in book.states)

    def warnings(self, reservation: Reservation) -> list[str]:
        """Header values ``scope:id NN%`` for the request's scopes past a warn threshold."""
        book = self._books.get(reservation.period)
        if book is None or not self.warn_at:
            return []
        out = []
        _, num, den = self._warn_ratios[0]
        for key in reservation.scopes:
            state = book.states.get(key)
            if state and state.limit and state.spent * den >= num * state.limit:
                percent = (Decimal(state.spent) * 100 / state.limit).quantize(Decimal(1))
                out.append(f"{key[0]}:{key[1]} {percent}%")
        return out

    def status(self, period: str | None = None) -> list[ScopeStatus]:
        """Every limited scope of a loaded period (call ``book`` first to load one)."""
        book = self._books.get(period or self.current_period())
        if book is None:
            return []
        return [
            ScopeStatus(k[0], k[1], book.period, s.limit, s.spent, s.reserved)
            for k, s in sorted(book.states.items())
        ]

    # -- changes -----------------------------------------------------------------------------
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
            book.crossed = {c for c in book.crossed if c[0] != key} | self._passed(key, state)


def describe(exc: BudgetExceeded) -> str:
    """One sentence for the 402 message and the blocked-executions log."""
    return (
        f"Budget exceeded for {exc.scope} '{exc.scope_id}' in {exc.period}: limit "
        f"${format_usd(exc.limit)}, spent ${format_usd(exc.spent)}, reserved "
        f"${format_usd(exc.reserved)}; this request needs up to ${format_usd(exc.estimate)}."
    )


def month_after(period: str) -> str:
    """``2026-12`` -> ``2027-01``."""
    start = datetime(int(period[:4]), int(period[5:7]), 28) + timedelta(days=5)
    return f"{start.year:04d}-{start.month:02d}"
