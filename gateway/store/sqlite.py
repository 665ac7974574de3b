"""SQLite ledger: WAL mode, one writer task that group-commits a queue of writes.

Shape taken from datasette's ``execute_write_fn``: the only write connection belongs to one
task fed by a queue; every write waiting when a batch starts shares its single commit, so a
busy gateway pays one commit (and, with ``synchronous=FULL``, one fsync) per batch rather than
per request. The write connection lives in one dedicated thread and a whole batch (BEGIN,
one ``executemany`` per statement, COMMIT) runs there as a single call: one hop between the
event loop and the thread per batch. Reads use a second connection (aiosqlite), which WAL
lets run beside the writer. The thread checkpoints the WAL (RESTART) every
``CHECKPOINT_EVERY`` commits, so the WAL stays small under a steady stream of requests.

With ``synchronous=NORMAL`` (the default) ``begin`` does not wait for a commit: it appends
the pending row to the journal (``gateway.store.journal``: one ``os.write``, which survives a
process crash or ``kill -9``), queues the insert for the writer and returns. Waiting for the
commit was most of costwall's added latency. ``recover`` settles the journal's rows that never
reached the database, so a request that reached the upstream is still never lost or
under-counted by a crash; a power loss is only covered by ``synchronous=FULL``, where every
commit fsyncs and ``begin`` returns once its row is committed. While the writer is failing
(or closed) or is ``_BACKLOG`` writes behind, ``begin`` skips the journal and waits for its
commit: a broken database refuses requests instead of forwarding them, and a slow one slows
requests down instead of growing an unbounded queue. Reads wait for the begins queued before
them, so a read still sees every begun row.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

from gateway.audit import Anchor, AuditRow, PendingEvent
from gateway.audit_store import key_file
from gateway.audit_verify import anchor_from
from gateway.budget import Reservation, ScopeKey
from gateway.ledger import COLUMNS, KeyRecord, LedgerEntry, fold_caps
from gateway.store.group_commit import GroupCommit, resolve
from gateway.store.journal import Journal
from gateway.store.outbox_sql import SqliteOutbox
from gateway.store.sqlite_file import StorageLost, _WriteConnection, check_file
from gateway.store.sqlite_reports import SqliteReports
from gateway.store.sqlite_sql import (
    _DEFAULTS,
    _INSERT_AUDIT,
    _INSERT_PENDING,
    _OLDEST_ROW,
    _PROBE,
    _UPSERT,
    MIGRATIONS,
    Write,
    _grouped,
    _parse_ts,
    _row,
    _ts,
)

log = logging.getLogger("costwall.ledger")

_BATCH = 512
_BACKLOG = 2048  # queued writes beyond which ``begin`` waits for its commit (back-pressure)
CHECKPOINT_EVERY = 256  # writer commits between WAL checkpoints (in the writer thread)
IDENTITY_CHECK_S = 0.2  # ``begin`` re-checks that the database file is still there this often


class SqliteLedger(SqliteReports, SqliteOutbox):
    """The embedded ledger. One process owns the file; see ``gateway.store.interfaces``."""

    def __init__(self, path: str | Path, synchronous: str = "NORMAL", replica: str = "local"):
        self.path = Path(path)
        self.synchronous = synchronous
        self.replica = replica
        self._writer: _WriteConnection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._writes: GroupCommit[Write] = GroupCommit(self._commit_batch, _BATCH,
                                                       "costwall-ledger-writer")
        self._put = self._writes.put
        # synchronous=NORMAL only: see the module docstring.
        # Always there to recover a previous run's segments; written only with NORMAL.
        self._journal = Journal(self.path)
        self._journaling = synchronous == "NORMAL"
        self._healthy = True  # the writer's last commit succeeded
        self._commits = 0
        self._checked_at = 0.0  # monotonic time of the last database file identity check
        self._lost: StorageLost | None = None  # set while the database file is missing

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(self.path.parent, os.W_OK):
            # SQLite must create the WAL and its shared-memory file beside the database;
            # opening a WAL database in a read-only directory is the one way to a SIGBUS.
            raise PermissionError(f"the ledger directory {self.path.parent} is not writable")
        self._writer = _WriteConnection(self.path, self.synchronous)
        await self._writer.open()
        await self._writer.migrate(MIGRATIONS)
        self._reader = await self._connect()
        self._writes.start()

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        conn.row_factory = aiosqlite.Row
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute(f"PRAGMA synchronous={self.synchronous}")
        await conn.execute("PRAGMA busy_timeout=5000")
        return conn

    async def close(self) -> None:
        if self._writes.running:
            await self.flush()
            await self._writes.close()
        for conn in (self._writer, self._reader):
            if conn is not None:
                await conn.close()
        self._writer = self._reader = None

    # -- the writer --------------------------------------------------------------------------
    async def _commit_batch(self, batch: list[Write]) -> None:
        """Commit a batch (``GroupCommit``); if it fails, each write alone, so one bad write
        fails only its own caller. Then tell the journal and the waiters."""
        assert self._writer is not None
        try:
            await self._commit(batch)
            outcomes: list[BaseException | None] = [None] * len(batch)
        except Exception:
            outcomes = []
            for item in batch:
                try:
                    await self._commit([item])
                    outcomes.append(None)
                except Exception as exc:
                    log.error("ledger write failed: %s", exc)
                    outcomes.append(exc)
        self._healthy = all(error is None for error in outcomes)
        for (_sql, _params, fut, seq), error in zip(batch, outcomes, strict=True):
            if seq is not None:
                if error is not None:  # the row stays in its journal segment for recovery
                    self._journal.keep(seq)
                self._journal.committed(seq)
            resolve(fut, error)
        self._commits += 1
        if self._commits >= CHECKPOINT_EVERY:
            self._commits = 0
            try:
                await self._writer.checkpoint()
            except Exception as exc:
                log.warning("ledger checkpoint failed: %s", exc)

    async def _commit(self, batch: list[Write]) -> None:
        assert self._writer is not None
        grouped = _grouped(batch)
        if grouped:
            await self._writer.transaction(grouped)

    async def _write(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._put((sql, params, fut, None))
        await fut

    async def flush(self) -> None:
        await self._writes.flush()
        self._journal.settle_all()

    # -- the request path --------------------------------------------------------------------
    def _check_storage(self, force: bool = False) -> None:
        """Raise ``StorageLost`` if the database file is gone (a stat every
        ``IDENTITY_CHECK_S`` at most, so the request path pays next to nothing)."""
        now = time.monotonic()
        if force or now - self._checked_at >= IDENTITY_CHECK_S:
            self._checked_at = now
            writer = self._writer
            try:
                check_file(self.path, writer.identity if writer is not None else None)
            except StorageLost as exc:
                if self._lost is None:
                    log.error("%s", exc)
                self._lost = exc
            else:
                self._lost = None
        if self._lost is not None:
            raise self._lost

    async def begin(self, entry: LedgerEntry, reservation: Reservation | None = None) -> None:
        entry.replica = self.replica
        row = _row(entry)
        writer = self._writer
        if writer is None or writer.closed:
            raise sqlite3.ProgrammingError("the ledger's write connection is closed")
        self._check_storage()
        if self._journaling and self._healthy and self._writes.qsize() < _BACKLOG:
            seq = self._journal.append(row)  # durable against a crash from here on
            self._put((_INSERT_PENDING, row, None, seq))
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._put((_INSERT_PENDING, row, fut, None))
        await fut

    def settle(self, entry: LedgerEntry) -> None:
        entry.replica = self.replica
        self._put((_UPSERT, _row(entry), None, None))

    async def recover(self) -> int:
        """Settle what a crash left: journaled rows missing from the file and pending rows."""
        assert self._writer is not None
        await self.flush()
        segments = self._journal.leftovers()
        journaled = []
        for path in segments:
            for values in Journal.read(path):
                if _OLDEST_ROW <= len(values) < len(COLUMNS):  # journaled by an older version
                    values = [*values, *_DEFAULTS[len(values):]]
                if len(values) != len(COLUMNS):
                    log.warning("ledger journal %s: skipped a row of %d fields", path.name,
                                len(values))
                    continue
                row = dict(zip(COLUMNS, values, strict=True))
                row.update(state="settled", cost=row["reserved"], usage_source="reserved")
                journaled.append(tuple(row.values()))
        count = await self._writer.recover(journaled)
        for path in segments:
            path.unlink(missing_ok=True)
        return count

    # -- reads -------------------------------------------------------------------------------
    async def _fetch(self, sql: str, params: tuple[Any, ...] = ()) -> list[aiosqlite.Row]:
        assert self._reader is not None
        if self._journal.pending:
            # Reads see every begun row (as when begin awaited its commit): wait until the
            # writer has committed everything queued before this read.
            await self._write("")
        return list(await self._reader.execute_fetchall(sql, params))

    async def ping(self) -> bool:
        # Ready means writes can land: the writer task is alive and the file answers a read
        # (``SELECT 1`` alone would succeed without touching the database file).
        if not self._writes.running:
            return False
        # Never a new connection here: opening a WAL database whose directory turned
        # read-only is what can map its ``-shm`` badly. Two ``access`` calls say whether
        # the journal and SQLite can still create and write their files.
        if not (os.access(self.path.parent, os.W_OK) and os.access(self.path, os.W_OK)):
            return False
        try:
            self._check_storage(force=True)
            await self._fetch("SELECT MAX(version) FROM schema_version")
            if not self._healthy:  # the last commit failed (a full disk?): is it over?
                await self._write(_PROBE, (_ts(datetime.now(UTC)),))
        except Exception:
            return False
        return True

    # -- admin state -------------------------------------------------------------------------
    async def get_setting(self, key: str) -> str | None:
        rows = await self._fetch("SELECT value FROM settings WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    async def _change(self, sql: str, params: tuple[Any, ...], audit: AuditRow | None) -> int:
        """An admin write; with ``audit``, in one transaction with its audit event."""
        if audit is None:
            await self._write(sql, params)
            return 1

        def both(conn: sqlite3.Connection) -> int:
            changed = conn.execute(sql, params).rowcount
            if changed:
                conn.execute(_INSERT_AUDIT, (audit.ts, audit.kind, audit.data))
            return int(changed)

        assert self._writer is not None
        return int(await self._writer.call(both))

    async def set_setting(self, key: str, value: str, audit: AuditRow | None = None) -> None:
        await self._change(
            "INSERT INTO settings (key, value, updated_at) VALUES (?, ?, ?) ON CONFLICT (key) "
            "DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            (key, value, _ts(datetime.now(UTC))), audit,
        )

    async def add_setting(self, key: str, value: str) -> str:
        await self._write(
            "INSERT INTO settings (key, value, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (key) DO NOTHING", (key, value, _ts(datetime.now(UTC))))
        stored = await self.get_setting(key)
        assert stored is not None  # settings rows are never deleted
        return stored

    async def caps(self) -> dict[ScopeKey, dict[str, int | None]]:
        rows = await self._fetch("SELECT scope, id, time_window, amount FROM budget_windows")
        return fold_caps((r[0], r[1], r[2], r[3]) for r in rows)

    async def set_caps(self, key: ScopeKey, changes: Mapping[str, int | None],
                       audit: AuditRow | None = None) -> None:
        now = _ts(datetime.now(UTC))
        await self._change(
            "INSERT INTO budget_windows (scope, id, time_window, amount, updated_at) VALUES "
            + ", ".join("(?, ?, ?, ?, ?)" for _ in changes)
            + " ON CONFLICT (scope, id, time_window) DO UPDATE SET amount = excluded.amount, "
            "updated_at = excluded.updated_at",
            tuple(v for w, limit in changes.items() for v in (key[0], key[1], w, limit, now)),
            audit,
        )

    async def latest_ts(self) -> datetime | None:
        rows = await self._fetch("SELECT MAX(ts) FROM requests")
        return _parse_ts(rows[0][0]) if rows else None

    async def keys(self) -> list[KeyRecord]:
        rows = await self._fetch(
            "SELECT name, key_sha256, tenant, agent, can_override, created_at, revoked_at, "
            "prefix, agents FROM api_keys ORDER BY created_at"
        )
        return [
            KeyRecord(r[0], r[1], r[2], r[3], bool(r[4]), _parse_ts(r[5]),  # type: ignore[arg-type]
                      _parse_ts(r[6]), r[7], tuple(r[8].split()))
            for r in rows
        ]

    async def add_key(self, record: KeyRecord, audit: AuditRow | None = None) -> None:
        await self._change(
            "INSERT INTO api_keys (name, key_sha256, tenant, agent, can_override, created_at, "
            "revoked_at, prefix, agents) VALUES (?, ?, ?, ?, ?, ?, NULL, ?, ?)",
            (record.name, record.key_sha256, record.tenant, record.agent,
             int(record.can_override), _ts(record.created_at), record.prefix,
             " ".join(record.agents)), audit,
        )

    async def revoke_key(self, name: str, when: datetime, audit: AuditRow | None = None) -> bool:
        rows = await self._fetch(
            "SELECT 1 FROM api_keys WHERE name = ? AND revoked_at IS NULL", (name,)
        )
        if not rows:
            return False
        changed = await self._change(
            "UPDATE api_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
            (_ts(when), name), audit,
        )
        return changed > 0

    # -- the audit trail's queue and anchor (gateway.audit) ------------------------------------
    def audit(self, row: AuditRow) -> None:
        """Queue an audit event for the writer's next batch (never waits, never raises)."""
        self._put((_INSERT_AUDIT, (row.ts, row.kind, row.data), None, None))

    async def audit_secret(self) -> bytes:
        """The chain's key, kept beside the database in ``audit.key`` (0600)."""
        return await asyncio.to_thread(key_file, self.path.parent / "audit.key")

    async def audit_lock(self) -> bool:
        return True  # one process owns a SQLite ledger

    async def audit_pending(self, limit: int) -> tuple[Anchor, list[PendingEvent]]:
        rows = await self._fetch(
            "SELECT count, head, sizes, key_id FROM audit_anchor WHERE trail = 'main'")
        anchor = anchor_from(dict(rows[0])) if rows else Anchor()
        events = await self._fetch(
            "SELECT seq, kind, data FROM audit_events WHERE line IS NULL ORDER BY seq "
            "LIMIT ?", (limit,)) if limit else []
        return anchor, [PendingEvent(int(r[0]), r[1], r[2]) for r in events]

    async def audit_advance(self, old: Anchor, new: Anchor,
                            written: list[tuple[int, int]]) -> None:
        """Mark events as written and move the anchor, atomically."""

        def advance(conn: sqlite3.Connection) -> None:
            moved = conn.execute(
                "UPDATE audit_anchor SET count = ?, head = ?, sizes = ?, key_id = ?, "
                "updated_at = ? WHERE trail = 'main' AND count = ?",
                (new.count, new.head, new.sizes_json(), new.key_id, _ts(datetime.now(UTC)),
                 old.count)).rowcount
            if moved != 1:
                raise RuntimeError("the audit anchor moved under the writer")
            conn.executemany("UPDATE audit_events SET line = ? WHERE seq = ?",
                             [(n, seq) for seq, n in written])

        assert self._writer is not None
        await self._writer.call(advance)

    async def audit_backlog(self) -> int:
        rows = await self._fetch("SELECT COUNT(*) FROM audit_events WHERE line IS NULL")
        return int(rows[0][0])
