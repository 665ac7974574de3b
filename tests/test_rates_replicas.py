"""Rate limits shared by replicas on one PostgreSQL database, and the store's faults.

Two ``costwall serve`` processes share a per-key rpm and a concurrency limit (the overshoot is
measured and printed; ``docs/rate-limits.md`` records it); a replica killed with ``kill -9``
frees its slots after ``ledger.reclaim_after_s``. ``rate_limits.on_store_error`` decides what
happens while the store cannot answer: the database cut off behind a TCP relay, or its rate
tables locked by someone else.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import pg
from tests.harness import KEYS, LoopThread, Stack, free_port, serve_replicas, stop_replicas
from tests.test_rates import CountingUpstream

KEY = "acme-content"
RECLAIM_S = 2


@pytest.fixture
def database() -> Iterator[str]:
    pg.require()
    with pg.temp_database() as url:
        yield url


class Fleet:
    """A counting simulator and two gateway replicas (A, B) on one database."""

    def __init__(self, tmp: Path, url: str, rate_limits: dict[str, Any], delay_s: float = 0.0):
        self.url = url
        self.upstream = CountingUpstream(LoopThread(), delay_s=delay_s)
        self.upstream.state.chunk_delay_s = 0
        try:
            self.replicas = serve_replicas(
                tmp, self.upstream.url, url, rate_limits=rate_limits,
                ledger={"pool_size": 3, "reclaim_after_s": RECLAIM_S})
        except BaseException:
            self.upstream.close()
            raise

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    def close(self) -> None:
        stop_replicas(self.replicas)
        self.upstream.close()


async def fire(urls: list[str], count: int, concurrency: int, max_retries: int = 0,
               stream: bool = False) -> list[tuple[int, int]]:
    """``count`` chat requests spread round-robin over ``urls``: (replica index, status)."""
    clients = [openai.AsyncOpenAI(base_url=f"{u}/v1", api_key=KEYS[KEY]["key"],
                                  max_retries=max_retries, timeout=60) for u in urls]
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> tuple[int, int]:
        which = i % len(clients)
        async with sem:
            try:
                reply = await clients[which].chat.completions.create(
                    model="gpt-4o-mini", max_tokens=10, stream=stream,
                    messages=[{"role": "user", "content": f"request {i}"}])
                if stream:
                    async for _ in reply:  # type: ignore[union-attr]
                        pass
                return which, 200
            except openai.APIStatusError as exc:
                return which, exc.status_code

    try:
        return list(await asyncio.gather(*(one(i) for i in range(count))))
    finally:
        for c in clients:
            await c.close()


# -- two replicas -------------------------------------------------------------------------------
def test_two_replicas_share_a_per_key_rpm(tmp_path: Path, database: str) -> None:
    fleet = Fleet(tmp_path, database, {"keys": {KEY: {"rpm": 60}}})
    try:
        started = time.monotonic()
        results = asyncio.run(fire(fleet.urls, 200, 40))
        seconds = time.monotonic() - started
        admitted = [which for which, status in results if status == 200]
        refused = [status for _, status in results if status != 200]
        overshoot = len(admitted) - 60
        print(f"\nshared rpm=60, 200 requests at concurrency 40 over 2 replicas in "
              f"{seconds:.1f} s: admitted {len(admitted)} (A {admitted.count(0)}, "
              f"B {admitted.count(1)}), overshoot {overshoot}")
        assert overshoot == 0
        assert set(refused) == {429}
        assert admitted.count(0) > 0 and admitted.count(1) > 0  # both replicas served
        assert fleet.upstream.state.total_requests == 60
        assert seconds < 50  # all inside one window: nothing expired meanwhile
    finally:
        fleet.close()


def test_two_replicas_share_a_concurrency_limit(tmp_path: Path, database: str) -> None:
    fleet = Fleet(tmp_path, database, {"keys": {KEY: {"concurrent": 4}}}, delay_s=0.3)
    try:
        results = asyncio.run(fire(fleet.urls, 24, 24, max_retries=30, stream=True))
        assert [status for _, status in results] == [200] * 24
        print(f"\nshared concurrent=4, 24 streams over 2 replicas: peak in flight upstream "
              f"{fleet.upstream.peak}")
        assert fleet.upstream.peak == 4
        assert fleet.upstream.state.total_requests == 24
    finally:
        fleet.close()


def test_a_killed_replica_frees_its_slots(tmp_path: Path, database: str) -> None:
    fleet = Fleet(tmp_path, database, {"keys": {KEY: {"concurrent": 2}}}, delay_s=30)
    a, b = fleet.replicas
    loop = LoopThread()
    try:
        # Two slow requests hold both slots on A; then A dies with them.
        held = [asyncio.run_coroutine_threadsafe(fire([a.url], 1, 1), loop.loop)
                for _ in range(2)]
        deadline = time.monotonic() + 10
        while fleet.upstream.inflight < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        fleet.upstream.state.delay_s = 0
        assert asyncio.run(fire([b.url], 1, 1)) == [(0, 429)]  # A's slots count on B
        a.kill9()
        for fut in held:
            fut.cancel()
        started = time.monotonic()
        while asyncio.run(fire([b.url], 1, 1)) != [(0, 200)]:
            assert time.monotonic() - started < RECLAIM_S + 8, "slots never freed"
            time.sleep(0.2)
        print(f"\nslots of a replica killed with kill -9 freed after "
              f"{time.monotonic() - started:.1f} s (reclaim_after_s {RECLAIM_S})")
    finally:
        loop.stop()
        fleet.close()


# -- the store away -----------------------------------------------------------------------------
class TcpRelay:
    """A TCP relay to PostgreSQL that a test can cut (every connection dropped, new ones
    refused: the database is unreachable) and restore."""

    def __init__(self, target: str):
        parts = urlsplit(target)
        self.host, self.port_to = parts.hostname or "127.0.0.1", parts.port or 5432
        self.port = free_port()
        self.url = target.replace(parts.netloc, f"{parts.username}@127.0.0.1:{self.port}")
        self.lt = LoopThread()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.restore()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.port_to)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        async def cut() -> None:
            assert self.server is not None
            self.server.close()
            for w in self.writers:
                w.transport.abort()
            self.writers.clear()
            self.server = None

        self.lt.run(cut())

    def restore(self) -> None:
        async def listen() -> asyncio.Server:
            return await asyncio.start_server(self._relay, "127.0.0.1", self.port)

        self.server = self.lt.run(listen())

    def close(self) -> None:
        if self.server is not None:
            self.cut()
        self.lt.stop()


def chat(stack: Stack, max_retries: int = 0) -> tuple[int, Any, Any]:
    client = stack.client(KEY, max_retries=max_retries)
    try:
        client.chat.completions.create(model="gpt-4o-mini", max_tokens=10,
                                       messages=[{"role": "user", "content": "hello"}])
        return 200, None, None
    except openai.APIStatusError as exc:
        return exc.status_code, exc.response.headers, exc.body
    finally:
        client.close()


def unavailable(stack: Stack) -> float:
    """Requests answered 503 ``unavailable``, read from /metrics without waiting for the
    ledger (which cannot flush while the database is away)."""
    text = stack.request("GET", "/metrics").body.decode()
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples if s.name == "costwall_requests_total"
               and s.labels.get("outcome") == "unavailable")


def wait_for(stack: Stack, status: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while chat(stack)[0] != status:
        assert time.monotonic() < deadline, f"never {status}"
        time.sleep(0.2)


def test_database_unreachable_closed_refuses_fast_and_recovers(tmp_path: Path,
                                                                database: str) -> None:
    relay = TcpRelay(database)
    stack = Stack(tmp_path, database=relay.url, rate_limits={"keys": {KEY: {"rpm": 100}}})
    try:
        assert chat(stack)[0] == 200
        relay.cut()
        started = time.monotonic()
        status, headers, body = chat(stack, max_retries=2)  # the SDK must not retry it
        assert time.monotonic() - started < 4  # the connection is gone: no timeout waited
        assert status == 503
        assert (body["code"], body["type"]) == ("rate_limits_unavailable", "server_error")
        assert headers["x-should-retry"] == "false" and headers["retry-after"] == "5"
        assert unavailable(stack) == 1  # one request, not three
        assert stack.state.total_requests == 1
        relay.restore()
        wait_for(stack, 200)  # the limiter and the ledger reconnect by themselves
        rates: Any = stack.gw.rates
        assert rates.up
    finally:
        if relay.server is None:  # the ledger needs its database to close
            relay.restore()
        stack.close()
        relay.close()


def test_database_unreachable_open_passes_the_rate_limit(tmp_path: Path,
                                                         database: str) -> None:
    """``open`` lets the rate limiter admit on this replica alone; the budget store, which
    has no such option, then refuses on its own (its hard cap needs the database)."""
    relay = TcpRelay(database)
    stack = Stack(tmp_path, database=relay.url,
                  rate_limits={"keys": {KEY: {"rpm": 100}}, "on_store_error": "open"})
    try:
        assert chat(stack)[0] == 200
        relay.cut()
        status, _, body = chat(stack)
        assert (status, body["code"]) == (503, "budget_store_unavailable")
        relay.restore()
        wait_for(stack, 200)
    finally:
        if relay.server is None:
            relay.restore()
        stack.close()
        relay.close()


async def lock_rate_tables(url: str) -> asyncpg.Connection:
    """Someone else holds the rate tables: every statement of the limiter waits (and is cut
    by its statement timeout) while the ledger and the budgets work on."""
    conn = await asyncpg.connect(url)
    await conn.execute("BEGIN; LOCK TABLE rate_windows, rate_inflight IN ACCESS EXCLUSIVE MODE")
    return conn


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_rate_store_not_answering(tmp_path: Path, database: str, mode: str) -> None:
    stack = Stack(tmp_path, database=database,
                  rate_limits={"keys": {KEY: {"rpm": 3}}, "on_store_error": mode})
    loop = LoopThread()
    try:
        assert chat(stack)[0] == 200  # counted in the shared window: 1 of 3
        conn = loop.run(lock_rate_tables(database))
        started = time.monotonic()
        first = chat(stack)[0]
        assert time.monotonic() - started < 5  # the limiter's own timeout (2 s) and a little
        statuses = [first] + [chat(stack)[0] for _ in range(4)]
        if mode == "closed":
            assert statuses == [503] * 5
            assert unavailable(stack) == 5
            assert stack.state.total_requests == 1
        else:  # limited on this replica alone, from an empty window: 3 more, then 429
            assert statuses == [200, 200, 200, 429, 429]
            assert stack.state.total_requests == 4
        loop.run(conn.execute("ROLLBACK"))
        loop.run(conn.close())
        rates: Any = stack.gw.rates
        deadline = time.monotonic() + 10
        while not rates.up:
            assert time.monotonic() < deadline, "the store never came back"
            time.sleep(0.1)
        # Shared again: the window as the store kept it (1 of 3 before the outage).
        assert [chat(stack)[0] for _ in range(3)] == [200, 200, 429]
    finally:
        stack.close()
        loop.stop()


def test_housekeeping_deletes_dead_slots_and_idle_rows(database: str) -> None:
    """The sweep's SQL: slots of replicas not heard of for the reclaim window go, windows idle
    for two minutes go, the lock row of a scope with nothing in flight goes; the rest stays."""
    from gateway.store.pg_rates_sql import SCHEMA, SWEEP_DEAD, SWEEP_IDLE

    async def run() -> list[tuple[str, str, str]]:
        conn = await asyncpg.connect(database)
        try:
            await conn.execute(SCHEMA)
            await conn.execute("CREATE TABLE replicas (id TEXT, last_seen TIMESTAMPTZ)")
            await conn.execute("INSERT INTO replicas VALUES ('alive', now()), "
                               "('late', now() - interval '1 minute')")
            await conn.execute(
                "INSERT INTO rate_windows (scope, id, kind, head) VALUES "
                "('key', 'old', 'rpm', 5), ('key', 'new', 'rpm', 500), "
                "('key', 'old', 'concurrent', 0), ('key', 'new', 'concurrent', 0)")
            await conn.execute("INSERT INTO rate_inflight VALUES ('key', 'new', 'alive', 1), "
                               "('key', 'old', 'late', 2), ('key', 'old', 'gone', 1)")
            assert await conn.execute(SWEEP_DEAD, "me", 10.0) == "DELETE 2"
            assert await conn.execute(SWEEP_IDLE, 100) == "DELETE 2"
            return [tuple(r) for r in await conn.fetch(
                "SELECT scope, id, kind FROM rate_windows ORDER BY 1, 2, 3")]
        finally:
            await conn.close()

    assert asyncio.run(run()) == [("key", "new", "concurrent"), ("key", "new", "rpm")]
