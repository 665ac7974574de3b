"""The audit trail never breaks a request, and its chain detects what it claims to detect.

A real gateway on a real port, the official SDK, the fake upstream and the real SQLite ledger:
the audit directory is broken by putting a regular file where ``logs/budget`` should be (a
mode like 0500 does not stop root), a database failure is a real SQLite trigger, and
``costwall check --audit`` is the real command run on files tampered with in each way the
chain claims to catch.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import orjson
import pytest

from gateway.audit import GENESIS
from gateway.cli import main as costwall
from tests.harness import ADMIN_TOKEN, Stack

MSG = [{"role": "user", "content": "hello"}]
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
EVENTS = 5


def check(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``costwall check --audit``: exit code and what it printed."""
    capsys.readouterr()
    code = costwall(["check", "--audit", "--config", str(config)])
    return code, capsys.readouterr().out


def blocked(stack: Stack, n: int) -> None:
    for _ in range(n):
        with pytest.raises(openai.APIStatusError) as info:
            stack.client().chat.completions.create(model="gpt-4o-mini", messages=MSG)
        assert info.value.status_code == 402


# -- tampering ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trail(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A stopped gateway's directory with EVENTS blocked events, and a pristine copy."""
    directory = tmp_path_factory.mktemp("trail")
    stack = Stack(directory, budgets={"global": {"monthly_usd": "0"}})
    try:
        blocked(stack, EVENTS)
        stack.flush()
    finally:
        stack.close()
    pristine = directory / "pristine"
    shutil.copytree(directory / "logs", pristine)
    yield directory, pristine


@pytest.fixture()
def files(trail: tuple[Path, Path]) -> Iterator[tuple[Path, Path]]:
    """(config, logs/budget) restored to the pristine trail for each test."""
    directory, pristine = trail
    shutil.rmtree(directory / "logs")
    shutil.copytree(pristine, directory / "logs")
    yield directory / "costwall.yaml", directory / "logs" / "budget"


def lines_of(folder: Path) -> list[bytes]:
    return (folder / "events.jsonl").read_bytes().splitlines()


def put(folder: Path, lines: list[bytes]) -> None:
    (folder / "events.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))


def edited(line: bytes) -> bytes:
    record = orjson.loads(line)
    record["estimate_usd"] = "0"
    return orjson.dumps(record)


def rechained(lines: list[bytes], digest: Callable[[bytes], str]) -> list[bytes]:
    """What someone without the key can do: recompute every prev and mac another way."""
    out, prev = [], GENESIS
    for line in lines:
        record = orjson.loads(line)
        record.pop("mac")
        record["prev"] = prev
        body = orjson.dumps(record)
        prev = digest(body)
        out.append(body[:-1] + b',"mac":"' + prev.encode() + b'"}')
    return out


def forged_append(lines: list[bytes]) -> list[bytes]:
    """A new last line whose prev is the real MAC of the last line (copied from it)."""
    last = orjson.loads(lines[-1])
    fake = {**last, "n": len(lines) + 1, "seq": last["seq"] + 1, "prev": last["mac"],
            "request_id": "cw-forged"}
    fake["mac"] = hashlib.sha256(orjson.dumps(fake)).hexdigest()
    return [*lines, orjson.dumps(fake)]


def sha(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def hmac_guess(body: bytes) -> str:
    import hmac

    return hmac.new(b"guessed-key", body, hashlib.sha256).hexdigest()


JSONL_CASES: dict[str, tuple[Callable[[list[bytes]], list[bytes]], str]] = {
    "edited line": (lambda ls: [*ls[:2], edited(ls[2]), *ls[3:]], "events.jsonl line 3:"),
    "edited first line": (lambda ls: [edited(ls[0]), *ls[1:]], "events.jsonl line 1:"),
    "inserted forged line": (
        lambda ls: [*ls[:2], orjson.dumps({**orjson.loads(ls[2]), "request_id": "cw-x"}),
                    *ls[2:]], "events.jsonl line 3:"),
    "inserted copy": (lambda ls: [*ls[:2], ls[1], *ls[2:]], "events.jsonl line 3: claims"),
    "deleted line": (lambda ls: [*ls[:2], *ls[3:]], "line 3: is event 4; event 3 deleted"),
    "deleted last lines": (lambda ls: ls[:3], "has 3 events but the database anchor records 5"),
    "edited last line": (lambda ls: [*ls[:-1], edited(ls[-1])], "events.jsonl line 5:"),
    "forged append": (forged_append, "events.jsonl line 6:"),
    "re-chained with SHA-256": (lambda ls: rechained(ls, sha), "events.jsonl line 1: its MAC"),
    "re-chained with another key": (lambda ls: rechained(ls, hmac_guess),
                                    "events.jsonl line 1: its MAC"),
    "reordered": (lambda ls: [ls[0], ls[2], ls[1], *ls[3:]], "events.jsonl line 2:"),
}


def test_intact_trail_passes(files: tuple[Path, Path],
                             capsys: pytest.CaptureFixture[str]) -> None:
    config, _ = files
    code, out = check(config, capsys)
    assert code == 0, out
    assert f"audit trail: {EVENTS} events, chain intact" in out


@pytest.mark.parametrize("case", list(JSONL_CASES))
def test_check_names_the_first_bad_line(case: str, files: tuple[Path, Path],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    config, folder = files
    tamper, expected = JSONL_CASES[case]
    put(folder, tamper(lines_of(folder)))
    code, out = check(config, capsys)
    assert code == 1, out
    problems = [line for line in out.splitlines() if line.startswith("error: audit trail:")]
    assert problems and expected in problems[0], out


@pytest.mark.parametrize("how", ["emptied", "cut mid-line", "deleted"])
def test_truncated_or_deleted_file(how: str, files: tuple[Path, Path],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    config, folder = files
    path = folder / "events.jsonl"
    if how == "emptied":
        path.write_bytes(b"")
        expected = "has 0 events but the database anchor records 5"
    elif how == "cut mid-line":
        data = path.read_bytes()
        path.write_bytes(data[:len(data) - 40])
        expected = "events.jsonl line 5: not valid JSON"
    else:
        path.unlink()
        expected = "events.jsonl is missing, but the database anchor records 5 events"
    code, out = check(config, capsys)
    assert code == 1 and expected in out, out


MD = "blocked-executions.md"
MD_CASES: dict[str, tuple[Callable[[list[str]], list[str]], str]] = {
    # header: 4 lines, then one row per event (file lines 5..9)
    "edited row": (lambda ls: [*ls[:6], ls[6].replace("gpt-4o-mini", "gpt-4o"), *ls[7:]],
                   f"{MD} line 7: does not match event 3 (edited)"),
    "deleted row": (lambda ls: [*ls[:6], *ls[7:]],
                    f"{MD} line 7: the row of event 3 is missing (deleted)"),
    "added row": (lambda ls: [*ls, ls[-1]], f"{MD} line 10: a row without an event (added)"),
    "inserted row": (lambda ls: [*ls[:5], ls[4].replace("acme", "evil"), *ls[5:]],
                     f"{MD} line 6: a row without an event (inserted)"),
    "last row deleted": (lambda ls: ls[:-1], f"{MD}: the row of event 5 is missing"),
    "file deleted": (lambda ls: [], f"{MD} is missing (5 events of kind blocked)"),
}


@pytest.mark.parametrize("case", list(MD_CASES))
def test_markdown_is_checked_against_the_events(case: str, files: tuple[Path, Path],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    config, folder = files
    tamper, expected = MD_CASES[case]
    path = folder / MD
    rows = tamper(path.read_text().splitlines(keepends=True))
    if rows:
        path.write_text("".join(rows))
    else:
        path.unlink()
    code, out = check(config, capsys)
    assert code == 1 and expected in out, out
    assert "events.jsonl" not in out  # the chain itself is fine


# -- the request path never depends on the audit files ------------------------------------------
def break_audit_dir(stack: Stack) -> Path:
    """A regular file where ``logs/budget`` must be: every write there fails, also as root."""
    folder = stack.settings.logs_dir / "budget"
    if folder.exists():
        shutil.move(folder, folder.with_name("budget.saved"))
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.write_text("not a directory")
    with pytest.raises(OSError):
        (folder / "probe").write_text("x")
    return folder


def repair_audit_dir(folder: Path) -> None:
    folder.unlink()
    saved = folder.with_name("budget.saved")
    if saved.exists():
        shutil.move(saved, folder)


def until(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_broken_audit_dir_never_changes_an_answer(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    stack = Stack(tmp_path, budgets={"global": {"monthly_usd": "0"}})
    try:
        blocked(stack, 1)  # the directory exists and holds one event
        stack.flush()
        folder = break_audit_dir(stack)

        blocked(stack, 1)  # a 402 stays a 402
        # A forwarded request whose settlement is audited (an override execution) keeps its
        # answer; the SDK, retrying as it does by default, sends it to the upstream once.
        before = stack.state.total_requests
        sdk = stack.client("acme-ops", max_retries=2)
        reply = sdk.chat.completions.create(
            model="gpt-4o-mini", messages=MSG, max_tokens=5,
            extra_headers={"X-Costwall-Override": "incident 4711"})
        assert reply.choices[0].message.content
        assert stack.state.total_requests == before + 1
        assert len([r for r in stack.rows() if r.override]) == 1
        # An admin change is applied and its record kept (in the database) meanwhile.
        r = stack.request("PUT", "/admin/api/budgets/tenant/acme", headers=ADMIN,
                          json={"monthly_usd": "7", "reason": "audit dir broken"})
        assert r.status == 200, r.body
        ready = stack.request("GET", "/readyz")
        body = ready.json()
        assert ready.status == 200 and body["status"] == "ready", body
        assert (body["audit"], body["audit_backlog"]) == ("error", 3), body
        assert "audit_error" in body

        repair_audit_dir(folder)
        until(lambda: stack.request("GET", "/readyz").json()["audit_backlog"] == 0)
        assert stack.lt.run(stack.gw.audit.flush())
        kinds = [e["kind"] for e in stack.gw.audit.events()]
        assert kinds == ["blocked", "blocked", "override", "admin"]
        assert stack.request("GET", "/readyz").json()["audit"] == "ok"
        code, out = check(tmp_path / "costwall.yaml", capsys)
        assert code == 0 and "4 events, chain intact" in out, out
    finally:
        stack.close()


def test_audit_dir_broken_from_the_start(tmp_path: Path) -> None:
    stack = Stack(tmp_path, budgets={"global": {"monthly_usd": "0"}})
    try:
        folder = break_audit_dir(stack)
        blocked(stack, 3)
        # queued through the ledger's writer: stored a moment after the 402s
        until(lambda: stack.request("GET", "/readyz").json()["audit_backlog"] == 3)
        stack.restart()  # the backlog survives a restart: it is in the database
        assert stack.request("GET", "/readyz").json()["audit_backlog"] == 3
        repair_audit_dir(folder)
        until(lambda: stack.request("GET", "/readyz").json()["audit_backlog"] == 0)
        assert [e["kind"] for e in stack.gw.audit.events()] == ["blocked"] * 3
        assert stack.lt.run(stack.gw.audit.verify()).ok
    finally:
        stack.close()


# -- admin changes and their records: both or neither -------------------------------------------
def trigger(stack: Stack, table: str, event: str = "INSERT") -> Callable[[], None]:
    """Make every ``event`` on ``table`` fail in the database; returns the undo."""
    db = Path(stack.settings.database.removeprefix("sqlite:///"))
    name = f"fail_{table}_{event.lower()}"
    with sqlite3.connect(db) as conn:
        conn.execute(f"CREATE TRIGGER {name} BEFORE {event} ON {table} "
                     "BEGIN SELECT RAISE(ABORT, 'disk says no'); END")

    def undo() -> None:
        with sqlite3.connect(db) as conn:
            conn.execute(f"DROP TRIGGER {name}")

    return undo


def caps_rows(stack: Stack) -> list[tuple[str, str, int | None]]:
    db = Path(stack.settings.database.removeprefix("sqlite:///"))
    with sqlite3.connect(db) as conn:
        return list(conn.execute("SELECT scope, id, amount FROM budget_windows"))


@pytest.mark.parametrize("failing", ["audit_events", "budget_windows"])
def test_admin_change_and_its_record_commit_together(tmp_path: Path, failing: str) -> None:
    stack = Stack(tmp_path)
    try:
        undo = trigger(stack, failing)
        r = stack.request("PUT", "/admin/api/budgets/tenant/acme", headers=ADMIN,
                          json={"monthly_usd": "3", "reason": "db failing"})
        assert r.status == 503, r.body
        error = r.json()["error"]
        assert error["code"] == "ledger_unavailable" and "not applied" in error["message"]
        budget = stack.request("GET", "/admin/api/budget", headers=ADMIN).json()["scopes"]
        assert not any(s["scope"] == "tenant" and s["id"] == "acme" for s in budget)
        assert caps_rows(stack) == []
        r = stack.request("POST", "/admin/api/override", headers=ADMIN,
                          json={"enabled": True, "reason": "db failing"})
        if failing == "audit_events":
            assert r.status == 503 and not stack.gw.overrides.state.enabled
        stack.flush()
        assert [e["action"] for e in stack.gw.audit.events("admin")] == (
            [] if failing == "audit_events" else ["override.on"])
        undo()
        r = stack.request("PUT", "/admin/api/budgets/tenant/acme", headers=ADMIN,
                          json={"monthly_usd": "3", "reason": "db back"})
        assert r.status == 200 and caps_rows(stack) == [("tenant", "acme", 3 * 10**12)]
        stack.flush()
        assert [e["action"] for e in stack.gw.audit.events("admin")][-1] == "cap.set"
    finally:
        stack.close()


def test_unanchored_tail_is_rewritten_not_duplicated(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Files written but the anchor update failing (as in a crash between the two): the
    writer cuts its own unanchored bytes and writes them again once it can anchor them."""
    stack = Stack(tmp_path, budgets={"global": {"monthly_usd": "0"}})
    try:
        blocked(stack, 1)
        stack.flush()
        undo = trigger(stack, "audit_anchor", "UPDATE")
        blocked(stack, 2)
        folder = stack.settings.logs_dir / "budget"
        until(lambda: stack.gw.audit.error is not None and len(lines_of(folder)) == 3)
        assert stack.request("GET", "/readyz").json()["audit_backlog"] == 2  # not anchored
        undo()
        assert stack.lt.run(stack.gw.audit.flush(timeout=40))
        assert len(lines_of(folder)) == 3
        code, out = check(tmp_path / "costwall.yaml", capsys)
        assert code == 0 and "3 events, chain intact" in out, out
    finally:
        stack.close()


def test_writer_stops_at_a_tampered_file_and_readyz_says_so(tmp_path: Path) -> None:
    stack = Stack(tmp_path, budgets={"global": {"monthly_usd": "0"}})
    try:
        blocked(stack, 2)
        stack.flush()
        jsonl = stack.settings.logs_dir / "budget" / "events.jsonl"
        jsonl.write_bytes(jsonl.read_bytes().splitlines(keepends=True)[0])  # cut the tail
        blocked(stack, 1)
        until(lambda: stack.request("GET", "/readyz").json()["audit"] == "error")
        body = stack.request("GET", "/readyz").json()
        assert body["audit_backlog"] == 1 and "anchor records" in body["audit_error"]
        assert len(jsonl.read_bytes().splitlines()) == 1  # nothing appended to a forked chain
    finally:
        stack.close()


def test_key_file_is_private_and_kept(tmp_path: Path) -> None:
    stack = Stack(tmp_path)
    try:
        key_path = tmp_path / "audit.key"
        assert key_path.stat().st_mode & 0o777 == 0o600
        key = key_path.read_bytes()
        stack.restart()
        assert key_path.read_bytes() == key and stack.gw.audit.key == key.strip()
        assert not list((tmp_path / "logs").rglob("audit.key"))
    finally:
        stack.close()


def test_an_unkeyed_trail_from_before_is_kept_aside(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "logs" / "budget"
    folder.mkdir(parents=True)
    old = b'{"kind":"blocked","time":"2026-01-01T00:00:00Z","prev":"' + GENESIS.encode() + b'"}\n'
    (folder / "events.jsonl").write_bytes(old)
    stack = Stack(tmp_path, budgets={"global": {"monthly_usd": "0"}})
    try:
        blocked(stack, 1)
        stack.flush()
        [aside] = folder.glob("events.jsonl.before-*")
        assert aside.read_bytes() == old
        code, out = check(tmp_path / "costwall.yaml", capsys)
        assert code == 0 and "1 events, chain intact" in out, out
    finally:
        stack.close()
