"""The audit key and the anchor, as ``costwall check --audit`` reads them.

Key: ``COSTWALL_AUDIT_KEY`` if set (its UTF-8 bytes). Otherwise, with SQLite, ``audit.key``
beside the database (32 random bytes as hex, created 0600 on first start); with PostgreSQL,
a secret generated on first start and stored in the database (``audit_secret``), shared by
every replica. Keeping the key out of the log directory is the point: whoever can edit the
files but not read the key cannot forge a line.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from gateway.audit import Anchor
from gateway.audit_verify import anchor_from
from gateway.store.urls import backend_of, sqlite_path

KEY_ENV = "COSTWALL_AUDIT_KEY"


def key_file(path: Path) -> bytes:
    """Read the key file, creating it (0600, never overwritten) if it does not exist."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes().strip()
        if len(key) < 16:
            raise ValueError(f"{path} holds no usable audit key (under 16 bytes)") from None
        return key
    key = secrets.token_hex(32).encode()
    try:
        os.write(fd, key + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


@dataclass(frozen=True, slots=True)
class AuditState:
    """What the database says about the trail: key (or None), anchor, events not in files."""

    key: bytes | None
    anchor: Anchor | None
    backlog: int
    problem: str | None = None


def read_state(database: str) -> AuditState:
    """Read the key and anchor for ``database`` without migrating or writing anything."""
    env = os.environ.get(KEY_ENV, "")
    env_key = env.encode() if env else None
    try:
        if backend_of(database) == "sqlite":
            return _sqlite(sqlite_path(database), env_key)
        return asyncio.run(_postgres(database, env_key))
    except Exception as exc:  # an unreachable database is a problem to report, not a crash
        return AuditState(env_key, None, 0, f"cannot read the audit anchor from the "
                                            f"database: {type(exc).__name__}: {exc}")


def _sqlite(path: Path, env_key: bytes | None) -> AuditState:
    if not path.exists():
        return AuditState(env_key, None, 0, f"the database {path} does not exist")
    key = env_key
    key_path = path.parent / "audit.key"
    if key is None and key_path.exists():
        key = key_path.read_bytes().strip()
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        conn.row_factory = sqlite3.Row
        has = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'audit_anchor'").fetchone()
        if not has:
            return AuditState(key, None, 0, "the database has no audit anchor yet (start "
                                            "costwall once to migrate it)")
        row = conn.execute("SELECT count, head, sizes, key_id FROM audit_anchor "
                           "WHERE trail = 'main'").fetchone()
        backlog = conn.execute("SELECT COUNT(*) FROM audit_events WHERE line IS NULL")
        count = int(backlog.fetchone()[0])
    finally:
        conn.close()
    return AuditState(key, anchor_from(dict(row)) if row else Anchor(), count)


async def _postgres(url: str, env_key: bytes | None) -> AuditState:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=10)
    try:
        row = await conn.fetchrow("SELECT count, head, sizes, key_id FROM audit_anchor "
                                  "WHERE trail = 'main'")
        backlog = int(await conn.fetchval(
            "SELECT COUNT(*) FROM audit_events WHERE line IS NULL"))
        key = env_key
        if key is None:
            stored = await conn.fetchval("SELECT secret FROM audit_secret WHERE id = 1")
            key = stored.encode() if stored else None
    finally:
        await conn.close()
    return AuditState(key, anchor_from(dict(row)) if row else Anchor(), backlog)
