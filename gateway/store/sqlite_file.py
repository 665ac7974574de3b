"""The SQLite ledger's one write connection, in one dedicated thread, and its file checks."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from gateway.store.sqlite_sql import _RECOVER_JOURNALED, _RECOVER_PENDING, Batch

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
