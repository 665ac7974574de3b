"""The PostgreSQL writer: one connection, one task, every request-path write grouped.

Same shape as the SQLite writer (datasette's ``execute_write_fn``): reservations, pending
ledger rows, settlements and final ledger rows are queued, and everything waiting when a
batch starts shares one transaction and one commit. That matters most for the rows every
request touches (the global budget): a batch locks each budget row once, decides all of its
reservations against the locked values in order, and writes each row once, so the hot row is
held for one short transaction per batch instead of one per request.

Locks are always taken in one order (``ORDER BY period, scope, id`` in ``lock_usage``) by
every transaction that touches budget rows, here and in crash reclaim, so two replicas never
deadlock on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import asyncpg
import orjson

from gateway.budget import Crossing, Reservation, ScopeState
from gateway.errors import BudgetExceeded
from gateway.ledger import COLUMNS, LedgerEntry
from gateway.store.group_commit import GroupCommit, resolve

log = logging.getLogger("costwall.ledger")

UsageKey = tuple[str, str, str]  # (period, scope, id)

_TYPES = {
    "id": "text", "ts": "timestamptz", "period": "text", "tenant": "text", "key_name": "text",
    "agent": "text", "campaign": "text", "task": "text", "model": "text", "endpoint": "text",
    "stream": "bool", "state": "text", "status": "int4", "prompt_tokens": "int8",
    "cached_tokens": "int8", "completion_tokens": "int8", "reasoning_tokens": "int8",
    "reserved": "int8", "cost": "int8", "usage_source": "text", "override": "bool",
    "override_reason": "text", "latency_ms": "int4", "replica": "text", "overshoot": "int8",
    "end_user": "text", "provider": "text",
}
assert tuple(_TYPES) == COLUMNS


def _insert_requests(first: int, final: bool) -> str:
    """INSERT of column arrays (parameters from ``$first``): pending rows or final rows."""
    sql = (f"INSERT INTO requests ({', '.join(COLUMNS)}) SELECT * FROM unnest("
           + ", ".join(f"${i}::{t}[]" for i, t in enumerate(_TYPES.values(), start=first))
           + ")")
    if not final:
        return sql + " ON CONFLICT (id) DO NOTHING"  # a retried begin keeps the first row
    return sql + " ON CONFLICT (id) DO UPDATE SET " + ", ".join(
        f"{c} = excluded.{c}" for c in COLUMNS if c != "id")


def entry_columns(entries: Sequence[LedgerEntry]) -> list[list[Any]]:
    """Column arrays for ``unnest``: one round trip writes any number of rows."""
    return [[getattr(e, c) for e in entries] for c in COLUMNS]


class Writes:
    """Many INSERT/UPDATEs as one statement (data-modifying CTEs): atomic, one round trip.

    A batch of only ledger rows then needs no BEGIN/COMMIT round trips at all (the common
    case for ``begin`` under light load), and a reservation batch writes everything after
    its decisions in one go.
    """

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.args: list[Any] = []

    def add(self, name: str, sql: Callable[[int], str], *args: Any) -> None:
        """``sql(n)`` is the statement with its parameters numbered from ``$n``."""
        self.parts.append(f"{name} AS ({sql(len(self.args) + 1)})")
        self.args.extend(args)

    async def run(self, conn: asyncpg.Connection) -> None:
        if self.parts:
            await conn.execute("WITH " + ", ".join(self.parts) + " SELECT 1", *self.args)

    def reservations(self, granted: Sequence[tuple[ReserveOp, Reservation]],
                     replica: str) -> None:
        if granted:
            self.add("res", lambda n: (
                "INSERT INTO reservations (id, replica, period, scopes, amount) "
                f"SELECT i, ${n + 1}, p, s, a FROM unnest(${n}::text[], ${n + 2}::text[], "
                f"${n + 3}::jsonb[], ${n + 4}::int8[]) AS v(i, p, s, a)"),
                [op.rid for op, _ in granted], replica, [op.period for op, _ in granted],
                [orjson.dumps(r.slots).decode() for _, r in granted],
                [r.amount for _, r in granted])

    def usage(self, rows: Mapping[UsageKey, ScopeState],
              before: Mapping[UsageKey, tuple[int, int]]) -> None:
        changed = [k for k, s in rows.items() if (s.spent, s.reserved) != before[k]]
        if changed:
            self.add("usage", lambda n: (
                "UPDATE budget_usage u SET spent = v.spent, reserved = v.reserved, "
                f"updated_at = now() FROM unnest(${n}::text[], ${n + 1}::text[], "
                f"${n + 2}::text[], ${n + 3}::numeric[], ${n + 4}::numeric[]) "
                "AS v(period, scope, id, spent, reserved) "
                "WHERE (u.period, u.scope, u.id) = (v.period, v.scope, v.id)"),
                [k[0] for k in changed], [k[1] for k in changed], [k[2] for k in changed],
                [rows[k].spent for k in changed], [rows[k].reserved for k in changed])

    def ledger(self, begins: Sequence[BeginOp], finals: Sequence[LedgerEntry]) -> None:
        """Pending rows, their links to their reservations, final rows."""
        if begins:
            self.add("pending", lambda n: _insert_requests(n, final=False),
                     *entry_columns([op.entry for op in begins]))
            linked = [op for op in begins if op.rid]
            if linked:
                self.add("link", lambda n: (
                    f"UPDATE reservations SET request_id = v.q FROM unnest(${n}::text[], "
                    f"${n + 1}::text[]) AS v(r, q) WHERE reservations.id = v.r"),
                    [op.rid for op in linked], [op.entry.id for op in linked])
        if finals:
            self.add("final", lambda n: _insert_requests(n, final=True),
                     *entry_columns(finals))


# -- operations -------------------------------------------------------------------------------
@dataclass(eq=False, slots=True)
class ReserveOp:
    """Take a reservation: ``decide`` runs against the locked budget rows of ``slots``."""

    period: str  # the calendar month (the reservation row's)
    slots: tuple[UsageKey, ...]  # every window of every scope of the request; existing rows
    rid: str
    decide: Callable[[dict[UsageKey, ScopeState]], Reservation]
    future: asyncio.Future[Reservation]


@dataclass(eq=False, slots=True)
class ReleaseOp:
    """Settle a reservation: ``reserved -= amount, spent += cost`` on the rows it holds."""

    rid: str
    slots: tuple[UsageKey, ...]
    amount: int
    cost: int
    tracked: bool = True  # the engine counted it in its mirror and waits for it


@dataclass(eq=False, slots=True)
class BeginOp:
    """Durably write a pending ledger row (and link it to its reservation)."""

    entry: LedgerEntry
    rid: str | None
    future: asyncio.Future[None]


@dataclass(eq=False, slots=True)
class UpsertOp:
    """Write the final version of a ledger row."""

    entry: LedgerEntry


Op = ReserveOp | ReleaseOp | BeginOp | UpsertOp


class UsageHook(Protocol):
    """What the shared budget engine learns from each committed transaction."""

    def crossings(self, before: Mapping[UsageKey, int],
                  rows: Mapping[UsageKey, ScopeState]) -> list[Crossing]:
        """Warn thresholds passed between ``before`` (spent) and ``rows`` (now)."""

    def committed(self, rows: Mapping[UsageKey, ScopeState], released: Sequence[ReleaseOp],
                  crossings: list[Crossing]) -> None:
        """Rows as committed, releases done, crossings this replica won the right to report."""


# -- budget rows ------------------------------------------------------------------------------
async def lock_usage(conn: asyncpg.Connection,
                     keys: Iterable[UsageKey]) -> dict[UsageKey, ScopeState]:
    """Lock the existing budget rows among ``keys``, in the one global order."""
    wanted = sorted(set(keys))
    if not wanted:
        return {}
    rows = await conn.fetch(
        "SELECT u.period, u.scope, u.id, u.spent, u.reserved FROM budget_usage u "
        "JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(period, scope, id) "
        "ON (u.period, u.scope, u.id) = (k.period, k.scope, k.id) "
        "ORDER BY u.period, u.scope, u.id FOR UPDATE OF u",
        [k[0] for k in wanted], [k[1] for k in wanted], [k[2] for k in wanted])
    return {(r[0], r[1], r[2]): ScopeState(0, int(r[3]), int(r[4])) for r in rows}


async def write_usage(conn: asyncpg.Connection, rows: Mapping[UsageKey, ScopeState],
                      before: Mapping[UsageKey, tuple[int, int]]) -> None:
    """Write back the locked rows that changed."""
    writes = Writes()
    writes.usage(rows, before)
    await writes.run(conn)


async def claim_crossings(conn: asyncpg.Connection, crossings: list[Crossing],
                          replica: str) -> list[Crossing]:
    """The crossings no replica has recorded yet (each is reported exactly once)."""
    if not crossings:
        return []
    won = await conn.fetch(
        "INSERT INTO budget_crossings (period, scope, id, threshold, replica) "
        "SELECT *, $5 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) "
        "ON CONFLICT DO NOTHING RETURNING period, scope, id, threshold",
        [c.period for c in crossings], [c.scope for c in crossings],
        [c.id for c in crossings], [str(c.threshold) for c in crossings], replica)
    keys = {(r[0], r[1], r[2], r[3]) for r in won}
    return [c for c in crossings if (c.period, c.scope, c.id, str(c.threshold)) in keys]


def apply_release(rows: Mapping[UsageKey, ScopeState], slots: Iterable[UsageKey],
                  amount: int, cost: int) -> None:
    for slot in slots:
        state = rows.get(slot)
        if state is not None:
            state.reserved -= amount
            state.spent += cost


# -- the writer -------------------------------------------------------------------------------
_CONNECTION_ERRORS = (OSError, asyncpg.PostgresConnectionError,
                      asyncpg.exceptions.AdminShutdownError,
                      asyncpg.exceptions.CannotConnectNowError)
_CONFLICTS = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)


@dataclass(slots=True)
class _Outcome:
    reserves: list[ReserveOp]
    results: list[Reservation | BudgetExceeded]
    begins: list[BeginOp]
    releases: list[ReleaseOp]
    rows: dict[UsageKey, ScopeState]
    crossings: list[Crossing] = field(default_factory=list)


class PgWriter:
    """Owns one connection and commits queued request-path writes in batches."""

    def __init__(self, connect: Callable[[], Awaitable[asyncpg.Connection]], replica: str,
                 hook: UsageHook | None = None, max_batch: int = 512):
        self._connect = connect
        self.replica = replica
        self.max_batch = max_batch
        self.hook = hook
        self._conn: asyncpg.Connection | None = None
        self.writes: GroupCommit[Op] = GroupCommit(self._process, max_batch,
                                                   "costwall-pg-writer")
        self.put = self.writes.put
        self.flush = self.writes.flush  # wait until every queued write is committed

    async def start(self) -> None:
        self._conn = await self._connect()
        self.writes.start()

    async def close(self) -> None:
        await self.writes.close()
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def _process(self, batch: list[Op]) -> None:
        """Commit a batch; retry while the database is away; isolate a bad operation."""
        delay, attempts = 0.05, 0
        while True:
            batch = [op for op in batch if not _abandoned(op)]
            if not batch:
                return
            try:
                outcome = await self._attempt(batch)
            except Exception as exc:
                lost = (self._conn is None or self._conn.is_closed()
                        or isinstance(exc, _CONNECTION_ERRORS))
                attempts += 1
                # While the database is away, keep the writes (a settlement must not be lost
                # while this process lives); a deadlock or serialization failure is retried a
                # few times; anything else is a bad operation, isolated below.
                if lost or (isinstance(exc, _CONFLICTS) and attempts <= 5):
                    log.warning("ledger writer: %s; retrying", type(exc).__name__)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    await self._reconnect()
                    continue
                if len(batch) == 1:
                    self._fail(batch[0], exc)
                    return
                for op in batch:
                    await self._process([op])
                return
            self._deliver(outcome)
            return

    async def _reconnect(self) -> None:
        if self._conn is not None and not self._conn.is_closed():
            return
        with contextlib.suppress(Exception):
            self._conn = await self._connect()

    def _fail(self, op: Op, exc: BaseException) -> None:
        log.error("ledger write failed (%s): %s", type(op).__name__, exc)
        if isinstance(op, ReserveOp | BeginOp):
            resolve(op.future, exc)
        elif isinstance(op, ReleaseOp) and op.tracked and self.hook is not None:
            self.hook.committed({}, [op], [])

    async def _attempt(self, batch: list[Op]) -> _Outcome:
        conn = self._conn
        if conn is None or conn.is_closed():
            raise asyncpg.InterfaceError("writer connection is closed")
        reserves = [op for op in batch if isinstance(op, ReserveOp)]
        releases = [op for op in batch if isinstance(op, ReleaseOp)]
        begins = [op for op in batch if isinstance(op, BeginOp)]
        finals = {op.entry.id: op.entry for op in batch if isinstance(op, UpsertOp)}
        keys = {s for op in reserves + releases for s in op.slots}
        writes = Writes()
        if not keys:  # only ledger rows: one self-committing statement
            writes.ledger(begins, list(finals.values()))
            await writes.run(conn)
            return _Outcome(reserves, [self._decide(op, {}) for op in reserves], begins,
                            releases, {})
        async with conn.transaction():
            rows = await lock_usage(conn, keys)
            before = {k: (s.spent, s.reserved) for k, s in rows.items()}
            if releases:
                gone = {r[0] for r in await conn.fetch(
                    "DELETE FROM reservations WHERE id = ANY($1::text[]) RETURNING id",
                    [op.rid for op in releases])}
                for op in releases:
                    if op.rid in gone:  # else a reclaim already charged it
                        apply_release(rows, op.slots, op.amount, op.cost)
            results = [self._decide(op, rows) for op in reserves]
            writes.reservations([(op, r) for op, r in zip(reserves, results, strict=True)
                                 if isinstance(r, Reservation) and r.slots], self.replica)
            writes.usage(rows, before)
            writes.ledger(begins, list(finals.values()))
            await writes.run(conn)
            crossings: list[Crossing] = []
            if self.hook is not None and rows:
                spent_before = {k: v[0] for k, v in before.items()}
                crossings = await claim_crossings(
                    conn, self.hook.crossings(spent_before, rows), self.replica)
        return _Outcome(reserves, results, begins, releases, rows, crossings)

    @staticmethod
    def _decide(op: ReserveOp, rows: dict[UsageKey, ScopeState]
                ) -> Reservation | BudgetExceeded:
        view = {s: rows[s] for s in op.slots if s in rows}
        try:
            return op.decide(view)
        except BudgetExceeded as exc:
            return exc

    def _deliver(self, outcome: _Outcome) -> None:
        for op, result in zip(outcome.reserves, outcome.results, strict=True):
            if op.future.done():  # the caller gave up after all: give the budget back
                if isinstance(result, Reservation) and result.slots:
                    self.put(ReleaseOp(op.rid, result.slots, result.amount, 0,
                                       tracked=False))
            elif isinstance(result, BudgetExceeded):
                resolve(op.future, result)
            else:
                resolve(op.future, None, result)
        for begin in outcome.begins:
            if begin.future.done():  # never forwarded: close the row at no cost
                self.put(UpsertOp(replace(begin.entry, state="settled", cost=0,
                                          usage_source="none")))
            else:
                resolve(begin.future, None)
        if self.hook is not None:
            self.hook.committed(outcome.rows, outcome.releases, outcome.crossings)


def _abandoned(op: Op) -> bool:
    """A reservation or pending row whose caller stopped waiting before it was written."""
    return isinstance(op, ReserveOp | BeginOp) and op.future.done()
