"""Budgets shared by every replica: admission decided in PostgreSQL, mirrored in memory.

``SharedBudgets`` implements ``gateway.budget.Budgets`` by composing the pure admission
(``gateway.budget_rules.admit``) with the ``budget_usage`` rows, locked in the writer's
transaction: a reservation is granted only if ``spent + reserved + amount <= limit`` holds for
every limited slot (a scope in the current period of one of its windows) *as committed by all
replicas*, and the increment commits atomically with a ``reservations`` row that crash
reclaim can find. So the hard cap holds across replicas, in every window.

Each request locks every *existing* budget row of its scopes in the current period of every
window, limited for this replica or not: a cap added on another replica is counted from the
moment its row exists, before this replica has heard of the new limit (it starts enforcing
it within a second, ``pg_sync``). A new end user's row is created (from the ledger, under a
table lock) before their first reservation, so 50 first requests at once on several
replicas all meet the same row.

``Mirror`` keeps the in-memory books for headers, status and metrics: the writer tells it about
every commit (it is the writer's ``UsageHook``, given to the ledger at construction), it adds
this replica's settlements not yet written, and ``pg_sync`` refreshes it from the database, so
it shows what the other replicas spent too.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from functools import partial

from gateway.budget import (
    Admission,
    Books,
    ClampRequest,
    Crossing,
    PeriodBook,
    Reservation,
    ScopeKey,
    ScopeState,
    admit,
)
from gateway.errors import BudgetExceeded, ServiceUnavailable
from gateway.store.pg_writer import ReleaseOp, ReserveOp, UsageKey
from gateway.store.postgres import PostgresLedger
from gateway.windows import WINDOWS, Span, window_of

CrossingSink = Callable[[list[Crossing]], None]


class Mirror:
    """This replica's copy of the shared budget rows (the writer's ``UsageHook``).

    ``on_crossings`` receives the warn crossings this replica won the right to report
    (audit and metrics), once the database has confirmed them.
    """

    def __init__(self, books: Books, on_crossings: CrossingSink | None = None):
        self.books = books
        self.on_crossings = on_crossings
        # This replica's settlements queued but not committed: [spent, reserved] deltas.
        self.unflushed: dict[UsageKey, list[int]] = {}
        self.commits = 0  # writer commits seen, to notice a read that raced one

    def show(self, key: UsageKey, spent: int, reserved: int) -> None:
        """Set one slot's numbers from the database (plus what is not written yet)."""
        book = self.books.periods.get(key[0])
        state = book.states.get((key[1], key[2])) if book else None
        if state is not None:
            delta = self.unflushed.get(key, (0, 0))
            state.spent, state.reserved = spent + delta[0], reserved + delta[1]

    def settling(self, reservation: Reservation, actual: int) -> None:
        """A settlement queued for the writer: counted at once, corrected on commit."""
        periods = self.books.periods
        for slot in reservation.slots:
            delta = self.unflushed.setdefault(slot, [0, 0])
            delta[0] += actual
            delta[1] -= reservation.amount
            book = periods.get(slot[0])
            state = book.states.get((slot[1], slot[2])) if book else None
            if state is not None:
                state.reserved -= reservation.amount
                state.spent += actual

    # -- gateway.store.pg_writer.UsageHook ---------------------------------------------------
    def crossings(self, before: Mapping[UsageKey, int],
                  rows: Mapping[UsageKey, ScopeState]) -> list[Crossing]:
        found = []
        crossed = self.books.rule.crossed
        limits = self.books.limits
        for key, state in rows.items():
            limit = limits.get((key[1], key[2]), window_of(key[0]))
            if limit is None:
                continue
            for threshold in crossed(before[key], state.spent, limit):
                found.append(Crossing(key[1], key[2], key[0], threshold, limit, state.spent))
        return found

    def committed(self, rows: Mapping[UsageKey, ScopeState], released: Sequence[ReleaseOp],
                  crossings: list[Crossing]) -> None:
        self.commits += 1
        for op in released:
            if not op.tracked:
                continue
            for slot in op.slots:
                delta = self.unflushed.get(slot)
                if delta is not None:
                    delta[0] -= op.cost
                    delta[1] += op.amount
                    if delta == [0, 0]:
                        del self.unflushed[slot]
        for key, state in rows.items():
            self.show(key, state.spent, state.reserved)
        if crossings and self.on_crossings is not None:
            self.on_crossings(crossings)


class SharedBudgets:
    """``Budgets`` whose reservations are atomic across replicas (PostgreSQL)."""

    def __init__(self, ledger: PostgresLedger, mirror: Mirror, policy: Admission):
        self.ledger = ledger
        self.replica = ledger.replica
        self.mirror = mirror
        self.policy = policy
        books = self.books = mirror.books
        self.limits, self.tz, self.clock = books.limits, books.tz, books.clock
        self.rule, self.warn_at = books.rule, books.warn_at
        self.near_cap, self.min_output_tokens = policy.near_cap, policy.min_output_tokens
        self._book_lock = asyncio.Lock()
        self._ensure_lock = asyncio.Lock()
        self._ensured: set[UsageKey] = set()
        # The reads are the books' own methods (bound once: no extra call per request).
        self.current_period = books.current_period
        self.remaining = books.remaining
        self.warnings = books.warnings
        self.status = books.status

    # -- budget rows -------------------------------------------------------------------------
    async def _ensure(self, slots: Iterable[UsageKey]) -> None:
        missing = [s for s in slots if s not in self._ensured]
        if not missing:
            return
        async with self._ensure_lock:  # 50 first requests of a new user: one creates the row
            missing = [s for s in missing if s not in self._ensured]
            if missing:
                spans = [self.books.span(s[0]) for s in missing]
                await self.ledger.ensure_usage(missing, spans)
                self._ensured.update(missing)

    async def _rows(self, period: str) -> dict[ScopeKey, tuple[int, int]]:
        """The period's rows, re-read (a few times at most) if a commit raced the read."""
        for _ in range(3):
            seen = self.mirror.commits
            rows = await self.ledger.usage_rows(period)
            if seen == self.mirror.commits:
                break
        return rows

    async def book(self, period: str | None = None) -> PeriodBook:
        """The mirror of ``period`` (default: this month), loaded from the shared rows on
        first use."""
        return await self._book(self.books.span(period or self.current_period()))

    async def load_current(self) -> None:
        """Load the current period of every window in use (status, gauges, the admin)."""
        for span in self.books.current_spans():
            await self._book(span)

    async def _book(self, span: Span) -> PeriodBook:
        book = self.books.periods.get(span.period)
        if book is not None:
            return book
        async with self._book_lock:
            book = self.books.periods.get(span.period)
            if book is None:
                book = await self._load_book(span)
                self.books.drop_old()
                self._ensured = {s for s in self._ensured if s[0] in self.books.periods}
        return book

    async def _load_book(self, span: Span) -> PeriodBook:
        explicit = [(k, limit) for k, w, limit in self.limits.items() if w == span.window]
        await self._ensure([(span.period, *k) for k, _ in explicit])
        book = PeriodBook(span.period, span=span)
        for key, limit in explicit:
            book.states[key] = ScopeState(limit)
        self.books.periods[span.period] = book  # the mirror finds the book there
        for key, (spent, reserved) in (await self._rows(span.period)).items():
            self.mirror.show((span.period, *key), spent, reserved)
        return book

    async def refresh(self) -> None:
        """Re-read the current periods' rows (what the other replicas spent and reserved)."""
        for span in self.books.current_spans():
            if span.period not in self.books.periods:
                await self._book(span)
                continue
            for key, (spent, reserved) in (await self._rows(span.period)).items():
                self.mirror.show((span.period, *key), spent, reserved)

    # -- admission ---------------------------------------------------------------------------
    async def reserve(
        self,
        scopes: Iterable[ScopeKey],
        amount: int,
        *,
        force: bool = False,
        clamp: ClampRequest | None = None,
    ) -> Reservation:
        """Reserve in the database, atomically across scopes, windows and replicas, or raise."""
        books = self.books
        now = books.now()
        spans = {w: books.spans.get(w, now) for w in WINDOWS}
        periods = books.periods
        wanted = tuple(dict.fromkeys(scopes))
        limited: list[UsageKey] = []
        for key in wanted:
            caps = self.limits.of(key)
            if not caps:
                continue
            for window, limit in caps.items():
                span = spans[window]
                book = periods.get(span.period)
                if book is None:
                    book = await self._book(span)
                if key not in book.states:  # e.g. an end user's first request
                    books.track(book, key, limit)
                limited.append((span.period, key[0], key[1]))
        await self._ensure(limited)
        # Every window's existing row is locked, limited here or not (see the module doc).
        slots = tuple((span.period, k[0], k[1]) for span in spans.values() for k in wanted)
        rid = secrets.token_hex(12)
        fut: asyncio.Future[Reservation] = asyncio.get_running_loop().create_future()
        month = spans["monthly"].period
        decide = partial(self._decide, month, now, amount, force, clamp, rid)
        self.ledger.writer.put(ReserveOp(month, slots, rid, decide, fut))
        try:
            return await asyncio.wait_for(fut, self.ledger.op_timeout_s)
        except BudgetExceeded as exc:
            raise books.resets(exc) from None
        except Exception:
            raise ServiceUnavailable(
                "costwall cannot reach its budget database, so this request was not "
                "forwarded. Try again shortly.", code="budget_store_unavailable") from None

    def _decide(self, month: str, at: datetime, amount: int, force: bool,
                clamp: ClampRequest | None, rid: str,
                rows: dict[UsageKey, ScopeState]) -> Reservation:
        """Run in the writer's transaction against the locked rows of the request's slots."""
        limited: dict[UsageKey, ScopeState] = {}
        limits = self.limits
        for slot, state in rows.items():
            limit = limits.get((slot[1], slot[2]), window_of(slot[0]))
            if limit is not None:
                state.limit = limit
                limited[slot] = state
        taken = admit(self.policy, limited, amount, force, clamp, month, at)
        # Rows this replica has no limit for (yet) still count the request.
        tracked = tuple(s for s in rows if s not in limited)
        for slot in tracked:
            rows[slot].reserved += taken.amount
        slots = taken.slots + tracked
        # ``hold``: the pending ledger row is linked to it (``PostgresLedger.begin``).
        return Reservation(month, slots, taken.amount, taken.forced, taken.clamped_tokens,
                           hold=rid if slots else None, at=at)

    def settle(self, reservation: Reservation, actual: int) -> list[Crossing]:
        """Queue the settlement; crossings are reported once committed (``on_crossings``)."""
        if reservation.settled:
            return []
        reservation.settled = True
        if reservation.hold is None or not reservation.slots:
            return []
        self.mirror.settling(reservation, actual)
        self.ledger.writer.put(ReleaseOp(reservation.hold, reservation.slots,
                                         reservation.amount, actual))
        return []

    # -- changes -----------------------------------------------------------------------------
    async def set_limit(self, key: ScopeKey, limit: int | None,
                        window: str = "monthly") -> None:
        """Add, change or remove one window's cap; the budget row keeps counting either way."""
        self.limits.set(key, window, limit)
        now_limit = self.limits.get(key, window)
        for book in list(self.books.periods.values()):
            if book.window != window:
                continue
            if now_limit is None:
                book.states.pop(key, None)
                continue
            await self._ensure([(book.period, *key)])
            state = book.states.get(key)
            if state is None:
                book.states[key] = ScopeState(now_limit)
                rows = await self._rows(book.period)
                self.mirror.show((book.period, *key), *rows.get(key, (0, 0)))
            else:
                state.limit = now_limit
