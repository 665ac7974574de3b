"""``costwall invoice``: build a month's invoice from the ledger and write PDF + CSV.

Runs beside (or without) a running gateway; every failure is one line and an exit code.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from admin.invoices import (
    InvoiceRenderError,
    NoActivity,
    build_invoice,
    invoice_files,
    validate_period,
    write_invoice,
)
from gateway.budget import period_of
from gateway.config import Settings
from gateway.store import open_ledger
from gateway.store.interfaces import Ledger


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
