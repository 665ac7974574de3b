"""``AuditQueue`` over PostgreSQL: the shared table of audit events and the chain's anchor.

Mixed into ``gateway.store.postgres.PostgresLedger``, which provides ``pool``, ``url`` and
``replica`` and creates the queue's state (``_audit_rows`` and the rest) in its constructor.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

import asyncpg

from gateway.audit import Anchor, AuditRow, PendingEvent
from gateway.audit_verify import anchor_from

log = logging.getLogger("costwall.ledger")

AUDIT_LOCK = 0x636F737461756469  # held by the one replica that writes the audit files
_AUDIT_BATCH = 500
_INSERT_AUDIT = ("INSERT INTO audit_events (ts, kind, data, replica) SELECT t, k, d, $4 FROM "
                 "unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS v(t, k, d, o) "
                 "ORDER BY o")


class PgAuditQueue:
    """The audit trail's queue and anchor, shared by every replica."""

    pool: asyncpg.Pool
    url: str
    replica: str
    _audit_rows: list[AuditRow]
    _audit_wake: asyncio.Event
    _audit_inserting: asyncio.Lock
    _audit_conn: asyncpg.Connection | None
    _audit_locked: bool

    # -- the audit trail's queue and anchor (gateway.audit) ------------------------------------
    # Every replica stores its events in the one shared table; the replica holding AUDIT_LOCK
    # writes them all, in table order, into its files (one chain, one anchor). Another takes
    # over when it stops; its files must then be the same files (a shared logs_dir), else its
    # writer stops at the anchor check and /readyz says so (docs/operations.md).
    def audit(self, row: AuditRow) -> None:
        """Queue an audit event for the next INSERT batch (never waits, never raises)."""
        self._audit_rows.append(row)
        self._audit_wake.set()

    async def _audit_drain(self) -> None:
        delay = 0.05
        while True:
            await self._audit_wake.wait()
            rows = self._audit_rows[:_AUDIT_BATCH]
            if not rows:
                self._audit_wake.clear()
                continue
            try:
                async with self._audit_inserting:
                    await self.pool.execute(_INSERT_AUDIT, [r.ts for r in rows],
                                            [r.kind for r in rows], [r.data for r in rows],
                                            self.replica)
                    del self._audit_rows[:len(rows)]
            except Exception as exc:  # the database is away: keep them and retry
                log.warning("audit events not stored yet (%s); retrying", type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.05

    async def audit_secret(self) -> bytes:
        """The chain's key when COSTWALL_AUDIT_KEY is not set: generated once, shared."""
        await self.pool.execute("INSERT INTO audit_secret (id, secret) VALUES (1, $1) "
                                "ON CONFLICT (id) DO NOTHING", secrets.token_hex(32))
        secret: str = await self.pool.fetchval("SELECT secret FROM audit_secret WHERE id = 1")
        return secret.encode()

    async def audit_lock(self) -> bool:
        """True while this replica is the one that writes the audit files."""
        conn = self._audit_conn
        if conn is None or conn.is_closed():
            self._audit_locked = False
            self._audit_conn = conn = await asyncpg.connect(self.url)
        if not self._audit_locked:
            self._audit_locked = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)",
                                                          AUDIT_LOCK))
        return self._audit_locked

    async def audit_pending(self, limit: int) -> tuple[Anchor, list[PendingEvent]]:
        row = await self.pool.fetchrow(
            "SELECT count, head, sizes, key_id FROM audit_anchor WHERE trail = 'main'")
        anchor = anchor_from(dict(row)) if row else Anchor()
        events = await self.pool.fetch(
            "SELECT seq, kind, data FROM audit_events WHERE line IS NULL ORDER BY seq "
            "LIMIT $1", limit) if limit else []
        return anchor, [PendingEvent(int(r[0]), r[1], r[2]) for r in events]

    async def audit_advance(self, old: Anchor, new: Anchor,
                            written: list[tuple[int, int]]) -> None:
        """Mark events as written and move the anchor, atomically (and only from ``old``)."""
        async with self.pool.acquire() as conn, conn.transaction():
            status = await conn.execute(
                "UPDATE audit_anchor SET count = $1, head = $2, sizes = $3, key_id = $4, "
                "updated_at = now() WHERE trail = 'main' AND count = $5",
                new.count, new.head, new.sizes_json(), new.key_id, old.count)
            if status != "UPDATE 1":
                raise RuntimeError("the audit anchor moved under the writer")
            await conn.execute(
                "UPDATE audit_events SET line = v.n FROM unnest($1::int8[], $2::int8[]) "
                "AS v(seq, n) WHERE audit_events.seq = v.seq",
                [seq for seq, _ in written], [n for _, n in written])

    async def audit_backlog(self) -> int:
        async with self._audit_inserting:  # else a batch being inserted counts twice
            return int(await self.pool.fetchval(
                "SELECT COUNT(*) FROM audit_events WHERE line IS NULL")) + len(self._audit_rows)
