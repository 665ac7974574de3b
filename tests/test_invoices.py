"""Invoices: real traffic and real ledger rows in, a PDF parsed back with pypdf and a CSV out.

Checks the contract finance relies on: exact sums, a rounding rule that keeps every table equal
to the total, formula cells neutralised, a renderer that fetches nothing (a canary server
counts hits), an embedded font that draws non-Latin names, and the ``costwall invoice`` CLI.
"""

from __future__ import annotations

import csv
import html
import io
import random
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pypdf
import pytest
from aiohttp import web
from pypdf.generic import ContentStream

from admin.invoices import (
    CSV_COLUMNS,
    MAX_LINES,
    InvoiceRenderError,
    allocate_cents,
    build_invoice,
    display_label,
    html_to_pdf,
    invoice_paths,
    link_callback,
    make_invoice,
    render_csv,
    render_pdf,
)
from gateway.budget import period_of
from gateway.ledger import LedgerEntry
from gateway.money import to_pico, to_usd
from gateway.store.interfaces import Ledger
from tests.harness import ROOT, Stack
from tests.harness import test_env as harness_env

CLOSED = "2025-03"  # a month long past: its invoice is final
HALF_CENT = to_pico("0.005")
FORMULAS = ['=HYPERLINK("http://x")', "+1", "-2", "@SUM(A1)"]


# -- fixtures ---------------------------------------------------------------------------------
class Canary:
    """A local HTTP server that counts every request it gets: the renderer must send none."""

    def __init__(self, stack: Stack):
        self.hits: list[str] = []

        async def hit(request: web.Request) -> web.Response:
            self.hits.append(request.path)
            return web.Response(body=b"GIF89a", content_type="image/gif")

        async def start() -> tuple[web.AppRunner, int]:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", hit)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

        self.runner, self.port = stack.lt.run(start())
        self.url = f"http://127.0.0.1:{self.port}"


def entry(n: int, period: str = CLOSED, *, cost: int = HALF_CENT, day: int = 1,
          **fields: Any) -> LedgerEntry:
    """A settled ledger row of ``period`` (for data the SDK cannot send, e.g. non-ASCII)."""
    base: dict[str, Any] = dict(
        id=f"inv-{period}-{n:05d}", period=period, tenant="acme", key_name="acme-content",
        agent="content", campaign=None, task=None, model="gpt-4o-mini",
        endpoint="chat.completions", state="settled", status=200, prompt_tokens=100 + n,
        completion_tokens=10 + n, cost=cost, reserved=cost, usage_source="upstream",
        ts=datetime(int(period[:4]), int(period[5:]), day, 9, 0, n % 60, tzinfo=UTC))
    base.update(fields)
    return LedgerEntry(**base)


async def store(ledger: Ledger, entries: list[LedgerEntry]) -> None:
    """Through the ledger's own write path: a durable pending row, then the settled one."""
    for e in entries:
        pending = LedgerEntry(**{**e.as_dict(), "state": "pending", "cost": 0})
        await ledger.begin(pending)
        ledger.settle(e)
    await ledger.flush()


# The closed month: three half-cent requests of acme in three models (naive rounding prints
# 0.03, the exact total is 0.015 -> 0.02), names no HTTP header could carry, and globex.
ACME_CLOSED = [
    entry(1, model="gpt-4o-mini", campaign="Zoë Ωmega Привет", agent="Zoë-agent", day=3),
    entry(2, model="gpt-4.1", campaign="\tlead=1", agent="content", day=3,
          task="-task"),
    entry(3, model="o4-mini", campaign=None, agent="Привет", day=17, override=True,
          override_reason="=cmd|' /C calc'!A0"),
]
GLOBEX_CLOSED = [
    entry(10 + i, tenant="globex", key_name="globex-research", agent="research",
          campaign=f"globex-{i % 3}", model="gpt-4.1", cost=to_pico("1.234567891234") + i,
          day=1 + i)
    for i in range(12)
]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Canary]]:
    """One gateway for the module: real SDK traffic this month, stored rows in a closed one."""
    stack = Stack(tmp_path_factory.mktemp("invoices"))
    canary = Canary(stack)
    client = stack.client()
    hostile = [*FORMULAS, f'<img src="{canary.url}/x">', "file:///etc/passwd",
               f"url({canary.url}/y)", "spring-launch"]
    for i, campaign in enumerate(hostile):
        client.chat.completions.create(
            model="gpt-4o-mini" if i % 2 else "gpt-4.1", max_tokens=20,
            messages=[{"role": "user", "content": f"invoice test {i}"}],
            extra_headers={"X-Costwall-Campaign": campaign, "X-Costwall-Task": f"t{i}"})
    stack.client("globex-research").embeddings.create(model="text-embedding-3-small",
                                                      input="hello")
    stack.lt.run(store(stack.gw.ledger, ACME_CLOSED + GLOBEX_CLOSED))
    yield stack, canary
    stack.lt.run(canary.runner.cleanup())
    stack.close()


def pdf_text(pdf: bytes) -> str:
    """All pages' text with whitespace collapsed, so a table row reads as one line."""
    reader = pypdf.PdfReader(io.BytesIO(pdf))
    return " ".join(" ".join(page.extract_text() for page in reader.pages).split())


def fonts_drawing_text(pdf: bytes) -> set[str]:
    """Base fonts that actually show text (ReportLab selects Helvetica first, drawing nothing)."""
    reader = pypdf.PdfReader(io.BytesIO(pdf))
    used: set[str] = set()
    for page in reader.pages:
        fonts = page["/Resources"]["/Font"]
        current = None
        for operands, op in ContentStream(page.get_contents(), reader).operations:
            if op == b"Tf":
                current = str(fonts[operands[0]].get_object()["/BaseFont"])
            elif op in (b"Tj", b"TJ", b"'", b'"') and current is not None:
                used.add(current)
    return used


def csv_rows(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode("utf-8"), newline="")))


# -- the rounding rule ------------------------------------------------------------------------
def test_allocation_sums_to_rounded_exact_total_where_naive_rounding_fails() -> None:
    naive = [int((Decimal(a) / 10**10).quantize(Decimal(1), ROUND_HALF_UP))
             for a in [HALF_CENT] * 3]
    assert sum(naive) == 3  # the trap: three half cents printed as 0.03
    assert allocate_cents([HALF_CENT] * 3) == [1, 1, 0]  # 0.015 -> 0.02
    assert allocate_cents([to_pico("0.004"), to_pico("0.004")]) == [1, 0]  # 0.008 -> 0.01
    assert allocate_cents([to_pico("0.0049")] * 3) == [1, 0, 0]  # 0.0147 -> 0.01
    assert allocate_cents([]) == []
    rng = random.Random(5)
    for _ in range(2000):
        amounts = [rng.choice([0, HALF_CENT, rng.randrange(10**13)]) for _ in
                   range(rng.randrange(1, 12))]
        cents = allocate_cents(amounts)
        exact_total = Decimal(sum(amounts)) / 10**10
        assert sum(cents) == int(exact_total.quantize(Decimal(1), ROUND_HALF_UP))
        for amount, c in zip(amounts, cents, strict=True):
            assert amount // 10**10 <= c <= -(-amount // 10**10)  # floor or ceil, nothing else


@pytest.mark.parametrize("bad", ["2026-13", "../x", "2026-1", "2026-00", "2026-11\n", "",
                                 "202611", "2026-11/../../etc", "１２３４-11", "0999-01",
                                 "9999-12"])
def test_bad_months_are_rejected(env: tuple[Stack, Canary], bad: str, tmp_path: Path) -> None:
    stack, _ = env
    with pytest.raises(ValueError, match="invalid month"):
        stack.lt.run(build_invoice(stack.gw, bad, None))
    with pytest.raises(ValueError, match="invalid month"):
        invoice_paths(tmp_path, bad, None)


def test_invoice_paths_never_leave_the_reports_folder(tmp_path: Path) -> None:
    root = (tmp_path / "reports").resolve()
    assert invoice_paths(tmp_path / "reports", "2026-11", None) == (
        root / "invoices" / "costwall_invoice_2026_11.pdf",
        root / "invoices" / "costwall_invoice_2026_11.csv")
    pdf, csv_path = invoice_paths(tmp_path / "reports", "2026-11", "acme")
    assert (pdf.name, csv_path.name) == ("costwall_invoice_2026_11_acme.pdf",
                                         "costwall_invoice_2026_11_acme.csv")
    names = set()
    for tenant in ["../../etc/passwd", "a/b", "..", "/abs", "acme\x00x", "a:b", "Zoë"]:
        pdf, csv_path = invoice_paths(tmp_path / "reports", "2026-11", tenant)
        assert pdf.parent == csv_path.parent == root / "invoices", tenant
        assert pdf.name.startswith("costwall_invoice_2026_11_") and "/" not in pdf.name
        assert ".." not in pdf.name and "\x00" not in pdf.name
        names.add(pdf.name)
    assert len(names) == 7  # sanitised names stay distinct


# -- real traffic: CSV and PDF ----------------------------------------------------------------
def test_invoice_of_real_traffic_csv_exact_and_neutralised(env: tuple[Stack, Canary]) -> None:
    stack, _ = env
    period = stack.gw.budgets.current_period()
    stack.flush()
    invoice = stack.lt.run(build_invoice(stack.gw, period, None))
    rows = csv_rows(render_csv(invoice))
    ledger_rows = stack.rows()
    assert len(rows) == len(ledger_rows) == len(invoice.entries) == 9
    assert tuple(rows[0]) == CSV_COLUMNS
    usage = stack.lt.run(stack.gw.ledger.usage(period, "tenant"))
    exact_total = sum((Decimal(r["cost_usd"]) for r in rows), Decimal(0))
    assert exact_total == to_usd(sum(u.cost for u in usage)) == to_usd(invoice.total_exact) > 0
    assert exact_total.quantize(Decimal("0.01"), ROUND_HALF_UP) == Decimal(invoice.total)
    by_id = {r["request_id"]: r for r in rows}
    for row in ledger_rows:
        assert Decimal(by_id[row.id]["cost_usd"]) == to_usd(row.cost)
        assert int(by_id[row.id]["prompt_tokens"]) == row.prompt_tokens
    campaigns = {r["campaign"] for r in rows}
    for formula in FORMULAS:
        assert "'" + formula in campaigns and formula not in campaigns
    for row in rows:  # no cell a spreadsheet would run, numbers untouched
        assert not any(v.startswith(("=", "+", "-", "@", "\t", "\r", "\n")) for v in row.values())
        assert row["cost_usd"][0].isdigit() and row["override"] in ("true", "false")
    raw = render_csv(invoice).decode("utf-8")
    assert raw.startswith('"timestamp","request_id","tenant"')  # every field quoted


def test_pdf_of_real_traffic_fetches_nothing_and_shows_names_as_text(
        env: tuple[Stack, Canary]) -> None:
    stack, canary = env
    period = stack.gw.budgets.current_period()
    invoice = stack.lt.run(build_invoice(stack.gw, period, None))
    pdf = render_pdf(invoice)
    assert canary.hits == []
    assert pdf.startswith(b"%PDF-") and b"/FontFile2" in pdf  # DejaVu embedded, not Helvetica
    assert fonts_drawing_text(pdf) == {"/AAAAAA+DejaVuSans", "/AAAAAA+DejaVuSans-Bold"}
    text = pdf_text(pdf)
    assert f"CW-{period}-ALL" in text and "Interim" in text
    assert f"$ {invoice.total}" in text
    assert f'<img src="{canary.url}/x">' in text and "file:///etc/passwd" in text
    assert f"url({canary.url}/y)" in text and '=HYPERLINK("http://x")' in text
    assert "root:x:0:0" not in text
    for heading in ("Charges by model", "By tenant", "By campaign", "By agent", "By day"):
        assert heading in text
        assert invoice.breakdown(heading.split()[-1]).total_cents == invoice.total_cents
    pages = len(pypdf.PdfReader(io.BytesIO(pdf)).pages)
    assert f"Page 1 of {pages}" in text


def test_hostile_markup_is_blocked_by_the_sandbox(env: tuple[Stack, Canary]) -> None:
    """Even markup that escaped the template would fetch nothing: callback + policy."""
    _, canary = env
    u = canary.url
    html = f"""<html><head><link rel="stylesheet" href="{u}/css"><style>
      @import url({u}/import);
      @font-face {{ font-family: Evil; src: url({u}/font.ttf); }}
      body {{ background-image: url({u}/bg); }}
    </style></head><body>
      <img src="{u}/img"><img src="file:///etc/passwd"><img src="/etc/hostname">
      <img src="../../../../etc/hostname"><div style="background-image: url({u}/div)">x</div>
      <pdf:background src="{u}/pdfbg"/><p style="font-family: Evil">hello</p>
    </body></html>"""
    pdf = html_to_pdf(html)
    assert pdf.startswith(b"%PDF-") and canary.hits == []
    assert link_callback("asset:logo.png").endswith("admin/assets/logo.png")
    for uri in (f"{u}/x", "file:///etc/passwd", "/etc/passwd", "logo.png", "asset:../x",
                str(ROOT / "admin" / "assets" / "logo.png"), ""):
        assert link_callback(uri, None) == "data:,"


def test_render_limits_become_a_clear_error() -> None:
    with pytest.raises(InvoiceRenderError, match="too large to render"):
        html_to_pdf("<html><body>" + "<div>" * 400 + "x" + "</div>" * 400 + "</body></html>")


# -- a closed month: rounding, non-Latin names, determinism ----------------------------------
def test_closed_month_rounds_per_line_and_totals_match(env: tuple[Stack, Canary]) -> None:
    stack, _ = env
    invoice = stack.lt.run(build_invoice(stack.gw, CLOSED, "acme"))
    assert invoice.number == "CW-2025-03-ACME" and invoice.final
    assert invoice.issue_date.isoformat() == "2025-04-01"
    text = pdf_text(render_pdf(invoice))
    assert "CW-2025-03-ACME" in text and "Issue date 2025-04-01" in text and "Final" in text
    assert "Bill to acme" in text and "$ 0.02" in text
    # Charges by model: equal half cents, ties by name; 0.01 + 0.01 + 0.00 = 0.02, not 0.03.
    assert "gpt-4.1 1 102 0 12 0.01" in text
    assert "gpt-4o-mini 1 101 0 11 0.01" in text
    assert "o4-mini 1 103 0 13 0.00" in text
    assert text.count("Total 3 306 0 36 0.02") == 1  # the model table (with cached column)
    assert text.count("Total 3 306 36 0.02") == 4  # campaign, agent, provider, day
    assert "2025-03-03 2 203 23 0.01" in text and "2025-03-17 1 103 13 0.01" in text
    for name in ("Zoë Ωmega Привет", "Zoë-agent", "Привет", "lead=1", "(no campaign)"):
        assert name in text, name
    rows = csv_rows(render_csv(invoice))
    exact = sum((Decimal(r["cost_usd"]) for r in rows), Decimal(0))
    assert exact == Decimal("0.015") and exact.quantize(Decimal("0.01"), ROUND_HALF_UP) == \
        Decimal("0.02")
    by_id = {r["request_id"]: r for r in rows}
    assert by_id["inv-2025-03-00002"]["campaign"] == "'\tlead=1"
    assert by_id["inv-2025-03-00002"]["task"] == "'-task"
    assert by_id["inv-2025-03-00003"]["override_reason"] == "'=cmd|' /C calc'!A0"
    assert by_id["inv-2025-03-00003"]["override"] == "true"
    assert by_id["inv-2025-03-00001"]["campaign"] == "Zoë Ωmega Привет"


def test_all_tenants_closed_month_has_tenant_breakdown(env: tuple[Stack, Canary]) -> None:
    stack, _ = env
    invoice = stack.lt.run(build_invoice(stack.gw, CLOSED, None))
    exact = 3 * HALF_CENT + 12 * to_pico("1.234567891234") + sum(range(12))
    assert invoice.total_exact == exact and invoice.total == "14.83"  # 14.829814694874
    text = pdf_text(render_pdf(invoice))
    assert "CW-2025-03-ALL" in text and "All tenants" in text
    tenants = invoice.breakdown("tenant")
    assert [(line.label, line.amount) for line in tenants.lines] == [("globex", "14.81"),
                                                                      ("acme", "0.02")]
    assert "By tenant" in text and "globex 12" in text and "$ 14.83" in text
    assert sum(line.cents for line in invoice.lines) == invoice.total_cents


def test_closed_month_regenerates_byte_for_byte(env: tuple[Stack, Canary]) -> None:
    stack, _ = env
    first = stack.lt.run(build_invoice(stack.gw, CLOSED, None))
    pdf1, csv1 = render_pdf(first), render_csv(first)
    stack.restart()  # a fresh gateway reading the same ledger, later in time
    second = stack.lt.run(build_invoice(stack.gw, CLOSED, None))
    assert (second.number, second.issue_date, second.total) == (first.number,
                                                                  first.issue_date, first.total)
    assert render_csv(second) == csv1
    pdf2 = render_pdf(second)
    assert pdf_text(pdf2) == pdf_text(pdf1)
    assert pdf2 == pdf1  # ReportLab invariant mode: no timestamp, no random file id


def test_long_invoice_repeats_headers_and_folds_small_groups() -> None:
    entries = [entry(i, "2026-10", cost=to_pico("0.01") * (i + 1), day=1 + i % 31,
                     campaign=f"campaign-{i:03d}", agent=f"agent-{i % 7}")
               for i in range(MAX_LINES + 20)]
    invoice = make_invoice(entries, "2026-10", "acme", "Example Corp", ZoneInfo("UTC"),
                           datetime(2026, 11, 28, tzinfo=UTC))
    campaigns = invoice.breakdown("campaign")
    assert len(campaigns.lines) == MAX_LINES and campaigns.folded == 21
    assert campaigns.lines[-1].label == "Other campaigns (21)"
    assert campaigns.total_cents == invoice.total_cents == sum(range(1, 81))
    pdf = render_pdf(invoice)
    text = pdf_text(pdf)
    pages = len(pypdf.PdfReader(io.BytesIO(pdf)).pages)
    assert pages >= 3 and f"Page {pages} of {pages}" in text
    assert text.count("Campaign Requests Input tokens Output tokens Amount (USD)") >= 2
    assert "Example Corp" in text and "Other campaigns (21)" in text


def test_timezone_decides_days_and_empty_months_render() -> None:
    late = entry(1, "2026-10", ts=datetime(2026, 10, 31, 23, 30, tzinfo=UTC))
    tokyo = make_invoice([late], "2026-11", None, "costwall", ZoneInfo("Asia/Tokyo"),
                         datetime(2026, 11, 28, tzinfo=UTC))
    assert [line.label for line in tokyo.breakdown("day").lines] == ["2026-11-01"]
    assert not tokyo.final and tokyo.issue_date.isoformat() == "2026-11-28"
    empty = make_invoice([], "2026-02", "acme", "costwall", ZoneInfo("UTC"),
                         datetime(2026, 11, 28, tzinfo=UTC))
    assert empty.total == "0.00" and empty.period_end.isoformat() == "2026-02-28"
    text = pdf_text(render_pdf(empty))
    assert "No usage in this period." in text and "$ 0.00" in text
    assert csv_rows(render_csv(empty)) == []


def test_interim_invoice_shows_in_flight_requests_apart_from_upstream_errors() -> None:
    rows = [entry(1, "2026-11", day=2),
            entry(2, "2026-11", day=2, status=502, cost=0),  # the upstream failed
            entry(3, "2026-11", day=3, status=0, cost=0, usage_source="reserved"),  # no answer
            entry(4, "2026-11", day=28, state="pending", status=0, cost=0,
                  reserved=to_pico("0.02"))]  # still running
    interim = make_invoice(rows, "2026-11", None, "costwall", ZoneInfo("UTC"),
                           datetime(2026, 11, 28, 12, tzinfo=UTC))
    assert not interim.final and (interim.upstream_errors, interim.in_flight) == (2, 1)
    text = pdf_text(render_pdf(interim))
    assert "Interim" in text and "upstream errors: 2 · in flight: 1" in text
    assert "1 request still in flight is counted at its reserved upper bound" in text
    assert interim.total_exact == HALF_CENT + to_pico("0.02")  # the bound, as the budgets do
    closed = make_invoice(rows[:3], "2026-11", None, "costwall", ZoneInfo("UTC"),
                          datetime(2026, 12, 2, tzinfo=UTC))
    closed_text = pdf_text(render_pdf(closed))
    assert "Final" in closed_text and "in flight" not in closed_text


def test_a_month_without_activity_has_no_invoice(env: tuple[Stack, Canary],
                                                  tmp_path: Path) -> None:
    stack, _ = env
    auth = {"Authorization": f"Bearer {harness_env()['COSTWALL_ADMIN_TOKEN']}"}
    current = stack.gw.budgets.current_period()
    for path, status, words in [
        ("1999-01.pdf", 404, "No activity in 1999-01"),
        ("1999-01.csv", 404, "No activity in 1999-01"),
        (f"{CLOSED}.pdf?tenant=nobody", 404, "for tenant 'nobody'"),
        ("2999-01.pdf", 404, "has not begun"),
        (f"{CLOSED}.pdf?tenant=acme", 200, ""),
        (f"{current}.pdf?tenant=nobody", 200, ""),  # the open month: an empty interim one
    ]:
        resp = stack.request("GET", f"/admin/invoices/{path}", headers=auth)
        assert resp.status == status, (path, resp.body[:200])
        if status == 404:
            assert words in html.unescape(resp.body.decode()), path
            assert b"Traceback" not in resp.body
    empty_now = pdf_text(stack.request("GET", f"/admin/invoices/{current}.pdf?tenant=nobody",
                                       headers=auth).body)
    assert "Interim" in empty_now and "No usage in this period." in empty_now
    done = run_cli(stack, "1999-01", "--out", str(tmp_path))
    assert done.returncode == 1 and "No activity in 1999-01" in done.stderr
    assert "Traceback" not in done.stderr and list(tmp_path.iterdir()) == []


# -- the command line -------------------------------------------------------------------------
def run_cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    config = stack.dir / "costwall.yaml"
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "invoice", *args, "--config", str(config)],
        cwd=ROOT, env={"PATH": "/usr/bin:/bin", **harness_env()}, capture_output=True, text=True,
        timeout=120)


def test_cli_writes_both_files_while_the_gateway_runs(env: tuple[Stack, Canary],
                                                      tmp_path: Path) -> None:
    stack, _ = env
    out = tmp_path / "out"
    month = stack.gw.budgets.current_period()  # this month's SDK traffic (the fixture's)
    done = run_cli(stack, month, "--out", str(out))
    assert done.returncode == 0, done.stderr
    stem = f"costwall_invoice_{month.replace('-', '_')}"
    assert done.stdout.split() == [str(out / f"{stem}.pdf"), str(out / f"{stem}.csv")]
    done = run_cli(stack, CLOSED, "--tenant", "acme", "--out", str(out))
    assert done.returncode == 0, done.stderr
    pdf = out / "costwall_invoice_2025_03_acme.pdf"
    assert done.stdout.split() == [str(pdf), str(out / "costwall_invoice_2025_03_acme.csv")]
    expected = stack.lt.run(build_invoice(stack.gw, CLOSED, "acme"))
    assert pdf.read_bytes() == render_pdf(expected)
    assert (out / "costwall_invoice_2025_03_acme.csv").read_bytes() == render_csv(expected)

    done = run_cli(stack)  # default month (now, budgets.timezone) and reports/invoices
    assert done.returncode == 0, done.stderr
    period = period_of(datetime.now(UTC), ZoneInfo("UTC")).replace("-", "_")
    folder = stack.settings.reports_dir / "invoices"
    assert done.stdout.split() == [str(folder / f"costwall_invoice_{period}.pdf"),
                                   str(folder / f"costwall_invoice_{period}.csv")]
    rows = csv_rows((folder / f"costwall_invoice_{period}.csv").read_bytes())
    assert len(rows) == len(stack.rows())


@pytest.mark.parametrize("month", ["2026-13", "../x", "2026-1"])
def test_cli_rejects_bad_months(env: tuple[Stack, Canary], month: str, tmp_path: Path) -> None:
    done = run_cli(env[0], month, "--out", str(tmp_path))
    assert done.returncode == 2
    assert "invalid month" in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_month_boundaries_follow_budget_timezone() -> None:
    now = datetime(2026, 12, 1, 0, 30, tzinfo=ZoneInfo("Europe/Berlin"))
    inv = make_invoice([], "2026-11", None, "costwall", ZoneInfo("Europe/Berlin"),
                       now.astimezone(UTC))
    assert inv.final and inv.issue_date.isoformat() == "2026-12-01"
    assert period_of(now - timedelta(hours=1), ZoneInfo("Europe/Berlin")) == "2026-11"


def test_labels_drop_control_characters_and_shorten() -> None:
    assert display_label("a\x00b\u202ec\nd", "-") == "a b c d"
    assert display_label(None, "(no campaign)") == "(no campaign)"
    assert display_label("\x07", "(none)") == "(none)"
    long = display_label("W" * 90, "")
    assert len(long) == 60 and long.endswith("…")
