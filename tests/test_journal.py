"""The SQLite ledger's journal: begin without waiting, recovery from segments, bounded files."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from gateway.store import journal as journal_module
from gateway.store import sqlite as ledger_sqlite
from gateway.store.journal import Journal
from gateway.store.sqlite import SqliteLedger, _row
from tests.test_ledger_contract import entry, settled


async def _stop_writer(ledger: SqliteLedger) -> None:
    assert ledger._writes._task is not None
    ledger._writes._task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await ledger._writes._task
    ledger._writes._task = None


async def _crash(ledger: SqliteLedger) -> None:
    """As if the process died now: the writer stops, nothing is flushed or deleted."""
    if ledger._writes._task is not None:
        await _stop_writer(ledger)
    for conn in (ledger._writer, ledger._reader):
        if conn is not None:
            await conn.close()


async def test_begin_returns_before_the_commit_and_recovery_finds_the_journaled_rows(
        tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    first = SqliteLedger(db)
    await first.start()
    await _stop_writer(first)  # the process dies before the writer commits anything
    entries = [entry(n, reserved=1_000 + n) for n in range(50)]
    await asyncio.wait_for(asyncio.gather(*(first.begin(e) for e in entries)), 1)
    first.settle(settled(entries[0], 5))  # queued, never committed either
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 0
    [segment] = Journal(db).segments().values()
    assert [r[0] for r in Journal.read(segment)] == [e.id for e in entries]
    await _crash(first)

    second = SqliteLedger(db)
    await second.start()
    assert await second.recover() == 50
    rows = await second.entries("2026-11")
    assert [(r.id, r.state, r.cost, r.usage_source) for r in rows] == [
        (e.id, "settled", e.reserved, "reserved") for e in entries]
    assert rows[0].as_dict() == replace(entries[0], state="settled", cost=1_000,
                                        usage_source="reserved", replica="local").as_dict()
    assert Journal(db).segments() == {}
    assert await second.recover() == 0
    await second.close()


async def test_recovery_keeps_committed_settlements_and_tolerates_a_torn_last_line(
        tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    ledger = SqliteLedger(db)
    await ledger.start()
    done = entry(1, reserved=9_000)
    await ledger.begin(done)
    ledger.settle(settled(done, 123))
    await ledger.begin(entry(2, reserved=4_000))  # committed as pending
    await ledger.flush()
    await ledger.close()
    # A previous process's segment: rows 1 and 2 again, row 3 never committed, then a line
    # cut short by the crash.
    lines = [orjson.dumps(_row(e)) for e in (done, entry(2, reserved=4_000),
                                              entry(3, reserved=2_500))]
    torn = orjson.dumps(_row(entry(4)))[:40]
    Journal(db).path(7).write_bytes(b"\n".join(lines) + b"\n" + torn)

    ledger = SqliteLedger(db)
    await ledger.start()
    assert await ledger.recover() == 2  # row 3 from the journal, row 2 was pending
    rows = {r.id: r for r in await ledger.entries("2026-11")}
    assert sorted(rows) == ["cw-0001", "cw-0002", "cw-0003"]
    assert (rows["cw-0001"].cost, rows["cw-0001"].usage_source) == (123, "upstream")
    assert (rows["cw-0002"].state, rows["cw-0002"].cost) == ("settled", 4_000)
    assert (rows["cw-0003"].state, rows["cw-0003"].cost,
            rows["cw-0003"].usage_source) == ("settled", 2_500, "reserved")
    assert Journal(db).segments() == {}
    await ledger.close()


async def test_segments_are_deleted_once_committed_and_the_wal_stays_bounded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger_sqlite, "CHECKPOINT_EVERY", 16)
    monkeypatch.setattr(journal_module, "SEGMENT_ENTRIES", 1024)
    db = tmp_path / "l.db"
    ledger = SqliteLedger(db)
    await ledger.start()
    most_segments = 0
    sem = asyncio.Semaphore(64)

    async def one(n: int) -> None:
        nonlocal most_segments
        async with sem:
            e = entry(n, id=f"cw-{n:05d}")
            await ledger.begin(e)
            most_segments = max(most_segments, len(Journal(db).segments()) if n % 256 == 0
                                else 0)
            await asyncio.sleep(0)
            ledger.settle(settled(e, n))

    await asyncio.gather(*(one(n) for n in range(20_000)))
    for _ in range(100):  # the writer catches up without a flush
        if not ledger._journal.pending:
            break
        await asyncio.sleep(0.05)
    behind = len(Journal(db).segments())
    await ledger.flush()
    wal = (tmp_path / "l.db-wal").stat().st_size
    assert Journal(db).segments() == {} and ledger._journal.pending == 0
    assert await ledger.count() == 20_000
    rows = await ledger.entries("2026-11")
    assert {r.state for r in rows} == {"settled"}
    assert sorted(r.cost for r in rows) == list(range(20_000))
    await ledger.close()
    assert behind <= 1, "only the open segment is left once the writer has caught up"
    assert most_segments <= 4, f"{most_segments} segments at once"
    assert wal < 4 * 1024 * 1024, f"WAL grew to {wal} bytes"


async def test_reads_see_every_begun_row(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "l.db")
    await ledger.start()
    for n in range(20):
        await ledger.begin(entry(n))
    assert await ledger.count() == 20  # no flush: a read waits for the queued begins
    assert (await ledger.spend_by_scope("2026-11"))[("tenant", "acme")] == 20 * 10_000
    await ledger.close()


async def test_a_locked_database_delays_commits_not_begins(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "l.db")
    await ledger.start()
    other = sqlite3.connect(tmp_path / "l.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock for a moment
    e = entry(1)
    await asyncio.wait_for(ledger.begin(e), 0.1)
    ledger.settle(replace(settled(e, 7), latency_ms=3))
    await asyncio.sleep(0.2)
    other.execute("COMMIT")
    other.close()
    await ledger.flush()
    [row] = await ledger.entries("2026-11")
    assert (row.state, row.cost, row.latency_ms) == ("settled", 7, 3)
    await ledger.close()


async def test_a_failing_writer_makes_begin_wait_and_fail(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "l.db")
    await ledger.start()
    ledger.settle(replace(settled(entry(1), 1), model=None))  # type: ignore[arg-type]
    await ledger.flush()  # NOT NULL: this commit fails
    assert not ledger._healthy
    await ledger.begin(entry(2))  # waits for its own commit, which succeeds
    assert ledger._healthy and ledger._journal.pending == 0
    assert Journal(tmp_path / "l.db").segments() == {}, "nothing journaled while unhealthy"
    assert ledger._writer is not None
    await ledger._writer.close()
    with pytest.raises(sqlite3.ProgrammingError):
        await ledger.begin(entry(3))
    await ledger.close()


async def test_full_synchronous_mode_awaits_every_commit_and_writes_no_journal(
        tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "l.db", synchronous="FULL")
    await ledger.start()
    other = sqlite3.connect(tmp_path / "l.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    begin = asyncio.create_task(ledger.begin(entry(1)))
    await asyncio.sleep(0.2)
    assert not begin.done(), "begin must wait for its row to be committed"
    other.execute("COMMIT")
    other.close()
    await asyncio.wait_for(begin, 5)
    assert Journal(tmp_path / "l.db").segments() == {}
    assert await ledger.count() == 1
    await ledger.close()
