"""The end-to-end budget suite again, on PostgreSQL (the shared, multi-replica engine).

Every test of ``tests/test_budgets.py`` runs here unchanged against a fresh database of its
own: hard cap under concurrency, scopes, overrides, warnings, clamping, month rollover and
restart. Multi-replica behaviour is in ``tests/test_replicas.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import pg
from tests.test_budgets import *  # noqa: F403  (the tests themselves)


@pytest.fixture(autouse=True)
def postgres(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    pg.require()
    with pg.temp_database() as url:
        monkeypatch.setenv("COSTWALL_TEST_DATABASE", url)
        yield url
