"""Throwaway PostgreSQL databases for tests: one per test, created and dropped here.

PostgreSQL is expected at ``COSTWALL_TEST_PG`` (default: the local server with trust auth).
Each database has a random name, so tests running in parallel never see each other's rows.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
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


def available() -> bool:
    try:
        asyncio.run(_admin("SELECT 1"))
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    return True


@contextmanager
def temp_database() -> Iterator[str]:
    """The URL of a fresh, empty database, dropped (with its connections) afterwards."""
    name = f"costwall_test_{secrets.token_hex(6)}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{SERVER}/{name}"
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def require() -> None:
    """Skip unless PostgreSQL answers (CI and this machine run it; a laptop may not)."""
    if not available():
        pytest.skip(f"PostgreSQL is not reachable at {SERVER}")
