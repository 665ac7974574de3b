"""Monthly audit rotation: a real gateway with an injected clock writes events in October and
November; October's files move to ``logs/budget/archive/2026-10/``, the chain continues in the
new segment, ``costwall check --audit`` passes, and tampering with the archive is named with
its file and line.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import openai
import orjson
import pytest

from gateway.audit import AuditTampered, rotate_files
from gateway.cli import main as costwall
from tests import pg
from tests.harness import ADMIN_TOKEN, Stack

MSG = [{"role": "user", "content": "hello"}]
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


class Clock:
    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def blocked(stack: Stack, n: int) -> None:
    for _ in range(n):
        with pytest.raises(openai.APIStatusError) as info:
            stack.client().chat.completions.create(model="gpt-4o-mini", messages=MSG)
        assert info.value.status_code == 402


def check(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = costwall(["check", "--audit", "--config", str(config)])
    return code, capsys.readouterr().out


@pytest.fixture(scope="module")
def rotated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """Two events in October, a rollover, three in November; then the gateway stops."""
    directory = tmp_path_factory.mktemp("rotation")
    clock = Clock(datetime(2026, 10, 30, 12, tzinfo=UTC))
    stack = Stack(directory, clock=clock, budgets={"global": {"monthly_usd": "0"}})
    try:
        blocked(stack, 2)
        stack.flush()
        budget = directory / "logs" / "budget"
        assert not (budget / "archive").exists()
        clock.now = datetime(2026, 11, 1, 0, 0, 5, tzinfo=UTC)
        deadline = time.monotonic() + 10
        while not (budget / "archive" / "2026-10" / "events.jsonl").exists():
            assert time.monotonic() < deadline, "no rotation at the month's start"
            stack.flush()
            time.sleep(0.1)
        assert not (budget / "events.jsonl").exists()  # rotated before any November event
        blocked(stack, 2)
        stack.restart()  # a restart in November neither rotates again nor forks the chain
        blocked(stack, 1)
        stack.flush()
        logs = stack.request("GET", "/admin/api/logs/blocked", headers=ADMIN).json()
        assert logs["total"] == 5  # the logs API reads the archive too
    finally:
        stack.close()
    pristine = directory / "pristine"
    shutil.copytree(directory / "logs", pristine)
    yield directory, pristine


@pytest.fixture()
def files(rotated: tuple[Path, Path]) -> Iterator[tuple[Path, Path]]:
    directory, pristine = rotated
    shutil.rmtree(directory / "logs")
    shutil.copytree(pristine, directory / "logs")
    yield directory / "costwall.yaml", directory / "logs" / "budget"


def test_october_is_archived_and_the_chain_continues(
        files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    config, budget = files
    archive = budget / "archive" / "2026-10"
    old = [orjson.loads(x) for x in (archive / "events.jsonl").read_bytes().splitlines()]
    new = [orjson.loads(x) for x in (budget / "events.jsonl").read_bytes().splitlines()]
    assert [e["n"] for e in old] == [1, 2] and [e["n"] for e in new] == [3, 4, 5]
    assert new[0]["prev"] == old[-1]["mac"]
    assert all(e["time"].startswith("2026-10") for e in old)
    assert all(e["time"].startswith("2026-11") for e in new)
    md = (archive / "blocked-executions.md").read_text().splitlines()
    assert md[0] == "# Blocked executions" and len(md) == 4 + 2
    current = (budget / "blocked-executions.md").read_text().splitlines()
    assert current[0] == "# Blocked executions" and len(current) == 4 + 3
    code, out = check(config, capsys)
    assert code == 0, out
    assert "5 events, chain intact" in out


def test_an_edited_archived_line_is_named_with_its_file(
        files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    config, budget = files
    path = budget / "archive" / "2026-10" / "events.jsonl"
    lines = path.read_bytes().splitlines()
    lines[1] = lines[1].replace(b'"tenant":"acme"', b'"tenant":"evil"')
    path.write_bytes(b"".join(x + b"\n" for x in lines))
    code, out = check(config, capsys)
    assert code == 1
    assert "archive/2026-10/events.jsonl line 2: its MAC does not match" in out


def test_a_deleted_archive_is_detected(files: tuple[Path, Path],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    config, budget = files
    shutil.rmtree(budget / "archive")
    code, out = check(config, capsys)
    assert code == 1
    assert ("the archived segments hold 0 events but the current segment starts after "
            "event 2") in out


def test_a_cut_archive_is_detected(files: tuple[Path, Path],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    config, budget = files
    path = budget / "archive" / "2026-10" / "events.jsonl"
    path.write_bytes(path.read_bytes().splitlines(keepends=True)[0])
    code, out = check(config, capsys)
    assert code == 1
    assert ("the archived segments hold 1 events but the current segment starts after "
            "event 2") in out


def test_an_archive_deleted_with_the_anchor_rewound_still_breaks_the_chain(
        files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """Without the archive, the current segment's first line no longer links to anything."""
    config, budget = files
    shutil.rmtree(budget / "archive" / "2026-10")
    (budget / "archive" / "2026-09").mkdir()
    code, out = check(config, capsys)
    assert code == 1 and "events.jsonl line 1: prev is not the MAC" in out


def test_rotation_with_postgresql(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same rollover with the trail anchored in PostgreSQL."""
    pg.require()
    with pg.temp_database() as url:
        clock = Clock(datetime(2026, 10, 31, 23, 59, tzinfo=UTC))
        stack = Stack(tmp_path, clock=clock, database=url,
                      budgets={"global": {"monthly_usd": "0"}})
        try:
            blocked(stack, 2)
            stack.flush()
            clock.now = datetime(2026, 11, 1, 0, 1, tzinfo=UTC)
            blocked(stack, 1)
            stack.flush()
        finally:
            stack.close()
        budget = tmp_path / "logs" / "budget"
        assert len((budget / "archive" / "2026-10" / "events.jsonl").read_bytes()
                   .splitlines()) == 2
        assert len((budget / "events.jsonl").read_bytes().splitlines()) == 1
        code, out = check(tmp_path / "costwall.yaml", capsys)
        assert code == 0 and "3 events, chain intact" in out, out


def test_a_rotation_cut_short_by_a_crash_finishes_and_never_overwrites(tmp_path: Path) -> None:
    """``rotate_files`` again after a crash between two renames: the rest moves; a file on
    both sides is refused rather than overwritten."""
    for name in ("events.jsonl", "blocked-executions.md"):
        (tmp_path / name).write_text(name)
    target = tmp_path / "archive" / "2026-10"
    target.mkdir(parents=True)
    (tmp_path / "events.jsonl").rename(target / "events.jsonl")  # the crash: one file moved
    rotate_files(tmp_path, "2026-10", ["events.jsonl", "blocked-executions.md"])
    assert sorted(p.name for p in target.iterdir()) == ["blocked-executions.md", "events.jsonl"]
    assert not (tmp_path / "blocked-executions.md").exists()
    (tmp_path / "events.jsonl").write_text("new")
    with pytest.raises(AuditTampered):
        rotate_files(tmp_path, "2026-10", ["events.jsonl"])
    assert (target / "events.jsonl").read_text() == "events.jsonl"


def test_an_event_stamped_in_the_archived_month_joins_the_new_segment(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Rotated at midnight, then an event stamped a moment before it reaches the queue (or a
    clock steps back): it joins the new month's segment instead of starting a second
    segment of the archived month, whose rotation would then find the archive taken."""
    clock = Clock(datetime(2026, 10, 31, 23, 59, tzinfo=UTC))
    stack = Stack(tmp_path, clock=clock, budgets={"global": {"monthly_usd": "0"}})
    try:
        blocked(stack, 1)
        stack.flush()
        clock.now = datetime(2026, 11, 1, 0, 0, 1, tzinfo=UTC)
        stack.flush()  # no event pending: the writer rotates into November
        budget = tmp_path / "logs" / "budget"
        assert (budget / "archive" / "2026-10" / "events.jsonl").exists()
        clock.now = datetime(2026, 10, 31, 23, 59, 59, tzinfo=UTC)  # a late October event
        blocked(stack, 1)
        clock.now = datetime(2026, 11, 2, tzinfo=UTC)
        blocked(stack, 1)
        stack.flush()
        assert stack.gw.audit.error is None
        assert len(list(stack.gw.audit.events("blocked"))) == 3
        assert [e["n"] for e in map(orjson.loads, (budget / "events.jsonl").open("rb"))] \
            == [2, 3]
    finally:
        stack.close()
    code, out = check(tmp_path / "costwall.yaml", capsys)
    assert code == 0, out
