"""The ``rate_limits`` section: rpm, tpm and concurrent per global/tenant/agent/key/end user.

Each entry is a mapping of kinds (``{rpm: 600, tpm: 200000, concurrent: 20}``) read by this
section's own ``parse`` into ``gateway.ratelimit.RateLimit``; every limit must be a positive
whole number (a limit of 0 would refuse everything: leave the kind out for "no limit").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, ClassVar, Self

from gateway.config.budgets import ID_HINT, ID_RE
from gateway.config.fields import Context, Section, reject_unknown, setting
from gateway.config.kinds import Choice
from gateway.ratelimit import KINDS, RateLimit, RatePlan

_SCOPE_SECTIONS = {"tenants": "tenant", "agents": "agent", "keys": "key", "users": "user"}
MAX_LIMIT = 10**12  # a trillion tokens per minute is past any real account
USER_MAX = 128  # an end user id, as ``gateway.inbound.end_user`` accepts it
ENTRY_HELP = "{rpm, tpm, concurrent}"


@dataclass(frozen=True, slots=True)
class RateLimitSettings(Section):
    KEY = "rate_limits"
    EXTRA: ClassVar[Mapping[str, str]] = {
        "global": f"the global limits {ENTRY_HELP}",
        **{name: f"per-{scope} limits {ENTRY_HELP}, by {scope} id"
           for name, scope in _SCOPE_SECTIONS.items()},
        "users_default": f"the limits {ENTRY_HELP} of every end user not in users",
    }
    on_store_error: str = setting(
        "closed", "PostgreSQL: refuse (closed) or limit per replica (open) while the shared "
        "store is unreachable", Choice(("closed", "open"), echo=True))
    # internal: (scope, id) -> limits; scope "global" uses id "global".
    limits: Mapping[tuple[str, str], RateLimit] = field(default_factory=dict)
    users_default: RateLimit | None = None

    @property
    def plan(self) -> RatePlan:
        """The limits as the rate limiter resolves them per request."""
        return RatePlan(self.limits, self.users_default)

    @classmethod
    def parse(cls, ctx: Context) -> Self:
        raw = ctx.raw.get(cls.KEY) or {}
        problems = ctx.problems
        if not isinstance(raw, Mapping):
            problems.append(f"{cls.KEY}: must be a mapping (of "
                            f"{', '.join(sorted(cls.known_keys()))})")
            raw = {}
        if "campaigns" in raw:  # a client names its own campaign: a limit there is no limit
            problems.append(f"{cls.KEY}.campaigns: campaigns have no rate limits (a client "
                            "chooses its campaign); limit its key, agent, tenant or end user")
        reject_unknown({k: v for k, v in raw.items() if k != "campaigns"}, cls.known_keys(),
                       (), cls.KEY, problems)
        limits: dict[tuple[str, str], RateLimit] = {}
        if raw.get("global") is not None:
            entry = _entry(raw["global"], f"{cls.KEY}.global", problems)
            if entry is not None:
                limits[("global", "global")] = entry
        for section, scope in _SCOPE_SECTIONS.items():
            entries = raw.get(section) or {}
            if not isinstance(entries, Mapping):
                problems.append(f"{cls.KEY}.{section}: must be a mapping of {scope} id to "
                                f"{ENTRY_HELP}")
                continue
            for ident, spec in entries.items():
                where = f"{cls.KEY}.{section}.{ident}"
                _check_id(scope, ident, where, problems)
                entry = _entry(spec, where, problems)
                if entry is not None:
                    limits[(scope, str(ident))] = entry
        default = None
        if raw.get("users_default") is not None:
            default = _entry(raw["users_default"], f"{cls.KEY}.users_default", problems)
        return cls(**ctx.read(cls, raw), limits=limits, users_default=default)


def _check_id(scope: str, ident: Any, where: str, problems: list[str]) -> None:
    if scope == "user":  # end user ids are what clients send: any printable text
        text = str(ident)
        if not text.strip() or text != text.strip() or len(text) > USER_MAX \
                or not text.isprintable():
            problems.append(f"{where}: an end user id is 1 to {USER_MAX} printable characters "
                            "without surrounding spaces")
    elif not ID_RE.match(str(ident)):
        problems.append(f"{where}: ids use {ID_HINT}")


def _entry(value: Any, where: str, problems: list[str]) -> RateLimit | None:
    """``{rpm, tpm, concurrent}`` at ``where``, every problem reported."""
    if not isinstance(value, Mapping):
        problems.append(f"{where}: expected a mapping of limits such as {{rpm: 60}} "
                        f"(kinds: {', '.join(KINDS)})")
        return None
    before = len(problems)
    reject_unknown(value, KINDS, (), where, problems)
    found = {kind: _limit(value[kind], f"{where}.{kind}", problems)
             for kind in KINDS if kind in value}
    if len(problems) > before:
        return None
    if not found:
        problems.append(f"{where}: needs at least one of {', '.join(KINDS)} "
                        "(e.g. {rpm: 60})")
        return None
    return RateLimit(**found)


def _limit(value: Any, where: str, problems: list[str]) -> int | None:
    """A positive whole number of requests or tokens."""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, Decimal) and value.is_finite() and value == value.to_integral():
        number = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    if number is None:
        shown = str(value) if isinstance(value, Decimal) else repr(value)
        problems.append(f"{where}: expected a whole number, got {shown}")
        return None
    if number <= 0:
        problems.append(f"{where}: must be a positive whole number, got {number} (leave it "
                        "out for no limit)")
        return None
    if number > MAX_LIMIT:
        problems.append(f"{where}: must be at most {MAX_LIMIT}, got {number}")
        return None
    return number
