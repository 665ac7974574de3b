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
import dataclasses
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

from gateway.audit import Anchor, AuditRow, PendingEvent
from gateway.audit_store import key_file
from gateway.audit_verify import anchor_from
from gateway.budget import Reservation, ScopeKey
from gateway.ledger import (
    COLUMNS,
    GROUP_BY,
    KeyRecord,
    LedgerEntry,
    UsageRow,
    fold_overshoot,
    fold_spend,
)
from gateway.store.group_commit import GroupCommit, resolve
from gateway.store.journal import Journal

log = logging.getLogger("costwall.ledger")

MIGRATIONS: list[str] = [
    # 1: the request ledger and admin state
    """
    CREATE TABLE requests (
        id TEXT PRIMARY KEY, ts TEXT NOT NULL, period TEXT NOT NULL, tenant TEXT NOT NULL,
        key_name TEXT NOT NULL, agent TEXT NOT NULL, campaign TEXT, task TEXT,
        model TEXT NOT NULL, endpoint TEXT NOT NULL, stream INTEGER NOT NULL,
        state TEXT NOT NULL, status INTEGER NOT NULL,
        prompt_tokens INTEGER NOT NULL, cached_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL, reasoning_tokens INTEGER NOT NULL,
        reserved INTEGER NOT NULL, cost INTEGER NOT NULL, usage_source TEXT NOT NULL,
        override INTEGER NOT NULL, override_reason TEXT, latency_ms INTEGER NOT NULL,
        replica TEXT NOT NULL
    );
    CREATE INDEX requests_period_ts ON requests (period, ts);
    CREATE INDEX requests_pending ON requests (state) WHERE state = 'pending';
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at TEXT NOT NULL);
    CREATE TABLE budget_caps (
        scope TEXT NOT NULL, id TEXT NOT NULL, monthly INTEGER, updated_at TEXT NOT NULL,
        PRIMARY KEY (scope, id)
    );
    CREATE TABLE api_keys (
        name TEXT PRIMARY KEY, key_sha256 TEXT NOT NULL UNIQUE, tenant TEXT NOT NULL,
        agent TEXT NOT NULL, can_override INTEGER NOT NULL, created_at TEXT NOT NULL,
        revoked_at TEXT, prefix TEXT NOT NULL
    );
    """,
    # 2: the further agent types a key may name in X-Costwall-Agent (space-separated)
    """
    ALTER TABLE api_keys ADD COLUMN agents TEXT NOT NULL DEFAULT ''
    """,
    # 3: the audit trail's durable queue (events not yet in the files have line NULL) and the
    # anchor of its hash chain (gateway.audit)
    """
    CREATE TABLE audit_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT NOT NULL, kind TEXT NOT NULL,
        data TEXT NOT NULL, line INTEGER
    );
    CREATE INDEX audit_events_backlog ON audit_events (seq) WHERE line IS NULL;
    CREATE TABLE audit_anchor (
        trail TEXT PRIMARY KEY, count INTEGER NOT NULL, head TEXT NOT NULL,
        sizes TEXT NOT NULL, key_id TEXT NOT NULL, updated_at TEXT NOT NULL
    );
    INSERT INTO audit_anchor VALUES ('main', 0,
        '0000000000000000000000000000000000000000000000000000000000000000', '{}', '', '')
    """,
    # 4: what a request was charged beyond its reservation (an upstream billed past the bound)
    """
    ALTER TABLE requests ADD COLUMN overshoot INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX requests_overshoot ON requests (period) WHERE overshoot > 0;
    """,
]

_INSERT_AUDIT = "INSERT INTO audit_events (ts, kind, data) VALUES (?, ?, ?)"

_INSERT_PENDING = (
    f"INSERT OR IGNORE INTO requests ({', '.join(COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in COLUMNS)})"
)
_UPSERT = (
    f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)}) "
    f"ON CONFLICT (id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in COLUMNS if c != "id")
)
_RECOVER_JOURNALED = (
    f"INSERT OR IGNORE INTO requests ({', '.join(COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in COLUMNS)})"
)
_RECOVER_PENDING = (
    "UPDATE requests SET state = 'settled', cost = reserved, usage_source = 'reserved' "
    "WHERE state = 'pending'"
)
# A write that ``ping`` tries while commits are failing, so readiness comes back on its own.
_PROBE = ("INSERT INTO settings (key, value, updated_at) VALUES ('ledger.probe', '', ?) "
          "ON CONFLICT (key) DO UPDATE SET updated_at = excluded.updated_at")
# Columns added after the first release have defaults: a journal row written by an older
# costwall (fewer fields) is completed with them.
_DEFAULTS = [f.default for f in dataclasses.fields(LedgerEntry)]
_OLDEST_ROW = COLUMNS.index("replica") + 1
_COST = "CASE WHEN state = 'pending' THEN reserved ELSE cost END"
_USAGE_SUMS = ("prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens", _COST)
_BATCH = 512
_BACKLOG = 2048  # queued writes beyond which ``begin`` waits for its commit (back-pressure)
CHECKPOINT_EVERY = 256  # writer commits between WAL checkpoints (in the writer thread)
IDENTITY_CHECK_S = 0.2  # ``begin`` re-checks that the database file is still there this often
# (sql, params, future of a caller waiting for the commit, journal segment of the row)
Write = tuple[str, tuple[Any, ...], "asyncio.Future[None] | None", int | None]


def _wide_sum(expr: str) -> str:
    """Two SUMs that cannot overflow: of the high and of the low 32 bits of ``expr``.

    SQLite's SUM over integers raises "integer overflow" past 2**63-1, which would take down
    every report (and the budget load at start) for good once two huge rows exist. Each half
    fits 32 bits, so their sums fit 64 bits for any row count SQLite can hold; ``_unwide``
    joins them exactly in Python.
    """
    return f"SUM(({expr}) >> 32), SUM(({expr}) & 4294967295)"


def _unwide(high: Any, low: Any) -> int:
    return (int(high or 0) << 32) + int(low or 0)


def _ts(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_ts(value: str | None) -> datetime | None:
    if value is None:
        return None
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def _row(entry: LedgerEntry) -> tuple[Any, ...]:
    values = []
    for name in COLUMNS:
        value = getattr(entry, name)
        if isinstance(value, datetime):
            value = _ts(value)
        elif isinstance(value, bool):
            value = int(value)
        values.append(value)
    return tuple(values)


Batch = list[tuple[str, list[tuple[Any, ...]]]]
FileId = tuple[int, int]  # (st_dev, st_ino)


class StorageLost(sqlite3.OperationalError):
    """The database file was deleted, renamed or replaced under the running gateway.

    SQLite keeps working through its open descriptor, so without this check the gateway
    would go on answering 200 and committing into an unlinked file that nobody will ever
    read again (and after a restart every cap would start from zero).
    """


def file_id(path: Path) -> FileId | None:
    """The identity of the file now at ``path`` (None if there is none)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_file(path: Path, expected: FileId | None) -> None:
    """Raise ``StorageLost`` unless ``path`` is still the file the ledger opened."""
    if expected is not None and file_id(path) != expected:
        raise StorageLost(f"the ledger database {path} was deleted, renamed or replaced "
                          "while costwall was running; restart costwall (requests are "
                          "refused until then)")


class _WriteConnection:
    """The only write connection, used from one dedicated thread (never from the loop)."""

    def __init__(self, path: Path, synchronous: str):
        self._path = path
        self._synchronous = synchronous
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="costwall-ledger-writer")
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self.identity: FileId | None = None  # the database file this connection opened

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def open(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        conn = sqlite3.connect(self._path, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute("PRAGMA busy_timeout=5000")
        self._conn = conn
        self.identity = file_id(self._path)

    async def transaction(self, batch: Batch) -> None:
        """Run every statement of ``batch`` (``executemany`` each) in one transaction."""
        await self._run(self._transaction, batch)

    def _transaction(self, batch: Batch) -> None:
        if self._conn is None:
            raise sqlite3.ProgrammingError("the ledger's write connection is closed")
        # One stat per batch, in this thread: a commit into a deleted file is lost.
        check_file(self._path, self.identity)
        _transaction(self._conn, batch)

    async def call(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``fn(conn)`` in one transaction of its own (between two batches)."""
        return await self._run(self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        conn = self._conn
        if conn is None:
            raise sqlite3.ProgrammingError("the ledger's write connection is closed")
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    async def checkpoint(self) -> None:
        """Checkpoint the WAL and restart it (its fsync happens here, never on the loop).

        RESTART, not PASSIVE: under a steady stream of commits a passive checkpoint never
        catches up and the WAL grows without bound (measured: 685 MB in a 6-minute
        benchmark). While it runs, new writers are held off; the loop's connection then
        gets SQLITE_BUSY at once and hands its batch to this thread, which runs it next.
        """
        await self._run(self._checkpoint)

    def _checkpoint(self) -> None:
        if self._conn is not None:
            check_file(self._path, self.identity)
            self._conn.execute("PRAGMA wal_checkpoint(RESTART)")

    @property
    def closed(self) -> bool:
        return self._closed or self._conn is None

    async def recover(self, journaled: list[tuple[Any, ...]]) -> int:
        """Store journaled rows that never reached the file, settle every pending row."""
        return int(await self._run(self._recover, journaled))

    def _recover(self, journaled: list[tuple[Any, ...]]) -> int:
        conn = self._conn
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        try:
            inserted = conn.executemany(_RECOVER_JOURNALED, journaled).rowcount if journaled else 0
            updated = conn.execute(_RECOVER_PENDING).rowcount
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return max(inserted, 0) + max(updated, 0)

    async def migrate(self, migrations: list[str]) -> None:
        await self._run(self._migrate, migrations)

    def _migrate(self, migrations: list[str]) -> None:
        conn = self._conn
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER)")
            current = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] or 0
            for version, script in enumerate(migrations[current:], start=current + 1):
                for statement in filter(str.strip, script.split(";")):
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version VALUES (?)", (version,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._run(self._close)
        self._pool.shutdown(wait=True)

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _transaction(conn: sqlite3.Connection, batch: Batch) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        for sql, rows in batch:
            conn.executemany(sql, rows)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _grouped(batch: list[Write]) -> Batch:
    # Pending inserts first (INSERT OR IGNORE), then the rest in queue order: a settle
    # upsert never runs before its own pending insert, and either order yields the same row.
    groups: dict[str, list[tuple[Any, ...]]] = {_INSERT_PENDING: []}
    for sql, params, _, _ in batch:
        if sql:  # "" is a read barrier (see ``SqliteLedger._fetch``)
            groups.setdefault(sql, []).append(params)
    return [(sql, rows) for sql, rows in groups.items() if rows]


def _entry(row: aiosqlite.Row) -> LedgerEntry:
    data = dict(row)
    data["ts"] = _parse_ts(data["ts"])
    data["stream"] = bool(data["stream"])
    data["override"] = bool(data["override"])
    return LedgerEntry(**data)


class SqliteLedger:
    """The embedded ledger. One process owns the file; see ``gateway.ledger`` for the contract."""

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

    async def spend_by_scope(self, period: str) -> dict[ScopeKey, int]:
        rows = await self._fetch(
            f"SELECT tenant, agent, campaign, key_name, {_wide_sum(_COST)} "
            "FROM requests WHERE period = ? GROUP BY tenant, agent, campaign, key_name",
            (period,),
        )
        return fold_spend([(r[0], r[1], r[2], r[3], _unwide(r[4], r[5])) for r in rows])

    async def overshoot(self, period: str) -> dict[ScopeKey, tuple[int, int]]:
        rows = await self._fetch(
            f"SELECT tenant, agent, campaign, key_name, {_wide_sum('overshoot')}, COUNT(*) "
            "FROM requests WHERE period = ? AND overshoot > 0 "
            "GROUP BY tenant, agent, campaign, key_name", (period,))
        return fold_overshoot([(r[0], r[1], r[2], r[3], _unwide(r[4], r[5]), r[6])
                               for r in rows])

    async def usage(self, period: str, group_by: str, tenant: str | None = None) -> list[UsageRow]:
        if group_by not in GROUP_BY:
            raise ValueError(f"group_by must be one of {', '.join(GROUP_BY)}")
        column = "substr(ts, 1, 10)" if group_by == "day" else f"COALESCE({group_by}, '')"
        where, params = "period = ?", [period]
        if tenant is not None:
            where += " AND tenant = ?"
            params.append(tenant)
        sums = ", ".join(_wide_sum(c) for c in _USAGE_SUMS)
        rows = await self._fetch(
            f"SELECT {column} AS grp, COUNT(*), {sums}, SUM(override) "
            f"FROM requests WHERE {where} GROUP BY grp ORDER BY grp",
            tuple(params),
        )
        out = []
        for r in rows:
            values = tuple(r)
            wide = [_unwide(values[i], values[i + 1]) for i in range(2, 2 + 2 * 5, 2)]
            out.append(UsageRow(str(values[0]), int(values[1]), *wide, int(values[-1] or 0)))
        return out

    async def entries(self, period: str, tenant: str | None = None) -> list[LedgerEntry]:
        sql = f"SELECT {', '.join(COLUMNS)} FROM requests WHERE period = ?"
        params: tuple[Any, ...] = (period,)
        if tenant is not None:
            sql += " AND tenant = ?"
            params += (tenant,)
        return [_entry(r) for r in await self._fetch(sql + " ORDER BY ts, id", params)]

    async def periods(self) -> list[str]:
        rows = await self._fetch("SELECT DISTINCT period FROM requests ORDER BY period DESC")
        return [r[0] for r in rows]

    async def count(self) -> int:
        return int((await self._fetch("SELECT COUNT(*) FROM requests"))[0][0])

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

    async def caps(self) -> dict[ScopeKey, int | None]:
        rows = await self._fetch("SELECT scope, id, monthly FROM budget_caps")
        return {(r[0], r[1]): r[2] for r in rows}

    async def set_cap(self, key: ScopeKey, limit: int | None,
                      audit: AuditRow | None = None) -> None:
        await self._change(
            "INSERT INTO budget_caps (scope, id, monthly, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (scope, id) DO UPDATE SET monthly = excluded.monthly, "
            "updated_at = excluded.updated_at",
            (key[0], key[1], limit, _ts(datetime.now(UTC))), audit,
        )

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
