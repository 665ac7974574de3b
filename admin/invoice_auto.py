"""Invoice automation and history: last month's invoices issued once, kept unchanged.

With ``invoices.auto: true`` a background task (at start, then every ``CHECK_S`` seconds; no
cron) looks at the month before the current one (in ``budgets.timezone``, by ``gw.clock``).
If it had activity and is not issued yet, the replicas race for the ledger setting
``invoices.issued.YYYY-MM`` with ``add_setting`` (insert-if-absent: exactly one wins). The
winner writes the all-tenant invoice and one per tenant into ``<reports_dir>/invoices/``
(PDF + CSV, atomically; the renders are deterministic), then replaces its claim with the
history record: per file set the tenant, file names, SHA-256 of each file, total and issue
time. The history lives in the shared database, so every replica lists it.

A claim whose issuer died (no record after ``LEASE_S``) is taken over by the replica that wins
a second ``add_setting`` keyed by that stale claim, so a crash delays the issue but never
doubles it. Files recorded in the history are never rewritten: ``stored_file`` serves them
after checking their SHA-256, and the save button and ``costwall invoice`` leave them alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from gateway.budget import period_of
from gateway.money import format_usd
from gateway.services import GATEWAY, Gateway

log = logging.getLogger("costwall.invoices")
CHECK_S = 60.0
LEASE_S = 600.0
PREFIX = "invoices.issued."
WAKE = "invoices.auto.wake"  # gw.extras: an asyncio.Event that runs the check now


def setting_key(month: str) -> str:
    return PREFIX + month


def month_before(period: str) -> str:
    year, month = int(period[:4]), int(period[5:7])
    return f"{year - 1:04d}-12" if month == 1 else f"{year:04d}-{month - 1:02d}"


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def invoice_issued_event(record: dict[str, Any]) -> dict[str, Any]:
    """The ``invoice.issued`` event (SPEC "Alerts") for a month's record; stable id."""
    ident = hashlib.sha256(f"invoice.issued|{record['month']}".encode()).hexdigest()
    return {"type": "invoice.issued", "id": f"evt_{ident[:32]}",
            "data": {"month": record["month"], "issued_at": record["issued_at"],
                     "invoices": record["invoices"]}}


async def record_of(gw: Gateway, month: str) -> dict[str, Any] | None:
    """The month's history record once issued (None while unissued or only claimed)."""
    raw = await gw.ledger.get_setting(setting_key(month))
    if raw is None:
        return None
    data = orjson.loads(raw)
    return data if isinstance(data, dict) and data.get("state") == "issued" else None


async def history(gw: Gateway) -> list[dict[str, Any]]:
    """Every issued file set, newest month first (all-tenant invoice first in a month)."""
    current = period_of(gw.clock(), gw.settings.budgets.tz)
    out = []
    for month in await gw.ledger.periods():
        if month >= current:
            continue
        record = await record_of(gw, month)
        if record is None:
            continue
        for item in record["invoices"]:
            out.append({"month": month, "issued_at": record["issued_at"], **item})
    return out


def _write_new(path: Path, data: bytes) -> None:
    """Write atomically; a file already holding exactly ``data`` is left as it is."""
    if path.exists() and path.read_bytes() == data:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o444)
    os.replace(tmp, path)


async def _issue(gw: Gateway, month: str) -> list[dict[str, Any]]:
    """Render and write the month's file sets; their history entries."""
    from admin import invoices as inv
    tenants = sorted(r.group for r in await gw.ledger.usage(month, "tenant"))
    items = []
    for tenant in [None, *tenants]:
        invoice = await inv.build_invoice(gw, month, tenant)
        pdf = await asyncio.to_thread(inv.render_pdf, invoice)
        csv = inv.render_csv(invoice)
        pdf_path, csv_path = inv.invoice_paths(gw.settings.reports_dir, month, tenant)
        pdf_path.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(_write_new, pdf_path, pdf)
        await asyncio.to_thread(_write_new, csv_path, csv)
        items.append({
            "tenant": tenant, "number": invoice.number,
            "files": {"pdf": pdf_path.name, "csv": csv_path.name},
            "sha256": {"pdf": hashlib.sha256(pdf).hexdigest(),
                       "csv": hashlib.sha256(csv).hexdigest()},
            "total_usd": f"{invoice.total_cents // 100}.{invoice.total_cents % 100:02d}",
            "total_exact_usd": format_usd(invoice.total_exact)})
    return items


async def _claim(gw: Gateway, month: str, issuer: str) -> bool:
    """True if this process is the one to issue ``month`` (now)."""
    key = setting_key(month)
    claim = orjson.dumps({"state": "claimed", "by": issuer,
                          "at": _iso(gw.clock())}).decode()
    stored = await gw.ledger.add_setting(key, claim)
    if stored == claim:
        return True
    data = orjson.loads(stored)
    if data.get("state") != "claimed":
        return False
    if data.get("by") == issuer:
        return True
    try:
        at = datetime.fromisoformat(str(data.get("at")).replace("Z", "+00:00"))
    except ValueError:
        at = datetime.min.replace(tzinfo=UTC)
    if gw.clock() - at < timedelta(seconds=LEASE_S):
        return False  # another replica is issuing right now
    # The issuer died mid-way: whoever wins this second claim takes over (exactly one).
    won = await gw.ledger.add_setting(f"{key}.takeover.{data.get('at')}", issuer)
    if won != issuer:
        return False
    await gw.ledger.set_setting(key, claim)
    log.warning("invoices %s: the claim of %s expired; issuing them here", month,
                data.get("by"))
    return True


async def check(gw: Gateway, issuer: str) -> dict[str, Any] | None:
    """Issue last month's invoices if that is due and this process wins; the record."""
    month = month_before(period_of(gw.clock(), gw.settings.budgets.tz))
    if await record_of(gw, month) is not None:
        return None  # the usual case: one indexed read a minute
    if not await gw.ledger.usage(month, "tenant"):
        return None  # no activity, no invoice (admin.invoices.NoActivity)
    if not await _claim(gw, month, issuer):
        return None
    await gw.ledger.flush()
    items = await _issue(gw, month)
    record = {"state": "issued", "month": month, "issued_at": _iso(gw.clock()),
              "by": issuer, "invoices": items}
    await gw.ledger.set_setting(setting_key(month), orjson.dumps(record).decode())
    event = invoice_issued_event(record)
    log.info("invoices %s issued: %d file sets (event %s)", month, len(items), event["id"])
    if gw.alerts is not None:
        gw.alerts.emit_event(event)
    return record


async def invoice_files(gw: Gateway, event: dict[str, Any]) -> list[tuple[str, bytes, str]]:
    """The PDF and CSV files of an ``invoice.issued`` event, to attach to its e-mail: the
    issued bytes, checked against the recorded SHA-256 (``stored_file``), so the replica that
    sends the mail need not be the one whose disk holds the files."""
    from admin import invoices as inv

    data = event.get("data") or {}
    month = str(data.get("month"))
    out = []
    for item in data.get("invoices") or []:
        tenant = item.get("tenant")
        paths = inv.invoice_paths(gw.settings.reports_dir, month, tenant)
        for kind, path, mime in (("pdf", paths[0], "application/pdf"),
                                 ("csv", paths[1], "text/csv")):
            body = await stored_file(gw, month, tenant, kind)
            if body is None:
                raise IssuedFileLost(f"{path.name} is not in the invoice history")
            out.append((path.name, body, mime))
    return out


async def stored_file(gw: Gateway, month: str, tenant: str | None, kind: str) -> bytes | None:
    """The issued file of ``month``/``tenant`` (``pdf``/``csv``), checked against its
    SHA-256; None when that month is not issued. A file that is missing or changed on this
    replica is rendered again and served only if it hashes the same."""
    from admin import invoices as inv

    record = await record_of(gw, month)
    if record is None:
        return None
    item = next((i for i in record["invoices"] if i.get("tenant") == (tenant or None)), None)
    if item is None:
        return None
    want = item["sha256"][kind]
    path = inv.invoice_paths(gw.settings.reports_dir, month, tenant)[0 if kind == "pdf" else 1]
    with contextlib.suppress(OSError):
        data = await asyncio.to_thread(path.read_bytes)
        if hashlib.sha256(data).hexdigest() == want:
            return data
        log.error("issued invoice %s does not match its recorded SHA-256", path.name)
    invoice = await inv.build_invoice(gw, month, tenant)
    data = (await asyncio.to_thread(inv.render_pdf, invoice) if kind == "pdf"
            else inv.render_csv(invoice))
    if hashlib.sha256(data).hexdigest() != want:
        raise IssuedFileLost(f"The issued invoice file {path.name} is missing or was changed "
                             "on this server, and the ledger no longer renders the same bytes.")
    return data


class IssuedFileLost(Exception):
    """An issued file cannot be served with its recorded SHA-256."""


def automation(app: web.Application) -> Any:
    """``cleanup_ctx``: the background check, when ``invoices.auto`` is on."""

    async def run(app: web.Application) -> AsyncIterator[None]:
        gw = app[GATEWAY]
        task = None
        if gw.alerts is not None:
            gw.alerts.attachments = functools.partial(invoice_files, gw)
        if gw.settings.invoices_auto:
            issuer = f"{gw.ledger.replica}/{uuid.uuid4().hex[:8]}"
            wake = gw.extras[WAKE] = asyncio.Event()
            task = asyncio.create_task(_loop(gw, issuer, wake), name="costwall-invoice-auto")
        yield
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return run


async def _loop(gw: Gateway, issuer: str, wake: asyncio.Event) -> None:
    """Check at start, then every ``CHECK_S`` seconds or when ``wake`` is set."""
    while True:
        try:
            await check(gw, issuer)
        except asyncio.CancelledError:
            raise
        except Exception:  # the next check tries again; the claim's lease bounds a stall
            log.exception("invoice automation failed (retrying in %ds)", CHECK_S)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), CHECK_S)
        wake.clear()
