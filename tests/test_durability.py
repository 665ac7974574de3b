"""kill -9 with requests in flight: every forwarded request is in the ledger after restart.

With ``synchronous=NORMAL`` a request's pending row may be only in the ledger's journal when
the process dies (``gateway.store.journal``); the restart's recovery must find it either way.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import openai

from gateway.fake_upstream import FakeUpstreamState, start_fake_upstream
from gateway.store.journal import Journal
from tests.harness import KEYS, LoopThread, ServeProcess, http_request, test_env, write_config


def test_kill9_mid_stream_loses_nothing(tmp_path: Path) -> None:
    lt = LoopThread()
    state = FakeUpstreamState(chunk_delay_s=0.2)
    runner, upstream_url, _ = lt.run(start_fake_upstream(state=state))
    config = write_config(tmp_path, upstream_url)
    server = ServeProcess(config, test_env())
    server.start()
    started = threading.Barrier(6)
    errors: list[BaseException] = []

    def stream(i: int) -> None:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEYS["acme-content"]["key"],
                               max_retries=0)
        try:
            s = client.chat.completions.create(
                model="gpt-4o-mini", max_tokens=200, stream=True,
                messages=[{"role": "user", "content": f"story {i}"}])
            for n, _chunk in enumerate(s):
                if n == 2:
                    started.wait(10)
        except (openai.APIError, threading.BrokenBarrierError) as exc:
            errors.append(exc)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    started.wait(20)  # all five streams are flowing
    server.kill9()
    for t in threads:
        t.join(20)
    forwarded = len(state.requests)
    assert forwarded == 5 and len(errors) == 5  # every client saw its stream break

    db = tmp_path / "costwall.db"
    with sqlite3.connect(db) as conn:
        pending = {r[0] for r in conn.execute("SELECT id FROM requests WHERE state='pending'")}
    journaled = {row[0] for p in Journal(db).segments().values() for row in Journal.read(p)}
    assert len(pending | journaled) == 5, "pending rows were durable before forwarding"
    _assert_recovered(server, db, forwarded)
    lt.run(runner.cleanup())
    lt.stop()


def _assert_recovered(server: ServeProcess, db: Path, forwarded: int) -> None:
    server.start()  # recovery settles leftovers at their reserved upper bound
    try:
        with sqlite3.connect(db) as conn:
            rows = conn.execute(
                "SELECT state, usage_source, cost, reserved FROM requests").fetchall()
        assert len(rows) == forwarded
        for row_state, source, cost, reserved in rows:
            assert (row_state, source) == ("settled", "reserved")
            assert cost == reserved > 0
        assert Journal(db).segments() == {}, "recovery deletes the journal"
        assert http_request("GET", f"{server.url}/healthz").status == 200
    finally:
        server.terminate()


def test_kill9_right_after_forwarding_with_rows_only_in_the_journal(tmp_path: Path) -> None:
    """The database is write-locked, so the pending rows never reach it: only the journal."""
    lt = LoopThread()
    state = FakeUpstreamState(delay_s=5.0)
    runner, upstream_url, _ = lt.run(start_fake_upstream(state=state))
    config = write_config(tmp_path, upstream_url)
    server = ServeProcess(config, test_env())
    server.start()
    db = tmp_path / "costwall.db"
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    errors: list[BaseException] = []

    def call(i: int) -> None:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEYS["acme-content"]["key"],
                               max_retries=0, timeout=20)
        try:
            client.chat.completions.create(model="gpt-4o-mini", max_tokens=50,
                                           messages=[{"role": "user", "content": f"q {i}"}])
        except openai.APIError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while len(state.requests) < 5 and time.monotonic() < deadline:
        time.sleep(0.005)
    server.kill9()  # right after the fifth request reached the upstream
    for t in threads:
        t.join(20)
    assert len(state.requests) == 5 and len(errors) == 5
    assert lock.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 0
    lock.execute("COMMIT")
    lock.close()
    [segment] = Journal(db).segments().values()
    assert len(Journal.read(segment)) == 5
    _assert_recovered(server, db, 5)
    lt.run(runner.cleanup())
    lt.stop()
