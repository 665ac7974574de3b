"""The end-to-end rate-limit suite again, on PostgreSQL (the shared limiter).

Every test of ``tests/test_rates.py`` runs here unchanged against a fresh database of its own,
through ``gateway.store.pg_rates.SharedRates``. Two replicas and store faults are in
``tests/test_rates_replicas.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import pg
from tests.test_rates import *  # noqa: F403  (the tests themselves)


@pytest.fixture(autouse=True)
def postgres(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    pg.require()
    with pg.temp_database() as url:
        monkeypatch.setenv("COSTWALL_TEST_DATABASE", url)
        yield url
