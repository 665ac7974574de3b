"""The store's small interfaces: what each caller needs from the database, and no more.

Both backends (``gateway.store.sqlite`` and ``gateway.store.postgres``) implement all five;
each caller is typed against the part it uses, so a new backend (or a fake in a test) knows
exactly what it must provide, in the spirit of httpx's transports:

- ``RequestLog``: the request path (``gateway.proxy``). ``begin`` durably records a *pending*
  row at the reserved upper bound before anything is forwarded; ``settle`` queues the final
  row. A crash between the two leaves a pending row that ``recover`` settles at its reserved
  amount, so nothing that reached the upstream is lost or under-counted.
- ``AdminState``: settings, caps and keys; every change may carry the audit row that
  describes it, committed in the same transaction.
- ``Reports``: usage, entries, periods, overshoot and the spend budgets start from.
- ``AuditQueue``: the audit trail's durable queue and the anchor of its hash chain
  (``gateway.audit.AuditTrail``).
- ``Outbox``: the alerts' durable outbox (``gateway.alerts``), rows claimed with a lease.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from gateway.budget import Reservation, ScopeKey
from gateway.ledger import KeyRecord, LedgerEntry, UsageRow
from gateway.windows import Span

if TYPE_CHECKING:
    from gateway.audit import Anchor, AuditRow, PendingEvent


class Lifecycle(Protocol):
    replica: str

    async def start(self) -> None:
        """Open connections, migrate the schema, start the writer."""

    async def close(self) -> None:
        """Flush every queued write and close."""

    async def ping(self) -> bool:
        """True when the database answers and writes can land (for /readyz)."""

    async def recover(self) -> int:
        """Settle pending rows left by a crash at their reserved upper bound; return the count."""


class RequestLog(Protocol):
    """What the request path writes: one pending row, then its final version."""

    async def begin(self, entry: LedgerEntry, reservation: Reservation | None = None) -> None:
        """Durably record a pending entry (linked to ``reservation`` where the store holds
        reservations itself); returns once it is safe to forward."""

    def settle(self, entry: LedgerEntry) -> None:
        """Queue the final version of an entry (non-blocking; ``flush`` waits for it)."""

    async def flush(self) -> None:
        """Wait until every queued write is committed."""


class AdminState(Protocol):
    """Settings, caps and keys; each change optionally committed with its audit row."""

    async def get_setting(self, key: str) -> str | None: ...

    async def set_setting(self, key: str, value: str, audit: AuditRow | None = None) -> None:
        """Store a setting; with ``audit``, in one transaction with that audit event."""

    async def add_setting(self, key: str, value: str) -> str:
        """Store ``value`` unless ``key`` has one; return the stored value (racers agree)."""

    async def caps(self) -> dict[ScopeKey, dict[str, int | None]]:
        """Caps set by admins per scope and window, overriding config; None means the
        window's limit was removed."""

    async def set_caps(self, key: ScopeKey, changes: Mapping[str, int | None],
                       audit: AuditRow | None = None) -> None:
        """Store one scope's changed windows (``{"daily": limit or None}``) at once."""

    async def keys(self) -> list[KeyRecord]: ...

    async def add_key(self, record: KeyRecord, audit: AuditRow | None = None) -> None: ...

    async def revoke_key(self, name: str, when: datetime,
                         audit: AuditRow | None = None) -> bool: ...


class Reports(Protocol):
    """Read-only views of the ledger."""

    async def spend_by_scope(self, period: str) -> dict[ScopeKey, int]:
        """Spend per (scope, id) in a month; pending rows count at their reserved amount."""

    async def spend_in(self, span: Span) -> dict[ScopeKey, int]:
        """Spend per (scope, id) in one period of any window (rows admitted within it)."""

    async def latest_ts(self) -> datetime | None:
        """The newest request's admission instant (time never goes back before it)."""

    async def overshoot(self, period: str) -> dict[ScopeKey, tuple[int, int]]:
        """Per (scope, id): pico-USD charged beyond reservations in a period, and how many
        requests did (only scopes that had any)."""

    async def usage(self, period: str, group_by: str, tenant: str | None = None) -> list[UsageRow]:
        """Settled totals of a period grouped by one of ``gateway.ledger.GROUP_BY``."""

    async def entries(self, period: str, tenant: str | None = None) -> list[LedgerEntry]:
        """Every entry of a period in time order (for CSV invoices)."""

    async def periods(self) -> list[str]:
        """Months that have entries, newest first."""

    async def count(self) -> int:
        """Number of rows (tests and health)."""


class AuditQueue(Protocol):
    """The audit trail's durable queue and anchor (``gateway.audit.AuditStore``)."""

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

    async def flush(self) -> None: ...


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One alert for one channel (``gateway.alerts``). Times are Unix seconds; ``status`` is
    pending, sent or failed; ``attempts`` counts claims (a claim is an attempt begun)."""

    event_id: str
    channel: str
    type: str
    body: str
    created_at: float
    status: str = "pending"
    attempts: int = 0
    next_at: float = 0.0
    last_error: str | None = None
    sent_at: float | None = None


class Outbox(Protocol):
    """The alerts' durable outbox: stored before the first attempt, claimed with a lease so
    one replica sends each (event, channel)."""

    async def outbox_add(self, rows: list[OutboxRow]) -> None:
        """Store rows; an (event id, channel) already stored is left as it is."""

    async def outbox_claim(self, now: float, lease_s: float, limit: int,
                           channel: str | None = None) -> list[OutboxRow]:
        """Take up to ``limit`` due pending rows (of ``channel``, or any) whose lease expired,
        lease them until ``now + lease_s`` and count the attempt."""

    async def outbox_abandon(self, keep: tuple[str, ...], error: str) -> int:
        """Mark failed the pending rows of every channel not in ``keep``; return how many."""

    async def outbox_finish(self, event_id: str, channel: str, status: str, next_at: float,
                            error: str | None, now: float) -> None:
        """Record an attempt's outcome (sent, failed, or pending again at ``next_at``)."""

    async def outbox_list(self, limit: int) -> list[OutboxRow]:
        """The most recent rows, newest first."""


class Ledger(Lifecycle, RequestLog, AdminState, Reports, AuditQueue, Outbox, Protocol):
    """A whole backend: every part above (what ``open_store`` opens)."""
