"""The SQLite ledger's schema and statements, and the row <-> ``LedgerEntry`` conversions.

Migrations are numbered by their position: append one entry, never edit a released one.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime
from typing import Any

import aiosqlite

from gateway.ledger import COLUMNS, LedgerEntry

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
    # 5: the alerts' durable outbox, one row per (event, channel) (gateway.alerts)
    """
    CREATE TABLE alert_outbox (
        event_id TEXT NOT NULL, channel TEXT NOT NULL, type TEXT NOT NULL, body TEXT NOT NULL,
        created_at REAL NOT NULL, status TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0, next_at REAL NOT NULL DEFAULT 0,
        lease_until REAL NOT NULL DEFAULT 0, last_error TEXT, sent_at REAL,
        PRIMARY KEY (event_id, channel)
    );
    CREATE INDEX alert_outbox_due ON alert_outbox (next_at) WHERE status = 'pending';
    CREATE INDEX alert_outbox_recent ON alert_outbox (created_at);
    """,
    # 6: the end user a request was for (the ``user`` scope) and the upstream it went to
    """
    ALTER TABLE requests ADD COLUMN end_user TEXT;
    ALTER TABLE requests ADD COLUMN provider TEXT NOT NULL DEFAULT '';
    """,
    # 7: caps set by admins per budget window (amount NULL: a configured cap removed); the
    # monthly caps of budget_caps move here
    """
    CREATE TABLE budget_windows (
        scope TEXT NOT NULL, id TEXT NOT NULL, time_window TEXT NOT NULL, amount INTEGER,
        updated_at TEXT NOT NULL, PRIMARY KEY (scope, id, time_window)
    );
    INSERT INTO budget_windows SELECT scope, id, 'monthly', monthly, updated_at FROM budget_caps;
    DROP TABLE budget_caps;
    CREATE INDEX requests_ts ON requests (ts);
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
