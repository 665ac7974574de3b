"""Monthly invoices: the exact ledger in, a branded PDF and a per-request CSV out.

The ledger keeps every cost exact (integer pico-USD). Money is rounded to cents here and only
here, by one rule (see ``allocate_cents``): in every table of the PDF the printed lines add up
to the printed total, and the printed total is the exact ledger total rounded half-up to the
cent, which is also what the CSV's exact ``cost_usd`` column sums to before rounding.

Rendering is sandboxed: the PDF template is Jinja2 with autoescape on, and xhtml2pdf runs in
``admin.pdf_sandbox`` (bundled assets only, no network). Campaign names and other
request-supplied text are untrusted throughout.

Used by ``costwall invoice`` (``admin.invoice_cli``) and by the admin routes, which call
``build_invoice`` then ``render_pdf`` / ``render_csv`` (``render_pdf`` is CPU-bound: run it in a
thread, e.g. ``await asyncio.to_thread(render_pdf, invoice)``).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Protocol
from zoneinfo import ZoneInfo

import jinja2

from admin.invoice_text import (  # re-exported: the invoice API in one place
    _period_dates,
    allocate_cents,
    display_label,
    format_cents,
    invoice_number,
    round_half_up_cents,
    safe_name,
    validate_period,
)
from admin.pdf_sandbox import (  # re-exported: the invoice API in one place
    ASSETS,
    BUNDLED_ASSETS,
    InvoiceRenderError,
    html_to_pdf,
    link_callback,
)
from gateway.budget import period_of
from gateway.config import Settings
from gateway.ledger import LedgerEntry
from gateway.money import format_usd
from gateway.store.interfaces import Ledger

TEMPLATES = Path(__file__).resolve().parent / "templates"
MAX_LINES = 60  # per breakdown table; the rest fold into one "other" line (the CSV has all)
CSV_COLUMNS = (
    "timestamp", "request_id", "tenant", "agent", "campaign", "task", "model",
    "prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens", "cost_usd",
    "override", "override_reason", "key_name", "endpoint", "status", "usage_source", "state",
    "latency_ms", "overshoot_usd", "user", "provider",
)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")
__all__ = [  # the invoice API, including what it re-exports from admin.pdf_sandbox
    "ASSETS", "BUNDLED_ASSETS", "CSV_COLUMNS", "MAX_LINES", "Breakdown", "Invoice",
    "InvoiceRenderError", "InvoiceSource", "Line", "NoActivity", "allocate_cents",
    "build_invoice", "charge",
    "display_label", "format_cents", "html_to_pdf", "invoice_files",
    "invoice_number", "invoice_paths", "link_callback", "make_invoice", "neutralise",
    "render_csv", "render_html", "render_pdf", "round_half_up_cents", "safe_name",
    "validate_period", "write_invoice",
]


class InvoiceSource(Protocol):
    """What ``build_invoice`` needs: a ``Gateway`` fits, and so does the CLI's bare ledger."""

    @property
    def settings(self) -> Settings: ...

    @property
    def ledger(self) -> Ledger: ...

    @property
    def clock(self) -> Callable[[], datetime]: ...


# -- value objects -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Line:
    """One printed line: a group's usage, its exact cost and its rounded amount in cents."""

    label: str
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    exact: int  # pico-USD, as in the ledger
    cents: int  # what the invoice prints (see allocate_cents)

    @property
    def amount(self) -> str:
        """The printed amount, e.g. ``'1,234.56'``."""
        return format_cents(self.cents)

    @property
    def exact_usd(self) -> str:
        return format_usd(self.exact)


@dataclass(frozen=True)
class Breakdown:
    """One table of the invoice: lines grouped by ``key``; ``sum(cents) == total_cents``."""

    key: str
    title: str
    lines: tuple[Line, ...]
    total_cents: int
    folded: int = 0  # groups folded into the last "other" line

    @property
    def total(self) -> str:
        return format_cents(self.total_cents)


@dataclass(frozen=True)
class Invoice:
    """A month's invoice for one tenant (or all of them when ``tenant`` is None)."""

    number: str
    period: str
    issue_date: date
    tenant: str | None
    company: str
    entries: list[LedgerEntry]
    timezone: str
    final: bool  # the period has ended: regenerating yields the same numbers
    period_start: date
    period_end: date  # last day, inclusive
    total_exact: int  # pico-USD
    total_cents: int
    lines: tuple[Line, ...]  # the charges: one line per model
    # tenant (all-tenant invoices), campaign, agent, model, provider (upstream), day
    breakdowns: tuple[Breakdown, ...]

    @property
    def total(self) -> str:
        return format_cents(self.total_cents)

    @property
    def total_exact_usd(self) -> str:
        return format_usd(self.total_exact)

    @property
    def requests(self) -> int:
        return len(self.entries)

    def tokens(self, kind: str) -> int:
        """Sum of one token column (``prompt``, ``cached``, ``completion``, ``reasoning``)."""
        return sum(getattr(e, f"{kind}_tokens") for e in self.entries)

    @property
    def overrides(self) -> int:
        return sum(1 for e in self.entries if e.override)

    @property
    def upstream_errors(self) -> int:
        """Finished requests the upstream failed (an error status, or no answer at all)."""
        return sum(1 for e in self.entries
                   if e.state != "pending" and (e.status >= 400 or e.status == 0))

    @property
    def in_flight(self) -> int:
        """Requests still running (charged at their reserved upper bound until they end)."""
        return sum(1 for e in self.entries if e.state == "pending")

    def breakdown(self, key: str) -> Breakdown:
        return next(b for b in self.breakdowns if b.key == key)


# -- money ------------------------------------------------------------------------------------






def charge(entry: LedgerEntry) -> int:
    """What an entry costs on the invoice: settled cost; a still-pending row its reserved bound.

    The same rule the budgets use (``Ledger.spend_by_scope``), so an invoice of the running
    month matches the dashboard; in a closed month nothing is pending after recovery.
    """
    return entry.reserved if entry.state == "pending" else entry.cost


# -- building ---------------------------------------------------------------------------------
class NoActivity(ValueError):
    """No invoice: a closed month without a single ledger entry, or a month not yet begun.

    A "Final" invoice of $0.00 for a month costwall never saw would look like a statement
    that nothing was used; the running month, even empty, gets its interim statement.
    """










def _lines(groups: dict[str, list[LedgerEntry]], order: str, other: str) -> tuple[
        list[Line], int]:
    """Group totals as rounded lines; past MAX_LINES the smallest fold into one line."""
    totals = [(label, members, sum(charge(e) for e in members)) for label, members in
              groups.items()]
    if order == "amount":
        totals.sort(key=lambda t: (-t[2], t[0]))
    else:
        totals.sort(key=lambda t: t[0])
    folded = 0
    if len(totals) > MAX_LINES:
        rest = totals[MAX_LINES - 1:]
        folded = len(rest)
        merged = [e for _, members, _ in rest for e in members]
        totals = [*totals[: MAX_LINES - 1],
                  (f"{other} ({folded})", merged, sum(t[2] for t in rest))]
    cents = allocate_cents([t[2] for t in totals])
    lines = [
        Line(label, len(members), sum(e.prompt_tokens for e in members),
             sum(e.cached_tokens for e in members), sum(e.completion_tokens for e in members),
             sum(e.reasoning_tokens for e in members), exact, c)
        for (label, members, exact), c in zip(totals, cents, strict=True)
    ]
    return lines, folded


def _breakdown(entries: Iterable[LedgerEntry], key: str, title: str,
               label: Callable[[LedgerEntry], str], order: str = "amount",
               other: str = "Other") -> Breakdown:
    groups: dict[str, list[LedgerEntry]] = {}
    for entry in entries:
        groups.setdefault(label(entry), []).append(entry)
    lines, folded = _lines(groups, order, other)
    return Breakdown(key, title, tuple(lines), sum(line.cents for line in lines), folded)


def make_invoice(entries: list[LedgerEntry], period: str, tenant: str | None, company: str,
                 tz: ZoneInfo, now: datetime) -> Invoice:
    """The invoice of ``entries`` (pure: no I/O). ``now`` decides whether the month is closed.

    A closed month is issued on the first day of the next month, so regenerating it gives the
    same invoice; the running month is an interim statement issued today.
    """
    validate_period(period)
    start, end = _period_dates(period)
    today = now.astimezone(tz).date()
    final = period < period_of(now, tz)
    issue = end + timedelta(days=1) if final else today
    total = sum(charge(e) for e in entries)

    def day(e: LedgerEntry) -> str:
        return e.ts.astimezone(tz).date().isoformat()

    breakdowns = [
        _breakdown(entries, "model", "Charges by model", lambda e: display_label(e.model, "?"),
                   other="Other models"),
        _breakdown(entries, "campaign", "By campaign",
                   lambda e: display_label(e.campaign, "(no campaign)"),
                   other="Other campaigns"),
        _breakdown(entries, "agent", "By agent", lambda e: display_label(e.agent, "(no agent)"),
                   other="Other agents"),
        _breakdown(entries, "provider", "By provider",
                   lambda e: display_label(e.provider, "(before upstreams)"),
                   other="Other providers"),
        _breakdown(entries, "day", "By day", day, order="label"),
    ]
    if tenant is None:
        breakdowns.insert(1, _breakdown(entries, "tenant", "By tenant",
                                        lambda e: display_label(e.tenant, "(no tenant)"),
                                        other="Other tenants"))
    invoice = Invoice(
        number=invoice_number(period, tenant), period=period, issue_date=issue, tenant=tenant,
        company=company, entries=entries, timezone=str(tz), final=final, period_start=start,
        period_end=end, total_exact=total, total_cents=round_half_up_cents(total),
        lines=breakdowns[0].lines, breakdowns=tuple(breakdowns),
    )
    for b in invoice.breakdowns:  # the invariant every printed table keeps
        assert b.total_cents == invoice.total_cents, (b.key, b.total_cents)
    return invoice


async def build_invoice(gw: InvoiceSource, period: str, tenant: str | None) -> Invoice:
    """Read a month's ledger entries (one tenant, or all when None/empty) into an Invoice."""
    validate_period(period)
    tenant = tenant or None
    settings = gw.settings
    now = gw.clock()
    current = period_of(now, settings.budgets.tz)
    if period > current:
        raise NoActivity(f"{period} has not begun yet: there is nothing to invoice.")
    entries = await gw.ledger.entries(period, tenant)
    if not entries and period < current:
        who = f" for tenant '{display_label(tenant, '')}'" if tenant else ""
        raise NoActivity(f"No activity in {period}{who}: the ledger has no requests, so there "
                         "is no invoice.")
    return make_invoice(entries, period, tenant, settings.invoices.company,
                        settings.budgets.tz, now)


# -- CSV --------------------------------------------------------------------------------------
def neutralise(text: str | None) -> str:
    """OWASP CSV injection: untrusted text that starts like a formula gets a leading ``'``."""
    if not text:
        return ""
    return "'" + text if text.startswith(_FORMULA_START) else text


def render_csv(invoice: Invoice) -> bytes:
    """UTF-8 CSV, every field quoted: a header row, then one row per ledger entry.

    ``cost_usd`` is the exact ledger cost as a plain decimal string (no rounding), so the
    column sums to the invoice's exact total. Request-supplied text is neutralised.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for e in invoice.entries:
        writer.writerow((
            e.ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), neutralise(e.id),
            neutralise(e.tenant), neutralise(e.agent), neutralise(e.campaign),
            neutralise(e.task), neutralise(e.model), e.prompt_tokens, e.cached_tokens,
            e.completion_tokens, e.reasoning_tokens, format_usd(charge(e)),
            "true" if e.override else "false", neutralise(e.override_reason),
            neutralise(e.key_name), neutralise(e.endpoint), e.status, e.usage_source, e.state,
            e.latency_ms, format_usd(e.overshoot), neutralise(e.end_user),
            neutralise(e.provider),
        ))
    return buf.getvalue().encode("utf-8")


# -- PDF --------------------------------------------------------------------------------------
@cache
def _templates() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    env.filters["num"] = lambda n: f"{n:,}"
    env.filters["cents"] = format_cents
    env.filters["label"] = lambda s: display_label(s, "")
    return env


def render_html(invoice: Invoice) -> str:
    """The invoice as the XHTML xhtml2pdf renders (autoescaped Jinja2)."""
    return _templates().get_template("invoice_pdf.html").render(inv=invoice)


def render_pdf(invoice: Invoice) -> bytes:
    """The branded PDF. Deterministic for the same invoice; reads nothing but bundled assets."""
    return html_to_pdf(render_html(invoice), f"invoice {invoice.number}")


# -- files and the command line ---------------------------------------------------------------
def invoice_files(directory: Path, period: str, tenant: str | None) -> tuple[Path, Path]:
    """``directory/costwall_invoice_YYYY_MM[_TENANT].pdf`` and ``.csv``."""
    validate_period(period)
    stem = f"costwall_invoice_{period.replace('-', '_')}"
    if tenant:
        stem += f"_{safe_name(tenant)}"
    return directory / f"{stem}.pdf", directory / f"{stem}.csv"


def invoice_paths(reports_dir: Path, period: str, tenant: str | None) -> tuple[Path, Path]:
    """Where the admin keeps a month's invoice: under ``reports_dir/invoices``, nowhere else."""
    root = Path(reports_dir).resolve()
    pdf, csv_path = invoice_files(root / "invoices", period, tenant)
    for path in (pdf, csv_path):
        if not path.resolve().is_relative_to(root):
            raise ValueError(f"invoice path {path} leaves the reports folder")
    return pdf, csv_path


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_invoice(invoice: Invoice, pdf_path: Path, csv_path: Path) -> None:
    """Render both files and write them atomically (a reader never sees half a file)."""
    pdf, text = render_pdf(invoice), render_csv(invoice)
    pdf_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(pdf_path, pdf)
    _write_atomic(csv_path, text)






