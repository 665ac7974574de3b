"""The SQLite ledger's inline path: bounded WAL, hand-over to the writer thread when locked."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from gateway import ledger_sqlite
from gateway.ledger_sqlite import SqliteLedger
from tests.test_ledger_contract import entry, settled


async def test_wal_stays_bounded_under_a_steady_stream_of_requests(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger_sqlite, "CHECKPOINT_EVERY", 16)
    ledger = SqliteLedger(tmp_path / "l.db")
    await ledger.start()
    sem = asyncio.Semaphore(32)

    async def one(n: int) -> None:
        async with sem:
            e = entry(n)
            await ledger.begin(e)
            await asyncio.sleep(0)
            ledger.settle(settled(e, n))

    await asyncio.gather(*(one(n) for n in range(3000)))
    await ledger.flush()
    wal = (tmp_path / "l.db-wal").stat().st_size
    rows = await ledger.entries("2026-11")
    await ledger.close()
    assert len(rows) == 3000 and {r.state for r in rows} == {"settled"}
    assert sorted(r.cost for r in rows) == list(range(3000))
    assert wal < 2 * 1024 * 1024, f"WAL grew to {wal} bytes"


async def test_a_locked_database_hands_writes_to_the_writer_thread(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "l.db")
    await ledger.start()
    assert ledger._inline is not None
    other = sqlite3.connect(tmp_path / "l.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock for a moment
    e = entry(1)
    begin = asyncio.create_task(ledger.begin(e))
    await asyncio.sleep(0.2)
    assert not begin.done(), "begin must wait for its row to be committed"
    other.execute("COMMIT")
    other.close()
    await asyncio.wait_for(begin, 5)
    ledger.settle(replace(settled(e, 7), latency_ms=3))
    await ledger.flush()
    [row] = await ledger.entries("2026-11")
    assert (row.state, row.cost, row.latency_ms) == ("settled", 7, 3)
    await ledger.close()


async def test_full_synchronous_mode_keeps_every_write_in_the_thread(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "l.db", synchronous="FULL")
    await ledger.start()
    assert ledger._inline is None
    await ledger.begin(entry(1))
    assert await ledger.count() == 1
    await ledger.close()
