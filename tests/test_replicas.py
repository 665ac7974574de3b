"""Two ``costwall serve`` processes sharing one PostgreSQL database.

One hard cap across replicas under concurrent load, a replica killed with ``kill -9`` in the
middle of it (the other keeps serving; after a restart the totals reconcile), and admin
changes made on one replica taking effect on the other within about a second.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import openai
import pytest

from gateway.estimate import estimate
from gateway.fake_upstream import FakeUpstreamState, start_fake_upstream
from gateway.money import to_pico
from gateway.pricing import load_price_table
from tests import pg
from tests.harness import (
    ADMIN_TOKEN,
    KEYS,
    ROOT,
    LoopThread,
    http_request,
    serve_replicas,
    stop_replicas,
)

MAX_TOKENS = 100
RECLAIM_S = 2


def cap_for(requests: int) -> Decimal:
    """A USD cap that fits ``requests`` chat requests of ``message(i)`` at MAX_TOKENS."""
    prices, _ = load_price_table(ROOT / "config" / "pricing.yaml")
    price = prices.lookup("gpt-4o-mini")
    assert price is not None
    est = estimate("chat", {"messages": message(999), "max_tokens": MAX_TOKENS}, price)
    return Decimal(price.upper_bound(est.prompt_tokens, MAX_TOKENS) * requests) / 10**12


def message(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"request {i:03d}: one line about budgets"}]


class Fleet:
    """A fake upstream and two gateway replicas (A, B) on one database."""

    def __init__(self, tmp: Path, url: str, cap: Decimal, delay_s: float = 0.05):
        self.url = url
        self.lt = LoopThread()
        self.state = FakeUpstreamState(delay_s=delay_s)
        self.runner, upstream, _ = self.lt.run(start_fake_upstream(state=self.state))
        try:
            self.replicas = serve_replicas(
                tmp, upstream, url, budgets={"global": {"monthly_usd": str(cap)}},
                ledger={"pool_size": 3, "reclaim_after_s": RECLAIM_S})
        except BaseException:
            self.lt.run(self.runner.cleanup())
            self.lt.stop()
            raise

    def close(self) -> None:
        stop_replicas(self.replicas)
        self.lt.run(self.runner.cleanup())
        self.lt.stop()

    def query(self, sql: str) -> list[Any]:
        async def run() -> list[Any]:
            conn = await asyncpg.connect(self.url)
            try:
                return list(await conn.fetch(sql))
            finally:
                await conn.close()

        return asyncio.run(run())


@pytest.fixture
def database() -> Iterator[str]:
    pg.require()
    with pg.temp_database() as url:
        yield url


async def fire(urls: list[str], count: int, concurrency: int,
               on_done: Any = None) -> list[tuple[int, int]]:
    """``count`` chat requests spread round-robin over ``urls``: (replica index, status)."""
    clients = [openai.AsyncOpenAI(base_url=f"{u}/v1", api_key=KEYS["acme-content"]["key"],
                                  max_retries=0, timeout=30) for u in urls]
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> tuple[int, int]:
        which = i % len(clients)
        async with sem:
            try:
                await clients[which].chat.completions.create(
                    model="gpt-4o-mini", messages=message(i), max_tokens=MAX_TOKENS,
                    extra_headers={"X-Costwall-Task": f"t-{i:03d}"})
                status = 200
            except openai.APIStatusError as exc:
                status = exc.status_code
            except openai.APIConnectionError:
                status = 0  # the replica is gone
            if on_done is not None:
                await on_done(i, which, status)
            return which, status

    try:
        return await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        for c in clients:
            await c.close()


def totals(fleet: Fleet) -> tuple[int, int, int, int]:
    """(ledger rows, SUM(cost), pending rows, open reservations)."""
    [(rows, cost, pending)] = fleet.query(
        "SELECT COUNT(*), COALESCE(SUM(cost), 0), COUNT(*) FILTER (WHERE state = 'pending') "
        "FROM requests")
    [(open_,)] = fleet.query("SELECT COUNT(*) FROM reservations")
    return rows, int(cost), pending, open_


def test_two_replicas_share_one_hard_cap(tmp_path: Path, database: str) -> None:
    cap = cap_for(50)
    fleet = Fleet(tmp_path, database, cap)
    try:
        results = asyncio.run(fire([r.url for r in fleet.replicas], 300, 60))
        statuses = [s for _, s in results]
        ok = statuses.count(200)
        assert statuses.count(200) + statuses.count(402) == 300
        assert {w for w, s in results if s == 200} == {0, 1}, "both replicas served"
        time.sleep(0.5)  # settlements are written in the background
        rows, spent, pending, open_ = totals(fleet)
        assert spent <= to_pico(cap), "zero overshoot across replicas"
        assert rows == ok == fleet.state.total_requests
        assert (pending, open_) == (0, 0)
        [(usage_spent, usage_reserved)] = fleet.query(
            "SELECT spent, reserved FROM budget_usage WHERE scope = 'global'")
        assert (int(usage_spent), int(usage_reserved)) == (spent, 0)
        share = Decimal(spent) / to_pico(cap)
        print(f"\ntwo replicas: {ok} allowed, {statuses.count(402)} blocked, "
              f"{share:.1%} of the cap used")
        assert share > Decimal("0.5")
    finally:
        fleet.close()


def test_kill9_mid_load_other_replica_serves_and_totals_reconcile(tmp_path: Path,
                                                                  database: str) -> None:
    cap = cap_for(1000)  # room for everything: B must not be starved by A's leftovers
    fleet = Fleet(tmp_path, database, cap, delay_s=0.2)
    a, b = fleet.replicas
    killed_at: list[int] = []

    async def on_done(i: int, which: int, status: int) -> None:
        if i >= 60 and not killed_at:  # the first wave is done; 60 more are in flight
            killed_at.append(i)
            a.kill9()

    try:
        results = asyncio.run(fire([a.url, b.url], 300, 60, on_done))
        after_kill = [(w, s) for w, s in results[killed_at[0] + 60:]]
        assert after_kill and all(s == 200 for w, s in after_kill if w == 1), \
            "replica B kept serving"
        assert all(s == 0 for w, s in after_kill if w == 0), "replica A is gone"
        a.start()  # a new process, a new replica id
        deadline = time.monotonic() + RECLAIM_S + 10
        while totals(fleet)[2:] != (0, 0):  # the dead replica's leftovers are reclaimed
            assert time.monotonic() < deadline, "pending rows were never reclaimed"
            time.sleep(0.2)
        rows, spent, _, _ = totals(fleet)
        assert spent <= to_pico(cap)
        forwarded = {r["json"]["messages"][0]["content"][8:11] for r in fleet.state.requests}
        ledger = {r[0][2:]: r[1] for r in fleet.query(
            "SELECT task, usage_source FROM requests")}
        assert forwarded <= set(ledger), "every forwarded request is in the ledger"
        # A pending row is written before forwarding: a kill between the two leaves a row
        # the upstream never saw, charged at its reserved bound (never the other way round).
        unseen = set(ledger) - forwarded
        assert all(ledger[t] == "reserved" for t in unseen)
        assert rows == fleet.state.total_requests + len(unseen)
        [(usage_spent, usage_reserved)] = fleet.query(
            "SELECT spent, reserved FROM budget_usage WHERE scope = 'global'")
        assert (int(usage_spent), int(usage_reserved)) == (spent, 0)
        reclaimed = sum(1 for s in ledger.values() if s == "reserved")
        print(f"\nkill -9: {fleet.state.total_requests} forwarded, {rows} ledger rows, "
              f"{reclaimed} charged at their reserved bound by the reclaim, "
              f"{len(unseen)} begun but not forwarded")
        # Both replicas serve again and still share the cap.
        after = asyncio.run(fire([a.url, b.url], 20, 10))
        assert [s for _, s in after] == [200] * 20
    finally:
        fleet.close()


def test_admin_changes_on_one_replica_reach_the_other_within_a_second(
        tmp_path: Path, database: str) -> None:
    fleet = Fleet(tmp_path, database, Decimal(0))
    a, b = fleet.replicas
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    chat = {"model": "gpt-4o-mini", "messages": message(1), "max_tokens": 5}
    key = {"Authorization": f"Bearer {KEYS['acme-content']['key']}"}

    def until(check: Any, timeout: float = 3.0) -> float:
        start = time.monotonic()
        while not check():
            assert time.monotonic() - start < timeout, "change never reached replica B"
            time.sleep(0.05)
        return time.monotonic() - start

    try:
        assert http_request("POST", f"{b.url}/v1/chat/completions", json=chat,
                            headers=key).status == 402
        r = http_request("POST", f"{a.url}/admin/api/override", headers=admin,
                         json={"enabled": True, "reason": "incident 4711"})
        assert r.status == 200, r.body
        took = until(lambda: http_request("POST", f"{b.url}/v1/chat/completions", json=chat,
                                          headers=key).status == 200)
        assert took < 1.0
        http_request("POST", f"{a.url}/admin/api/override", headers=admin,
                     json={"enabled": False, "reason": "incident over"})
        until(lambda: http_request("POST", f"{b.url}/v1/chat/completions", json=chat,
                                   headers=key).status == 402)

        r = http_request("PUT", f"{a.url}/admin/api/budgets/global/global", headers=admin,
                         json={"monthly_usd": "5"})
        assert r.status == 200, r.body

        def b_limit() -> str | None:
            scopes = http_request("GET", f"{b.url}/admin/api/budget",
                                  headers=admin).json()["scopes"]
            return next((s["limit_usd"] for s in scopes if s["scope"] == "global"), None)

        assert until(lambda: b_limit() == "5") < 1.0
        assert http_request("POST", f"{b.url}/v1/chat/completions", json=chat,
                            headers=key).status == 200

        made = http_request("POST", f"{a.url}/admin/api/keys", headers=admin,
                            json={"name": "fleet-bot", "tenant": "acme", "agent": "bots"})
        assert made.status in (200, 201), made.body
        new_key = {"Authorization": f"Bearer {made.json()['key']}"}
        assert until(lambda: http_request("POST", f"{b.url}/v1/chat/completions", json=chat,
                                          headers=new_key).status == 200) < 1.0
        http_request("DELETE", f"{a.url}/admin/api/keys/fleet-bot", headers=admin)
        until(lambda: http_request("POST", f"{b.url}/v1/chat/completions", json=chat,
                                   headers=new_key).status == 401)

        # Audit-logged once: by the replica where the admin acted.
        log_a = (tmp_path / "a" / "logs" / "budget" / "admin-actions.md").read_text()
        assert "incident 4711" in log_a and "fleet-bot" in log_a
        assert not (tmp_path / "b" / "logs" / "budget" / "admin-actions.md").exists()
    finally:
        fleet.close()
