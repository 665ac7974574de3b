"""PostgreSQL ledger: one database shared by every gateway replica.

The ``Ledger`` contract of ``gateway.store.interfaces`` on asyncpg: a connection pool
(``ledger.pool_size``) for reads and admin writes, and one writer connection that
group-commits the request path (``gateway.store.pg_writer``). Admin writes also ``NOTIFY
costwall_changes`` so other replicas reload them at once (``gateway.store.pg_sync``).
Reports and the audit queue are in ``pg_reports`` and ``pg_audit``.

Each process is a *replica* with a unique id stored on its rows. It heartbeats in
``replicas``; a replica not seen for ``reclaim_after_s`` (killed with ``kill -9``, lost its
host) is reclaimed by any other: its open reservations are charged at their reserved upper
bound if the request had been forwarded (released if not), and its pending ledger rows are
settled at that bound. So nothing that reached the upstream is under-counted and no budget
stays reserved forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from gateway.audit import AuditRow
from gateway.budget import Reservation, ScopeKey
from gateway.budget_rules import in_scope_sql
from gateway.ledger import (
    KeyRecord,
    LedgerEntry,
    fold_caps,
)
from gateway.store.outbox_sql import PgOutbox
from gateway.store.pg_audit import _INSERT_AUDIT, PgAuditQueue
from gateway.store.pg_reports import _COST, PgReports, _int
from gateway.store.pg_schema import migrate
from gateway.store.pg_writer import (
    BeginOp,
    PgWriter,
    UpsertOp,
    UsageHook,
    UsageKey,
    apply_release,
    claim_crossings,
    lock_usage,
    write_usage,
)
from gateway.windows import Span

log = logging.getLogger("costwall.ledger")

CHANNEL = "costwall_changes"
RECLAIM_LOCK = 0x636F7374  # advisory lock namespace for reclaiming one replica
# Which ledger rows belong to a scope, for the first spend of a new budget row.
_IN_SCOPE = in_scope_sql("r", "k")  # generated from the one definition (gateway.budget_rules)


def reservation_slots(month: str, stored: str) -> list[UsageKey]:
    """A reservation row's slots: ``[period, scope, id]`` triples, or the ``[scope, id]``
    pairs of the month that versions before budget windows stored."""
    return [(month, s[0], s[1]) if len(s) == 2 else (s[0], s[1], s[2])
            for s in orjson.loads(stored)]


def replica_id() -> str:
    """host-pid-random: unique per process, readable in the database."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{secrets.token_hex(3)}"


class PostgresLedger(PgReports, PgAuditQueue, PgOutbox):
    """The shared ledger; see ``gateway.store.interfaces`` for the contract."""

    def __init__(self, url: str, pool_size: int = 10, replica: str | None = None,
                 reclaim_after_s: float = 10.0, heartbeat_s: float = 1.0,
                 op_timeout_s: float = 5.0, hook: UsageHook | None = None):
        self.url = url
        self.pool_size = pool_size
        self.replica = replica or replica_id()
        self.reclaim_after_s = reclaim_after_s
        self.heartbeat_s = heartbeat_s
        self.op_timeout_s = op_timeout_s
        # ``hook``: the shared budgets' mirror, told about every committed budget change.
        self.writer = PgWriter(self._connect, self.replica, hook)
        self._pool: asyncpg.Pool | None = None
        self._housekeeping: asyncio.Task[None] | None = None
        # Request-path audit events waiting for their INSERT (a task drains them in batches).
        self._audit_rows: list[AuditRow] = []
        self._audit_wake = asyncio.Event()
        self._audit_inserting = asyncio.Lock()  # a batch is in the table or the list, never both
        self._audit_task: asyncio.Task[None] | None = None
        self._audit_conn: asyncpg.Connection | None = None  # holds AUDIT_LOCK when writing
        self._audit_locked = False

    async def _connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.url)

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("the ledger is not started")
        return self._pool

    async def start(self) -> None:
        self._pool = await asyncpg.create_pool(self.url, min_size=1, max_size=self.pool_size)
        async with self.pool.acquire() as conn:
            if await migrate(conn):
                log.info("database schema migrated")
        await self.heartbeat()
        await self.writer.start()
        self._housekeeping = asyncio.create_task(self._housekeep(),
                                                 name="costwall-pg-housekeeping")
        self._audit_task = asyncio.create_task(self._audit_drain(), name="costwall-pg-audit")

    async def close(self) -> None:
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
            self._housekeeping = None
        try:
            await asyncio.wait_for(self.flush(), self.op_timeout_s)
        except TimeoutError:
            log.error("ledger: database unreachable at shutdown; other replicas will reclaim "
                      "this one's open requests at their reserved cost")
        if self._audit_rows:
            log.error("ledger: %d audit events could not be stored before shutdown",
                      len(self._audit_rows))
        if self._audit_task is not None:
            self._audit_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._audit_task
            self._audit_task = None
        if self._audit_conn is not None:
            with contextlib.suppress(Exception):
                await self._audit_conn.close()
            self._audit_conn = None
        await self.writer.close()
        if self._pool is not None:
            # Gone for good: whatever is still open is reclaimed by the others after the window.
            with contextlib.suppress(Exception):
                await self._pool.execute("DELETE FROM replicas WHERE id = $1", self.replica)
            await self._pool.close()
            self._pool = None

    async def ping(self) -> bool:
        try:
            await asyncio.wait_for(self.pool.fetchval("SELECT 1"), 5)
        except Exception:
            return False
        return True

    # -- the request path --------------------------------------------------------------------
    async def _wait(self, fut: asyncio.Future[Any]) -> Any:
        return await asyncio.wait_for(fut, self.op_timeout_s)

    async def begin(self, entry: LedgerEntry, reservation: Reservation | None = None) -> None:
        entry.replica = self.replica
        # The pending row is linked to the reservation the shared budgets hold for it.
        rid = reservation.hold if reservation is not None else None
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.writer.put(BeginOp(entry, rid, fut))
        await self._wait(fut)

    def settle(self, entry: LedgerEntry) -> None:
        entry.replica = self.replica
        self.writer.put(UpsertOp(entry))

    async def flush(self) -> None:
        await self.writer.flush()
        while self._audit_rows:
            await asyncio.sleep(0.005)

    # -- replicas and crash recovery ---------------------------------------------------------
    async def heartbeat(self) -> None:
        await self.pool.execute(
            "INSERT INTO replicas (id, host, pid, started_at, last_seen) "
            "VALUES ($1, $2, $3, now(), now()) ON CONFLICT (id) DO UPDATE SET last_seen = now()",
            self.replica, socket.gethostname()[:200], os.getpid())

    async def _housekeep(self) -> None:
        reclaim_every = max(self.heartbeat_s, self.reclaim_after_s / 4)
        next_reclaim = 0.0
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self.heartbeat()
                if loop.time() >= next_reclaim:
                    next_reclaim = loop.time() + reclaim_every
                    settled = await self.reclaim()
                    if settled:
                        log.warning("settled %d requests of dead replicas at their reserved "
                                    "cost", settled)
            except Exception as exc:  # the database may be away; the writer retries too
                log.warning("replica housekeeping failed: %s", exc)

    async def dead_replicas(self) -> list[str]:
        """Replicas not seen for the reclaim window that still hold something open."""
        rows = await self.pool.fetch(
            "WITH holders AS (SELECT DISTINCT replica FROM reservations UNION "
            "SELECT DISTINCT replica FROM requests WHERE state = 'pending') "
            "SELECT h.replica FROM holders h LEFT JOIN replicas r ON r.id = h.replica "
            "WHERE h.replica <> $1 AND (r.id IS NULL OR "
            "r.last_seen < now() - make_interval(secs => $2)) "
            "UNION SELECT id FROM replicas WHERE id <> $1 AND "
            "last_seen < now() - make_interval(secs => $2)",
            self.replica, float(self.reclaim_after_s))
        return sorted(r[0] for r in rows)

    async def reclaim(self) -> int:
        """Reclaim every dead replica; return how many pending ledger rows were settled."""
        total = 0
        for dead in await self.dead_replicas():
            total += await self.reclaim_replica(dead)
        return total

    async def reclaim_replica(self, dead: str) -> int:
        """Charge a dead replica's open reservations and settle its pending rows.

        A reservation whose request had its pending row written (so it may have reached the
        upstream) is charged at its reserved amount; one without a ledger row was never
        forwarded and is released. Budget rows are locked in the global order.
        """
        hook = self.writer.hook
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))",
                               RECLAIM_LOCK, dead)
            alive = await conn.fetchval(
                "SELECT 1 FROM replicas WHERE id = $1 AND last_seen >= now() - "
                "make_interval(secs => $2)", dead, float(self.reclaim_after_s))
            if alive:
                return 0
            open_ = await conn.fetch(
                "SELECT r.id, r.period, r.scopes, r.amount, q.state, q.cost FROM reservations r "
                "LEFT JOIN requests q ON q.id = r.request_id WHERE r.replica = $1", dead)
            slots = {r[0]: reservation_slots(r[1], r[2]) for r in open_}
            rows = await lock_usage(conn, {s for r in open_ for s in slots[r[0]]})
            before = {k: (s.spent, s.reserved) for k, s in rows.items()}
            gone = {r[0] for r in await conn.fetch(
                "DELETE FROM reservations WHERE id = ANY($1::text[]) RETURNING id",
                [r[0] for r in open_])}
            for r in open_:
                if r[0] not in gone:  # its replica settled it after all
                    continue
                if r[4] is None:  # no ledger row: never forwarded
                    charge = 0
                elif r[4] == "pending":  # may have reached the upstream: never under-count
                    charge = r[3]
                else:  # settled, but the budget row missed it
                    charge = _int(r[5])
                apply_release(rows, slots[r[0]], r[3], charge)
            await write_usage(conn, rows, before)
            settled = await conn.fetch(
                "UPDATE requests SET state = 'settled', cost = reserved, "
                "usage_source = 'reserved' WHERE replica = $1 AND state = 'pending' "
                "RETURNING id", dead)
            await conn.execute("DELETE FROM replicas WHERE id = $1", dead)
            crossings = []
            if hook is not None and rows:
                crossings = await claim_crossings(
                    conn, hook.crossings({k: v[0] for k, v in before.items()}, rows),
                    self.replica)
        if hook is not None:
            hook.committed(rows, [], crossings)
        if open_ or settled:
            log.warning("reclaimed replica %s: %d reservations, %d pending requests", dead,
                        len(open_), len(settled))
        return len(settled)

    async def recover(self) -> int:
        """At start: reclaim replicas that died (this one's id is new, so it has nothing)."""
        return await self.reclaim()

    # -- shared budget rows (used by gateway.store.pg_budgets) ------------------------------
    async def usage_rows(self, period: str) -> dict[ScopeKey, tuple[int, int]]:
        """(spent, reserved) of every budget row of a period."""
        rows = await self.pool.fetch(
            "SELECT scope, id, spent, reserved FROM budget_usage WHERE period = $1", period)
        return {(r[0], r[1]): (int(r[2]), int(r[3])) for r in rows}

    async def ensure_usage(self, keys: Sequence[UsageKey], spans: Sequence[Span]) -> None:
        """Create missing budget rows (``keys[i]`` in the period ``spans[i]``), starting from
        what the ledger holds for the scope in that period.

        The table lock (EXCLUSIVE: plain reads go on) waits for reservation transactions in
        flight and holds new ones back while the first spend is computed, so a request is
        counted either here (its ledger row or its open reservation) or by locking the new
        row — never by neither. Taken once per scope and period.
        """
        if not keys:
            return
        cols = ([k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys])
        unnest = "unnest($1::text[], $2::text[], $3::text[]) AS k(period, scope, id)"
        missing = await self.pool.fetchval(
            f"SELECT COUNT(*) FROM {unnest} LEFT JOIN budget_usage u "
            "ON (u.period, u.scope, u.id) = (k.period, k.scope, k.id) WHERE u.id IS NULL",
            *cols)
        if not missing:
            return
        bounds = ([s.start for s in spans], [s.end for s in spans],
                  [s.months[0] for s in spans], [s.months[-1] for s in spans])
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("LOCK TABLE budget_usage IN EXCLUSIVE MODE")
            await conn.execute(
                "INSERT INTO budget_usage (period, scope, id, spent) "
                f"SELECT k.period, k.scope, k.id, "
                f"COALESCE((SELECT SUM({_COST}) FROM requests r "
                "WHERE r.period IN (k.m1, k.m2) AND r.ts >= k.t0 AND r.ts < k.t1 "
                f"AND {_IN_SCOPE}), 0) + "
                "COALESCE((SELECT SUM(v.amount) FROM reservations v "
                "WHERE v.request_id IS NULL AND v.scopes @> "
                "jsonb_build_array(jsonb_build_array(k.period, k.scope, k.id))), 0) "
                "FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], "
                "$5::timestamptz[], $6::text[], $7::text[]) AS k(period, scope, id, t0, t1, m1, "
                "m2) ORDER BY 1, 2, 3 ON CONFLICT DO NOTHING", *cols, *bounds)

    # -- admin state (each change is announced to the other replicas) ------------------------
    async def _change(self, kind: str, sql: str, *args: Any, audit: AuditRow | None = None
                      ) -> str:
        """An admin write, announced to the other replicas; with ``audit``, in one
        transaction with its audit event (both or neither)."""
        async with self.pool.acquire() as conn, conn.transaction():
            status: str = await conn.execute(sql, *args)
            if audit is not None and not status.endswith(" 0"):
                await conn.execute(_INSERT_AUDIT, [audit.ts], [audit.kind], [audit.data],
                                   self.replica)
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, kind)
        return status

    async def get_setting(self, key: str) -> str | None:
        value: str | None = await self.pool.fetchval(
            "SELECT value FROM settings WHERE key = $1", key)
        return value

    async def set_setting(self, key: str, value: str, audit: AuditRow | None = None) -> None:
        await self._change(
            f"setting:{key}",
            "INSERT INTO settings (key, value, updated_at) VALUES ($1, $2, now()) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
            "updated_at = excluded.updated_at", key, value, audit=audit)

    async def add_setting(self, key: str, value: str) -> str:
        await self.pool.execute(
            "INSERT INTO settings (key, value, updated_at) VALUES ($1, $2, now()) "
            "ON CONFLICT (key) DO NOTHING", key, value)
        stored = await self.get_setting(key)
        assert stored is not None  # settings rows are never deleted
        return stored

    async def caps(self) -> dict[ScopeKey, dict[str, int | None]]:
        rows = await self.pool.fetch("SELECT scope, id, time_window, amount FROM budget_windows")
        return fold_caps((r[0], r[1], r[2], r[3]) for r in rows)

    async def set_caps(self, key: ScopeKey, changes: Mapping[str, int | None],
                       audit: AuditRow | None = None) -> None:
        await self._change(
            "caps",
            "INSERT INTO budget_windows (scope, id, time_window, amount, updated_at) "
            "SELECT $1, $2, w, a, now() FROM unnest($3::text[], $4::int8[]) AS v(w, a) "
            "ON CONFLICT (scope, id, time_window) DO UPDATE SET amount = excluded.amount, "
            "updated_at = excluded.updated_at", key[0], key[1], list(changes),
            list(changes.values()), audit=audit)

    async def latest_ts(self) -> datetime | None:
        latest: datetime | None = await self.pool.fetchval("SELECT MAX(ts) FROM requests")
        return latest

    async def keys(self) -> list[KeyRecord]:
        rows = await self.pool.fetch(
            "SELECT name, key_sha256, tenant, agent, can_override, created_at, revoked_at, "
            "prefix, agents FROM api_keys ORDER BY created_at, name")
        return [KeyRecord(*r[:8], tuple(r[8])) for r in rows]  # type: ignore[call-arg]

    async def add_key(self, record: KeyRecord, audit: AuditRow | None = None) -> None:
        await self._change(
            "keys",
            "INSERT INTO api_keys (name, key_sha256, tenant, agent, can_override, created_at, "
            "revoked_at, prefix, agents) VALUES ($1, $2, $3, $4, $5, $6, NULL, $7, $8)",
            record.name, record.key_sha256, record.tenant, record.agent, record.can_override,
            record.created_at, record.prefix, list(record.agents), audit=audit)

    async def revoke_key(self, name: str, when: datetime, audit: AuditRow | None = None) -> bool:
        status = await self._change(
            "keys", "UPDATE api_keys SET revoked_at = $2 WHERE name = $1 AND revoked_at IS NULL",
            name, when, audit=audit)
        return status != "UPDATE 0"
