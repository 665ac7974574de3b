"""The ledger's records: one durable row per forwarded request, keys, usage report rows.

Plain data shared by both backends and their callers; the interfaces that store them are in
``gateway.store.interfaces`` (``RequestLog``, ``AdminState``, ``Reports``, ``AuditQueue``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from gateway.budget import ScopeKey, scopes_for

# invalid: the upstream reported a usage that cannot be real (gateway.usage); the request
# was charged by counting, or at its reserved bound when there was nothing to count.
USAGE_SOURCES = ("upstream", "counted", "reserved", "none", "invalid")
# Usage report groups and the ledger column each one reads ("day" is computed from ``ts``).
GROUP_COLUMNS = {"tenant": "tenant", "agent": "agent", "campaign": "campaign", "model": "model",
                 "day": "ts", "key_name": "key_name", "task": "task", "state": "state",
                 "user": "end_user", "provider": "provider"}
GROUP_BY = tuple(GROUP_COLUMNS)


@dataclass(slots=True)
class LedgerEntry:
    """One forwarded request. Money in integer pico-USD."""

    id: str
    ts: datetime
    period: str
    tenant: str
    key_name: str
    agent: str
    campaign: str | None
    task: str | None
    model: str
    endpoint: str
    stream: bool = False
    state: str = "pending"
    status: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    reserved: int = 0
    cost: int = 0
    usage_source: str = "none"
    override: bool = False
    override_reason: str | None = None
    latency_ms: int = 0
    replica: str = ""
    # pico-USD charged beyond ``reserved``: the upstream billed more than the admission bound
    # (0 for every request the bound held for). Flagged, never hidden.
    overshoot: int = 0
    # The end user the request was for (``X-Costwall-User``, else the body's ``user``): the
    # ``user`` scope. ``user`` is a reserved word in SQL, hence the column's name.
    end_user: str | None = None
    # The upstream (``upstreams[].name``) the request was sent to; "" before there were several.
    provider: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


COLUMNS = tuple(LedgerEntry.__dataclass_fields__)


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A virtual key created through the admin API (config keys are not stored)."""

    name: str
    key_sha256: str
    tenant: str
    agent: str
    can_override: bool
    created_at: datetime
    revoked_at: datetime | None = None
    prefix: str = ""
    agents: tuple[str, ...] = ()  # further agent types X-Costwall-Agent may name


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One group of a usage report."""

    group: str
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cost: int
    overrides: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def fold_spend(rows: list[tuple[str, str, str | None, str, str | None, int]]
               ) -> dict[ScopeKey, int]:
    """Turn (tenant, agent, campaign, key_name, end_user, cost) group sums into per-scope
    spend."""
    spend: dict[ScopeKey, int] = {}
    for tenant, agent, campaign, key_name, user, cost in rows:
        cost = int(cost or 0)
        for key in scopes_for(tenant, agent, campaign, key_name, user):
            spend[key] = spend.get(key, 0) + cost
    return spend


def fold_overshoot(
    rows: list[tuple[str, str, str | None, str, str | None, int, int]]
) -> dict[ScopeKey, tuple[int, int]]:
    """Turn (tenant, agent, campaign, key_name, end_user, overshoot, count) groups into
    per-scope (overshoot, count), as ``fold_spend`` does for spend."""
    found: dict[ScopeKey, tuple[int, int]] = {}
    for tenant, agent, campaign, key_name, user, amount, count in rows:
        for key in scopes_for(tenant, agent, campaign, key_name, user):
            total, n = found.get(key, (0, 0))
            found[key] = (total + int(amount or 0), n + int(count or 0))
    return found


def fold_caps(rows: Iterable[tuple[str, str, str, int | None]]
              ) -> dict[ScopeKey, dict[str, int | None]]:
    """(scope, id, window, limit) rows of admin caps, by scope (None: a cap removed)."""
    caps: dict[ScopeKey, dict[str, int | None]] = {}
    for scope, ident, window, limit in rows:
        caps.setdefault((scope, ident), {})[window] = None if limit is None else int(limit)
    return caps
