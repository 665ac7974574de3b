"""One contract for ``gateway.ledger.Ledger``, run against both backends.

SQLite (a temp file) and PostgreSQL (a fresh database per test) must give the same answers
to the same calls: durable pending rows, settlement, crash recovery at the reserved amount,
spend per scope, usage reports, entry order, periods and the admin state.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.budget import GLOBAL
from gateway.ledger import KeyRecord, LedgerEntry
from gateway.store import open_ledger
from gateway.store.interfaces import Ledger
from tests import pg

T0 = datetime(2026, 11, 3, 9, 30, tzinfo=UTC)
RECLAIM_S = 1.0  # PostgreSQL: how long a replica may be silent before it is presumed dead


def entry(n: int, **fields: Any) -> LedgerEntry:
    base: dict[str, Any] = {
        "id": f"cw-{n:04d}", "ts": T0 + timedelta(minutes=n), "period": "2026-11",
        "tenant": "acme", "key_name": "acme-content", "agent": "content", "campaign": None,
        "task": None, "model": "gpt-4o-mini", "endpoint": "chat", "reserved": 10_000,
    }
    base.update(fields)
    return LedgerEntry(**base)


def settled(e: LedgerEntry, cost: int, **fields: Any) -> LedgerEntry:
    return replace(e, state="settled", status=200, cost=cost, usage_source="upstream",
                   prompt_tokens=10, completion_tokens=5, latency_ms=12, **fields)


class Backend:
    """Opens ledgers of one kind on one store; knows how to make one of them 'crash'."""

    def __init__(self, kind: str, url: str):
        self.kind, self.url = kind, url
        self.opened: list[Ledger] = []

    async def open(self) -> Ledger:
        ledger = open_ledger(self.url, pool_size=3, reclaim_after_s=RECLAIM_S,
                             heartbeat_s=0.2)
        await ledger.start()
        self.opened.append(ledger)
        return ledger

    async def crash(self, ledger: Ledger) -> None:
        """As if the process died now: its rows stay as they are, its heartbeat stops."""
        if self.kind == "postgres":
            task = ledger._housekeeping  # type: ignore[attr-defined]
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            ledger._housekeeping = None  # type: ignore[attr-defined]
            await asyncio.sleep(RECLAIM_S + 0.3)

    async def close(self) -> None:
        for ledger in reversed(self.opened):
            await ledger.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        b = Backend("sqlite", f"sqlite:///{tmp_path / 'ledger.db'}")
        yield b
        await b.close()
        return
    pg.require()
    url = await pg.create_database()
    b = Backend("postgres", url)
    try:
        yield b
        await b.close()
    finally:
        await pg.drop_database(url)


async def test_begin_is_durable_and_settle_replaces_the_row(backend: Backend) -> None:
    ledger = await backend.open()
    assert await ledger.ping()
    e = entry(1, campaign="spring", task="t-1", stream=True, override=True,
              override_reason="incident 4711")
    await ledger.begin(e)
    [pending] = await ledger.entries("2026-11")
    assert (pending.state, pending.cost, pending.reserved) == ("pending", 0, 10_000)
    assert pending.replica == ledger.replica and pending.ts == e.ts
    ledger.settle(settled(e, 4_321, cached_tokens=2, reasoning_tokens=1))
    await ledger.flush()
    [row] = await ledger.entries("2026-11")
    assert row.as_dict() == settled(e, 4_321, cached_tokens=2, reasoning_tokens=1,
                                    replica=ledger.replica).as_dict()
    assert await ledger.count() == 1


async def test_begin_twice_keeps_one_row(backend: Backend) -> None:
    ledger = await backend.open()
    await ledger.begin(entry(1))
    await ledger.begin(entry(1, reserved=99))
    [row] = await ledger.entries("2026-11")
    assert row.reserved == 10_000


async def test_concurrent_begins_are_all_durable(backend: Backend) -> None:
    ledger = await backend.open()
    await asyncio.gather(*(ledger.begin(entry(n)) for n in range(300)))
    assert await ledger.count() == 300
    for n in range(300):
        ledger.settle(settled(entry(n), n))
    await ledger.flush()
    rows = await ledger.entries("2026-11")
    assert [r.cost for r in rows] == list(range(300))
    assert {r.state for r in rows} == {"settled"}


async def test_recover_settles_a_crash_at_the_reserved_amount(backend: Backend) -> None:
    first = await backend.open()
    await first.begin(entry(1, reserved=5_000))
    await first.begin(entry(2, reserved=7_000))
    first.settle(settled(entry(2, reserved=7_000), 300))
    await first.flush()
    await backend.crash(first)
    second = await backend.open()
    assert await second.recover() == 1
    rows = {r.id: r for r in await second.entries("2026-11")}
    assert (rows["cw-0001"].state, rows["cw-0001"].cost,
            rows["cw-0001"].usage_source) == ("settled", 5_000, "reserved")
    assert (rows["cw-0002"].cost, rows["cw-0002"].usage_source) == (300, "upstream")
    assert await second.recover() == 0


async def test_spend_by_scope_counts_pending_at_reserved(backend: Backend) -> None:
    ledger = await backend.open()
    await ledger.begin(entry(1, reserved=1_000))  # pending: counts 1000
    e2 = entry(2, campaign="spring", tenant="globex", key_name="globex", agent="research")
    await ledger.begin(e2)
    ledger.settle(settled(e2, 250))
    e3 = entry(3)
    await ledger.begin(e3)
    ledger.settle(settled(e3, 40))
    await ledger.begin(entry(4, period="2026-10", ts=T0 - timedelta(days=20)))
    await ledger.flush()
    spend = await ledger.spend_by_scope("2026-11")
    assert spend == {
        GLOBAL: 1_290, ("tenant", "acme"): 1_040, ("tenant", "globex"): 250,
        ("agent", "content"): 1_040, ("agent", "research"): 250,
        ("key", "acme-content"): 1_040, ("key", "globex"): 250, ("campaign", "spring"): 250,
    }
    assert await ledger.spend_by_scope("2026-12") == {}


async def _usage_fixture(ledger: Ledger) -> None:
    rows = [
        settled(entry(1, campaign="spring"), 100),
        settled(entry(2, model="gpt-4o", agent="ops", key_name="acme-ops",
                      ts=T0 + timedelta(days=1)), 200, override=True, override_reason="x"),
        settled(entry(3, tenant="globex", key_name="globex", agent="research",
                      task="t-9", ts=T0 + timedelta(days=1, hours=3)), 300),
    ]
    for r in rows:
        await ledger.begin(replace(r, state="pending", cost=0))
        ledger.settle(r)
    await ledger.begin(entry(4, ts=T0 + timedelta(days=2)))  # pending, counts at reserved
    await ledger.flush()


@pytest.mark.parametrize(("group_by", "expected"), [
    ("tenant", [("acme", 3, 10_300, 1), ("globex", 1, 300, 0)]),
    ("agent", [("content", 2, 10_100, 0), ("ops", 1, 200, 1), ("research", 1, 300, 0)]),
    ("campaign", [("", 3, 10_500, 1), ("spring", 1, 100, 0)]),
    ("model", [("gpt-4o", 1, 200, 1), ("gpt-4o-mini", 3, 10_400, 0)]),
    ("day", [("2026-11-03", 1, 100, 0), ("2026-11-04", 2, 500, 1), ("2026-11-05", 1, 10_000, 0)]),
    ("key_name", [("acme-content", 2, 10_100, 0), ("acme-ops", 1, 200, 1), ("globex", 1, 300, 0)]),
    ("task", [("", 3, 10_300, 1), ("t-9", 1, 300, 0)]),
    ("state", [("pending", 1, 10_000, 0), ("settled", 3, 600, 1)]),  # in flight apart
])
async def test_usage_groups(backend: Backend, group_by: str,
                            expected: list[tuple[str, int, int, int]]) -> None:
    ledger = await backend.open()
    await _usage_fixture(ledger)
    rows = await ledger.usage("2026-11", group_by)
    assert [(r.group, r.requests, r.cost, r.overrides) for r in rows] == expected
    settled_tokens = sum(r.prompt_tokens for r in rows)
    assert settled_tokens == 30  # three settled rows of 10 prompt tokens; pending has none


async def test_usage_filters_by_tenant_and_rejects_unknown_groups(backend: Backend) -> None:
    ledger = await backend.open()
    await _usage_fixture(ledger)
    rows = await ledger.usage("2026-11", "model", tenant="globex")
    assert [(r.group, r.cost) for r in rows] == [("gpt-4o-mini", 300)]
    with pytest.raises(ValueError):
        await ledger.usage("2026-11", "prompt; DROP TABLE requests")


async def test_entries_order_tenant_filter_and_periods(backend: Backend) -> None:
    ledger = await backend.open()
    same = T0 + timedelta(hours=5)
    for e in (entry(3, ts=same), entry(1, ts=same), entry(2, ts=T0),
              entry(7, period="2026-09", ts=T0 - timedelta(days=60)),
              entry(8, period="2026-10", ts=T0 - timedelta(days=30), tenant="globex")):
        await ledger.begin(e)
    assert [e.id for e in await ledger.entries("2026-11")] == ["cw-0002", "cw-0001", "cw-0003"]
    assert [e.id for e in await ledger.entries("2026-10", tenant="globex")] == ["cw-0008"]
    assert await ledger.entries("2026-10", tenant="acme") == []
    assert await ledger.periods() == ["2026-11", "2026-10", "2026-09"]


async def test_settings_and_caps(backend: Backend) -> None:
    ledger = await backend.open()
    assert await ledger.get_setting("override.global") is None
    await ledger.set_setting("override.global", '{"enabled": true}')
    await ledger.set_setting("override.global", '{"enabled": false}')
    assert await ledger.get_setting("override.global") == '{"enabled": false}'
    assert await ledger.caps() == {}
    await ledger.set_caps(("tenant", "acme"), {"monthly": 5 * 10**12})
    await ledger.set_caps(("campaign", "spring 'quoted'"), {"monthly": 10**12})
    await ledger.set_caps(("tenant", "acme"), {"monthly": None})  # removed (a config cap)
    # Several windows in one change; a later change to one window leaves the others.
    await ledger.set_caps(("user", "alice smith"), {"daily": 2 * 10**12, "hourly": 10**11})
    await ledger.set_caps(("user", "alice smith"), {"hourly": None})
    assert await ledger.caps() == {("tenant", "acme"): {"monthly": None},
                                   ("campaign", "spring 'quoted'"): {"monthly": 10**12},
                                   ("user", "alice smith"): {"daily": 2 * 10**12,
                                                             "hourly": None}}
    again = await backend.open()  # survives a restart / is seen by another replica
    assert await again.caps() == await ledger.caps()


async def test_add_setting_keeps_the_first_value(backend: Backend) -> None:
    """Insert-if-absent: replicas racing to create a shared secret all get one value."""
    first, second = await backend.open(), await backend.open()
    got = await asyncio.gather(*(ledger.add_setting("admin.session_secret", f"value-{i}")
                                 for i, ledger in enumerate([first, second] * 4)))
    assert len(set(got)) == 1 and got[0].startswith("value-")
    assert await first.add_setting("admin.session_secret", "later") == got[0]
    assert await second.get_setting("admin.session_secret") == got[0]


async def test_keys_add_and_revoke(backend: Backend) -> None:
    ledger = await backend.open()
    made = T0 + timedelta(seconds=1)
    a = KeyRecord("ci-bot", "a" * 64, "acme", "ci", False, T0, None, "sk-cw-abcd")
    b = KeyRecord("ops-bot", "b" * 64, "globex", "ops", True, made, None, "sk-cw-efgh",
                  ("ops-night", "ops.day"))  # further agent types round-trip too
    await ledger.add_key(b)
    await ledger.add_key(a)
    assert await ledger.keys() == [a, b]
    revoked_at = T0 + timedelta(hours=1)
    assert await ledger.revoke_key("ci-bot", revoked_at) is True
    assert await ledger.revoke_key("ci-bot", revoked_at) is False
    assert await ledger.revoke_key("nobody", revoked_at) is False
    assert await ledger.keys() == [replace(a, revoked_at=revoked_at), b]
    with pytest.raises(Exception):  # noqa: B017  (each driver raises its own integrity error)
        await ledger.add_key(replace(a, name="other"))  # same secret twice


async def test_audit_queue_anchor_and_atomic_admin_changes(backend: Backend) -> None:
    from gateway.audit import Anchor, AuditRow

    ledger = await backend.open()
    row = AuditRow("blocked", "2026-11-03T09:30:00.000000Z", '{"time": "t", "reason": "r"}')
    ledger.audit(row)
    ledger.audit(AuditRow("warning", row.ts, '{"time": "t2"}'))
    # An admin change carries its event in the same transaction; a no-op revoke records none.
    admin = AuditRow("admin", row.ts, '{"time": "t3", "action": "cap.set"}')
    await ledger.set_caps(("tenant", "acme"), {"monthly": 10**12}, audit=admin)
    assert not await ledger.revoke_key("nobody", T0, audit=admin)
    await ledger.flush()
    anchor, pending = await ledger.audit_pending(10)
    assert (anchor.count, anchor.sizes) == (0, {})
    # Queued events keep their order; an admin change commits when it is made (maybe first).
    assert [p.seq for p in pending] == sorted(p.seq for p in pending)
    assert [(p.kind, p.data) for p in pending if p.kind != "admin"] == [
        ("blocked", row.data), ("warning", '{"time": "t2"}')]
    assert [p.data for p in pending if p.kind == "admin"] == [admin.data]
    assert await ledger.audit_backlog() == 3
    moved = Anchor(2, "f" * 64, {"events.jsonl": 10}, "k")
    first, rest = pending[:2], pending[2]
    await ledger.audit_advance(anchor, moved, [(first[0].seq, 1), (first[1].seq, 2)])
    with pytest.raises(RuntimeError):  # only from the anchor it read: a second writer loses
        await ledger.audit_advance(anchor, Anchor(1, "e" * 64, {}, "k"), [(rest.seq, 1)])
    anchor, pending = await ledger.audit_pending(10)
    assert (anchor.count, anchor.head, anchor.sizes) == (2, "f" * 64, {"events.jsonl": 10})
    assert pending == [rest] and await ledger.audit_backlog() == 1
    assert await ledger.audit_secret() == await ledger.audit_secret()
    assert await ledger.audit_lock()
