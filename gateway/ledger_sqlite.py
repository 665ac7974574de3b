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
the pending row to the journal (``gateway.journal``: one ``os.write``, which survives a
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
import contextlib
import logging
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

from gateway.budget import ScopeKey
from gateway.journal import Journal
from gateway.ledger import COLUMNS, GROUP_BY, KeyRecord, LedgerEntry, UsageRow, fold_spend

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
]

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
_BATCH = 512
_BACKLOG = 2048  # queued writes beyond which ``begin`` waits for its commit (back-pressure)
CHECKPOINT_EVERY = 256  # writer commits between WAL checkpoints (in the writer thread)
# (sql, params, future of a caller waiting for the commit, journal segment of the row)
Write = tuple[str, tuple[Any, ...], "asyncio.Future[None] | None", int | None]


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


class _WriteConnection:
    """The only write connection, used from one dedicated thread (never from the loop)."""

    def __init__(self, path: Path, synchronous: str):
        self._path = path
        self._synchronous = synchronous
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="costwall-ledger-writer")
        self._conn: sqlite3.Connection | None = None
        self._closed = False

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

    async def transaction(self, batch: Batch) -> None:
        """Run every statement of ``batch`` (``executemany`` each) in one transaction."""
        await self._run(self._transaction, batch)

    def _transaction(self, batch: Batch) -> None:
        if self._conn is None:
            raise sqlite3.ProgrammingError("the ledger's write connection is closed")
        _transaction(self._conn, batch)

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

    def __init__(self, path: str | Path, synchronous: str = "NORMAL", replica: str = "local",
                 **_: Any):
        self.path = Path(path)
        self.synchronous = synchronous
        self.replica = replica
        self._writer: _WriteConnection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._queue: asyncio.Queue[Write]
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        # synchronous=NORMAL only: see the module docstring.
        # Always there to recover a previous run's segments; written only with NORMAL.
        self._journal = Journal(self.path)
        self._journaling = synchronous == "NORMAL"
        self._healthy = True  # the writer's last commit succeeded
        self._commits = 0

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._queue = asyncio.Queue()
        self._writer = _WriteConnection(self.path, self.synchronous)
        await self._writer.open()
        await self._writer.migrate(MIGRATIONS)
        self._reader = await self._connect()
        self._idle.set()
        self._task = asyncio.create_task(self._write_loop(), name="costwall-ledger-writer")

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        conn.row_factory = aiosqlite.Row
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute(f"PRAGMA synchronous={self.synchronous}")
        await conn.execute("PRAGMA busy_timeout=5000")
        return conn

    async def close(self) -> None:
        if self._task is not None:
            await self.flush()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for conn in (self._writer, self._reader):
            if conn is not None:
                await conn.close()
        self._writer = self._reader = None

    # -- the writer --------------------------------------------------------------------------
    async def _write_loop(self) -> None:
        assert self._writer is not None
        while True:
            first = await self._queue.get()
            self._idle.clear()
            batch = [first]
            while len(batch) < _BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
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
                    if error is None:
                        self._journal.committed(seq)
                    else:  # the row stays in its journal segment for the next recovery
                        self._journal.keep(seq)
                        self._journal.committed(seq)
                if fut is not None and not fut.done():
                    if error is None:
                        fut.set_result(None)
                    else:
                        fut.set_exception(error)
            self._commits += 1
            if self._commits >= CHECKPOINT_EVERY:
                self._commits = 0
                try:
                    await self._writer.checkpoint()
                except Exception as exc:
                    log.warning("ledger checkpoint failed: %s", exc)
            if self._queue.empty():
                self._idle.set()

    async def _commit(self, batch: list[Write]) -> None:
        assert self._writer is not None
        grouped = _grouped(batch)
        if grouped:
            await self._writer.transaction(grouped)

    async def _write(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((sql, params, fut, None))
        await fut

    async def flush(self) -> None:
        while not self._queue.empty() or not self._idle.is_set():
            await self._idle.wait()
            await asyncio.sleep(0)
        self._journal.settle_all()

    # -- the request path --------------------------------------------------------------------
    async def begin(self, entry: LedgerEntry) -> None:
        entry.replica = self.replica
        row = _row(entry)
        writer = self._writer
        if writer is None or writer.closed:
            raise sqlite3.ProgrammingError("the ledger's write connection is closed")
        if self._journaling and self._healthy and self._queue.qsize() < _BACKLOG:
            seq = self._journal.append(row)  # durable against a crash from here on
            self._queue.put_nowait((_INSERT_PENDING, row, None, seq))
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((_INSERT_PENDING, row, fut, None))
        await fut

    def settle(self, entry: LedgerEntry) -> None:
        entry.replica = self.replica
        self._queue.put_nowait((_UPSERT, _row(entry), None, None))

    async def recover(self) -> int:
        """Settle what a crash left: journaled rows missing from the file and pending rows."""
        assert self._writer is not None
        await self.flush()
        segments = self._journal.leftovers()
        journaled = []
        for path in segments:
            for values in Journal.read(path):
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
        if self._task is None or self._task.done():
            return False
        try:
            await self._fetch("SELECT MAX(version) FROM schema_version")
        except Exception:
            return False
        return True

    async def spend_by_scope(self, period: str) -> dict[ScopeKey, int]:
        rows = await self._fetch(
            "SELECT tenant, agent, campaign, key_name, "
            "SUM(CASE WHEN state = 'pending' THEN reserved ELSE cost END) "
            "FROM requests WHERE period = ? GROUP BY tenant, agent, campaign, key_name",
            (period,),
        )
        return fold_spend([tuple(r) for r in rows])  # type: ignore[misc]

    async def usage(self, period: str, group_by: str, tenant: str | None = None) -> list[UsageRow]:
        if group_by not in GROUP_BY:
            raise ValueError(f"group_by must be one of {', '.join(GROUP_BY)}")
        column = "substr(ts, 1, 10)" if group_by == "day" else f"COALESCE({group_by}, '')"
        where, params = "period = ?", [period]
        if tenant is not None:
            where += " AND tenant = ?"
            params.append(tenant)
        rows = await self._fetch(
            f"SELECT {column} AS grp, COUNT(*), SUM(prompt_tokens), SUM(cached_tokens), "
            "SUM(completion_tokens), SUM(reasoning_tokens), "
            "SUM(CASE WHEN state = 'pending' THEN reserved ELSE cost END), SUM(override) "
            f"FROM requests WHERE {where} GROUP BY grp ORDER BY grp",
            tuple(params),
        )
        return [UsageRow(str(r[0]), *(int(v or 0) for v in tuple(r)[1:])) for r in rows]

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

    async def set_setting(self, key: str, value: str) -> None:
        await self._write(
            "INSERT INTO settings (key, value, updated_at) VALUES (?, ?, ?) ON CONFLICT (key) "
            "DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            (key, value, _ts(datetime.now(UTC))),
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

    async def set_cap(self, key: ScopeKey, limit: int | None) -> None:
        await self._write(
            "INSERT INTO budget_caps (scope, id, monthly, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (scope, id) DO UPDATE SET monthly = excluded.monthly, "
            "updated_at = excluded.updated_at",
            (key[0], key[1], limit, _ts(datetime.now(UTC))),
        )

    async def keys(self) -> list[KeyRecord]:
        rows = await self._fetch(
            "SELECT name, key_sha256, tenant, agent, can_override, created_at, revoked_at, "
            "prefix FROM api_keys ORDER BY created_at"
        )
        return [
            KeyRecord(r[0], r[1], r[2], r[3], bool(r[4]), _parse_ts(r[5]),  # type: ignore[arg-type]
                      _parse_ts(r[6]), r[7])
            for r in rows
        ]

    async def add_key(self, record: KeyRecord) -> None:
        await self._write(
            "INSERT INTO api_keys (name, key_sha256, tenant, agent, can_override, created_at, "
            "revoked_at, prefix) VALUES (?, ?, ?, ?, ?, ?, NULL, ?)",
            (record.name, record.key_sha256, record.tenant, record.agent,
             int(record.can_override), _ts(record.created_at), record.prefix),
        )

    async def revoke_key(self, name: str, when: datetime) -> bool:
        rows = await self._fetch(
            "SELECT 1 FROM api_keys WHERE name = ? AND revoked_at IS NULL", (name,)
        )
        if not rows:
            return False
        await self._write(
            "UPDATE api_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
            (_ts(when), name),
        )
        return True
