"""Budgets shared by every replica: admission decided in PostgreSQL, mirrored in memory.

``SharedBudgets`` implements ``gateway.budget.Budgets`` by composing the pure admission
(``gateway.budget_rules.admit``) with the ``budget_usage`` rows, locked in the writer's
transaction: a reservation is granted only if ``spent + reserved + amount <= limit`` holds for
every limited scope *as committed by all replicas*, and the increment commits atomically with a
``reservations`` row that crash reclaim can find. So the hard cap holds across replicas.

Each request locks every *existing* budget row of its scopes, limited for this replica or
not: a cap added on another replica is counted from the moment its row exists, before this
replica has heard of the new limit (it starts enforcing it within a second, ``pg_sync``).

``Mirror`` keeps the in-memory books for headers, status and metrics: the writer tells it about
every commit (it is the writer's ``UsageHook``, given to the ledger at construction), it adds
this replica's settlements not yet written, and ``pg_sync`` refreshes it from the database, so
it shows what the other replicas spent too.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
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
        """Set one scope's numbers from the database (plus what is not written yet)."""
        book = self.books.periods.get(key[0])
        state = book.states.get((key[1], key[2])) if book else None
        if state is not None:
            delta = self.unflushed.get(key, (0, 0))
            state.spent, state.reserved = spent + delta[0], reserved + delta[1]

    def settling(self, reservation: Reservation, actual: int) -> None:
        """A settlement queued for the writer: counted at once, corrected on commit."""
        book = self.books.periods.get(reservation.period)
        for scope in reservation.scopes:
            delta = self.unflushed.setdefault((reservation.period, *scope), [0, 0])
            delta[0] += actual
            delta[1] -= reservation.amount
            state = book.states.get(scope) if book else None
            if state is not None:
                state.reserved -= reservation.amount
                state.spent += actual

    # -- gateway.store.pg_writer.UsageHook ---------------------------------------------------
    def crossings(self, before: Mapping[UsageKey, int],
                  rows: Mapping[UsageKey, ScopeState]) -> list[Crossing]:
        found = []
        crossed = self.books.rule.crossed
        for key, state in rows.items():
            limit = self.books.limits.get((key[1], key[2]))
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
            for scope in op.scopes:
                key = (op.period, *scope)
                delta = self.unflushed.get(key)
                if delta is not None:
                    delta[0] -= op.cost
                    delta[1] += op.amount
                    if delta == [0, 0]:
                        del self.unflushed[key]
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
        self._ensured: set[UsageKey] = set()
        # The reads are the books' own methods (bound once: no extra call per request).
        self.current_period = books.current_period
        self.remaining = books.remaining
        self.warnings = books.warnings
        self.status = books.status

    # -- budget rows -------------------------------------------------------------------------
    async def _ensure(self, period: str, keys: Iterable[ScopeKey]) -> None:
        missing = [(period, *k) for k in keys if (period, *k) not in self._ensured]
        if missing:
            await self.ledger.ensure_usage(missing)
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
        """The mirror of ``period`` (default: now), loaded from the shared rows on first use."""
        period = period or self.current_period()
        book = self.books.periods.get(period)
        if book is not None:
            return book
        async with self._book_lock:
            book = self.books.periods.get(period)
            if book is None:
                book = await self._load_book(period)
                self.books.drop_old(period)
        return book

    async def _load_book(self, period: str) -> PeriodBook:
        await self._ensure(period, list(self.limits))
        book = PeriodBook(period)
        for key, limit in self.limits.items():
            book.states[key] = ScopeState(limit)
        self.books.periods[period] = book  # the mirror finds the book there
        for key, (spent, reserved) in (await self._rows(period)).items():
            self.mirror.show((period, *key), spent, reserved)
        return book

    async def refresh(self) -> None:
        """Re-read the current month's rows (what the other replicas spent and reserved)."""
        period = self.current_period()
        if period not in self.books.periods:
            await self.book(period)
            return
        for key, (spent, reserved) in (await self._rows(period)).items():
            self.mirror.show((period, *key), spent, reserved)

    # -- admission ---------------------------------------------------------------------------
    async def reserve(
        self,
        scopes: Iterable[ScopeKey],
        amount: int,
        *,
        force: bool = False,
        clamp: ClampRequest | None = None,
    ) -> Reservation:
        """Reserve in the database, atomically across scopes and replicas, or raise."""
        book = await self.book()
        wanted = tuple(dict.fromkeys(scopes))
        await self._ensure(book.period, [k for k in wanted if k in self.limits])
        rid = secrets.token_hex(12)
        fut: asyncio.Future[Reservation] = asyncio.get_running_loop().create_future()
        decide = partial(self._decide, book.period, amount, force, clamp, rid)
        self.ledger.writer.put(ReserveOp(book.period, wanted, rid, decide, fut))
        try:
            return await asyncio.wait_for(fut, self.ledger.op_timeout_s)
        except BudgetExceeded:
            raise
        except Exception:
            raise ServiceUnavailable(
                "costwall cannot reach its budget database, so this request was not "
                "forwarded. Try again shortly.", code="budget_store_unavailable") from None

    def _decide(self, period: str, amount: int, force: bool, clamp: ClampRequest | None,
                rid: str, rows: dict[ScopeKey, ScopeState]) -> Reservation:
        """Run in the writer's transaction against the locked rows of the request's scopes."""
        limited: dict[ScopeKey, ScopeState] = {}
        for key, state in rows.items():
            limit = self.limits.get(key)
            if limit is not None:
                state.limit = limit
                limited[key] = state
        taken = admit(self.policy, PeriodBook(period, limited), rows, amount, force, clamp)
        # Rows this replica has no limit for (yet) still count the request.
        tracked = tuple(k for k in rows if k not in limited)
        for key in tracked:
            rows[key].reserved += taken.amount
        scopes = taken.scopes + tracked
        # ``hold``: the pending ledger row is linked to it (``PostgresLedger.begin``).
        return Reservation(period, scopes, taken.amount, taken.forced, taken.clamped_tokens,
                           hold=rid if scopes else None)

    def settle(self, reservation: Reservation, actual: int) -> list[Crossing]:
        """Queue the settlement; crossings are reported once committed (``on_crossings``)."""
        if reservation.settled:
            return []
        reservation.settled = True
        if reservation.hold is None or not reservation.scopes:
            return []
        self.mirror.settling(reservation, actual)
        self.ledger.writer.put(ReleaseOp(reservation.hold, reservation.period,
                                         reservation.scopes, reservation.amount, actual))
        return []

    # -- changes -----------------------------------------------------------------------------
    async def set_limit(self, key: ScopeKey, limit: int | None) -> None:
        """Add, change or remove a limit; the budget row keeps counting either way."""
        if limit is None:
            self.limits.pop(key, None)
            for book in self.books.periods.values():
                book.states.pop(key, None)
            return
        self.limits[key] = limit
        for book in list(self.books.periods.values()):
            await self._ensure(book.period, [key])
            state = book.states.get(key)
            if state is None:
                book.states[key] = ScopeState(limit)
                rows = await self._rows(book.period)
                self.mirror.show((book.period, *key), *rows.get(key, (0, 0)))
            else:
                state.limit = limit
