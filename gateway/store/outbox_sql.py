"""The alerts' outbox on both backends (``gateway.store.interfaces.Outbox``), as mixins.

A row is claimed by moving its lease forward in one statement (``UPDATE … WHERE lease
expired``; on PostgreSQL the candidate rows are locked ``FOR UPDATE SKIP LOCKED``), so one
replica at a time sends an (event, channel); a replica killed mid-delivery leaves a lease
that expires, and another sends it again with the same ``webhook-id``.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any

from gateway.store.interfaces import OutboxRow

if TYPE_CHECKING:
    import asyncpg

    from gateway.store.sqlite_file import _WriteConnection

_COLS = ("event_id, channel, type, body, created_at, status, attempts, next_at, last_error, "
         "sent_at")


def _row(r: Any) -> OutboxRow:
    return OutboxRow(str(r[0]), str(r[1]), str(r[2]), str(r[3]), float(r[4]), str(r[5]),
                     int(r[6]), float(r[7]), r[8], None if r[9] is None else float(r[9]))


class SqliteOutbox:
    """Outbox on SQLite: every statement goes through the single writer connection."""

    _writer: _WriteConnection | None

    async def _outbox_call(self, fn: Any) -> Any:
        assert self._writer is not None
        return await self._writer.call(fn)

    async def outbox_add(self, rows: list[OutboxRow]) -> None:
        def add(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO alert_outbox (event_id, channel, type, body, created_at, next_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (event_id, channel) DO NOTHING",
                [(r.event_id, r.channel, r.type, r.body, r.created_at, r.next_at)
                 for r in rows])

        await self._outbox_call(add)

    async def outbox_claim(self, now: float, lease_s: float, limit: int,
                           channel: str | None = None) -> list[OutboxRow]:
        def claim(conn: sqlite3.Connection) -> list[OutboxRow]:
            rows = conn.execute(
                "UPDATE alert_outbox SET lease_until = ?, attempts = attempts + 1 "
                "WHERE rowid IN (SELECT rowid FROM alert_outbox WHERE status = 'pending' "
                "AND next_at <= ? AND lease_until < ? AND (? IS NULL OR channel = ?) "
                f"ORDER BY next_at LIMIT ?) RETURNING {_COLS}",
                (now + lease_s, now, now, channel, channel, limit)).fetchall()
            return [_row(r) for r in rows]

        result: list[OutboxRow] = await self._outbox_call(claim)
        return result

    async def outbox_abandon(self, keep: tuple[str, ...], error: str) -> int:
        def abandon(conn: sqlite3.Connection) -> int:
            marks = ", ".join("?" * len(keep))
            return conn.execute(
                "UPDATE alert_outbox SET status = 'failed', last_error = ?, lease_until = 0 "
                f"WHERE status = 'pending' AND channel NOT IN ({marks})",
                (error, *keep)).rowcount

        result: int = await self._outbox_call(abandon)
        return result

    async def outbox_finish(self, event_id: str, channel: str, status: str, next_at: float,
                            error: str | None, now: float) -> None:
        def finish(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE alert_outbox SET status = ?, next_at = ?, last_error = ?, "
                "lease_until = 0, sent_at = CASE WHEN ? = 'sent' THEN ? ELSE sent_at END "
                "WHERE event_id = ? AND channel = ?",
                (status, next_at, error, status, now, event_id, channel))

        await self._outbox_call(finish)

    async def outbox_list(self, limit: int) -> list[OutboxRow]:
        def fetch(conn: sqlite3.Connection) -> list[OutboxRow]:
            rows = conn.execute(f"SELECT {_COLS} FROM alert_outbox ORDER BY created_at DESC, "
                                "event_id LIMIT ?", (limit,)).fetchall()
            return [_row(r) for r in rows]

        result: list[OutboxRow] = await self._outbox_call(fetch)
        return result


class PgOutbox:
    """Outbox on PostgreSQL: claims skip rows another replica is claiming."""

    pool: asyncpg.Pool

    async def outbox_add(self, rows: list[OutboxRow]) -> None:
        await self.pool.executemany(
            "INSERT INTO alert_outbox (event_id, channel, type, body, created_at, next_at) "
            "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (event_id, channel) DO NOTHING",
            [(r.event_id, r.channel, r.type, r.body, r.created_at, r.next_at) for r in rows])

    async def outbox_claim(self, now: float, lease_s: float, limit: int,
                           channel: str | None = None) -> list[OutboxRow]:
        rows = await self.pool.fetch(
            "UPDATE alert_outbox o SET lease_until = $1, attempts = o.attempts + 1 "
            "FROM (SELECT event_id, channel FROM alert_outbox WHERE status = 'pending' "
            "AND next_at <= $2 AND lease_until < $2 AND ($4::text IS NULL OR channel = $4) "
            "ORDER BY next_at LIMIT $3 FOR UPDATE SKIP LOCKED) d "
            "WHERE o.event_id = d.event_id AND o.channel = d.channel "
            "RETURNING o.event_id, o.channel, o.type, o.body, o.created_at, o.status, "
            "o.attempts, o.next_at, o.last_error, o.sent_at", now + lease_s, now, limit,
            channel)
        return [_row(r) for r in rows]

    async def outbox_abandon(self, keep: tuple[str, ...], error: str) -> int:
        status = await self.pool.execute(
            "UPDATE alert_outbox SET status = 'failed', last_error = $1, lease_until = 0 "
            "WHERE status = 'pending' AND NOT (channel = ANY($2::text[]))", error, list(keep))
        return int(status.split()[-1])

    async def outbox_finish(self, event_id: str, channel: str, status: str, next_at: float,
                            error: str | None, now: float) -> None:
        await self.pool.execute(
            "UPDATE alert_outbox SET status = $1, next_at = $2, last_error = $3, "
            "lease_until = 0, sent_at = CASE WHEN $1 = 'sent' THEN $4 ELSE sent_at END "
            "WHERE event_id = $5 AND channel = $6", status, next_at, error, now, event_id,
            channel)

    async def outbox_list(self, limit: int) -> list[OutboxRow]:
        rows = await self.pool.fetch(f"SELECT {_COLS} FROM alert_outbox "
                                     "ORDER BY created_at DESC, event_id LIMIT $1", limit)
        return [_row(r) for r in rows]
