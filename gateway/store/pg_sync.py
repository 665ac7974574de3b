"""Keep a replica's copy of shared admin state current (PostgreSQL only).

Admin changes made on any replica are written to the database, which also sends
``NOTIFY costwall_changes`` with what changed (``gateway.store.postgres``). Every replica listens
on its own connection and reloads at once: the global override switch, caps (into the budget
engine) and virtual keys. After a (re)connect everything is reloaded, so a notification lost
while the connection was down is never missed. The same loop refreshes the budget mirror
twice a second so headers, status and metrics show the other replicas' spend.

Reloading changes no audit trail: the replica where the admin acted already logged it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import asyncpg

from gateway.budget import apply_caps
from gateway.services import OVERRIDE_SETTING, Gateway, OverrideState
from gateway.store.pg_budgets import SharedBudgets
from gateway.store.postgres import CHANNEL, PostgresLedger

log = logging.getLogger("costwall.sync")

ALL = frozenset({"override", "caps", "keys"})


def kind_of(payload: str) -> str | None:
    """Notification payload -> what to reload."""
    if payload == f"setting:{OVERRIDE_SETTING}":
        return "override"
    return payload if payload in ALL else None


async def reload(gw: Gateway, kinds: set[str] | frozenset[str]) -> None:
    """Load the shared state named by ``kinds`` from the database into this replica."""
    if "override" in kinds:
        stored = await gw.ledger.get_setting(OVERRIDE_SETTING)
        if stored is not None:
            gw.overrides.state = OverrideState.from_json(stored)
    if "caps" in kinds:
        await apply_caps(gw.budgets, gw.settings.budgets.budget_limits(),
                         await gw.ledger.caps())
    if "keys" in kinds:
        gw.keys.reload(await gw.ledger.keys())


class ChangeFeed:
    """LISTEN for admin changes and refresh the budget mirror; one task per replica."""

    def __init__(self, gw: Gateway, refresh_s: float = 0.5):
        self.gw = gw
        self.refresh_s = refresh_s
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        kind = kind_of(payload)
        if kind is not None:
            self._dirty.add(kind)
            self._wake.set()

    async def run(self) -> None:
        ledger = self.gw.ledger
        assert isinstance(ledger, PostgresLedger)
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(ledger.url)
                await conn.add_listener(CHANNEL, self._notified)
                await reload(self.gw, ALL)  # whatever changed while we were not listening
                while not conn.is_closed():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.refresh_s)
                    self._wake.clear()
                    if self._dirty:
                        kinds, self._dirty = self._dirty, set()
                        await reload(self.gw, kinds)
                    if isinstance(self.gw.budgets, SharedBudgets):
                        await self.gw.budgets.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("change feed interrupted (%s); reconnecting", exc)
                await asyncio.sleep(1)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()


def start(gw: Gateway) -> asyncio.Task[None]:
    return asyncio.create_task(ChangeFeed(gw).run(), name="costwall-change-feed")
