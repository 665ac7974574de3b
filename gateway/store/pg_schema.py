"""PostgreSQL schema: versioned migrations, applied under an advisory lock.

Several replicas may start at the same moment against a fresh database; the transaction-level
advisory lock makes the second one wait and then find the schema current, instead of both
racing to create the same tables. Each migration is one script, applied once, in order, with
its number recorded in ``schema_version``.

Money is integer pico-USD: ``BIGINT`` per request (a single request never costs $9 million),
``NUMERIC(38,0)`` for per-scope monthly totals, which are sums.
"""

from __future__ import annotations

import asyncpg

# Any constant works; it only has to be the same for every costwall replica.
MIGRATION_LOCK = 0x636F737477616C6C  # "costwall"

MIGRATIONS: list[str] = [
    # 1: the request ledger, admin state, shared budgets, reservations and replicas
    """
    CREATE TABLE requests (
        id TEXT PRIMARY KEY, ts TIMESTAMPTZ NOT NULL, period TEXT NOT NULL,
        tenant TEXT NOT NULL, key_name TEXT NOT NULL, agent TEXT NOT NULL, campaign TEXT,
        task TEXT, model TEXT NOT NULL, endpoint TEXT NOT NULL, stream BOOLEAN NOT NULL,
        state TEXT NOT NULL, status INTEGER NOT NULL,
        prompt_tokens BIGINT NOT NULL, cached_tokens BIGINT NOT NULL,
        completion_tokens BIGINT NOT NULL, reasoning_tokens BIGINT NOT NULL,
        reserved BIGINT NOT NULL, cost BIGINT NOT NULL, usage_source TEXT NOT NULL,
        override BOOLEAN NOT NULL, override_reason TEXT, latency_ms INTEGER NOT NULL,
        replica TEXT NOT NULL
    );
    CREATE INDEX requests_period_ts ON requests (period, ts);
    CREATE INDEX requests_pending ON requests (replica) WHERE state = 'pending';
    CREATE TABLE settings (
        key TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at TIMESTAMPTZ NOT NULL
    );
    CREATE TABLE budget_caps (
        scope TEXT NOT NULL, id TEXT NOT NULL, monthly BIGINT, updated_at TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (scope, id)
    );
    CREATE TABLE api_keys (
        name TEXT PRIMARY KEY, key_sha256 TEXT NOT NULL UNIQUE, tenant TEXT NOT NULL,
        agent TEXT NOT NULL, can_override BOOLEAN NOT NULL, created_at TIMESTAMPTZ NOT NULL,
        revoked_at TIMESTAMPTZ, prefix TEXT NOT NULL
    );
    -- Spend and open reservations of every limited scope per month: the rows that admission
    -- locks and conditionally updates. Only limited scopes have rows.
    CREATE TABLE budget_usage (
        period TEXT NOT NULL, scope TEXT NOT NULL, id TEXT NOT NULL,
        spent NUMERIC(38, 0) NOT NULL DEFAULT 0, reserved NUMERIC(38, 0) NOT NULL DEFAULT 0,
        updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (period, scope, id)
    );
    -- One row per open reservation, so that a replica's crash never leaves budget stuck:
    -- request_id is set in the transaction that writes the request's pending ledger row.
    CREATE TABLE reservations (
        id TEXT PRIMARY KEY, replica TEXT NOT NULL, period TEXT NOT NULL,
        scopes JSONB NOT NULL, amount BIGINT NOT NULL, request_id TEXT,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    CREATE INDEX reservations_replica ON reservations (replica);
    CREATE TABLE replicas (
        id TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL,
        started_at TIMESTAMPTZ NOT NULL, last_seen TIMESTAMPTZ NOT NULL
    );
    -- Warn-threshold crossings: the first replica to insert one audit-logs it.
    CREATE TABLE budget_crossings (
        period TEXT NOT NULL, scope TEXT NOT NULL, id TEXT NOT NULL, threshold TEXT NOT NULL,
        replica TEXT NOT NULL, at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (period, scope, id, threshold)
    );
    """,
    # 2: the further agent types a key may name in X-Costwall-Agent
    """
    ALTER TABLE api_keys ADD COLUMN agents TEXT[] NOT NULL DEFAULT '{}';
    """,
    # 3: the audit trail's durable queue (line NULL: not yet in the files), the anchor of its
    # hash chain, and the chain's key when COSTWALL_AUDIT_KEY is not set (gateway.audit).
    # ``data`` is TEXT, not JSONB: the files are rendered from these exact bytes.
    """
    CREATE TABLE audit_events (
        seq BIGSERIAL PRIMARY KEY, ts TEXT NOT NULL, kind TEXT NOT NULL, data TEXT NOT NULL,
        replica TEXT NOT NULL, line BIGINT
    );
    CREATE INDEX audit_events_backlog ON audit_events (seq) WHERE line IS NULL;
    CREATE TABLE audit_anchor (
        trail TEXT PRIMARY KEY, count BIGINT NOT NULL, head TEXT NOT NULL, sizes TEXT NOT NULL,
        key_id TEXT NOT NULL, updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    INSERT INTO audit_anchor (trail, count, head, sizes, key_id) VALUES ('main', 0,
        '0000000000000000000000000000000000000000000000000000000000000000', '{}', '');
    CREATE TABLE audit_secret (id INTEGER PRIMARY KEY CHECK (id = 1), secret TEXT NOT NULL);
    """,
    # 4: what a request was charged beyond its reservation (an upstream billed past the bound)
    """
    ALTER TABLE requests ADD COLUMN overshoot BIGINT NOT NULL DEFAULT 0;
    CREATE INDEX requests_overshoot ON requests (period) WHERE overshoot > 0;
    """,
    # 5: the alerts' durable outbox, one row per (event, channel) (gateway.alerts)
    """
    CREATE TABLE alert_outbox (
        event_id TEXT NOT NULL, channel TEXT NOT NULL, type TEXT NOT NULL, body TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL, status TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0, next_at DOUBLE PRECISION NOT NULL DEFAULT 0,
        lease_until DOUBLE PRECISION NOT NULL DEFAULT 0, last_error TEXT,
        sent_at DOUBLE PRECISION, PRIMARY KEY (event_id, channel)
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
    # monthly caps of budget_caps move here. budget_usage rows are keyed by any window's
    # period id from now on (gateway.windows), reservations.scopes holds [period, scope, id].
    """
    CREATE TABLE budget_windows (
        scope TEXT NOT NULL, id TEXT NOT NULL, time_window TEXT NOT NULL, amount BIGINT,
        updated_at TIMESTAMPTZ NOT NULL, PRIMARY KEY (scope, id, time_window)
    );
    INSERT INTO budget_windows SELECT scope, id, 'monthly', monthly, updated_at FROM budget_caps;
    DROP TABLE budget_caps;
    CREATE INDEX requests_ts ON requests (ts);
    """,
]


async def migrate(conn: asyncpg.Connection) -> int:
    """Bring the schema to the newest version; return how many migrations ran."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            "version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        current: int = await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version")
        if current > len(MIGRATIONS):
            raise RuntimeError(f"database schema version {current} is newer than this "
                               f"costwall ({len(MIGRATIONS)}); upgrade costwall")
        for version, script in enumerate(MIGRATIONS[current:], start=current + 1):
            await conn.execute(script)
            await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", version)
        return len(MIGRATIONS) - current
