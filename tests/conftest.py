"""Shared fixtures: a running simulator + gateway stack per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Stack


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path)
    yield s
    s.close()


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator[type[Stack]]:
    """Build a stack with config overrides: ``make_stack(budgets={...}, keys=[...])``."""
    made: list[Stack] = []

    def make(**config: object) -> Stack:
        s = Stack(tmp_path / f"s{len(made)}", **config)  # type: ignore[arg-type]
        made.append(s)
        return s

    yield make  # type: ignore[misc]
    for s in made:
        s.close()
