"""Admission on PostgreSQL next to SQLite: reservations per second and the latency they add.

One "request" here is what the gateway does around forwarding, without HTTP: reserve its
upper bound on four scopes (global, tenant, agent and key; the first three capped, the caps
never reached), write its durable pending ledger row (``begin``), then settle (the budget
release and the final ledger row, both queued). Latency is reserve + begin: what a request
waits before it can be forwarded.

Backends:
  sqlite          in-memory BudgetEngine + SQLite ledger (single process by design)
  pg              SharedBudgets + PostgreSQL ledger, batched writer (the shipped design)
  pg-simple       the simple design: per request, one transaction on its own pooled
                  connection locks the scope rows (in order), checks and increments them and
                  writes the pending row; settling is a second such transaction. Every
                  request holds the hot global row for the length of its own commit.
Replicas run as separate processes on one database, each at the given concurrency.

Run: ``.venv/bin/python bench/pg_reserve_bench.py [--seconds 3] [--replicas 1,2]``
(PostgreSQL from ``COSTWALL_BENCH_PG``, default the local server with trust auth).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import secrets
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.budget import GLOBAL, BudgetEngine, scopes_for
from gateway.ledger import LedgerEntry
from gateway.store import open_ledger

SERVER = os.environ.get("COSTWALL_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
CAP = 10**21  # $1e9: admission runs on every request and never refuses
LIMITS = {GLOBAL: CAP, ("tenant", "acme"): CAP, ("agent", "content"): CAP}
PERIOD = datetime.now(UTC).strftime("%Y-%m")
UNIT = 50_000_000  # $0.00005 reserved per request


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(f"{SERVER}/postgres")
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


class SimpleDesign:
    """The per-request-transaction design, as a BudgetEngine + Ledger pair for ``_run``."""

    def __init__(self, url: str, pool_size: int):
        self.url, self.pool_size = url, pool_size
        self.pool: asyncpg.Pool | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.pool = await asyncpg.create_pool(self.url, min_size=self.pool_size,
                                              max_size=self.pool_size)

    async def book(self) -> None:
        from gateway.store.postgres import PostgresLedger

        ledger = PostgresLedger(self.url, pool_size=1)
        await ledger.start()
        await ledger.ensure_usage([(PERIOD, *k) for k in LIMITS])
        await ledger.close()

    async def reserve(self, scopes: list[Any], amount: int) -> Any:
        self._amount = amount
        return _Res(PERIOD, amount)

    async def begin(self, e: LedgerEntry, reservation: Any = None) -> None:
        from gateway.store.pg_writer import Writes, lock_usage

        assert self.pool is not None
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await lock_usage(conn, [(PERIOD, *k) for k in LIMITS])
            before = {k: (s.spent, s.reserved) for k, s in rows.items()}
            for key, state in rows.items():
                if state.spent + state.reserved + e.reserved > LIMITS[key[1:]]:
                    raise RuntimeError("over the cap")
                state.reserved += e.reserved
            writes = Writes()
            writes.usage(rows, before)
            writes.ledger([_Begin(e, None)], [])
            await writes.run(conn)

    def settle(self, res: Any, cost: Any = None) -> None:
        if isinstance(res, LedgerEntry):
            task = asyncio.create_task(self._settle(res))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _settle(self, e: LedgerEntry) -> None:
        from gateway.store.pg_writer import Writes, lock_usage

        assert self.pool is not None
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await lock_usage(conn, [(PERIOD, *k) for k in LIMITS])
            before = {k: (s.spent, s.reserved) for k, s in rows.items()}
            for state in rows.values():
                state.reserved -= e.reserved
                state.spent += e.cost
            writes = Writes()
            writes.usage(rows, before)
            writes.ledger([], [e])
            await writes.run(conn)

    async def flush(self) -> None:
        while self.tasks:
            await asyncio.gather(*self.tasks)

    async def close(self) -> None:
        await self.flush()
        assert self.pool is not None
        await self.pool.close()


class _Res:
    def __init__(self, period: str, amount: int):
        self.period, self.amount = period, amount


class _Begin:
    def __init__(self, entry: LedgerEntry, rid: str | None):
        self.entry, self.rid = entry, rid


async def _engine(backend: str, url: str, concurrency: int) -> tuple[Any, Any]:
    if backend == "pg-simple":
        simple = SimpleDesign(url, min(concurrency, 24))  # max_connections is 100
        await simple.start()
        return simple, simple
    if backend == "sqlite":
        ledger = open_ledger(url)
        await ledger.start()
        return BudgetEngine(LIMITS, ZoneInfo("UTC"), [Decimal("0.8")],
                            ledger.spend_by_scope), ledger
    from gateway.budget import Admission, Books
    from gateway.store.pg_budgets import Mirror, SharedBudgets
    from gateway.store.postgres import PostgresLedger

    mirror = Mirror(Books(LIMITS, ZoneInfo("UTC"), [Decimal("0.8")], lambda: datetime.now(UTC)))
    pg = PostgresLedger(url, pool_size=2, hook=mirror)
    await pg.start()
    return SharedBudgets(pg, mirror, Admission()), pg


async def _run(backend: str, url: str, concurrency: int, seconds: float, start_at: float,
               tag: str) -> dict[str, Any]:
    engine, ledger = await _engine(backend, url, concurrency)
    await engine.book()
    scopes = scopes_for("acme", "content", None, "acme-content")
    latencies: list[float] = []
    done = 0
    stop = start_at + seconds

    async def worker(w: int) -> None:
        nonlocal done
        n = 0
        while time.time() < stop:
            n += 1
            t = time.perf_counter()
            res = await engine.reserve(scopes, UNIT)
            e = LedgerEntry(id=f"{tag}-{w}-{n}", ts=datetime.now(UTC), period=res.period,
                            tenant="acme", key_name="acme-content", agent="content",
                            campaign=None, task=None, model="gpt-4o-mini", endpoint="chat",
                            reserved=res.amount)
            await ledger.begin(e, res)
            latencies.append(time.perf_counter() - t)
            engine.settle(res, UNIT // 2)
            ledger.settle(replace(e, state="settled", status=200, cost=UNIT // 2,
                                  usage_source="upstream"))
            done += 1

    await asyncio.sleep(max(0.0, start_at - time.time()))
    began = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - began
    await ledger.flush()
    writer = getattr(getattr(ledger, "writer", None), "writes", None)
    batch = writer.ops / writer.batches if writer and writer.batches else None
    await ledger.close()
    return {"done": done, "elapsed": elapsed, "latencies": latencies, "batch": batch}


def _child(args: tuple[str, str, int, float, float, str], out: Any) -> None:
    try:
        out.put(asyncio.run(_run(*args)))
    except BaseException as exc:
        out.put({"error": repr(exc)})
        raise


def scenario(backend: str, replicas: int, concurrency: int, seconds: float) -> dict[str, Any]:
    tmp = None
    if backend == "sqlite":
        tmp = tempfile.TemporaryDirectory()
        url = f"sqlite:///{Path(tmp.name) / 'bench.db'}"
    else:
        name = f"costwall_bench_{secrets.token_hex(4)}"
        asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
        url = f"{SERVER}/{name}"
        asyncio.run(_warm(url))  # migrate once, outside the measurement
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 2.0 + replicas  # after every process has connected
    procs = [ctx.Process(target=_child, args=((backend, url, concurrency, seconds, start_at,
                                               f"r{i}"), out)) for i in range(replicas)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise SystemExit(f"{backend}: {errors[0]}")
    for p in procs:
        p.join(30)
    if tmp is not None:
        tmp.cleanup()
    else:
        asyncio.run(_check_and_drop(url, sum(r["done"] for r in results)))
    lat = sorted(x for r in results for x in r["latencies"])
    rate = sum(r["done"] / r["elapsed"] for r in results)
    batches = [r["batch"] for r in results if r["batch"]]
    return {
        "backend": backend, "replicas": replicas, "concurrency": concurrency,
        "reservations_per_s": round(rate),
        "p50_ms": round(statistics.median(lat) * 1000, 2),
        "p99_ms": round(lat[int(len(lat) * 0.99) - 1] * 1000, 2),
        "ops_per_batch": round(statistics.mean(batches), 1) if batches else None,
    }


async def _warm(url: str) -> None:
    ledger = open_ledger(url, pool_size=1)
    await ledger.start()
    await ledger.close()


async def _check_and_drop(url: str, requests: int) -> None:
    """Every admitted request is in the ledger and the global row adds up; then drop."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetchval("SELECT COUNT(*) FROM requests WHERE state = 'settled'")
        spent, reserved = await conn.fetchrow(
            "SELECT spent, reserved FROM budget_usage WHERE scope = 'global'")
        assert rows == requests, (rows, requests)
        assert (int(spent), int(reserved)) == (requests * (UNIT // 2), 0), (spent, reserved)
    finally:
        await conn.close()
    name = url.rsplit("/", 1)[1]
    await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--replicas", default="1,2")
    parser.add_argument("--backends", default="sqlite,pg,pg-simple")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = []
    print(f"{'backend':<14}{'replicas':>9}{'conc.':>7}{'res/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'ops/txn':>9}")
    for backend in args.backends.split(","):
        for replicas in map(int, args.replicas.split(",")):
            if backend == "sqlite" and replicas > 1:
                continue  # one process owns a SQLite ledger
            for concurrency in map(int, args.concurrency.split(",")):
                r = scenario(backend, replicas, concurrency, args.seconds)
                results.append(r)
                print(f"{backend:<14}{replicas:>9}{concurrency:>7}{r['reservations_per_s']:>9}"
                      f"{r['p50_ms']:>9}{r['p99_ms']:>9}{r['ops_per_batch'] or '-':>9}",
                      flush=True)
    if args.json:
        args.json.write_text(json.dumps({"cpus": os.cpu_count(), "results": results},
                                        indent=2))


if __name__ == "__main__":
    main()
