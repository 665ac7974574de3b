"""The ``budgets`` section: calendar boundaries, warnings, the near-cap policy and the caps.

Caps arrive as ``{monthly_usd: 200, daily_usd: 10}`` (any of the four windows, or a bare
amount for a monthly cap) per scope id, plus ``users_default`` for end users not listed, and
are kept as exact integer pico-USD, never a float.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, ClassVar, Self
from zoneinfo import ZoneInfo

from gateway.budget_rules import Limits
from gateway.config.fields import Context, Section, reject_unknown, setting
from gateway.config.kinds import Choice, Fractions, Int, TimeZone
from gateway.money import MoneyError, to_pico
from gateway.windows import FIELDS

SCOPES = ("global", "tenant", "agent", "campaign", "key", "user")
_SCOPE_SECTIONS = {"tenants": "tenant", "agents": "agent", "campaigns": "campaign",
                   "keys": "key", "users": "user"}
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
ID_HINT = "letters, digits and . _ : @ - only (at most 128)"
USER_ID_MAX = 128  # end user ids are any printable text (they come from X-Costwall-User)
# The keys of one cap (budgets.global, budgets.tenants.<id>, ...), with their help.
ENTRY_KEYS = {
    "monthly_usd": "the cap in USD per calendar month",
    "weekly_usd": "the cap in USD per ISO week (Monday to Sunday)",
    "daily_usd": "the cap in USD per calendar day",
    "hourly_usd": "the cap in USD per clock hour",
}
assert set(ENTRY_KEYS) == set(FIELDS)


@dataclass(frozen=True, slots=True)
class BudgetSettings(Section):
    KEY = "budgets"
    EXTRA: ClassVar[Mapping[str, str]] = {
        "global": "the global cap ({monthly_usd: ..., daily_usd: ...})",
        **{name: f"per-{scope} caps, by {scope} id" for name, scope in _SCOPE_SECTIONS.items()},
        "users_default": "caps of every end user not listed under users",
    }
    timezone: str = setting("UTC", "calendar boundaries of every budget window", TimeZone())
    warn_at: tuple[Decimal, ...] = setting((Decimal("0.8"),), "warning thresholds (fractions)",
                                           Fractions())
    near_cap: str = setting("reject", "reject or clamp a request that does not fit",
                            Choice(("reject", "clamp"), echo=True))
    min_output_tokens: int = setting(16, "the least output clamp shrinks a request to", Int(1))
    # internal: (scope, id) -> {window: limit in pico-USD}; scope "global" uses id "global".
    limits: Mapping[tuple[str, str], Mapping[str, int]] = field(default_factory=dict)
    # internal: the caps every end user not listed under ``users`` gets ({window: pico-USD}).
    users_default: Mapping[str, int] = field(default_factory=dict)
    max_tool_calls: int = setting(16, "built-in tool calls bounded when a request sets none",
                                  Int(0, 1000))

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def budget_limits(self) -> Limits:
        """A fresh, mutable ``Limits`` for a budget engine (admin changes edit it)."""
        return Limits(self.limits, self.users_default)

    @classmethod
    def parse(cls, ctx: Context) -> Self:
        raw = ctx.mapping(cls)
        default: dict[str, int] = {}
        if raw.get("users_default") is not None:
            default = _caps(raw["users_default"], "budgets.users_default", ctx.problems) or {}
        return cls(**ctx.read(cls, raw), limits=_limits(raw, ctx), users_default=default)


def _limits(raw: Mapping[str, Any], ctx: Context) -> dict[tuple[str, str], dict[str, int]]:
    limits: dict[tuple[str, str], dict[str, int]] = {}
    problems = ctx.problems
    global_raw = raw.get("global")
    caps: dict[str, int] | None = None
    if global_raw is not None:
        caps = _caps(global_raw, "budgets.global", problems)
    if "MAX_MONTHLY_BUDGET" in ctx.env:  # the environment wins for the monthly window
        pico = _amount(ctx.env["MAX_MONTHLY_BUDGET"], "MAX_MONTHLY_BUDGET", problems)
        if pico is not None:
            caps = {**(caps or {}), "monthly": pico}
    if caps:
        limits[("global", "global")] = caps
    for section, scope in _SCOPE_SECTIONS.items():
        entries = raw.get(section) or {}
        if not isinstance(entries, Mapping):
            problems.append(f"budgets.{section}: must be a mapping of id to {{monthly_usd: ...}}")
            continue
        for ident, spec in entries.items():
            where = f"budgets.{section}.{ident}"
            if scope == "user":
                text = str(ident)
                if not text.strip() or len(text) > USER_ID_MAX or not text.isprintable():
                    problems.append(f"{where}: user ids are 1 to {USER_ID_MAX} printable "
                                    "characters")
            elif not ID_RE.match(str(ident)):
                problems.append(f"{where}: ids use letters, digits and . _ : @ - only")
            caps = _caps(spec, where, problems)
            if caps:
                limits[(scope, str(ident))] = caps
    return limits


def _caps(value: Any, where: str, problems: list[str]) -> dict[str, int] | None:
    """The caps at ``where``: ``{monthly_usd: 200, daily_usd: 10}`` (any of the four
    windows) or a bare amount (a monthly cap), reported readably."""
    if not isinstance(value, Mapping):
        pico = _amount(value, where, problems)
        return None if pico is None else {"monthly": pico}
    before = len(problems)
    reject_unknown(value, ENTRY_KEYS, (), where, problems)
    if not any(k in value for k in FIELDS):
        if len(problems) == before:  # a misspelt window already says why
            problems.append(f"{where}: needs at least one of monthly_usd, weekly_usd, "
                            "daily_usd, hourly_usd (e.g. monthly_usd: 200)")
        return None
    caps: dict[str, int] = {}
    for name, window in FIELDS.items():
        if name in value:
            pico = _amount(value[name], f"{where}.{name}", problems)
            if pico is not None:
                caps[window] = pico
    return caps


def _amount(value: Any, where: str, problems: list[str]) -> int | None:
    """One cap in USD: a decimal number or string, never negative."""
    if value is None:
        problems.append(f"{where}: expected an amount in USD such as 200 or \"12.50\", "
                        "got nothing")
        return None
    try:
        return to_pico(value)  # refuses negative amounts (a cap of 0 refuses every request)
    except MoneyError as exc:
        problems.append(f"{where}: expected an amount in USD such as 200 or \"12.50\" "
                        f"({exc})")
        return None
