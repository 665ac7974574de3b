"""Exact money: integer pico-dollars (1e-12 USD) inside, Decimal strings at the edges.

Prices are quoted per 1M tokens with at most six decimals, so one token's price is a whole
number of pico-dollars and every cost is an exact integer sum. Never a binary float.

>>> to_pico("0.15") // 1_000_000   # $0.15 per 1M tokens is 150,000 pico-USD per token
150000
>>> format_usd(150_000 * 1000)      # a thousand such tokens
'0.00015'
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

PICO_PER_USD = 10**12


class MoneyError(ValueError):
    """A value that is not an exact, finite, non-negative USD amount."""


def parse_usd(value: object) -> Decimal:
    """Parse a USD amount from a string, int or Decimal; floats are refused on purpose."""
    if isinstance(value, (bool, float)):
        raise MoneyError(f"{value!r} is a binary float; give money as a decimal string")
    if isinstance(value, (int, Decimal)):
        amount = Decimal(value)
    elif isinstance(value, str):
        try:
            amount = Decimal(value.strip())
        except InvalidOperation:
            raise MoneyError(f"{value!r} is not a decimal number") from None
    else:
        raise MoneyError(f"{value!r} is not a decimal number")
    if not amount.is_finite():
        raise MoneyError(f"{value!r} is not a finite amount")
    if amount < 0:
        raise MoneyError(f"{value!r} is negative")
    return amount


def to_pico(value: object) -> int:
    """USD (string/int/Decimal) to integer pico-dollars; refuses sub-pico precision."""
    amount = parse_usd(value)
    if amount.adjusted() > 15:  # beyond a quadrillion dollars: a typo, not a budget
        raise MoneyError(f"{value!r} is too large")
    pico = amount.scaleb(12)
    if pico != pico.to_integral_value():
        raise MoneyError(f"{value!r} has more than 12 decimal places")
    return int(pico)


def to_usd(pico: int) -> Decimal:
    """Integer pico-dollars to an exact Decimal in USD."""
    return Decimal(pico).scaleb(-12)


def format_usd(pico: int) -> str:
    """Plain decimal string without exponent or trailing zeros (``'0.00015'``, ``'12'``).

    Integer arithmetic: it runs several times per proxied request, and Decimal formatting
    cost ~2 µs a call. Beyond 28 digits Decimal's context precision would round, so those
    (never a real amount) keep the Decimal path to give exactly the same text.
    """
    magnitude = -pico if pico < 0 else pico
    if magnitude >= _DECIMAL_EXACT:
        return _format_usd_decimal(pico)
    whole, frac = divmod(magnitude, PICO_PER_USD)
    sign = "-" if pico < 0 else ""
    if not frac:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{frac:012d}".rstrip("0")


_DECIMAL_EXACT = 10**28  # Decimal's default precision: below this, scaleb is exact


def _format_usd_decimal(pico: int) -> str:
    """The reference formatting through Decimal (kept for huge values and for tests)."""
    text = format(to_usd(pico), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"
