"""Monthly invoices: the exact ledger in, a branded PDF and a per-request CSV out.

The ledger keeps every cost exact (integer pico-USD). Money is rounded to cents here and only
here, by one rule (see ``allocate_cents``): in every table of the PDF the printed lines add up
to the printed total, and the printed total is the exact ledger total rounded half-up to the
cent, which is also what the CSV's exact ``cost_usd`` column sums to before rounding.

Rendering is sandboxed: the PDF template is Jinja2 with autoescape on, and xhtml2pdf runs in
``admin.pdf_sandbox`` (bundled assets only, no network). Campaign names and other
request-supplied text are untrusted throughout.

Used by ``costwall invoice`` (``invoice_command``) and by the admin routes, which call
``build_invoice`` then ``render_pdf`` / ``render_csv`` (``render_pdf`` is CPU-bound: run it in a
thread, e.g. ``await asyncio.to_thread(render_pdf, invoice)``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import sys
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Protocol
from zoneinfo import ZoneInfo

import jinja2

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
from gateway.money import PICO_PER_USD, format_usd
from gateway.store import open_ledger
from gateway.store.interfaces import Ledger

TEMPLATES = Path(__file__).resolve().parent / "templates"
PICO_PER_CENT = PICO_PER_USD // 100
PERIOD_RE = re.compile(r"(?P<year>[0-9]{4})-(?P<month>0[1-9]|1[0-2])")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_LINES = 60  # per breakdown table; the rest fold into one "other" line (the CSV has all)
LABEL_CHARS = 60
CSV_COLUMNS = (
    "timestamp", "request_id", "tenant", "agent", "campaign", "task", "model",
    "prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens", "cost_usd",
    "override", "override_reason", "key_name", "endpoint", "status", "usage_source", "state",
    "latency_ms", "overshoot_usd",
)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")
__all__ = [  # the invoice API, including what it re-exports from admin.pdf_sandbox
    "ASSETS", "BUNDLED_ASSETS", "CSV_COLUMNS", "MAX_LINES", "Breakdown", "Invoice",
    "InvoiceRenderError", "InvoiceSource", "Line", "NoActivity", "allocate_cents",
    "build_invoice", "charge",
    "display_label", "format_cents", "html_to_pdf", "invoice_command", "invoice_files",
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
    breakdowns: tuple[Breakdown, ...]  # tenant (all-tenant invoices), campaign, agent, model, day

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
def round_half_up_cents(pico: int) -> int:
    """Exact pico-USD to whole cents, half a cent rounding up (costs are never negative)."""
    return (pico + PICO_PER_CENT // 2) // PICO_PER_CENT


def allocate_cents(amounts: Sequence[int]) -> list[int]:
    """Round exact pico-USD lines to cents so that they add up to the rounded exact total.

    The rule (largest remainder): the total is ``round_half_up_cents(sum(amounts))``; every line
    starts at its amount rounded down to the cent, and the cents still missing to reach the
    total go one each to the lines whose dropped fractions are largest (ties: the line printed
    first). So each printed line is its exact amount rounded down or up (never a whole cent
    away), the lines sum to the total exactly, and the total is the exact sum rounded. Naive
    per-line rounding would not do this: three lines of $0.005 round to $0.03, their exact sum
    of $0.015 to $0.02.

    >>> allocate_cents([5 * 10**9, 5 * 10**9, 5 * 10**9])   # $0.005 three times
    [1, 1, 0]
    """
    floors = [a // PICO_PER_CENT for a in amounts]
    short = round_half_up_cents(sum(amounts)) - sum(floors)  # 0 <= short <= len(amounts)
    by_fraction = sorted(range(len(amounts)), key=lambda i: (-(amounts[i] % PICO_PER_CENT), i))
    for i in by_fraction[:short]:
        floors[i] += 1
    return floors


def format_cents(cents: int) -> str:
    """``123456`` → ``'1,234.56'``."""
    return f"{cents // 100:,}.{cents % 100:02d}"


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
def validate_period(period: str) -> str:
    """``YYYY-MM`` or ValueError; nothing else (no paths, no ``2026-1``, no month 13)."""
    if not isinstance(period, str) or PERIOD_RE.fullmatch(period) is None:
        raise ValueError(f"invalid month {str(period)[:40]!r}: expected YYYY-MM, e.g. 2026-11")
    if not "1970-01" <= period < "9999-12":  # the month after must exist too
        raise ValueError(f"invalid month {period!r}: out of range")
    return period


def safe_name(tenant: str) -> str:
    """A tenant as a file-name and invoice-number part: itself when plain, else a safe form.

    Plain means letters, digits, ``.``, ``_`` and ``-`` (not leading), at most 64 characters.
    Anything else keeps its plain characters and gains a short hash, so two tenants never
    share a name and no ``/``, ``..`` or control character reaches a path.
    """
    if _SAFE_NAME.fullmatch(tenant) and ".." not in tenant:
        return tenant
    plain = re.sub(r"[^A-Za-z0-9_-]+", "_", tenant).strip("_")[:40] or "tenant"
    return f"{plain}-{hashlib.sha256(tenant.encode()).hexdigest()[:8]}"


def invoice_number(period: str, tenant: str | None) -> str:
    """Stable per month and tenant; a name unfit for a file name gets a hash suffix.

    >>> invoice_number("2026-11", "acme"), invoice_number("2026-11", None)
    ('CW-2026-11-ACME', 'CW-2026-11-ALL')
    >>> invoice_number("2026-11", "../etc")
    'CW-2026-11-ETC-F7F9121F'
    """
    return f"CW-{period}-{safe_name(tenant).upper() if tenant is not None else 'ALL'}"


def _period_dates(period: str) -> tuple[date, date]:
    year, month = int(period[:4]), int(period[5:7])
    start = date(year, month, 1)
    following = date(year + month // 12, month % 12 + 1, 1)
    return start, following - timedelta(days=1)


def display_label(text: str | None, empty: str) -> str:
    """Untrusted text as a table label: control characters out, long names shortened."""
    if not text:
        return empty
    cleaned = "".join(" " if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") else ch
                      for ch in text)
    cleaned = " ".join(cleaned.split()) or empty
    return cleaned if len(cleaned) <= LABEL_CHARS else cleaned[: LABEL_CHARS - 1] + "…"


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
            e.latency_ms, format_usd(e.overshoot),
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


@dataclass
class _LedgerOnly:
    """The ``InvoiceSource`` of the CLI: a ledger opened beside (or without) a running gateway."""

    settings: Settings
    ledger: Ledger
    clock: Callable[[], datetime]


def _fail(message: str, code: int) -> int:
    print(f"costwall invoice: {message}", file=sys.stderr)
    return code


async def invoice_command(settings: Settings, month: str | None, tenant: str | None,
                          out: Path | None) -> int:
    """``costwall invoice [YYYY-MM] [--tenant T] [--out DIR]``: write PDF + CSV, print paths."""
    import asyncio

    def clock() -> datetime:
        return datetime.now(UTC)

    period = month or period_of(clock(), settings.budgets.tz)
    try:
        validate_period(period)
    except ValueError as exc:
        return _fail(str(exc), 2)
    if tenant is not None and not tenant.strip():
        return _fail("--tenant must not be empty", 2)
    directory = out if out is not None else settings.general.reports_dir / "invoices"
    pdf_path, csv_path = invoice_files(directory, period, tenant)
    ledger = open_ledger(settings.database, synchronous=settings.db_synchronous, pool_size=2)
    try:
        await ledger.start()
        try:
            invoice = await build_invoice(_LedgerOnly(settings, ledger, clock), period, tenant)
            issued = await ledger.get_setting(f"invoices.issued.{period}")
        finally:
            await ledger.close()
    except NoActivity as exc:
        return _fail(str(exc), 1)
    except Exception as exc:  # a database that is down or unreadable: say so, no traceback
        return _fail(f"cannot read the ledger ({settings.ledger.database.split('://')[0]}): "
                     f"{type(exc).__name__}: {exc}", 1)
    if out is None and issued is not None and json.loads(issued).get("state") == "issued" \
            and pdf_path.exists() and csv_path.exists():
        # Issued by invoices.auto (admin.invoice_auto): those files never change.
        print(f"{period} is issued; its files are kept as issued:", file=sys.stderr)
        print(pdf_path)
        print(csv_path)
        return 0
    try:
        await asyncio.to_thread(write_invoice, invoice, pdf_path, csv_path)
    except InvoiceRenderError as exc:
        return _fail(str(exc), 1)
    except OSError as exc:
        return _fail(f"cannot write to {directory}: {exc}", 1)
    print(pdf_path)
    print(csv_path)
    return 0
