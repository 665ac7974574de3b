"""Pure budget arithmetic: scopes, limits per window, the warn-threshold rule and admission.

No I/O and no asyncio: both budget implementations (``gateway.budget.BudgetEngine`` in
memory, ``gateway.store.pg_budgets.SharedBudgets`` in PostgreSQL) and the admin's display
compose these functions, so each rule is written once.

The unit of accounting is a *slot*: one scope in one period of one window, keyed
``(period, scope, id)`` (``gateway.windows``: the period id also names its window). A
request is reserved in the slot of every limited window of every scope it belongs to, and
the invariant ``admit`` keeps is per slot: ``spent + reserved <= limit`` unless a request
was forced through by an override.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from gateway.errors import BudgetExceeded, describe_budget
from gateway.windows import WINDOWS, Span, window_of

ScopeKey = tuple[str, str]
SlotKey = tuple[str, str, str]  # (period, scope, id)
GLOBAL: ScopeKey = ("global", "global")
# The scope kinds and the request field (``gateway.ledger.LedgerEntry``) each one is keyed by;
# ``scopes_for`` and the SQL ``in_scope_sql`` are both derived from it.
SCOPE_FIELDS: dict[str, str | None] = {
    "global": None, "tenant": "tenant", "agent": "agent", "key": "key_name",
    "campaign": "campaign", "user": "end_user",
}


def period_of(moment: datetime, tz: ZoneInfo) -> str:
    """The calendar month (``YYYY-MM``) ``moment`` falls in, in the budget time zone."""
    local = moment.astimezone(tz)
    return f"{local.year:04d}-{local.month:02d}"


def period_bounds(period: str, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """UTC start (inclusive) and end (exclusive) of a ``YYYY-MM`` month in ``tz``."""
    year, month = int(period[:4]), int(period[5:7])
    start = datetime(year, month, 1, tzinfo=tz)
    end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=tz)
    return start.astimezone(UTC), end.astimezone(UTC)


def month_after(period: str) -> str:
    """``2026-12`` -> ``2027-01``."""
    start = datetime(int(period[:4]), int(period[5:7]), 28) + timedelta(days=5)
    return f"{start.year:04d}-{start.month:02d}"


def scopes_for(tenant: str, agent: str, campaign: str | None, key_name: str,
               user: str | None = None) -> list[ScopeKey]:
    """Every scope a request belongs to (the one definition of scope membership).

    >>> scopes_for("acme", "content", None, "k1")
    [('global', 'global'), ('tenant', 'acme'), ('agent', 'content'), ('key', 'k1')]
    >>> scopes_for("acme", "content", "launch", "k1", "alice")[-2:]
    [('campaign', 'launch'), ('user', 'alice')]
    """
    keys: list[ScopeKey] = [GLOBAL, ("tenant", tenant), ("agent", agent), ("key", key_name)]
    if campaign:
        keys.append(("campaign", campaign))
    if user:
        keys.append(("user", user))
    return keys


def in_scope_sql(row: str, key: str) -> str:
    """SQL for "ledger row ``row`` belongs to scope ``key``" (columns ``scope``, ``id``),
    generated from ``SCOPE_FIELDS`` (``tests/test_budgets_pg.py`` checks it against
    ``scopes_for``)."""
    cases = " ".join(
        f"WHEN '{kind}' THEN " + ("true" if column is None else f"{row}.{column} = {key}.id")
        for kind, column in SCOPE_FIELDS.items())
    return f"CASE {key}.scope {cases} ELSE false END"


Caps = dict[str, int]  # window -> limit in pico-USD


class Limits:
    """The caps of every scope, per window, and the template for end users not listed.

    ``of`` runs for every scope of every request, so it is one dict lookup. A user's caps
    are their own (``budgets.users``) or, for users not listed, ``budgets.users_default``;
    changing one window of a user who has no caps of their own starts from that template,
    and a user whose own caps are all removed falls back to it (never to no cap at all).

    >>> limits = Limits({GLOBAL: {"monthly": 100}}, {"daily": 5})
    >>> limits.of(GLOBAL), limits.of(("user", "alice")), limits.of(("tenant", "acme"))
    ({'monthly': 100}, {'daily': 5}, None)
    >>> limits.set(("user", "alice"), "monthly", 50); limits.of(("user", "alice"))
    {'daily': 5, 'monthly': 50}
    """

    __slots__ = ("caps", "user_default")

    def __init__(self, caps: Mapping[ScopeKey, Mapping[str, int]] | None = None,
                 user_default: Mapping[str, int] | None = None):
        self.caps: dict[ScopeKey, Caps] = {k: dict(v) for k, v in (caps or {}).items() if v}
        self.user_default: Caps = dict(user_default or {})

    @classmethod
    def coerce(cls, value: Limits | Mapping[ScopeKey, Any]) -> Limits:
        """``Limits`` as is; a plain mapping of scope to a monthly amount or to caps."""
        if isinstance(value, Limits):
            return value
        return cls({k: v if isinstance(v, Mapping) else {"monthly": v}
                    for k, v in value.items()})

    def of(self, key: ScopeKey) -> Caps | None:
        """The caps of ``key`` (None: not limited)."""
        caps = self.caps.get(key)
        if caps is None and key[0] == "user" and self.user_default:
            return self.user_default
        return caps

    def get(self, key: ScopeKey, window: str) -> int | None:
        caps = self.of(key)
        return None if caps is None else caps.get(window)

    def set(self, key: ScopeKey, window: str, limit: int | None) -> None:
        """Add, change or (``None``) remove one window's cap of ``key``."""
        caps = self.caps.get(key)
        if caps is None:
            caps = dict(self.user_default) if key[0] == "user" else {}
        if limit is None:
            caps.pop(window, None)
        else:
            caps[window] = limit
        if caps:
            self.caps[key] = caps
        else:
            self.caps.pop(key, None)

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` has caps of its own (configured names: safe as metric labels)."""
        return key in self.caps

    def windows(self) -> tuple[str, ...]:
        """The windows any cap (or the user template) uses, longest first."""
        used = {w for caps in self.caps.values() for w in caps} | set(self.user_default)
        return tuple(w for w in WINDOWS if w in used)

    def items(self) -> list[tuple[ScopeKey, str, int]]:
        """Every explicit cap as (scope key, window, limit)."""
        return [(k, w, v) for k, caps in self.caps.items() for w, v in caps.items()]


@dataclass(frozen=True, slots=True)
class WarnRule:
    """The one threshold rule: a scope has passed threshold ``t`` once ``spent >= t * limit``.

    Compared as exact integers (``t`` as a ratio), because it runs per scope on every request
    and Decimal arithmetic costs microseconds there.

    >>> rule = WarnRule.of([Decimal("0.8"), Decimal("0.5")])
    >>> rule.passed(80, 100), rule.warns(49, 100), rule.crossed(40, 80, 100)
    (2, False, (Decimal('0.5'), Decimal('0.8')))
    """

    thresholds: tuple[Decimal, ...]
    ratios: tuple[tuple[int, int], ...] = field(repr=False)

    @classmethod
    def of(cls, warn_at: Iterable[Decimal]) -> WarnRule:
        thresholds = tuple(sorted(warn_at))
        return cls(thresholds, tuple(t.as_integer_ratio() for t in thresholds))

    def passed(self, spent: int, limit: int) -> int:
        """How many thresholds (lowest first) ``spent`` has reached under ``limit``."""
        n = 0
        for num, den in self.ratios:
            if spent * den < num * limit:
                break  # sorted: the higher ones are not passed either
            n += 1
        return n

    def warns(self, spent: int, limit: int) -> bool:
        """Past the first threshold (headers, the admin's ``warn`` level)."""
        if not self.ratios:
            return False
        num, den = self.ratios[0]
        return spent * den >= num * limit

    def crossed(self, before: int, after: int, limit: int) -> tuple[Decimal, ...]:
        """Thresholds passed going from ``before`` to ``after`` spent."""
        return self.thresholds[self.passed(before, limit):self.passed(after, limit)]


@dataclass(slots=True)
class ScopeState:
    limit: int
    spent: int = 0
    reserved: int = 0

    @property
    def free(self) -> int:
        return self.limit - self.spent - self.reserved


@dataclass(frozen=True, slots=True)
class ScopeStatus:
    """What admins, metrics and headers see of one scope in one period of one window."""

    scope: str
    id: str
    period: str
    limit: int
    spent: int
    reserved: int
    window: str = "monthly"
    resets_at: datetime | None = None  # when the period ends (UTC)

    @property
    def utilization(self) -> Decimal:
        if self.limit <= 0:
            return Decimal(1) if self.spent > 0 else Decimal(0)
        return Decimal(self.spent) / Decimal(self.limit)


@dataclass(frozen=True, slots=True)
class Crossing:
    """A scope passed a warn threshold in a period of one of its windows (reported once)."""

    scope: str
    id: str
    period: str
    threshold: Decimal
    limit: int
    spent: int

    @property
    def window(self) -> str:
        return window_of(self.period)


@dataclass(frozen=True, slots=True)
class ClampRequest:
    """What admission needs to lower the output limit instead of refusing."""

    prompt_cost: int        # upper bound of the prompt's cost
    output_price: int       # pico-USD per output token (highest tier)
    requested_tokens: int   # the request's (or model's) output bound per choice
    choices: int = 1


@dataclass(slots=True)
class Reservation:
    """``amount`` held in each of ``slots`` until the request settles.

    ``period`` is the calendar month of ``at``, the admission instant: the request's ledger
    row carries both, so the ledger and the books agree on which period of every window the
    request counts in.
    """

    period: str
    slots: tuple[SlotKey, ...]
    amount: int
    forced: bool = False
    clamped_tokens: int | None = None
    settled: bool = False
    # The id a shared store holds it under (its pending ledger row is linked to it).
    hold: str | None = None
    at: datetime | None = None

    @property
    def scopes(self) -> tuple[ScopeKey, ...]:
        """The distinct scopes it is held in (whatever the window)."""
        return tuple(dict.fromkeys((s[1], s[2]) for s in self.slots))


@dataclass(slots=True)
class PeriodBook:
    """Spend and reservations of the limited scopes in one period of one window.

    ``base`` is every scope's spend in the period as the ledger held it when the book was
    loaded: a scope that gets a limit later in the period (an end user's first request
    under ``users_default``) starts from it without another read.
    """

    period: str
    states: dict[ScopeKey, ScopeState] = field(default_factory=dict)
    crossed: set[tuple[ScopeKey, Decimal]] = field(default_factory=set)
    span: Span | None = None
    base: Mapping[ScopeKey, int] = field(default_factory=dict)

    @property
    def window(self) -> str:
        return window_of(self.period)


@dataclass(frozen=True, slots=True)
class Admission:
    """How admission treats a request that does not fit (``budgets.near_cap``)."""

    near_cap: str = "reject"
    min_output_tokens: int = 16


def admit(
    policy: Admission,
    states: Mapping[SlotKey, ScopeState],
    amount: int,
    force: bool = False,
    clamp: ClampRequest | None = None,
    period: str = "",
    at: datetime | None = None,
) -> Reservation:
    """Reserve ``amount`` in every slot of ``states`` (which it updates), or raise
    ``BudgetExceeded`` naming the tightest one.

    ``states`` are the request's limited slots: every window of every scope it belongs to
    that has a limit. With ``force`` (an override) the reservation is taken even past the
    limits. With a ``clamp`` request and ``near_cap: clamp``, a request that does not fit is
    reserved at the largest output bound every slot still affords (at least
    ``min_output_tokens``). ``period`` (the month) and ``at`` go on the reservation.
    """
    clamped: int | None = None
    if not force and states:
        tightest_key, tightest = min(states.items(), key=lambda ks: ks[1].free)
        if amount > tightest.free:
            if clamp is None or policy.near_cap != "clamp" or clamp.output_price <= 0:
                raise exceeded(tightest_key, tightest, amount)
            per_choice = (tightest.free - clamp.prompt_cost) // (
                clamp.output_price * max(clamp.choices, 1)
            )
            if per_choice < min(policy.min_output_tokens, clamp.requested_tokens):
                raise exceeded(tightest_key, tightest, amount)
            clamped = min(per_choice, clamp.requested_tokens)
            amount = clamp.prompt_cost + clamped * clamp.output_price * max(clamp.choices, 1)
    for state in states.values():
        state.reserved += amount
    return Reservation(period, tuple(states), amount, force, clamped, at=at)


def exceeded(slot: SlotKey, state: ScopeState, amount: int) -> BudgetExceeded:
    return BudgetExceeded(
        scope=slot[1], scope_id=slot[2], period=slot[0], limit=state.limit,
        spent=state.spent, reserved=state.reserved, estimate=amount,
        window=window_of(slot[0]),
    )


describe = describe_budget  # the 402 sentence (kept under its old name)
