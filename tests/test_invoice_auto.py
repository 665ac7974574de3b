"""Invoice automation: a month rollover (injected clock) issues invoices exactly once across
two gateways sharing one database (a SQLite file, and PostgreSQL), the history lists them with
SHA-256s that match the files, and issued files are served and kept exactly as issued.

Real gateways on real ports, the official SDK, the fake upstream, real PDFs read with pypdf.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pypdf
import pytest

from admin.invoice_auto import WAKE
from gateway.cli import main as costwall
from tests import pg
from tests.harness import ADMIN_TOKEN, FINANCE_TOKEN, Stack
from tests.test_alerts import Mailbox, smtp  # noqa: F401 - a fixture

MSG = [{"role": "user", "content": "hello"}]
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
FINANCE = {"Authorization": f"Bearer {FINANCE_TOKEN}"}


class Clock:
    """A wall clock tests move by hand."""

    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def wake(stack: Stack) -> None:
    event = stack.gw.extras[WAKE]
    stack.lt.loop.call_soon_threadsafe(event.set)


def issued(stack: Stack, timeout: float = 30, count: int = 3) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = stack.request("GET", "/admin/api/invoices", headers=FINANCE).json()["invoices"]
        if len(found) >= count:
            return found  # type: ignore[no-any-return]
        time.sleep(0.2)
    raise AssertionError(f"invoices not issued in {timeout}s")


@pytest.fixture(params=["sqlite", "postgresql"])
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Stack, Stack, Clock]]:
    """Two gateways on one database and one reports folder, invoices.auto on."""
    clock = Clock(datetime(2026, 10, 20, 12, 0, tzinfo=UTC))
    extra: dict[str, Any] = {"invoices": {"auto": True, "company": "Acme Billing"},
                             "reports_dir": str(tmp_path / "reports")}
    if request.param == "postgresql":
        pg.require()
        ctx = pg.temp_database()
        extra["database"] = ctx.__enter__()
    else:
        ctx = None
        extra["database"] = f"sqlite:///{tmp_path / 'shared.db'}"
    a = Stack(tmp_path / "a", clock=clock, logs_dir=str(tmp_path / "a" / "logs"), **extra)
    b = Stack(tmp_path / "b", clock=clock, logs_dir=str(tmp_path / "b" / "logs"), **extra)
    try:
        yield a, b, clock
    finally:
        a.close()
        b.close()
        if ctx is not None:
            ctx.__exit__(None, None, None)


def test_rollover_issues_once_across_two_gateways(pair: tuple[Stack, Stack, Clock],
                                                 tmp_path: Path) -> None:
    a, b, clock = pair
    a.client("acme-content").chat.completions.create(model="gpt-4o-mini", messages=MSG)
    b.client("globex-research").chat.completions.create(model="gpt-4o-mini", messages=MSG)
    a.client("acme-ops").chat.completions.create(model="gpt-4o-mini", messages=MSG)
    a.flush()
    b.flush()
    wake(a)
    wake(b)
    time.sleep(0.5)
    assert a.request("GET", "/admin/api/invoices", headers=ADMIN).json()["invoices"] == []

    clock.now = datetime(2026, 11, 1, 0, 0, 30, tzinfo=UTC)  # October has closed
    for _ in range(3):  # both replicas race for it, several times
        wake(a)
        wake(b)
    found = issued(a)
    time.sleep(1.0)
    for _ in range(2):
        wake(a)
        wake(b)
    time.sleep(1.0)
    again = b.request("GET", "/admin/api/invoices", headers=ADMIN).json()
    assert again["auto"] is True
    assert again["invoices"] == found  # the same record from the other replica, unchanged
    assert [(i["month"], i["tenant"]) for i in found] == [
        ("2026-10", None), ("2026-10", "acme"), ("2026-10", "globex")]
    folder = tmp_path / "reports" / "invoices"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"costwall_invoice_2026_10{t}.{k}" for t in ("", "_acme", "_globex")
        for k in ("pdf", "csv"))
    for item in found:
        assert item["issued_at"] == "2026-11-01T00:00:30Z"
        for kind in ("pdf", "csv"):
            data = (folder / item["files"][kind]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == item["sha256"][kind]
            q = f"?tenant={item['tenant']}" if item["tenant"] else ""
            served = b.request("GET", f"/admin/invoices/2026-10.{kind}{q}", headers=FINANCE)
            assert served.status == 200 and served.body == data
    everything = pypdf.PdfReader(io.BytesIO((folder / "costwall_invoice_2026_10.pdf")
                                            .read_bytes()))
    text = "".join(page.extract_text() for page in everything.pages)
    assert "CW-2026-10-ALL" in text and "Acme Billing" in text
    assert f"${found[0]['total_usd']}" in text or found[0]["total_usd"] in text
    cents = sum(int(i["total_usd"].replace(".", "")) for i in found[1:])
    assert cents == int(found[0]["total_usd"].replace(".", ""))  # tenants add up to all
    # The history page shows them; `costwall invoice` leaves the issued files alone.
    page = a.request("GET", "/admin/invoices", headers=ADMIN)
    assert page.status == 200 and b'id="history"' in page.body
    assert page.body.count(b'data-month="2026-10"') == 3
    before = {p.name: (p.stat().st_ino, p.read_bytes()) for p in folder.iterdir()}
    assert costwall(["invoice", "2026-10", "--config", str(a.dir / "costwall.yaml")]) == 0
    assert {p.name: (p.stat().st_ino, p.read_bytes()) for p in folder.iterdir()} == before


def test_issued_file_changed_on_disk_is_not_served(pair: tuple[Stack, Stack, Clock],
                                                   tmp_path: Path) -> None:
    a, _b, clock = pair
    a.client("acme-content").chat.completions.create(model="gpt-4o-mini", messages=MSG)
    a.flush()
    clock.now = datetime(2026, 11, 2, tzinfo=UTC)
    wake(a)
    found = issued(a, count=2)
    path = tmp_path / "reports" / "invoices" / found[0]["files"]["csv"]
    original = path.read_bytes()
    path.chmod(0o644)
    path.write_bytes(original.replace(b"acme", b"evil"))
    served = a.request("GET", "/admin/invoices/2026-10.csv", headers=ADMIN)
    # The edited file is refused; the ledger renders the same bytes, which are served.
    assert served.status == 200 and served.body == original
    assert hashlib.sha256(served.body).hexdigest() == found[0]["sha256"]["csv"]


def test_a_dead_issuers_claim_is_taken_over_once(pair: tuple[Stack, Stack, Clock],
                                                 tmp_path: Path) -> None:
    """A replica that claimed October and died (its claim never became a record): after the
    lease, exactly one of the live replicas issues instead; before it, nobody does."""
    a, b, clock = pair
    a.client("acme-content").chat.completions.create(model="gpt-4o-mini", messages=MSG)
    a.flush()
    clock.now = datetime(2026, 11, 1, 0, 5, tzinfo=UTC)
    stale = orjson.dumps({"state": "claimed", "by": "dead/0000", "at": "2026-11-01T00:00:00Z"})
    assert a.lt.run(a.gw.ledger.add_setting("invoices.issued.2026-10", stale.decode())) == \
        stale.decode()
    wake(a)
    wake(b)
    time.sleep(1.0)  # within the lease: the claim holds
    assert a.request("GET", "/admin/api/invoices", headers=ADMIN).json()["invoices"] == []
    clock.now = datetime(2026, 11, 1, 0, 11, tzinfo=UTC)  # past the 10-minute lease
    wake(a)
    wake(b)
    found = issued(b, count=2)
    assert [i["tenant"] for i in found] == [None, "acme"]
    assert found[0]["issued_at"] == "2026-11-01T00:11:00Z"
    record = orjson.loads(a.lt.run(a.gw.ledger.get_setting("invoices.issued.2026-10")))
    assert record["by"] != "dead/0000"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_rollover_on_two_gateways_mails_the_invoices_once(
        backend: str, tmp_path: Path, smtp: tuple[Mailbox, int]) -> None:  # noqa: F811
    """Two gateways, each with its own reports folder, both with ``invoices.email_to``: the
    month is issued once and mailed once (aiosmtpd), with attachments that are the issued
    files byte for byte (their SHA-256 is the history's), whichever replica sends the mail."""
    from admin.invoice_auto import invoice_files
    from tests.test_alerts import fast

    box, port = smtp
    clock = Clock(datetime(2026, 10, 20, 12, 0, tzinfo=UTC))
    ctx = pg.temp_database() if backend == "postgresql" else None
    if ctx is not None:
        pg.require()
    database = ctx.__enter__() if ctx is not None else f"sqlite:///{tmp_path / 'shared.db'}"
    extra: dict[str, Any] = {
        "database": database,
        "invoices": {"auto": True, "email_to": ["finance@example.com", "books@example.com"]},
        "alerts": {"smtp": {"host": "127.0.0.1", "port": port, "from": "costwall@example.com"}}}
    a = Stack(tmp_path / "a", clock=clock, **extra)  # reports in tmp/a/reports, tmp/b/reports
    b = Stack(tmp_path / "b", clock=clock, **extra)
    try:
        for stack in (a, b):
            fast(stack.gw.alerts)
        a.client("acme-content").chat.completions.create(model="gpt-4o-mini", messages=MSG)
        b.client("globex-research").chat.completions.create(model="gpt-4o-mini", messages=MSG)
        a.flush()
        b.flush()
        clock.now = datetime(2026, 11, 1, 0, 0, 30, tzinfo=UTC)
        for _ in range(3):
            wake(a)
            wake(b)
        found = issued(a)
        deadline = time.monotonic() + 20
        while not box.messages:
            assert time.monotonic() < deadline, "no invoice mail"
            time.sleep(0.1)
        for _ in range(2):
            wake(a)
            wake(b)
        time.sleep(1.5)  # a second mail, or a second issue, would be here by now
        assert b.request("GET", "/admin/api/invoices", headers=ADMIN).json()["invoices"] \
            == found
        [(rcpt, mail)] = box.messages
        assert sorted(rcpt) == ["books@example.com", "finance@example.com"]
        assert "invoice.issued" in mail["Subject"]
        attached = {p.get_filename(): p.get_content() for p in mail.iter_attachments()}
        recorded = {item["files"][kind]: item["sha256"][kind]
                    for item in found for kind in ("pdf", "csv")}
        assert len(attached) == len(recorded) == 6
        assert {name: hashlib.sha256(data if isinstance(data, bytes) else data.encode())
                .hexdigest() for name, data in attached.items()} == recorded
        # The replica whose disk lacks the files attaches the same bytes (checked, rendered).
        issuer = a if (tmp_path / "a" / "reports" / "invoices").exists() else b
        other = b if issuer is a else a
        assert not (other.dir / "reports" / "invoices").exists()
        event = {"data": {"month": "2026-10", "invoices": found}}
        files = other.lt.run(invoice_files(other.gw, event))
        assert {name: hashlib.sha256(data).hexdigest() for name, data, _ in files} == recorded
    finally:
        a.close()
        b.close()
        if ctx is not None:
            ctx.__exit__(None, None, None)
