"""How money and ratios look on admin pages (display only; the API gives exact strings).

>>> usd(12_345_678 * 10**9)
'$12,345.68'
>>> usd(420 * 10**6)
'$0.00042'
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal

from gateway.money import to_usd

CENT = Decimal("0.01")
MICRO = Decimal("0.000001")


def usd(pico: int) -> str:
    """Cents for amounts of a cent or more; up to six decimals below (per-request costs)."""
    amount = to_usd(pico)
    if amount == 0:
        return "$0.00"
    if amount >= CENT:
        return f"${amount.quantize(CENT, ROUND_HALF_UP):,}"
    small = amount.quantize(MICRO, ROUND_HALF_UP)
    if small == 0:
        return "<$0.000001"
    return f"${small.normalize():f}"


def percent(ratio: Decimal) -> str:
    """``Decimal('0.4213')`` -> ``'42.1%'``."""
    return f"{(ratio * 100).quantize(Decimal('0.1'), ROUND_HALF_UP)}%"


def share(part: int, whole: int) -> str:
    """Width (0-100, one decimal) of ``part`` as a bar against ``whole``; for SVG attributes."""
    if whole <= 0 or part <= 0:
        return "0"
    return str(min(Decimal(100), Decimal(part) * 100 / whole).quantize(Decimal("0.1")))


def count(number: int) -> str:
    return f"{number:,}"


def plural(number: int, noun: str, many: str | None = None) -> str:
    """``plural(1, "request")`` -> ``'1 request'``, ``plural(1200, "request")`` -> ``'1,200
    requests'``."""
    return f"{number:,} {noun if number == 1 else many or noun + 's'}"


def when(value: str | datetime | None) -> str:
    """One timestamp format on every page (UTC, to the second): ``2026-11-29 22:04:51``.

    >>> when("2026-11-29T22:04:51.123456Z"), when("2026-11-29T23:04:51+01:00"), when(None)
    ('2026-11-29 22:04:51', '2026-11-29 22:04:51', '')
    """
    if not value:
        return ""
    if isinstance(value, datetime):
        moment = value
    else:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return value[:19].replace("T", " ")
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S")
