"""The words and numbers of an invoice: cents by the documented rounding rule, the month,
the invoice number and file-name-safe tenant names, table labels from untrusted text. Pure.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence
from datetime import date, timedelta

from gateway.money import PICO_PER_USD

PICO_PER_CENT = PICO_PER_USD // 100
PERIOD_RE = re.compile(r"(?P<year>[0-9]{4})-(?P<month>0[1-9]|1[0-2])")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
LABEL_CHARS = 60


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
