"""Rate limits shared by every replica on one PostgreSQL database, exactly.

Its own connection and its own writer task (a ``GroupCommit``, the shape of the ledger's
writer, but separate: rate limits never wait behind ledger writes, and the budget code is not
touched). Every admission and settlement waiting when a batch starts shares one transaction:

1. lock (creating if needed) the rows of every window the batch touches, in one global order
   (``rate_windows``: one row per scope, id and kind, holding ``gateway.ratelimit.Window``'s
   newest second and its 61 one-second buckets);
2. apply the settlements (token bounds corrected to usage, requests never forwarded taken
   back, concurrency slots freed), so what they free is free for this batch;
3. decide the admissions in order with the same pure functions as the in-memory limiter,
   against the counts *as committed by all replicas*;
4. write the rows back and commit; only then are the callers answered.

So the sliding-window bound holds across replicas exactly (no overshoot beyond clock skew
between replicas: each request is counted at its own replica's time, and a window never
moves back). Concurrency: ``rate_inflight`` holds each replica's requests in flight per scope
(only its own writer writes its rows, so it writes absolute numbers); an admission adds the
others' rows to its own count under the lock of the scope's ``concurrent`` row. Rows of a
replica that stopped heartbeating (``replicas``, kept by the ledger) for
``ledger.reclaim_after_s`` are deleted, so a ``kill -9`` frees its slots.

The two tables are UNLOGGED and created here, idempotently under an advisory lock, not by
the ledger's migrations: rate counts are worth a minute, a database crash that empties them
re-allows at most one minute's limit, and the ledger's schema is left alone.

When the store cannot answer within ``op_timeout_s`` (down, unreachable, locked), the
limiter is marked down: ``on_store_error: closed`` refuses with 503 (``RatesUnavailable``),
``open`` limits on this replica alone (``LocalRates``) until a probe gets through again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg

from gateway.errors import RatesUnavailable
from gateway.ratelimit import (
    RateKey,
    RateTicket,
    Refusal,
    ScopeId,
    Slot,
    Window,
    Windowed,
    bound_tokens,
    correction,
    refuse,
    take,
    tightest,
)
from gateway.store.group_commit import GroupCommit, resolve
from gateway.store.pg_rates_sql import (
    LOCK,
    OTHERS,
    SCHEMA,
    SCHEMA_LOCK,
    SWEEP_DEAD,
    SWEEP_IDLE,
    WRITE_MINE,
    WRITE_WINDOWS,
)

if TYPE_CHECKING:
    from gateway.call import Call
    from gateway.rates import LocalRates

log = logging.getLogger("costwall.rates")

# Lost connection, a statement cut by statement_timeout, a refused connect: the store is away.
_AWAY = (OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
         asyncpg.exceptions.QueryCanceledError, asyncpg.exceptions.AdminShutdownError,
         asyncpg.exceptions.CannotConnectNowError, asyncpg.exceptions.DeadlockDetectedError)


class StoreAway(Exception):
    """The shared store did not decide (the caller falls back per ``on_store_error``)."""


@dataclass(eq=False, slots=True)
class AdmitOp:
    now: float
    windows: list[Windowed]
    slots: list[Slot]
    tokens: int  # the request's bound (what it counts in a tpm window)
    future: asyncio.Future[RateTicket | Refusal]


@dataclass(eq=False, slots=True)
class SettleOp:
    corrections: list[tuple[RateKey, int, int]]  # (key, delta, bucket)
    held: list[ScopeId]


@dataclass(eq=False, slots=True)
class ProbeOp:
    """Is the store back? (sent while it is marked down)"""


@dataclass(eq=False, slots=True)
class SweepOp:
    """Housekeeping: slots of dead replicas, windows idle for two minutes."""

    now: float


Op = AdmitOp | SettleOp | ProbeOp | SweepOp


class SharedRates:
    """``gateway.rates.Rates`` with the windows and slots in PostgreSQL."""

    def __init__(self, url: str, replica: str | None, local: LocalRates, *, fail_open: bool,
                 reclaim_after_s: float = 10.0, op_timeout_s: float = 2.0,
                 max_batch: int = 512):
        from gateway.store.postgres import replica_id

        self.url = url
        self.replica = replica or replica_id()
        self.local = local  # the fallback while the store is away (open), never otherwise
        self.plan, self.metrics, self.clock = local.plan, local.metrics, local.clock
        self.fail_open = fail_open
        self.reclaim_after_s = reclaim_after_s
        self.op_timeout_s = op_timeout_s
        self.up = True
        self.writes: GroupCommit[Op] = GroupCommit(self._process, max_batch,
                                                   "costwall-pg-rates")
        self._conn: asyncpg.Connection | None = None
        self._mine: dict[ScopeId, int] = {}  # this replica's requests in flight, as committed
        self._resync = False  # after an outage, write every row of ``_mine`` again
        self._closing = False
        self._housekeeping: asyncio.Task[None] | None = None

    # -- lifetime ----------------------------------------------------------------------------
    async def _connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(
            self.url, timeout=self.op_timeout_s,
            server_settings={"application_name": "costwall-rates",
                             "statement_timeout": str(int(self.op_timeout_s * 1000))})

    async def start(self) -> None:
        self._conn = await self._connect()
        async with self._conn.transaction():
            await self._conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
            await self._conn.execute(SCHEMA)
        self.writes.start()
        self._housekeeping = asyncio.create_task(self._housekeep(),
                                                 name="costwall-pg-rates-housekeeping")

    async def close(self) -> None:
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
            self._housekeeping = None
        self._closing = True  # a store that is away now is given up on after one more try
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.writes.flush(), self.op_timeout_s)
        await self.writes.close()
        if self._conn is not None:
            with contextlib.suppress(Exception):  # gone: our slots are freed at once
                await self._conn.execute("DELETE FROM rate_inflight WHERE replica = $1",
                                         self.replica)
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None

    async def _housekeep(self) -> None:
        every = max(self.reclaim_after_s / 4, 0.25)
        loop = asyncio.get_running_loop()
        next_sweep = loop.time() + every
        while True:
            await asyncio.sleep(min(every, 0.5))
            if not self.up and self.writes.empty():
                self.writes.put(ProbeOp())
            elif self.up and loop.time() >= next_sweep:
                next_sweep = loop.time() + every
                self.writes.put(SweepOp(self.clock().timestamp()))

    # -- the request path --------------------------------------------------------------------
    async def admit(self, call: Call) -> None:
        windows, slots = self.plan.needs(call.key.tenant, call.agent, call.key.name,
                                         call.user)
        if not windows and not slots:
            return
        if not self.up:
            call.rate = self._without_store(call)
            return
        fut: asyncio.Future[RateTicket | Refusal] = asyncio.get_running_loop().create_future()
        self.writes.put(AdmitOp(self.clock().timestamp(), windows, slots,
                                bound_tokens(call.estimate), fut))
        try:
            result = await asyncio.wait_for(fut, self.op_timeout_s)
        except (TimeoutError, StoreAway) as exc:
            self._down(exc)
            call.rate = self._without_store(call)
            return
        if isinstance(result, Refusal):
            raise self.local.refused(call, result)
        call.rate = result

    def _without_store(self, call: Call) -> RateTicket | None:
        """``on_store_error``: open limits on this replica alone, closed refuses (503)."""
        if self.fail_open:
            return self.local.admit_now(call)
        self.metrics.child(self.metrics.requests, "unavailable", call.price.name).inc()
        raise RatesUnavailable(
            "costwall cannot reach its shared rate-limit store, so this request was not "
            "forwarded (rate_limits.on_store_error: closed). Try again shortly.")

    def settle(self, ticket: RateTicket, sent: bool, tokens: int | None) -> None:
        """Queue the corrections and freed slots (committed with the next batch)."""
        corrections = []
        for key, amount, bucket in ticket.counted:
            delta = correction(key[2], amount, sent, tokens)
            if delta:
                corrections.append((key, delta, bucket))
        if corrections or ticket.held:
            self.writes.put(SettleOp(corrections, ticket.held))

    # -- up and down -------------------------------------------------------------------------
    def _down(self, exc: BaseException) -> None:
        self._resync = True
        if self.up:
            self.up = False
            log.warning("rate limits: the shared store is unreachable (%s); %s",
                        type(exc).__name__,
                        "limiting on this replica alone (on_store_error: open)"
                        if self.fail_open else
                        "refusing requests with 503 (on_store_error: closed)")

    def _back(self) -> None:
        if not self.up:
            self.up = True
            log.warning("rate limits: the shared store is back; limits are shared again")

    # -- the writer --------------------------------------------------------------------------
    async def _process(self, batch: list[Op]) -> None:
        """Commit a batch; while the store is away, fail admissions at once (their callers
        fall back) and keep retrying settlements, which must not be lost."""
        delay, failures = 0.05, 0
        while True:
            batch = [op for op in batch if not (isinstance(op, AdmitOp) and op.future.done())]
            if not batch:
                return
            try:
                results = await self._attempt(batch)
            except Exception as exc:
                away = isinstance(exc, _AWAY) or self._conn is None or self._conn.is_closed()
                failures += 1
                if away:
                    self._down(exc)
                else:
                    log.error("rate limits: batch failed: %s: %s", type(exc).__name__, exc)
                for op in batch:
                    if isinstance(op, AdmitOp):
                        resolve(op.future, StoreAway(str(exc)))
                batch = [op for op in batch if isinstance(op, SettleOp)]
                if not batch or self._closing or (not away and failures >= 5):
                    if batch:
                        log.error("rate limits: %d settlements dropped", len(batch))
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            self._back()
            self._deliver(batch, results)
            return

    async def _reconnect(self) -> None:
        if self._conn is not None and not self._conn.is_closed():
            return
        with contextlib.suppress(Exception):
            self._conn = await self._connect()

    def _deliver(self, batch: list[Op], results: list[RateTicket | Refusal]) -> None:
        admits = (op for op in batch if isinstance(op, AdmitOp))
        for op, result in zip(admits, results, strict=True):
            if op.future.done():  # the caller gave up (and fell back): give it all back
                if isinstance(result, RateTicket):
                    self.settle(result, False, None)
            else:
                resolve(op.future, None, result)

    async def _attempt(self, batch: list[Op]) -> list[RateTicket | Refusal]:
        await self._reconnect()  # after an outage, the probe's batch opens a new connection
        conn = self._conn
        if conn is None or conn.is_closed():
            raise asyncpg.InterfaceError("rate store connection is closed")
        admits = [op for op in batch if isinstance(op, AdmitOp)]
        settles = [op for op in batch if isinstance(op, SettleOp)]
        keys: set[RateKey] = {key for op in admits for key, _ in op.windows}
        keys.update(key for op in settles for key, _, _ in op.corrections)
        guarded = {slot[0] for op in admits for slot in op.slots}
        keys.update((scope, ident, "concurrent") for scope, ident in guarded)
        mine = dict(self._mine)
        changed: set[ScopeId] = set(mine) if self._resync else set()
        if not keys and not settles:
            await conn.fetchval("SELECT count(*) FROM (SELECT 1 FROM rate_windows LIMIT 1) t")
            await self._sweep(conn, batch)
            return []
        results: list[RateTicket | Refusal] = []
        async with conn.transaction():
            windows: dict[RateKey, Window] = {}
            if keys:
                order = sorted(keys)
                rows = await conn.fetch(LOCK, [k[0] for k in order], [k[1] for k in order],
                                        [k[2] for k in order])
                windows = {(r[0], r[1], r[2]): Window(r[3], r[4]) for r in rows}
            for settle in settles:  # first: what they free is free for this batch
                for key, delta, bucket in settle.corrections:
                    window = windows.get(key)
                    if window is not None:
                        window.correct(bucket, delta)
                for scope in settle.held:
                    mine[scope] = max(mine.get(scope, 0) - 1, 0)
                    changed.add(scope)
            others: dict[ScopeId, int] = {}
            if guarded:
                scopes = sorted(guarded)
                others = {(r[0], r[1]): int(r[2]) for r in await conn.fetch(
                    OTHERS, self.replica, [s[0] for s in scopes], [s[1] for s in scopes])}
            for op in admits:
                state = [(key, limit, windows[key]) for key, limit in op.windows]
                held = [(slot, others.get(slot[0], 0) + mine.get(slot[0], 0))
                        for slot in op.slots]
                refusal = refuse(op.now, state, held, op.tokens)
                if refusal is not None:
                    results.append(refusal)
                    continue
                for scope, _ in op.slots:
                    mine[scope] = mine.get(scope, 0) + 1
                    changed.add(scope)
                results.append(RateTicket(self, take(op.now, state, op.tokens),
                                          [scope for scope, _ in op.slots],
                                          tightest(op.now, state)))
            await self._write(conn, windows, mine, changed)
        self._mine = {k: v for k, v in mine.items() if v}
        self._resync = False
        await self._sweep(conn, batch)
        return results

    async def _write(self, conn: asyncpg.Connection, windows: dict[RateKey, Window],
                     mine: dict[ScopeId, int], changed: set[ScopeId]) -> None:
        rows = [(k, w) for k, w in windows.items() if k[2] != "concurrent"]
        if rows:
            await conn.execute(
                WRITE_WINDOWS, [k[0] for k, _ in rows], [k[1] for k, _ in rows],
                [k[2] for k, _ in rows], [w.head for _, w in rows],
                ["{" + ",".join(map(str, w.counts)) + "}" for _, w in rows])
        if changed:
            scopes = sorted(changed)
            await conn.execute(WRITE_MINE, self.replica, [s[0] for s in scopes],
                               [s[1] for s in scopes], [mine.get(s, 0) for s in scopes])

    async def _sweep(self, conn: asyncpg.Connection, batch: list[Op]) -> None:
        """Housekeeping after the batch's own transaction (never holding its locks)."""
        sweep = next((op for op in batch if isinstance(op, SweepOp)), None)
        if sweep is None:
            return
        try:
            await conn.execute(SWEEP_DEAD, self.replica, self.reclaim_after_s)
            await conn.execute(SWEEP_IDLE, int(sweep.now) - 2 * 61)
        except Exception as exc:  # another replica's batch may hold the rows: next time
            log.info("rate limits: housekeeping skipped (%s)", type(exc).__name__)
        self.local.sweep(sweep.now)
