"""``/admin/invoices``: months with data, totals per tenant, PDF/CSV downloads and saving.

Rendering lives in ``admin.invoices`` (``build_invoice``, ``render_pdf``, ``render_csv``);
this module only validates what the URL asks for and serves the bytes. The month must be
exactly ``YYYY-MM`` and the tenant plain text, so nothing from the URL ever reaches a path.
Both roles may read and save invoices: finance owns them, and they change no budget state.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web

from admin import invoice_auto, validate
from admin import invoices as inv
from admin.auth import Handler, read_form, requires
from admin.errors import BadInput, Missing
from admin.render import flash, render
from gateway.errors import GatewayError
from gateway.money import format_usd
from gateway.services import GATEWAY

CONTENT_TYPES = {"pdf": "application/pdf", "csv": "text/csv; charset=utf-8"}


class RenderFailed(GatewayError):
    status = 500
    type = "server_error"
    code = "invoice_render_failed"


def _month(request: web.Request) -> str:
    month = request.match_info["month"]
    if not validate.MONTH_RE.match(month):
        raise Missing("No such invoice: URLs look like /admin/invoices/2026-05.pdf.")
    return month


async def _build(request: web.Request, month: str, tenant: str | None) -> inv.Invoice:
    try:
        return await inv.build_invoice(request.app[GATEWAY], month, tenant)
    except inv.NoActivity as exc:
        raise Missing(str(exc)) from None
    except ValueError as exc:
        raise BadInput(str(exc)) from None


async def _bytes(kind: str, invoice: inv.Invoice) -> bytes:
    try:
        if kind == "pdf":  # CPU-bound: keep the event loop free for proxied traffic
            return await asyncio.to_thread(inv.render_pdf, invoice)
        return inv.render_csv(invoice)
    except inv.InvoiceRenderError as exc:
        raise RenderFailed(str(exc)) from None


def _filename(kind: str, month: str, tenant: str | None) -> str:
    pdf, csv = inv.invoice_files(Path("."), month, tenant)
    return (pdf if kind == "pdf" else csv).name


def _download(kind: str) -> Handler:
    @requires("read")
    async def download(request: web.Request) -> web.Response:
        month = _month(request)
        tenant = validate.tenant(request.query.get("tenant"))
        try:  # an issued month: the stored file, exactly as issued
            body = await invoice_auto.stored_file(request.app[GATEWAY], month, tenant, kind)
        except invoice_auto.IssuedFileLost as exc:
            raise RenderFailed(str(exc)) from None
        if body is None:
            invoice = await _build(request, month, tenant)
            body = await _bytes(kind, invoice)
        return web.Response(body=body, headers={
            "Content-Type": CONTENT_TYPES[kind],
            "Content-Disposition": f'attachment; filename="{_filename(kind, month, tenant)}"',
        })

    return download


@requires("read")
async def invoices_page(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    current = gw.budgets.current_period()
    periods = await gw.ledger.periods()
    if current not in periods:
        periods = [current, *periods]
    months = []
    for period in periods:
        tenants = sorted(await gw.ledger.usage(period, "tenant"), key=lambda r: r.group)
        months.append({"period": period, "tenants": tenants, "current": period == current,
                       "total": sum(r.cost for r in tenants),
                       "requests": sum(r.requests for r in tenants)})
    issued = await invoice_auto.history(gw)
    return render(request, "invoices.html", {
        "months": months, "issued": issued,
        "issued_months": {i["month"] for i in issued}, "auto": gw.settings.invoices_auto,
    }, active="invoices")


@requires("read")
async def save_invoice(request: web.Request) -> web.Response:
    """Write a month's PDF and CSV under ``reports_dir/invoices`` (as ``costwall invoice``)."""
    gw = request.app[GATEWAY]
    form = await read_form(request)
    month, tenant = form.get("month"), form.get("tenant") or None
    if not isinstance(month, str) or not validate.MONTH_RE.match(month):
        raise BadInput("month must look like YYYY-MM.")
    tenant = validate.tenant(tenant if isinstance(tenant, str) else None)
    if await invoice_auto.record_of(gw, month) is not None:
        flash(request, f"{month} is issued: its files are kept as issued (download them from "
                       "the history).")
        raise web.HTTPSeeOther("/admin/invoices")
    invoice = await _build(request, month, tenant)
    pdf, csv = inv.invoice_paths(gw.settings.general.reports_dir, month, tenant)
    try:
        await asyncio.to_thread(inv.write_invoice, invoice, pdf, csv)
    except inv.InvoiceRenderError as exc:
        raise RenderFailed(str(exc)) from None
    except OSError as exc:
        raise RenderFailed(f"Cannot write the invoice files: {exc.strerror}") from None
    flash(request, f"Saved {pdf.name} and {csv.name} (total ${format_usd(invoice.total_exact)})"
                   f" in {gw.settings.general.reports_dir / 'invoices'}.")
    raise web.HTTPSeeOther("/admin/invoices")


def setup_invoices(app: web.Application) -> None:
    """Routes of ``/admin/invoices`` and the downloads (paths relative to the admin mount)."""
    app.router.add_get("/invoices", invoices_page)
    app.router.add_post("/invoices/save", save_invoice)
    app.router.add_get("/invoices/{month}.pdf", _download("pdf"))
    app.router.add_get("/invoices/{month}.csv", _download("csv"))
