"""Storage faults fail closed and the gateway stays alive (SQLite ledger).

Measured on main: with the database file deleted or renamed under a running gateway, requests
got 200 and ``/readyz`` 200 while SQLite committed into an unlinked file (after a restart the
ledger was empty and every cap started from zero). Now the ledger compares the path's inode
with the file it opened and refuses (503 ``ledger_unavailable``, nothing forwarded).

A read-only directory and a full disk need a real filesystem state: root ignores ``chmod``,
so the read-only case runs the gateway as ``nobody`` (``setpriv``), and the full disk is a
small tmpfs (``mount``); both are skipped where the test cannot do that.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import (
    KEYS,
    ROOT,
    LoopThread,
    Stack,
    free_port,
    http_request,
    test_env,
    write_config,
)

MSG = [{"role": "user", "content": "One line about budgets, please."}]


def chat(url: str, content: str = "hi") -> int:
    return http_request("POST", url + "/v1/chat/completions", json={
        "model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}],
        "max_tokens": 5}, headers={"Authorization": f"Bearer {KEYS['acme-content']['key']}"},
    ).status


def ready(url: str) -> int:
    return http_request("GET", url + "/readyz").status


def db_path(stack: Stack) -> Path:
    return Path(stack.settings.database.removeprefix("sqlite:///"))


def refuses_everything(stack: Stack) -> None:
    """503 ledger_unavailable, /readyz 503, and the upstream sees nothing."""
    time.sleep(0.25)  # past the ledger's identity re-check interval
    hits = stack.state.total_requests
    for _ in range(5):
        answer = stack.request("POST", "/v1/chat/completions", json={
            "model": "gpt-4o-mini", "messages": MSG, "max_tokens": 5},
            headers={"Authorization": f"Bearer {KEYS['acme-content']['key']}"})
        assert answer.status == 503, answer.body
        assert answer.json()["error"]["code"] == "ledger_unavailable"
    assert ready(stack.url) == 503
    assert stack.state.total_requests == hits  # nothing forwarded


@pytest.fixture
def sqlite_stack(tmp_path: Path) -> Iterator[Stack]:
    os.environ.pop("COSTWALL_TEST_DATABASE", None)
    s = Stack(tmp_path)
    yield s
    s.close()


def test_deleted_database_file_fails_closed(sqlite_stack: Stack) -> None:
    s = sqlite_stack
    assert chat(s.url) == 200 and ready(s.url) == 200
    s.flush()
    db = db_path(s)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    refuses_everything(s)
    # A restart starts a fresh file and serves again (what was lost is the operator's to
    # restore from a backup; nothing was written into the void meanwhile).
    s.restart()
    assert ready(s.url) == 200 and chat(s.url) == 200


def test_renamed_database_file_fails_closed_until_it_is_back(sqlite_stack: Stack) -> None:
    s = sqlite_stack
    assert chat(s.url) == 200
    s.flush()
    db = db_path(s)
    moved = db.with_name("moved.db")
    db.rename(moved)
    refuses_everything(s)
    moved.rename(db)  # the same file again: nothing was written elsewhere meanwhile
    time.sleep(0.25)
    assert ready(s.url) == 200 and chat(s.url) == 200
    s.restart()
    assert len(s.rows()) == 2  # both answered requests are in the file that stayed


def test_replaced_database_file_fails_closed(sqlite_stack: Stack) -> None:
    s = sqlite_stack
    assert chat(s.url) == 200
    s.flush()
    db = db_path(s)
    other = db.with_name("other.db")
    shutil.copyfile(db, other)
    other.replace(db)  # same name, another inode (a restore gone wrong, say)
    refuses_everything(s)


# -- filesystems that need privileges ---------------------------------------------------------
def _serve_as(user: int | None, config: Path, port: int) -> subprocess.Popen[bytes]:
    """``costwall serve`` (as ``user``), its log in a file beside the config: a pipe nobody
    reads would fill up with the error lines of refused requests and block the gateway."""
    prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] if user else []
    with open(config.with_name("serve.log"), "wb") as log:
        return subprocess.Popen(
            [*prefix, sys.executable, "-m", "gateway.cli", "serve", "--config", str(config),
             "--port", str(port)], cwd=ROOT, env={**os.environ, **test_env()},
            stdout=subprocess.DEVNULL, stderr=log)


def _wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if ready(url) == 200:
                return
        except OSError:
            pass
        assert proc.poll() is None, proc.args
        time.sleep(0.1)
    raise AssertionError("costwall serve did not become ready")


@pytest.fixture
def upstream() -> Iterator[tuple[str, object]]:
    from gateway.fake_upstream import FakeUpstreamState, start_fake_upstream

    lt = LoopThread()
    state = FakeUpstreamState()
    runner, url, _ = lt.run(start_fake_upstream(state=state))
    yield url, state
    lt.run(runner.cleanup())
    lt.stop()


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temporary directory other users can reach (pytest's ``tmp_path`` is private)."""
    path = Path(tempfile.mkdtemp(prefix="costwall-ro-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_read_only_ledger_directory_never_kills_the_process(
        shared_tmp: Path, upstream: tuple[str, object]) -> None:
    """As ``nobody`` (root ignores permissions): the directory turns read-only under it."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the gateway as another user")
    nobody = 65534
    tmp_path = shared_tmp
    for parent in tmp_path.parents:  # nobody must reach the directory
        if parent != Path("/") and os.stat(parent).st_mode & 0o001 == 0:
            pytest.skip(f"{parent} is not searchable by other users")
    db_dir, logs = tmp_path / "db", tmp_path / "logs"
    for d in (db_dir, logs):
        d.mkdir()
        os.chown(d, nobody, nobody)
    config = write_config(tmp_path, upstream[0], database=f"sqlite:///{db_dir}/costwall.db",
                          logs_dir=str(logs))
    os.chmod(config, 0o644)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve_as(nobody, config, port)
    try:
        _wait_ready(url, proc)
        assert chat(url) == 200
        os.chmod(db_dir, 0o555)
        for f in db_dir.iterdir():
            os.chmod(f, 0o444)
        for _ in range(20):  # the measured crash was /readyz (SIGBUS on the -shm mapping)
            assert ready(url) == 503
            assert chat(url) in (200, 503)  # open descriptors may still write: never lost
        assert proc.poll() is None, "the gateway died"
        os.chmod(db_dir, 0o755)
        assert ready(url) == 200 or proc.poll() is None
    finally:
        os.chmod(db_dir, 0o755)
        proc.terminate()
        code = proc.wait(30)
    assert code == 0, code  # a clean exit, not a signal


def test_full_disk_fails_closed_and_recovers(tmp_path: Path,
                                             upstream: tuple[str, object]) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    db_dir = tmp_path / "db"
    db_dir.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(db_dir)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        config = write_config(tmp_path, upstream[0],
                              database=f"sqlite:///{db_dir}/costwall.db")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = _serve_as(None, config, port)
        try:
            _wait_ready(url, proc)
            assert chat(url) == 200
            filler = db_dir / "filler"
            subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k"],
                           capture_output=True)
            statuses = [chat(url, "budget " * 300) for _ in range(300)]
            assert statuses[-50:] == [503] * 50, statuses  # fails closed once nothing fits
            assert ready(url) == 503
            state = upstream[1]
            hits = state.total_requests  # type: ignore[attr-defined]
            assert chat(url) == 503 and state.total_requests == hits  # type: ignore
            assert proc.poll() is None
            filler.unlink()
            deadline = time.monotonic() + 10  # readiness comes back by itself
            while ready(url) != 200 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert ready(url) == 200 and chat(url) == 200
            proc.terminate()
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    finally:
        subprocess.run(["umount", "-l", str(db_dir)], capture_output=True)
