"""The shared budget engine with two replicas in one process, on one PostgreSQL database.

Fast, deterministic checks of what ``tests/test_replicas.py`` shows with real processes:
no overshoot across replicas, crash reclaim, caps another replica added, crossings reported
once, and a slow replica's late settlement never counted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from gateway.budget import GLOBAL, Admission, Books, Crossing, Reservation, ScopeKey, scopes_for
from gateway.errors import BudgetExceeded
from gateway.ledger import LedgerEntry
from gateway.store.pg_budgets import Mirror, SharedBudgets
from gateway.store.postgres import PostgresLedger
from tests import pg

NOW = datetime(2026, 11, 15, 12, tzinfo=UTC)
PERIOD = "2026-11"
UNIT = 1_000_000  # pico-USD per request in these tests
RECLAIM_S = 1.0
Replica = Callable[..., Awaitable[SharedBudgets]]


@pytest.fixture
async def replica() -> AsyncIterator[Replica]:
    """``await replica(limits)``: a started engine + ledger on the test's database."""
    pg.require()
    url = await pg.create_database()
    made: list[SharedBudgets] = []

    async def make(limits: dict[ScopeKey, int], warn_at: tuple[str, ...] = ("0.8",),
                   on_crossings: Callable[[list[Crossing]], None] | None = None
                   ) -> SharedBudgets:
        # Wired as gateway.store.open_store does: mirror, ledger reporting to it, budgets.
        mirror = Mirror(Books(limits, ZoneInfo("UTC"), [Decimal(w) for w in warn_at],
                              lambda: NOW), on_crossings)
        ledger = PostgresLedger(url, pool_size=2, reclaim_after_s=RECLAIM_S, heartbeat_s=0.2,
                                hook=mirror)
        await ledger.start()
        engine = SharedBudgets(ledger, mirror, Admission())
        await engine.book()
        made.append(engine)
        return engine

    try:
        yield make
    finally:
        for engine in made:
            await engine.ledger.close()
        await pg.drop_database(url)


def entry(n: int, reservation: Reservation, tenant: str = "acme") -> LedgerEntry:
    return LedgerEntry(id=f"cw-{n:05d}", ts=NOW, period=PERIOD, tenant=tenant,
                       key_name=f"{tenant}-key", agent="content", campaign=None, task=None,
                       model="gpt-4o-mini", endpoint="chat", reserved=reservation.amount)


async def request(engine: SharedBudgets, n: int, cost: int, tenant: str = "acme",
                  campaign: str | None = None, hold: float = 0.0) -> bool:
    """The request path's calls in its order: reserve, begin, (forward), settle."""
    try:
        res = await engine.reserve(scopes_for(tenant, "content", campaign, f"{tenant}-key"),
                                   UNIT)
    except BudgetExceeded:
        return False
    e = entry(n, res, tenant)
    await engine.ledger.begin(e, res)
    await asyncio.sleep(hold)
    engine.settle(res, cost)
    engine.ledger.settle(replace(e, state="settled", status=200, cost=cost,
                                 usage_source="upstream"))
    return True


async def usage(*engines: SharedBudgets) -> dict[ScopeKey, tuple[int, int]]:
    """The budget rows once every replica's queued writes are committed."""
    for engine in engines:
        await engine.ledger.flush()
    return await engines[0].ledger.usage_rows(PERIOD)


async def reclaimed(engine: SharedBudgets, dead: SharedBudgets,
                    timeout: float = 5.0) -> None:
    """Wait until ``dead`` was reclaimed (by any live replica's housekeeping)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while await engine.ledger.pool.fetchval("SELECT 1 FROM replicas WHERE id = $1",
                                            dead.replica):
        assert asyncio.get_running_loop().time() < deadline, "never reclaimed"
        await asyncio.sleep(0.1)


async def crash(engine: SharedBudgets) -> None:
    """Stop the replica's heartbeat as a kill -9 would; its rows stay as they are."""
    task = engine.ledger._housekeeping
    assert task is not None
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    engine.ledger._housekeeping = None


async def test_two_replicas_never_overshoot(replica: Replica) -> None:
    limits = {GLOBAL: 50 * UNIT, ("tenant", "acme"): 40 * UNIT,
              ("campaign", "spring"): 15 * UNIT}
    a, b = await replica(limits), await replica(limits)
    tenants = ["acme", "globex"]
    results = await asyncio.gather(*(
        request(engine, n, UNIT, tenants[n % 2], "spring" if n % 3 == 0 else None, hold=0.01)
        for n in range(300) for engine in [(a, b)[n % 2]]))
    granted = sum(results)
    rows = await usage(a, b)
    assert granted == 50, "the global cap fits exactly 50 requests"
    assert rows[GLOBAL] == (50 * UNIT, 0)
    assert rows[("tenant", "acme")][0] <= 40 * UNIT
    assert rows[("campaign", "spring")][0] <= 15 * UNIT
    assert sum(r.cost for r in await a.ledger.entries(PERIOD)) == 50 * UNIT
    # Both mirrors agree with the database once refreshed.
    for engine in (a, b):
        await engine.refresh()
        [status] = [s for s in engine.status() if (s.scope, s.id) == GLOBAL]
        assert (status.spent, status.reserved) == (50 * UNIT, 0)
    with pytest.raises(BudgetExceeded) as info:
        await b.reserve([GLOBAL], 1)
    assert (info.value.spent, info.value.limit) == (50 * UNIT, 50 * UNIT)


async def test_dead_replica_is_reclaimed_at_reserved_cost(replica: Replica) -> None:
    limits = {GLOBAL: 10 * UNIT}
    a, b = await replica(limits), await replica(limits)
    forwarded = []
    for n in range(2):  # reached the upstream: pending rows exist
        res = await a.reserve([GLOBAL], UNIT)
        await a.ledger.begin(entry(n, res), res)
        forwarded.append(res)
    await a.reserve([GLOBAL], UNIT)  # reserved, crashed before its pending row
    done = await a.reserve([GLOBAL], UNIT)  # settled normally before the crash
    await a.ledger.begin(entry(9, done), done)
    a.settle(done, UNIT // 4)
    a.ledger.settle(replace(entry(9, done), state="settled", cost=UNIT // 4))
    await a.ledger.flush()
    assert (await usage(b))[GLOBAL] == (UNIT // 4, 3 * UNIT)
    await crash(a)
    assert await b.ledger.reclaim() == 0, "not yet: a replica may be silent for a while"
    assert await b.ledger.dead_replicas() == []
    await reclaimed(b, a)
    assert (await usage(b))[GLOBAL] == (2 * UNIT + UNIT // 4, 0)
    rows = {r.id: r for r in await b.ledger.entries(PERIOD)}
    assert [(rows[f"cw-{n:05d}"].cost, rows[f"cw-{n:05d}"].usage_source) for n in range(2)] \
        == [(UNIT, "reserved")] * 2
    assert await b.ledger.reclaim() == 0
    # What was released is usable again; the mirror followed the reclaim.
    assert b.status()[0].spent == 2 * UNIT + UNIT // 4 and b.status()[0].reserved == 0
    await b.reserve([GLOBAL], 7 * UNIT)


async def test_late_settlement_of_a_reclaimed_reservation_is_not_counted_twice(
        replica: Replica) -> None:
    a, b = await replica({GLOBAL: 10 * UNIT}), await replica({GLOBAL: 10 * UNIT})
    res = await a.reserve([GLOBAL], UNIT)
    await a.ledger.begin(entry(1, res), res)
    await crash(a)  # a stalls (not dead): b reclaims it
    await reclaimed(b, a)
    assert [r.cost for r in await b.ledger.entries(PERIOD)] == [UNIT]
    a.settle(res, UNIT // 10)  # ... and then a wakes up and settles
    a.ledger.settle(replace(entry(1, res), state="settled", cost=UNIT // 10))
    assert (await usage(a))[GLOBAL] == (UNIT, 0), "charged once, at the reserved bound"


async def test_a_cap_added_on_one_replica_counts_the_others_at_once(replica: Replica) -> None:
    a, b = await replica({GLOBAL: 100 * UNIT}), await replica({GLOBAL: 100 * UNIT})
    assert await request(b, 1, UNIT, "acme")  # spent before the cap existed
    await b.ledger.flush()
    await a.set_limit(("tenant", "acme"), 3 * UNIT)  # b has not heard of it yet
    assert ("tenant", "acme") not in b.limits
    assert await request(b, 2, UNIT, "acme")
    assert (await usage(a, b))[("tenant", "acme")] == (2 * UNIT, 0)
    assert await request(a, 3, UNIT, "acme")
    assert not await request(a, 4, UNIT, "acme"), "3 spent of 3"


async def test_warn_crossing_is_reported_once_across_replicas(replica: Replica) -> None:
    limits = {GLOBAL: 20 * UNIT}
    seen: list[tuple[str, Crossing]] = []
    a = await replica(limits, ("0.5", "0.9"), lambda cs: seen.extend(("a", c) for c in cs))
    b = await replica(limits, ("0.5", "0.9"), lambda cs: seen.extend(("b", c) for c in cs))
    await asyncio.gather(*(request((a, b)[n % 2], n, UNIT) for n in range(20)))
    await a.ledger.flush()
    await b.ledger.flush()
    assert sorted(c.threshold for _, c in seen) == [Decimal("0.5"), Decimal("0.9")]
    assert all((c.scope, c.id, c.period) == ("global", "global", PERIOD) for _, c in seen)


async def test_limit_removed_and_restored_keeps_an_exact_count(replica: Replica) -> None:
    a = await replica({GLOBAL: 100 * UNIT, ("tenant", "acme"): 5 * UNIT})
    assert await request(a, 1, UNIT)
    await a.set_limit(("tenant", "acme"), None)
    assert await request(a, 2, UNIT)  # unlimited now, but still counted
    await a.set_limit(("tenant", "acme"), 5 * UNIT)
    assert (await usage(a))[("tenant", "acme")] == (2 * UNIT, 0)
    assert [s.spent for s in a.status() if s.id == "acme"] == [2 * UNIT]


async def test_connections_lost_and_back(replica: Replica,
                                         caplog: pytest.LogCaptureFixture) -> None:
    a = await replica({GLOBAL: 10 * UNIT})
    assert await request(a, 1, UNIT)
    await a.ledger.flush()
    async with a.ledger.pool.acquire() as conn:  # the server drops every other connection
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    assert await request(a, 2, UNIT), "the writer reconnects and carries on"
    # asyncpg names the loss differently depending on timing (InterfaceError,
    # InternalClientError, ConnectionDoesNotExistError...): what matters is the retry.
    assert re.search(r"ledger writer: \w+; retrying", caplog.text)
    assert await request(a, 3, UNIT)
    assert (await usage(a))[GLOBAL] == (3 * UNIT, 0)
    assert len(await a.ledger.entries(PERIOD)) == 3
