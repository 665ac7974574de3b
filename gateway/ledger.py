"""The ledger interface: one durable row per forwarded request, plus the small admin state.

Two backends implement ``Ledger``: ``gateway.ledger_sqlite`` (the embedded default) and
``gateway.ledger_pg`` (shared by several replicas). The request path only ever calls
``begin`` (a durable *pending* row at the reserved upper bound, before anything is forwarded)
and ``settle`` (the final row, written in the background). A crash between the two leaves a
pending row that ``recover`` settles at its reserved amount, so nothing that reached the
upstream is lost or under-counted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from gateway.budget import GLOBAL, ScopeKey

if TYPE_CHECKING:
    from gateway.audit import Anchor, AuditRow, PendingEvent

# invalid: the upstream reported a usage that cannot be real (gateway.usage); the request
# was charged by counting, or at its reserved bound when there was nothing to count.
USAGE_SOURCES = ("upstream", "counted", "reserved", "none", "invalid")
GROUP_BY = ("tenant", "agent", "campaign", "model", "day", "key_name", "task", "state")


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


class Ledger(Protocol):
    """Durable storage for requests, admin state and the spend that budgets start from."""

    replica: str

    async def start(self) -> None:
        """Open connections, migrate the schema, start the writer."""

    async def close(self) -> None:
        """Flush every queued write and close."""

    async def ping(self) -> bool:
        """True when the database answers (for /readyz)."""

    async def recover(self) -> int:
        """Settle pending rows left by a crash at their reserved upper bound; return the count."""

    async def begin(self, entry: LedgerEntry) -> None:
        """Durably record a pending entry; returns once it is committed."""

    def settle(self, entry: LedgerEntry) -> None:
        """Queue the final version of an entry (non-blocking; ``flush`` waits for it)."""

    async def flush(self) -> None:
        """Wait until every queued write is committed."""

    async def spend_by_scope(self, period: str) -> dict[ScopeKey, int]:
        """Spend per (scope, id) in a period; pending rows count at their reserved amount."""

    async def get_setting(self, key: str) -> str | None: ...

    async def set_setting(self, key: str, value: str, audit: AuditRow | None = None) -> None:
        """Store a setting; with ``audit``, in one transaction with that audit event."""

    async def add_setting(self, key: str, value: str) -> str:
        """Store ``value`` unless ``key`` has one; return the stored value (racers agree)."""

    async def caps(self) -> dict[ScopeKey, int | None]:
        """Caps set by admins, overriding config; None means the limit was removed."""

    async def set_cap(self, key: ScopeKey, limit: int | None,
                      audit: AuditRow | None = None) -> None: ...

    async def keys(self) -> list[KeyRecord]: ...

    async def add_key(self, record: KeyRecord, audit: AuditRow | None = None) -> None: ...

    async def revoke_key(self, name: str, when: datetime,
                         audit: AuditRow | None = None) -> bool: ...

    # The audit trail's durable queue and anchor (``gateway.audit.AuditStore``).
    def audit(self, row: AuditRow) -> None:
        """Queue an audit event (never waits, never raises)."""

    async def audit_secret(self) -> bytes:
        """The chain's key when ``COSTWALL_AUDIT_KEY`` is not set."""

    async def audit_lock(self) -> bool:
        """True while this process is the one that writes the audit files."""

    async def audit_pending(self, limit: int) -> tuple[Anchor, list[PendingEvent]]:
        """The anchor and the oldest ``limit`` events not yet in the files."""

    async def audit_advance(self, old: Anchor, new: Anchor,
                            written: list[tuple[int, int]]) -> None:
        """Mark (seq, line) pairs written and move the anchor from ``old`` to ``new``."""

    async def audit_backlog(self) -> int:
        """Events stored but not yet in the files."""

    async def overshoot(self, period: str) -> dict[ScopeKey, tuple[int, int]]:
        """Per (scope, id): pico-USD charged beyond reservations in a period, and how many
        requests did (only scopes that had any)."""

    async def usage(self, period: str, group_by: str, tenant: str | None = None) -> list[UsageRow]:
        """Settled totals of a period grouped by one of ``GROUP_BY``."""

    async def entries(self, period: str, tenant: str | None = None) -> list[LedgerEntry]:
        """Every entry of a period in time order (for CSV invoices)."""

    async def periods(self) -> list[str]:
        """Months that have entries, newest first."""

    async def count(self) -> int:
        """Number of rows (tests and health)."""


def fold_spend(rows: list[tuple[str, str, str | None, str, int]]) -> dict[ScopeKey, int]:
    """Turn (tenant, agent, campaign, key_name, cost) group sums into per-scope spend."""
    spend: dict[ScopeKey, int] = {}
    for tenant, agent, campaign, key_name, cost in rows:
        cost = int(cost or 0)
        for key in (GLOBAL, ("tenant", tenant), ("agent", agent), ("key", key_name)):
            spend[key] = spend.get(key, 0) + cost
        if campaign:
            spend[("campaign", campaign)] = spend.get(("campaign", campaign), 0) + cost
    return spend


def fold_overshoot(
    rows: list[tuple[str, str, str | None, str, int, int]]
) -> dict[ScopeKey, tuple[int, int]]:
    """Turn (tenant, agent, campaign, key_name, overshoot, count) groups into per-scope
    (overshoot, count), as ``fold_spend`` does for spend."""
    found: dict[ScopeKey, tuple[int, int]] = {}
    for tenant, agent, campaign, key_name, amount, count in rows:
        keys = [GLOBAL, ("tenant", tenant), ("agent", agent), ("key", key_name)]
        if campaign:
            keys.append(("campaign", campaign))
        for key in keys:
            total, n = found.get(key, (0, 0))
            found[key] = (total + int(amount or 0), n + int(count or 0))
    return found


def open_ledger(url: str, **options: Any) -> Ledger:
    """The backend for a ``database`` URL (``sqlite:///path`` or ``postgresql://...``)."""
    if url.startswith("sqlite:///"):
        from gateway.ledger_sqlite import SqliteLedger

        return SqliteLedger(url.removeprefix("sqlite:///"), **options)
    if url.startswith(("postgresql://", "postgres://")):
        from gateway.ledger_pg import PostgresLedger

        return PostgresLedger(url, **options)
    raise ValueError(f"unsupported database URL {url!r}")
