"""The ``budgets`` section: month boundaries, warnings, the near-cap policy and the caps.

Caps arrive as ``{monthly_usd: 200}`` (or a bare amount) per scope id and are kept as exact
integer pico-USD, never a float.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, ClassVar, Self
from zoneinfo import ZoneInfo

from gateway.config.fields import NOT_YET, Context, Section, reject_unknown, setting
from gateway.config.kinds import Choice, Fractions, Int, TimeZone
from gateway.money import MoneyError, to_pico

SCOPES = ("global", "tenant", "agent", "campaign", "key")
_SCOPE_SECTIONS = {"tenants": "tenant", "agents": "agent", "campaigns": "campaign", "keys": "key"}
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
ID_HINT = "letters, digits and . _ : @ - only (at most 128)"
# The keys of one cap (budgets.global, budgets.tenants.<id>, ...), with their help.
ENTRY_KEYS = {"monthly_usd": "the cap in USD per calendar month"}


@dataclass(frozen=True, slots=True)
class BudgetSettings(Section):
    KEY = "budgets"
    EXTRA: ClassVar[Mapping[str, str]] = {
        "global": "the global cap ({monthly_usd: ...})",
        **{name: f"per-{scope} caps, by {scope} id" for name, scope in _SCOPE_SECTIONS.items()},
    }
    timezone: str = setting("UTC", "month boundaries", TimeZone())
    warn_at: tuple[Decimal, ...] = setting((Decimal("0.8"),), "warning thresholds (fractions)",
                                           Fractions())
    near_cap: str = setting("reject", "reject or clamp a request that does not fit",
                            Choice(("reject", "clamp"), echo=True))
    min_output_tokens: int = setting(16, "the least output clamp shrinks a request to", Int(1))
    # internal: (scope, id) -> monthly limit in pico-USD; scope "global" uses id "global".
    limits: Mapping[tuple[str, str], int] = field(default_factory=dict)
    max_tool_calls: int = setting(16, "built-in tool calls bounded when a request sets none",
                                  Int(0, 1000))

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @classmethod
    def parse(cls, ctx: Context) -> Self:
        raw = ctx.mapping(cls)
        return cls(**ctx.read(cls, raw), limits=_limits(raw, ctx))


def _limits(raw: Mapping[str, Any], ctx: Context) -> dict[tuple[str, str], int]:
    limits: dict[tuple[str, str], int] = {}
    problems = ctx.problems
    global_raw = ctx.env.get("MAX_MONTHLY_BUDGET", raw.get("global"))
    if global_raw is not None:
        where = "MAX_MONTHLY_BUDGET" if "MAX_MONTHLY_BUDGET" in ctx.env else "budgets.global"
        pico = _money(global_raw, where, problems)
        if pico is not None:
            limits[("global", "global")] = pico
    for section, scope in _SCOPE_SECTIONS.items():
        entries = raw.get(section) or {}
        if not isinstance(entries, Mapping):
            problems.append(f"budgets.{section}: must be a mapping of id to {{monthly_usd: ...}}")
            continue
        for ident, spec in entries.items():
            where = f"budgets.{section}.{ident}"
            if not ID_RE.match(str(ident)):
                problems.append(f"{where}: ids use letters, digits and . _ : @ - only")
            pico = _money(spec, where, problems)
            if pico is not None:
                limits[(scope, str(ident))] = pico
    return limits


def _money(value: Any, where: str, problems: list[str]) -> int | None:
    """A monthly cap at ``where``: ``{monthly_usd: 200}`` (or a bare amount), reported
    readably."""
    field_where = where
    if isinstance(value, Mapping):
        before = len(problems)
        reject_unknown(value, ENTRY_KEYS, NOT_YET["budget_entry"], where, problems)
        if "monthly_usd" not in value:
            if len(problems) == before:  # a misspelt or later window already says why
                problems.append(f"{where}: needs monthly_usd (the cap in USD per calendar "
                                "month, e.g. monthly_usd: 200)")
            return None
        field_where, value = f"{where}.monthly_usd", value["monthly_usd"]
    if value is None:
        problems.append(f"{field_where}: expected an amount in USD such as 200 or \"12.50\", "
                        "got nothing")
        return None
    try:
        return to_pico(value)
    except MoneyError as exc:
        problems.append(f"{field_where}: expected an amount in USD such as 200 or \"12.50\" "
                        f"({exc})")
        return None
