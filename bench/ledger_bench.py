"""Group commit in the SQLite ledger: durable pending rows per second, and their latency.

Compares the ledger's writer task (every write waiting when a batch starts shares one commit)
with a naive one-commit-per-row loop, under synchronous=NORMAL and FULL, at concurrency 1 and
64. Run: ``.venv/bin/python bench/ledger_bench.py [--rows 5000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from gateway.ledger import COLUMNS, LedgerEntry
from gateway.store.sqlite import SqliteLedger, _row


def entry(i: int) -> LedgerEntry:
    return LedgerEntry(id=f"bench-{i}", ts=datetime.now(UTC), period="2026-11", tenant="t",
                       key_name="k", agent="a", campaign=None, task=None, model="gpt-4o-mini",
                       endpoint="chat", reserved=1000)


async def group_commit(path: Path, sync: str, rows: int, concurrency: int) -> tuple[float, list]:
    ledger = SqliteLedger(path, synchronous=sync)
    await ledger.start()
    latencies: list[float] = []
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            t = time.perf_counter()
            await ledger.begin(entry(i))
            latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(rows)))
    elapsed = time.perf_counter() - start
    await ledger.close()
    return rows / elapsed, latencies


def naive(path: Path, sync: str, rows: int) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={sync}")
    conn.execute(f"CREATE TABLE requests ({', '.join(COLUMNS)})")
    sql = f"INSERT INTO requests VALUES ({', '.join('?' for _ in COLUMNS)})"
    start = time.perf_counter()
    for i in range(rows):
        conn.execute(sql, _row(entry(i)))  # autocommit: one commit per row
    elapsed = time.perf_counter() - start
    conn.close()
    return rows / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=5000)
    args = parser.parse_args()
    print(f"{'mode':<34}{'rows/s':>10}{'p50 ms':>9}{'p99 ms':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for sync in ("NORMAL", "FULL"):
            rate = naive(Path(tmp) / f"naive-{sync}.db", sync, args.rows)
            print(f"{'one commit per row, ' + sync:<34}{rate:>10.0f}{'':>9}{'':>9}")
            for concurrency in (1, 64):
                rate, lat = asyncio.run(group_commit(
                    Path(tmp) / f"gc-{sync}-{concurrency}.db", sync, args.rows, concurrency))
                q = statistics.quantiles(lat, n=100)
                print(f"{f'ledger writer, {sync}, c={concurrency}':<34}{rate:>10.0f}"
                      f"{q[49] * 1000:>9.2f}{q[98] * 1000:>9.2f}")


if __name__ == "__main__":
    main()
