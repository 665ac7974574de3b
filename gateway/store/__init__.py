"""Storage: the ledger's backends behind small interfaces, opened from the settings.

``open_store(settings)`` turns the ``database`` URL (``gateway.store.urls.backend_of``) into
a backend and wires it, through constructor arguments only: SQLite (``gateway.store.sqlite``,
the embedded default) with the in-memory budgets (``gateway.budget.BudgetEngine``), or PostgreSQL
(``gateway.store.postgres``, shared by replicas) with the shared budgets
(``gateway.store.pg_budgets.SharedBudgets``) whose mirror the ledger's writer reports to.
The interfaces are in ``gateway.store.interfaces``; docs/architecture.md says where a new
backend plugs in.

Backends are imported when opened, so importing this package needs no database driver.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from gateway.budget import Admission, BudgetEngine, Budgets, Crossing
from gateway.store.interfaces import AdminState, AuditQueue, Ledger, Reports, RequestLog
from gateway.store.urls import backend_of, sqlite_path

__all__ = ["Store", "backend_of", "open_ledger", "open_store"]

if TYPE_CHECKING:
    from gateway.config import Settings
    from gateway.services import Gateway

def open_ledger(url: str, *, synchronous: str = "NORMAL", pool_size: int = 10,
                reclaim_after_s: float = 10.0, heartbeat_s: float = 1.0) -> Ledger:
    """A ledger alone (tools, tests): ``synchronous`` applies to SQLite, the others to
    PostgreSQL (pool size, replica reclaim window, heartbeat)."""
    if backend_of(url) == "sqlite":
        from gateway.store.sqlite import SqliteLedger

        return SqliteLedger(sqlite_path(url), synchronous)
    from gateway.store.postgres import PostgresLedger

    return PostgresLedger(url, pool_size=pool_size, reclaim_after_s=reclaim_after_s,
                          heartbeat_s=heartbeat_s)


@dataclass(frozen=True, slots=True)
class Store:
    """An opened (not yet started) backend, seen through its parts, and its budgets.

    ``ledger`` is the whole backend; ``log``, ``admin``, ``reports`` and ``audit`` are the
    same object typed as the part each caller needs. ``follow`` starts the task that keeps a
    replica's copy of shared admin state current (None for a store nobody else writes).
    """

    ledger: Ledger
    budgets: Budgets
    follow: Callable[[Gateway], asyncio.Task[None]] | None = None

    @property
    def log(self) -> RequestLog:
        return self.ledger

    @property
    def admin(self) -> AdminState:
        return self.ledger

    @property
    def reports(self) -> Reports:
        return self.ledger

    @property
    def audit(self) -> AuditQueue:
        return self.ledger


def open_store(settings: Settings, clock: Callable[[], datetime] | None = None,
               on_crossings: Callable[[list[Crossing]], None] | None = None) -> Store:
    """The backend named by ``settings.database`` with its matching budgets.

    ``on_crossings`` receives warn crossings that the shared budgets learn of when the
    database confirms them (the local budgets return them from ``settle`` instead).
    """
    clock = clock or (lambda: datetime.now(UTC))
    b = settings.budgets
    policy = Admission(b.near_cap, b.min_output_tokens)
    if backend_of(settings.database) == "sqlite":
        from gateway.store.sqlite import SqliteLedger

        ledger = SqliteLedger(sqlite_path(settings.database), settings.db_synchronous)
        budgets = BudgetEngine(b.budget_limits(), b.tz, b.warn_at, ledger.spend_in,
                               policy.near_cap, policy.min_output_tokens, clock)
        return Store(ledger, budgets)
    from gateway.budget import Books
    from gateway.store import pg_sync
    from gateway.store.pg_budgets import Mirror, SharedBudgets
    from gateway.store.postgres import PostgresLedger

    # Replicas share one hard cap: admission happens in PostgreSQL. The mirror exists first,
    # so the ledger's writer can report every commit to it from its first transaction.
    mirror = Mirror(Books(b.budget_limits(), b.tz, b.warn_at, clock), on_crossings)
    pg = PostgresLedger(settings.database, pool_size=settings.db_pool_size,
                        reclaim_after_s=settings.db_reclaim_after_s, hook=mirror)
    return Store(pg, SharedBudgets(pg, mirror, policy), pg_sync.start)
