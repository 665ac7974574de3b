"""Budgets shared by every replica: admission decided in PostgreSQL, mirrored in memory.

``SharedBudgetEngine`` has ``BudgetEngine``'s interface and decision (``admit``), but the
numbers it decides on are the ``budget_usage`` rows, locked in the writer's transaction: a
reservation is granted only if ``spent + reserved + amount <= limit`` holds for every limited
scope *as committed by all replicas*, and the increment commits atomically with a
``reservations`` row that crash reclaim can find. So the hard cap holds across replicas.

Each request locks every *existing* budget row of its scopes, limited for this replica or
not: a cap added on another replica is counted from the moment its row exists, before this
replica has heard of the new limit (it starts enforcing it within a second, ``pg_sync``).

The in-memory book is a mirror for headers, status and metrics: updated from every commit
(plus this replica's settlements not yet written) and refreshed from the database by
``pg_sync``, so it shows what the other replicas spent too.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from zoneinfo import ZoneInfo

from gateway.budget import (
    BudgetEngine,
    ClampRequest,
    Crossing,
    PeriodBook,
    Reservation,
    ScopeKey,
    ScopeState,
)
from gateway.errors import BudgetExceeded, ServiceUnavailable
from gateway.ledger_pg import PostgresLedger
from gateway.pg_writer import ReleaseOp, ReserveOp, UsageKey, pending_reservation


@dataclass(slots=True)
class SharedReservation(Reservation):
    """A reservation held in the database under id ``rid``."""

    rid: str = ""


class SharedBudgetEngine(BudgetEngine):
    """``BudgetEngine`` whose reservations are atomic across replicas (PostgreSQL)."""

    def __init__(
        self,
        ledger: PostgresLedger,
        limits: Mapping[ScopeKey, int],
        tz: ZoneInfo,
        warn_at: Iterable[Decimal],
        near_cap: str = "reject",
        min_output_tokens: int = 16,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ):
        super().__init__(limits, tz, warn_at, ledger.spend_by_scope, near_cap,
                         min_output_tokens, clock)
        self.ledger = ledger
        self.replica = ledger.replica
        ledger.writer.hook = self
        # Set by the app: reports the warn crossings this replica won (audit + metrics).
        self.on_crossings: Callable[[list[Crossing]], None] | None = None
        self._ensured: set[UsageKey] = set()
        # This replica's settlements queued but not committed: [spent, reserved] deltas.
        self._unflushed: dict[UsageKey, list[int]] = {}
        self._commits = 0  # writer commits seen, to notice a read that raced one

    # -- budget rows -------------------------------------------------------------------------
    async def _ensure(self, period: str, keys: Iterable[ScopeKey]) -> None:
        missing = [(period, *k) for k in keys if (period, *k) not in self._ensured]
        if missing:
            await self.ledger.ensure_usage(missing)
            self._ensured.update(missing)

    async def _rows(self, period: str) -> dict[ScopeKey, tuple[int, int]]:
        """The period's rows, re-read (a few times at most) if a commit raced the read."""
        for _ in range(3):
            seen = self._commits
            rows = await self.ledger.usage_rows(period)
            if seen == self._commits:
                break
        return rows

    def _mirror(self, key: UsageKey, spent: int, reserved: int) -> None:
        book = self._books.get(key[0])
        state = book.states.get((key[1], key[2])) if book else None
        if state is not None:
            delta = self._unflushed.get(key, (0, 0))
            state.spent, state.reserved = spent + delta[0], reserved + delta[1]

    async def _load_book(self, period: str) -> PeriodBook:
        """The mirror of a new period, loaded from the shared budget rows."""
        await self._ensure(period, list(self.limits))
        book = PeriodBook(period)
        for key, limit in self.limits.items():
            book.states[key] = ScopeState(limit)
        self._books[period] = book  # _mirror finds the book through _books
        for key, (spent, reserved) in (await self._rows(period)).items():
            self._mirror((period, *key), spent, reserved)
        return book

    async def refresh(self) -> None:
        """Re-read the current month's rows (what the other replicas spent and reserved)."""
        period = self.current_period()
        if period not in self._books:
            await self.book(period)
            return
        for key, (spent, reserved) in (await self._rows(period)).items():
            self._mirror((period, *key), spent, reserved)

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
        pending_reservation.set(None)
        book = await self.book()
        wanted = tuple(dict.fromkeys(scopes))
        await self._ensure(book.period, [k for k in wanted if k in self.limits])
        rid = secrets.token_hex(12)
        fut: asyncio.Future[Reservation] = asyncio.get_running_loop().create_future()
        decide = partial(self._decide, book.period, amount, force, clamp, rid)
        self.ledger.writer.put(ReserveOp(book.period, wanted, rid, decide, fut))
        try:
            reservation = await asyncio.wait_for(fut, self.ledger.op_timeout_s)
        except BudgetExceeded:
            raise
        except Exception:
            raise ServiceUnavailable(
                "costwall cannot reach its budget database, so this request was not "
                "forwarded. Try again shortly.", code="budget_store_unavailable") from None
        if reservation.scopes:
            pending_reservation.set(rid)  # PostgresLedger.begin links the pending row to it
        return reservation

    def _decide(self, period: str, amount: int, force: bool, clamp: ClampRequest | None,
                rid: str, rows: dict[ScopeKey, ScopeState]) -> SharedReservation:
        """Run in the writer's transaction against the locked rows of the request's scopes."""
        limited: dict[ScopeKey, ScopeState] = {}
        for key, state in rows.items():
            limit = self.limits.get(key)
            if limit is not None:
                state.limit = limit
                limited[key] = state
        taken = self.admit(PeriodBook(period, limited), rows, amount, force=force, clamp=clamp)
        # Rows this replica has no limit for (yet) still count the request.
        tracked = tuple(k for k in rows if k not in limited)
        for key in tracked:
            rows[key].reserved += taken.amount
        return SharedReservation(period, taken.scopes + tracked, taken.amount, taken.forced,
                                 taken.clamped_tokens, rid=rid)

    def settle(self, reservation: Reservation, actual: int) -> list[Crossing]:
        """Queue the settlement; crossings are reported once committed (``on_crossings``)."""
        if reservation.settled:
            return []
        reservation.settled = True
        if not isinstance(reservation, SharedReservation) or not reservation.scopes:
            return []
        book = self._books.get(reservation.period)
        for scope in reservation.scopes:
            delta = self._unflushed.setdefault((reservation.period, *scope), [0, 0])
            delta[0] += actual
            delta[1] -= reservation.amount
            state = book.states.get(scope) if book else None
            if state is not None:
                state.reserved -= reservation.amount
                state.spent += actual
        self.ledger.writer.put(ReleaseOp(reservation.rid, reservation.period,
                                         reservation.scopes, reservation.amount, actual))
        return []

    # -- what the writer reports (gateway.pg_writer.UsageHook) -------------------------------
    def crossings(self, before: Mapping[UsageKey, int],
                  rows: Mapping[UsageKey, ScopeState]) -> list[Crossing]:
        found = []
        for key, state in rows.items():
            limit = self.limits.get((key[1], key[2]))
            if limit is None:
                continue
            for threshold in self.warn_at:
                if before[key] < threshold * limit <= state.spent:
                    found.append(Crossing(key[1], key[2], key[0], threshold, limit,
                                          state.spent))
        return found

    def committed(self, rows: Mapping[UsageKey, ScopeState], released: Sequence[ReleaseOp],
                  crossings: list[Crossing]) -> None:
        self._commits += 1
        for op in released:
            if not op.tracked:
                continue
            for scope in op.scopes:
                key = (op.period, *scope)
                delta = self._unflushed.get(key)
                if delta is not None:
                    delta[0] -= op.cost
                    delta[1] += op.amount
                    if delta == [0, 0]:
                        del self._unflushed[key]
        for key, state in rows.items():
            self._mirror(key, state.spent, state.reserved)
        if crossings and self.on_crossings is not None:
            self.on_crossings(crossings)

    # -- changes -----------------------------------------------------------------------------
    async def set_limit(self, key: ScopeKey, limit: int | None) -> None:
        """Add, change or remove a limit; the budget row keeps counting either way."""
        if limit is None:
            self.limits.pop(key, None)
            for book in self._books.values():
                book.states.pop(key, None)
            return
        self.limits[key] = limit
        for book in list(self._books.values()):
            await self._ensure(book.period, [key])
            state = book.states.get(key)
            if state is None:
                book.states[key] = ScopeState(limit)
                rows = await self._rows(book.period)
                self._mirror((book.period, *key), *rows.get(key, (0, 0)))
            else:
                state.limit = limit
