"""The SQL of the shared rate limiter (``gateway.store.pg_rates``), in one place.

``rate_windows``: one row per scope, id and kind (rpm, tpm; ``concurrent`` rows only serve as
the lock of a scope's slots) with ``gateway.ratelimit.Window``'s newest second and its 61
buckets. ``rate_inflight``: each replica's requests in flight per scope. Both UNLOGGED: rate
counts are worth a minute.
"""

from __future__ import annotations

SCHEMA_LOCK = 0x636F737472617465  # "costrate": one replica creates the tables at a time
SCHEMA = """
CREATE UNLOGGED TABLE IF NOT EXISTS rate_windows (
    scope TEXT NOT NULL, id TEXT NOT NULL, kind TEXT NOT NULL,
    head BIGINT NOT NULL DEFAULT 0, counts BIGINT[] NOT NULL DEFAULT '{}',
    PRIMARY KEY (scope, id, kind)
);
CREATE UNLOGGED TABLE IF NOT EXISTS rate_inflight (
    scope TEXT NOT NULL, id TEXT NOT NULL, replica TEXT NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (scope, id, replica)
);
"""
# Lock (and create) the rows of a batch in one order, so two replicas never deadlock.
LOCK = """
INSERT INTO rate_windows AS w (scope, id, kind)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) AS k(scope, id, kind) ORDER BY 1, 2, 3
ON CONFLICT (scope, id, kind) DO UPDATE SET head = w.head
RETURNING scope, id, kind, head, counts
"""
# The other replicas' requests in flight per scope (this replica's own count is in memory).
OTHERS = """
SELECT i.scope, i.id, sum(i.n) FROM rate_inflight i
JOIN unnest($2::text[], $3::text[]) AS k(scope, id) ON (i.scope, i.id) = (k.scope, k.id)
WHERE i.replica <> $1 GROUP BY i.scope, i.id
"""
# The batch's windows written back; counts as '{...}' text (unnest flattens 2-D arrays).
WRITE_WINDOWS = """
UPDATE rate_windows AS w SET head = v.head, counts = v.counts::bigint[]
FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[])
    AS v(scope, id, kind, head, counts)
WHERE (w.scope, w.id, w.kind) = (v.scope, v.id, v.kind)
"""
# This replica's requests in flight per scope, as absolute numbers (only it writes its rows).
WRITE_MINE = """
WITH v AS (SELECT * FROM unnest($2::text[], $3::text[], $4::int4[]) AS v(scope, id, n)),
gone AS (DELETE FROM rate_inflight i USING v
         WHERE v.n = 0 AND (i.scope, i.id, i.replica) = (v.scope, v.id, $1))
INSERT INTO rate_inflight (scope, id, replica, n) SELECT scope, id, $1, n FROM v WHERE n > 0
ON CONFLICT (scope, id, replica) DO UPDATE SET n = excluded.n
"""
# Slots held by replicas the ledger's heartbeat has not seen for ledger.reclaim_after_s.
SWEEP_DEAD = """
DELETE FROM rate_inflight i WHERE i.replica <> $1 AND NOT EXISTS (
    SELECT 1 FROM replicas r WHERE r.id = i.replica
    AND r.last_seen > now() - $2::float8 * interval '1 second')
"""
# Windows with nothing counted any more, lock rows of scopes with nothing in flight.
SWEEP_IDLE = """
DELETE FROM rate_windows w WHERE (w.kind <> 'concurrent' AND w.head < $1)
OR (w.kind = 'concurrent' AND NOT EXISTS (
    SELECT 1 FROM rate_inflight i WHERE (i.scope, i.id) = (w.scope, w.id)))
"""
