"""kill -9 during in-flight streams: every forwarded request is in the ledger after restart."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import openai

from gateway.fake_upstream import FakeUpstreamState, start_fake_upstream
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
        pending = conn.execute("SELECT COUNT(*) FROM requests WHERE state='pending'").fetchone()
    assert pending[0] == 5, "pending rows were durable before forwarding"

    server.start()  # recovery settles leftovers at their reserved upper bound
    try:
        with sqlite3.connect(db) as conn:
            rows = conn.execute(
                "SELECT state, usage_source, cost, reserved FROM requests").fetchall()
        assert len(rows) == forwarded
        for row_state, source, cost, reserved in rows:
            assert (row_state, source) == ("settled", "reserved")
            assert cost == reserved > 0
        assert http_request("GET", f"{server.url}/healthz").status == 200
    finally:
        server.terminate()
        lt.run(runner.cleanup())
        lt.stop()
