"""The store's seams: one group-commit queue, one backend decision with explicit wiring, and
scope membership in SQL generated from (and checked against) the one Python definition."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from gateway.budget import BudgetEngine, ScopeStatus, WarnRule, scopes_for
from gateway.budget_rules import SCOPE_FIELDS, in_scope_sql
from gateway.config import load_settings
from gateway.store import backend_of, open_store
from gateway.store.group_commit import GroupCommit, resolve
from tests import pg
from tests.harness import test_env, write_config


async def test_group_commit_batches_what_waits_and_survives_a_failing_batch() -> None:
    batches: list[list[int]] = []

    async def commit(batch: list[int]) -> None:
        batches.append(batch)
        if 13 in batch:
            raise RuntimeError("a bad batch")
        await asyncio.sleep(0.01)

    writes: GroupCommit[int] = GroupCommit(commit, max_batch=4, name="test-writer")
    writes.start()
    for n in range(10):
        writes.put(n)
    await writes.flush()
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    writes.put(13)  # the commit raises: logged, and the writer goes on
    await writes.flush()
    writes.put(14)
    await writes.flush()
    assert batches[-2:] == [[13], [14]] and writes.running
    assert (writes.batches, writes.ops) == (5, 12)
    await writes.close()
    assert not writes.running


async def test_resolve_wakes_each_waiter_once() -> None:
    loop = asyncio.get_running_loop()
    ok, bad, gone = loop.create_future(), loop.create_future(), loop.create_future()
    gone.cancel()
    resolve(ok, None, 7)
    resolve(bad, ValueError("no"))
    resolve(gone, None)  # a waiter that gave up is left alone
    resolve(None, None)
    assert ok.result() == 7 and isinstance(bad.exception(), ValueError)


def test_the_backend_is_named_by_the_url_scheme_only() -> None:
    assert backend_of("sqlite:///x.db") == "sqlite"
    assert backend_of("postgresql://u@h/db") == backend_of("postgres://h/db") == "postgresql"
    with pytest.raises(ValueError, match="unsupported database URL"):
        backend_of("mysql://h/db")


def _settings(tmp_path: Path, database: str | None = None):  # type: ignore[no-untyped-def]
    overrides = {"database": database} if database else {}
    config = write_config(tmp_path, "http://127.0.0.1:9", **overrides)
    settings, problems = load_settings(config, test_env())
    assert not problems
    return settings


def test_open_store_wires_sqlite_with_local_budgets(tmp_path: Path) -> None:
    store = open_store(_settings(tmp_path))
    assert isinstance(store.budgets, BudgetEngine) and store.follow is None
    assert store.log is store.admin is store.reports is store.audit is store.ledger


async def test_open_store_wires_postgres_through_constructor_arguments(tmp_path: Path) -> None:
    pg.require()
    from gateway.store.pg_budgets import SharedBudgets

    url = await pg.create_database()
    try:
        seen: list[object] = []
        store = open_store(_settings(tmp_path, url), on_crossings=seen.extend)
        budgets = store.budgets
        assert isinstance(budgets, SharedBudgets) and store.follow is not None
        assert budgets.ledger is store.ledger
        # The writer reports commits to the budgets' mirror from its first transaction.
        assert budgets.ledger.writer.hook is budgets.mirror
        assert budgets.mirror.on_crossings == seen.extend
    finally:
        await pg.drop_database(url)


async def test_in_scope_sql_agrees_with_scopes_for_on_postgres() -> None:
    """The SQL that counts a new budget row's first spend matches the Python definition."""
    pg.require()
    url = await pg.create_database()
    conn = await asyncpg.connect(url)
    try:
        rows = [("acme", "content", None, "k1", None),
                ("acme", "research", "launch", "k2", "alice"),
                ("beta", "content", "launch", "k3", "bob")]
        keys = sorted({k for r in rows for k in scopes_for(*r)} | {("tenant", "nobody"),
                                                                      ("unknown", "x")})
        for row, key in itertools.product(rows, keys):
            got = await conn.fetchval(
                "SELECT COALESCE((" + in_scope_sql("r", "k") + "), false) FROM "
                "(SELECT $1::text AS tenant, $2::text AS agent, $3::text AS campaign, "
                "$4::text AS key_name, $5::text AS end_user) r, "
                "(SELECT $6::text AS scope, $7::text AS id) k",
                *row, *key)
            assert got is (key in scopes_for(*row)), (row, key)
        assert set(SCOPE_FIELDS) == {k[0] for k in keys} - {"unknown"}
    finally:
        await conn.close()
        await pg.drop_database(url)


def test_one_warn_rule_for_headers_crossings_and_the_admin_level() -> None:
    from admin.ops import level

    rule = WarnRule.of([Decimal("0.8"), Decimal("0.5")])
    engine = BudgetEngine({}, ZoneInfo("UTC"), rule.thresholds,
                          lambda p: asyncio.sleep(0, {}), clock=lambda: datetime.now(UTC))
    assert engine.rule == rule and engine.warn_at == (Decimal("0.5"), Decimal("0.8"))
    for spent in (0, 49, 50, 79, 80, 81):
        status = ScopeStatus("global", "global", "p", 100, spent, 0)
        assert (level(status, rule) == "warn") is rule.warns(spent, 100) is (spent >= 50)
        assert rule.passed(spent, 100) == (spent >= 50) + (spent >= 80)
    assert rule.crossed(49, 80, 100) == (Decimal("0.5"), Decimal("0.8"))
    assert rule.crossed(80, 99, 100) == ()
