"""Pure budget arithmetic: scopes, periods, the warn-threshold rule and the admission decision.

No I/O and no asyncio: both budget implementations (``gateway.budget.BudgetEngine`` in
memory, ``gateway.store.pg_budgets.SharedBudgets`` in PostgreSQL) and the admin's display
compose these functions, so each rule is written once. The invariant ``admit`` keeps: for
every limited scope, ``spent + reserved <= limit`` unless a request was forced through by an
override.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from gateway.errors import BudgetExceeded, describe_budget

ScopeKey = tuple[str, str]
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
    """What admins, metrics and headers see of one scope in one period."""

    scope: str
    id: str
    period: str
    limit: int
    spent: int
    reserved: int

    @property
    def utilization(self) -> Decimal:
        if self.limit <= 0:
            return Decimal(1) if self.spent > 0 else Decimal(0)
        return Decimal(self.spent) / Decimal(self.limit)


@dataclass(frozen=True, slots=True)
class Crossing:
    """A scope passed a warn threshold in a period (audit-logged once)."""

    scope: str
    id: str
    period: str
    threshold: Decimal
    limit: int
    spent: int


@dataclass(frozen=True, slots=True)
class ClampRequest:
    """What admission needs to lower the output limit instead of refusing."""

    prompt_cost: int        # upper bound of the prompt's cost
    output_price: int       # pico-USD per output token (highest tier)
    requested_tokens: int   # the request's (or model's) output bound per choice
    choices: int = 1


@dataclass(slots=True)
class Reservation:
    period: str
    scopes: tuple[ScopeKey, ...]
    amount: int
    forced: bool = False
    clamped_tokens: int | None = None
    settled: bool = False
    # The id a shared store holds it under (its pending ledger row is linked to it).
    hold: str | None = None


@dataclass(slots=True)
class PeriodBook:
    """Spend and reservations of the limited scopes in one month."""

    period: str
    states: dict[ScopeKey, ScopeState] = field(default_factory=dict)
    crossed: set[tuple[ScopeKey, Decimal]] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class Admission:
    """How admission treats a request that does not fit (``budgets.near_cap``)."""

    near_cap: str = "reject"
    min_output_tokens: int = 16


def admit(
    policy: Admission,
    book: PeriodBook,
    scopes: Iterable[ScopeKey],
    amount: int,
    force: bool = False,
    clamp: ClampRequest | None = None,
) -> Reservation:
    """Reserve ``amount`` in every limited scope of ``book`` (which it updates), or raise
    ``BudgetExceeded`` naming the tightest one.

    With ``force`` (an override) the reservation is taken even past the limit. With a
    ``clamp`` request and ``near_cap: clamp``, a request that does not fit is reserved at
    the largest output bound every scope still affords (at least ``min_output_tokens``).
    """
    limited = tuple(k for k in dict.fromkeys(scopes) if k in book.states)
    states = [book.states[k] for k in limited]
    clamped: int | None = None
    if not force and states:
        tightest_key, tightest = min(zip(limited, states, strict=True), key=lambda ks: ks[1].free)
        if amount > tightest.free:
            if clamp is None or policy.near_cap != "clamp" or clamp.output_price <= 0:
                raise exceeded(book.period, tightest_key, tightest, amount)
            per_choice = (tightest.free - clamp.prompt_cost) // (
                clamp.output_price * max(clamp.choices, 1)
            )
            if per_choice < min(policy.min_output_tokens, clamp.requested_tokens):
                raise exceeded(book.period, tightest_key, tightest, amount)
            clamped = min(per_choice, clamp.requested_tokens)
            amount = clamp.prompt_cost + clamped * clamp.output_price * max(clamp.choices, 1)
    for state in states:
        state.reserved += amount
    return Reservation(book.period, limited, amount, force, clamped)


def exceeded(period: str, key: ScopeKey, state: ScopeState, amount: int) -> BudgetExceeded:
    return BudgetExceeded(
        scope=key[0], scope_id=key[1], period=period, limit=state.limit,
        spent=state.spent, reserved=state.reserved, estimate=amount,
    )


describe = describe_budget  # the 402 sentence (kept under its old name)
