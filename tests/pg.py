"""Throwaway PostgreSQL databases for tests: one per test, created and dropped here.

PostgreSQL is expected at ``COSTWALL_TEST_PG`` (default: the local server with trust auth).
Each database has a random name, so tests running in parallel never see each other's rows.
"""

from __future__ import annotations

import asyncio
import functools
import os
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import asyncpg
import pytest

SERVER = os.environ.get("COSTWALL_TEST_PG", "postgresql://postgres@127.0.0.1:5432")


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(f"{SERVER}/postgres", timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@functools.cache
def available() -> bool:
    """Whether the server answers (asked once, from a thread: callers may be inside a loop)."""

    def probe() -> bool:
        try:
            asyncio.run(_admin("SELECT 1"))
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return False
        return True

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(probe).result()


async def create_database() -> str:
    """The URL of a fresh, empty database (drop it with ``drop_database``)."""
    name = f"costwall_test_{secrets.token_hex(6)}"
    await _admin(f'CREATE DATABASE "{name}"')
    return f"{SERVER}/{name}"


async def drop_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    assert name.startswith("costwall_test_")
    await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def temp_database() -> Iterator[str]:
    """A fresh database for synchronous tests, dropped (with its connections) afterwards."""
    url = asyncio.run(create_database())
    try:
        yield url
    finally:
        asyncio.run(drop_database(url))


def require() -> None:
    """Skip unless PostgreSQL answers (CI and this machine run it; a laptop may not)."""
    if not available():
        pytest.skip(f"PostgreSQL is not reachable at {SERVER}")
