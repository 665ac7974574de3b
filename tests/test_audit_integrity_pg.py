"""The audit trail on PostgreSQL: one chain for every replica, anchored in the database.

Events stored by any replica are written, in table order, by the one replica holding the audit
lock; the key is generated once and kept in the database (no ``COSTWALL_AUDIT_KEY`` here).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from tests import pg
from tests.harness import Stack
from tests.test_audit_integrity import (
    ADMIN,
    blocked,
    check,
    edited,
    lines_of,
    put,
    test_audit_dir_broken_from_the_start,  # noqa: F401  (run again on PostgreSQL)
    test_broken_audit_dir_never_changes_an_answer,  # noqa: F401
    test_writer_stops_at_a_tampered_file_and_readyz_says_so,  # noqa: F401
    until,
)


@pytest.fixture(autouse=True)
def postgres(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    pg.require()
    with pg.temp_database() as url:
        monkeypatch.setenv("COSTWALL_TEST_DATABASE", url)
        yield url


def test_replicas_share_one_chain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = Stack(tmp_path / "a", budgets={"global": {"monthly_usd": "0"}})
    b = Stack(tmp_path / "b", budgets={"global": {"monthly_usd": "0"}})
    try:
        blocked(a, 2)
        blocked(b, 3)
        b.flush()
        until(lambda: len(list(a.gw.audit.events())) == 5)
        assert not (tmp_path / "b" / "logs" / "budget" / "events.jsonl").exists()
        code, out = check(tmp_path / "a" / "costwall.yaml", capsys)
        assert code == 0 and "5 events, chain intact" in out, out
        folder = tmp_path / "a" / "logs" / "budget"
        put(folder, [*lines_of(folder)[:3], edited(lines_of(folder)[3]), lines_of(folder)[4]])
        code, out = check(tmp_path / "a" / "costwall.yaml", capsys)
        assert code == 1 and "events.jsonl line 4:" in out, out
        put(folder, lines_of(folder)[:2])
        code, out = check(tmp_path / "a" / "costwall.yaml", capsys)
        assert code == 1 and "has 2 events but the database anchor records 5" in out, out
    finally:
        b.close()
        a.close()


def failing(url: str, table: str) -> Callable[[], None]:
    """Make every INSERT into ``table`` fail in the database; returns the undo."""

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run(
        "CREATE FUNCTION costwall_fail() RETURNS trigger AS $$ BEGIN "
        "RAISE EXCEPTION 'disk says no'; END $$ LANGUAGE plpgsql; "
        f"CREATE TRIGGER costwall_fail BEFORE INSERT ON {table} "
        "FOR EACH ROW EXECUTE FUNCTION costwall_fail()"))
    return lambda: asyncio.run(run(f"DROP TRIGGER costwall_fail ON {table}"))


def test_admin_change_fails_whole_when_its_record_cannot_be_stored(tmp_path: Path,
                                                                  postgres: str) -> None:
    stack = Stack(tmp_path)
    try:
        undo = failing(postgres, "audit_events")
        r = stack.request("PUT", "/admin/api/budgets/tenant/acme", headers=ADMIN,
                          json={"monthly_usd": "3", "reason": "db failing"})
        assert r.status == 503 and r.json()["error"]["code"] == "ledger_unavailable", r.body
        assert stack.lt.run(stack.gw.ledger.caps()) == {}
        r = stack.request("POST", "/admin/api/keys", headers=ADMIN,
                          json={"name": "bot", "tenant": "acme", "agent": "bots"})
        assert r.status == 503 and stack.lt.run(stack.gw.ledger.keys()) == []
        undo()
        r = stack.request("PUT", "/admin/api/budgets/tenant/acme", headers=ADMIN,
                          json={"monthly_usd": "3", "reason": "db back"})
        assert r.status == 200
        stack.flush()
        assert [e["action"] for e in stack.gw.audit.events("admin")] == ["cap.set"]
    finally:
        stack.close()
