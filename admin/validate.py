"""Checks for every value an admin sends: money, scopes, ids, months, names, reasons.

Pure functions that return a clean value or raise ``BadInput`` with a message an operator can
act on, so the UI and the JSON API refuse the same things with the same words.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

from admin.errors import BadInput
from gateway.config import SCOPES
from gateway.ledger import GROUP_BY
from gateway.money import MoneyError, parse_usd, to_pico
from gateway.windows import FIELDS

MONTH_RE = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")
DAY_RE = re.compile(r"^\d{4}-(0[1-9]|1[0-2])(-(0[1-9]|[12]\d|3[01]))?$")
TENANT_RE = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")  # same rule as config key names
# The ledger keeps pico-USD in 64-bit integers: 9.2e18 pico is about $9.2M.
MAX_CAP_USD = Decimal(9_000_000)
MAX_REASON = 500
LOG_KINDS = ("blocked", "override", "admin", "overshoot")
USAGE_GROUPS = GROUP_BY


def money(value: Any, field: str = "monthly_usd") -> int:
    """A cap in USD (decimal string, int or exact Decimal) as pico-USD."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise BadInput(f"{field} is required, e.g. \"250\" or \"12.50\".", param=field)
    if isinstance(value, str):
        value = value.strip().removeprefix("$").replace(",", "").strip()
    try:
        if parse_usd(value) > MAX_CAP_USD:  # before scaling: 1e999999 would overflow Decimal
            raise BadInput(f"{field}: caps above ${MAX_CAP_USD:,} are not supported.",
                           param=field)
        return to_pico(value)
    except (MoneyError, ArithmeticError) as exc:
        raise BadInput(f"{field}: {exc}. Give a non-negative amount in USD like \"12.50\".",
                       param=field) from None


def caps(body: dict[str, Any], allowed: tuple[str, ...] = ("reason",)) -> dict[str, int | None]:
    """The windows a change names: ``{"daily_usd": "40", "hourly_usd": null}`` ->
    ``{"daily": pico, "hourly": None}`` (null removes that window's cap)."""
    unknown = sorted(k for k in body if k not in FIELDS and k not in allowed)
    if unknown:
        raise BadInput(f"Unknown field {unknown[0][:40]!r}: a cap is set per window with "
                       f"{', '.join(FIELDS)} (null removes one).", param=unknown[0][:40],
                       code="unknown_window")
    changes = {FIELDS[k]: None if body[k] is None else money(body[k], k)
               for k in FIELDS if k in body}
    if not changes:
        raise BadInput(f"Name at least one window: {', '.join(FIELDS)} (e.g. "
                       "{\"daily_usd\": \"40\"}; null removes one).", param="monthly_usd")
    return changes


def scope(value: str) -> str:
    """One of the budget scopes (global, tenant, agent, campaign, key)."""
    if value not in SCOPES:
        raise BadInput(f"Unknown scope {value[:40]!r}; expected one of {', '.join(SCOPES)}.",
                       param="scope", code="unknown_scope")
    return value


def scope_id(kind: str, value: str) -> str:
    """The id within a scope: ``global`` for the global scope, else printable text."""
    value = value.strip()
    if kind == "global":
        if value not in ("", "global"):
            raise BadInput("The global scope's id is 'global'.", param="id")
        return "global"
    if not value or len(value) > 128 or not value.isprintable():
        raise BadInput("A scope id is 1 to 128 printable characters.", param="id")
    return value


def month(value: str | None, default: str) -> str:
    """``YYYY-MM`` (strict), or ``default`` when absent."""
    if value is None or value == "":
        return default
    if not MONTH_RE.match(value):
        raise BadInput("month must look like YYYY-MM, e.g. 2026-05.", param="month",
                       code="invalid_month")
    return value


def group_by(value: str | None) -> str:
    if value not in USAGE_GROUPS:
        raise BadInput(f"group_by must be one of {', '.join(USAGE_GROUPS)}.", param="group_by")
    return value


def tenant(value: str | None) -> str | None:
    """An optional tenant filter (letters, digits and . _ : @ -)."""
    if value is None or value == "":
        return None
    if not TENANT_RE.match(value):
        raise BadInput("tenant must be 1-128 letters, digits or . _ : @ -", param="tenant")
    return value


def name(value: Any, field: str) -> str:
    """A key, tenant or agent name, with the same rule the config file uses."""
    if not isinstance(value, str) or not NAME_RE.match(value.strip()):
        raise BadInput(f"{field} is required: up to 128 letters, digits or . _ : @ - "
                       "(starting with a letter or digit).", param=field)
    return value.strip()


def agents(value: Any) -> tuple[str, ...]:
    """A key's further agent types: a list of names (or one comma/space-separated string)."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    if not isinstance(value, list) or len(value) > 100:
        raise BadInput("agents must be a list of at most 100 agent types.", param="agents")
    out: list[str] = []
    for item in value:
        if item == "*":
            raise BadInput("agents: '*' (any agent type) can only be set in the config file.",
                           param="agents")
        if not isinstance(item, str) or not NAME_RE.match(item.strip()):
            raise BadInput("agents: each agent type is up to 128 letters, digits or . _ : @ - "
                           "(starting with a letter or digit).", param="agents")
        item = item.strip()
        if item not in out:
            out.append(item)
    return tuple(out)


def reason(value: Any, required: bool) -> str:
    """A one-line reason for the audit trail (whitespace collapsed, at most 500 chars)."""
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise BadInput("reason must be a string.", param="reason")
    text = " ".join(value.split())
    if not text.isprintable():  # control or format characters, lone surrogates
        raise BadInput("reason must be printable text.", param="reason")
    if required and not text:
        raise BadInput("A reason is required: say why (it goes into the audit trail).",
                       param="reason")
    if len(text) > MAX_REASON:
        raise BadInput(f"reason is at most {MAX_REASON} characters.", param="reason")
    return text


def log_filter_date(value: str | None) -> str | None:
    """A day (``YYYY-MM-DD``) or month (``YYYY-MM``) to filter events by."""
    if value is None or value == "":
        return None
    if not DAY_RE.match(value):
        raise BadInput("date must be YYYY-MM-DD or YYYY-MM.", param="date")
    return value


def bounded_int(value: str | None, field: str, default: int, low: int, high: int) -> int:
    if value is None or value == "":
        return default
    if not value.isdigit() or not low <= int(value) <= high:
        raise BadInput(f"{field} must be a whole number from {low} to {high}.", param=field)
    return int(value)


def flag(value: Any, field: str) -> bool:
    """A JSON boolean (``true``/``false``), nothing looser."""
    if not isinstance(value, bool):
        raise BadInput(f"{field} must be true or false.", param=field)
    return value
