"""Rate limits as pure arithmetic: requests and tokens per minute, requests in flight.

No I/O and no clock: the time (seconds since the epoch, a float) is passed in, so the same
code decides in memory (SQLite, one process) and inside the shared store's transaction
(PostgreSQL, ``gateway.store.pg_rates``), and tests move time by hand.

**The algorithm: a conservative bucketed sliding window.** A ``Window`` keeps what was counted
in each one-second bucket of the last 61 seconds (the current second and the 60 before it).
A request is admitted only if everything counted in those 61 buckets, plus what it needs, fits
the limit. The oldest bucket is counted whole although part of it is already more than 60 s
ago, so *any* 60-second span (closed or open, aligned or not) never holds more than the limit:
the worst-case burst is exactly the limit, never 2x as with a fixed window. The price is on the
slow side: a client that fills its limit at once waits until its whole bucket has left the
window, up to 61 s instead of 60 (so a steady client may get ``limit`` per 61 s, 1.6 % less).

A token limit counts the request's upper bound at admission and is corrected to the actual
usage when it settles (in the bucket it was counted in, while that bucket is still in the
window); a request that was never forwarded is taken back out of every window.

>>> w = Window()                       # a limit of 3 per minute
>>> w.room(1000.5, 3), w.add(1000.5, 1), w.add(1000.7, 2), w.room(1000.9, 3)
(3, 1000, 1000, 0)
>>> w.wait(1030.0, 1, 3), w.room(1060.9, 3), w.room(1061.0, 3)
(31.0, 0, 3)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from gateway.budget_rules import scopes_for

if TYPE_CHECKING:
    from gateway.estimate import Estimate
    from gateway.settlement import Charge

KINDS = ("rpm", "tpm", "concurrent")
WINDOW_S = 60
BUCKETS = WINDOW_S + 1  # one-second buckets: the current second and the 60 before it
CONCURRENT_WAIT_S = 1.0  # nobody knows when a request in flight ends: ask to retry in 1 s
CACHE_MAX = 100_000  # resolved (tenant, agent, key, end user) combinations kept
SCOPE_NAMES = {"global": "global", "tenant": "tenant", "agent": "agent", "key": "key",
               "user": "end user"}

RateKey = tuple[str, str, str]  # (scope, id, kind) of a windowed limit (rpm or tpm)
ScopeId = tuple[str, str]  # (scope, id)


@dataclass(frozen=True, slots=True)
class RateLimit:
    """The limits of one scope; None: no limit of that kind."""

    rpm: int | None = None
    tpm: int | None = None
    concurrent: int | None = None


class Window:
    """What one limit counted in each second of the last minute (a ring of ``BUCKETS``).

    ``head`` is the newest second seen: a clock that steps back counts in it (never in a
    bucket that already left), a clock that steps forward forgets what left the window.
    The limit is not stored: replicas may disagree about it while a config rolls out, and
    each admission checks its own.
    """

    __slots__ = ("counts", "head", "total")

    def __init__(self, head: int = 0, counts: Sequence[int] | None = None):
        self.head = head
        self.counts = list(counts) if counts and len(counts) == BUCKETS else [0] * BUCKETS
        self.total = sum(self.counts)

    def advance(self, now: float) -> int:
        """Forget the buckets that left the window by ``now``; return the bucket a request
        made now counts in."""
        bucket, head = int(now), self.head
        if bucket <= head:
            return head
        counts = self.counts
        if bucket - head >= BUCKETS:
            if self.total:
                counts[:] = [0] * BUCKETS
                self.total = 0
        else:
            for b in range(head + 1, bucket + 1):
                i = b % BUCKETS
                if counts[i]:
                    self.total -= counts[i]
                    counts[i] = 0
        self.head = bucket
        return bucket

    def room(self, now: float, limit: int) -> int:
        """How much more fits under ``limit`` now."""
        self.advance(now)
        return max(limit - self.total, 0)

    def add(self, now: float, amount: int) -> int:
        """Count ``amount`` now (the caller checked ``room``); return the bucket used."""
        bucket = self.advance(now)
        self.counts[bucket % BUCKETS] += amount
        self.total += amount
        return bucket

    def correct(self, bucket: int, delta: int) -> None:
        """Change what ``bucket`` counted by ``delta``, if it is still in the window."""
        if not 0 <= self.head - bucket < BUCKETS or not delta:
            return
        i = bucket % BUCKETS
        new = max(self.counts[i] + delta, 0)
        self.total += new - self.counts[i]
        self.counts[i] = new

    def wait(self, now: float, amount: int, limit: int) -> float:
        """Seconds from ``now`` until ``amount`` fits (0: now; inf: never, it exceeds the
        limit itself). Bucket ``b`` leaves the window at second ``b + BUCKETS``."""
        self.advance(now)
        excess = self.total + amount - limit
        if excess <= 0:
            return 0.0
        if amount > limit:
            return math.inf
        freed, counts = 0, self.counts
        for b in range(self.head - WINDOW_S, self.head + 1):
            freed += counts[b % BUCKETS]
            if freed >= excess:
                return max(b + BUCKETS - now, 0.001)
        return max(self.head + BUCKETS - now, 0.001)  # unreachable while total is the sum

    def reset(self, now: float) -> float:
        """Seconds until nothing is counted any more (OpenAI's ``x-ratelimit-reset-*``)."""
        self.advance(now)
        if not self.total:
            return 0.0
        counts = self.counts
        for b in range(self.head, self.head - BUCKETS, -1):
            if counts[b % BUCKETS]:
                return max(b + BUCKETS - now, 0.0)
        return 0.0

    def idle(self, now: float) -> bool:
        """True once everything counted has left the window (the window may be dropped)."""
        self.advance(now)
        return not self.total

    def dump(self) -> tuple[int, list[int]]:
        return self.head, self.counts


# -- what an admitted request holds -------------------------------------------------------------
class Settles(Protocol):
    def settle(self, ticket: RateTicket, sent: bool, tokens: int | None) -> None:
        """Correct or take back what ``ticket`` counted and free its slots."""


@dataclass(slots=True, eq=False)
class RateTicket:
    """What one admitted request counted (``Call.rate``), closed exactly once when it settles.

    ``counted``: (key, amount, bucket) per window; ``held``: the scopes whose concurrency slot
    it holds; ``headers``: the ``x-ratelimit-*`` headers of its response; ``owner``: the
    limiter that counted it (the shared store, or this process's own windows).
    """

    owner: Settles
    counted: list[tuple[RateKey, int, int]]
    held: list[ScopeId]
    headers: list[tuple[str, str]]
    settled: bool = False

    def close(self, sent: bool, tokens: int | None) -> None:
        """Settle once: ``sent`` False gives everything back (never forwarded); else the
        token bound becomes ``tokens`` (None: unknown, the bound stays) and slots are freed."""
        if not self.settled:
            self.settled = True
            self.owner.settle(self, sent, tokens)


def bound_tokens(estimate: Estimate) -> int:
    """What a request counts in a ``tpm`` limit at admission: its prompt and output bound."""
    return estimate.prompt_tokens + estimate.output_tokens * estimate.choices


def used_tokens(charge: Charge) -> int | None:
    """The tokens a settled request used, for ``tpm``: its usage, 0 for an answer that costs
    nothing (``UsageSource.NONE``), None when unknown (charged at its bound, so counted at
    its bound)."""
    if charge.usage is not None:
        return charge.usage.prompt_tokens + charge.usage.completion_tokens
    return 0 if charge.source == "none" else None


# -- one request against all its limits --------------------------------------------------------
# A windowed limit a request must fit: (key, limit). It counts 1 in an rpm window and its
# token bound in a tpm window.
Windowed = tuple[RateKey, int]
# A windowed limit with its current state: (key, limit, window).
Counting = tuple[RateKey, int, Window]
# A concurrency limit: (scope, id), limit.
Slot = tuple[ScopeId, int]
_PARTS = ("limit", "remaining", "reset")
_HEADERS = {"rpm": ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
                    "x-ratelimit-reset-requests"),
            "tpm": ("x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens",
                    "x-ratelimit-reset-tokens")}


@dataclass(frozen=True, slots=True)
class Refusal:
    """The limit a refused request breaks (the one it would wait longest for)."""

    scope: str
    id: str
    kind: str
    limit: int
    wait: float  # seconds until it would fit; inf: never (a token bound above the limit)
    amount: int = 1
    remaining: int = 0
    reset: float = 0.0

    @property
    def retry_after(self) -> int:
        """Whole seconds for ``Retry-After`` (at least 1; 60 for a request that never fits)."""
        if math.isinf(self.wait):
            return WINDOW_S
        return max(math.ceil(self.wait), 1)

    def message(self) -> str:
        """What the 429 says: the scope, its id, the limit and when to try again."""
        who = "the global" if self.scope == "global" else \
            f"{SCOPE_NAMES.get(self.scope, self.scope)} '{self.id}':"
        if self.kind == "concurrent":
            return (f"Rate limit reached for {who} {self.limit} concurrent requests. "
                    f"Retry when one of them finishes (Retry-After: {self.retry_after}s).")
        unit = "requests per minute (rpm)" if self.kind == "rpm" else "tokens per minute (tpm)"
        text = f"Rate limit reached for {who} {self.limit} {unit}."
        if self.kind == "tpm":
            text += f" This request counts up to {self.amount} tokens (its prompt and output " \
                    "bound)."
        if math.isinf(self.wait):
            return text + " It can never fit: lower its max_tokens (or the equivalent), or " \
                          "raise the limit."
        return text + f" Try again in {self.retry_after}s."

    def headers(self) -> list[tuple[str, str]]:
        """``Retry-After`` (whole seconds), ``retry-after-ms`` (the openai SDK reads it
        first), and the ``x-ratelimit-*`` trio of the broken limit. A request that can never
        fit also says ``x-should-retry: false``: retrying it cannot help."""
        out = [("Retry-After", str(self.retry_after))]
        if math.isinf(self.wait):
            out.append(("x-should-retry", "false"))
        else:
            out.append(("retry-after-ms", str(max(math.ceil(self.wait * 1000), 1))))
        names = _HEADERS.get(self.kind)
        if names is not None:
            out += [(names[0], str(self.limit)), (names[1], str(self.remaining)),
                    (names[2], duration_text(self.reset))]
        return out


def refuse(now: float, windows: Sequence[Counting], slots: Sequence[tuple[Slot, int]],
           tokens: int) -> Refusal | None:
    """The refusal for a request of ``tokens`` (its bound) needing ``windows`` and ``slots``
    (each with its state: the window, the requests in flight), or None if it fits them all."""
    worst: Refusal | None = None
    for key, limit, window in windows:
        amount = tokens if key[2] == "tpm" else 1
        if window.room(now, limit) >= amount:
            continue
        wait = window.wait(now, amount, limit)
        if worst is None or wait > worst.wait:
            worst = Refusal(key[0], key[1], key[2], limit, wait, amount,
                            max(limit - window.total, 0), window.reset(now))
    for (scope, limit), inflight in slots:
        if inflight < limit:
            continue
        if worst is None or worst.wait < CONCURRENT_WAIT_S:
            worst = Refusal(scope[0], scope[1], "concurrent", limit, CONCURRENT_WAIT_S)
    return worst


def take(now: float, windows: Sequence[Counting], tokens: int) -> list[tuple[RateKey, int, int]]:
    """Count an admitted request in each window: (key, amount, bucket) to correct later."""
    out = []
    for key, _, window in windows:
        amount = tokens if key[2] == "tpm" else 1
        out.append((key, amount, window.add(now, amount)))
    return out


def tightest(now: float, windows: Sequence[Counting]) -> list[tuple[str, str]]:
    """OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` for the tightest
    limit of each kind (least remaining, then the smallest limit), just after admission.

    The request was just counted in each window's newest bucket, so every window resets
    when that bucket leaves: ``head + BUCKETS`` (no scan; this runs on every request).
    """
    requests = tokens = None
    for key, limit, window in windows:
        if key[2] == "rpm":
            if requests is None or (limit - window.total, limit) < (
                    requests[1] - requests[2].total, requests[1]):
                requests = (key, limit, window)
        elif tokens is None or (limit - window.total, limit) < (
                tokens[1] - tokens[2].total, tokens[1]):
            tokens = (key, limit, window)
    out: list[tuple[str, str]] = []
    for best in (requests, tokens):
        if best is not None:
            names, limit, window = _HEADERS[best[0][2]], best[1], best[2]
            reset_ms = math.ceil((window.head + BUCKETS - now) * 1000 - 1e-6)
            out += ((names[0], str(limit)), (names[1], str(max(limit - window.total, 0))),
                    (names[2], _duration_ms(reset_ms)))
    return out


def tighter_than(upstream: list[tuple[str, str]],
                 ours: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Of each ``x-ratelimit-*`` trio (requests, tokens), the tighter one: the upstream's own
    (OpenAI sends the organisation's) or costwall's. Returns ours where they win and removes
    the upstream's losing trio from ``upstream`` in place, so no header is sent twice.

    >>> up = [("x-ratelimit-limit-requests", "5000"), ("x-ratelimit-remaining-requests", "4999"),
    ...       ("x-ratelimit-reset-requests", "12ms"), ("x-ratelimit-remaining-tokens", "3")]
    >>> ours = [("x-ratelimit-limit-requests", "60"), ("x-ratelimit-remaining-requests", "59"),
    ...         ("x-ratelimit-reset-requests", "1s"), ("x-ratelimit-limit-tokens", "900"),
    ...         ("x-ratelimit-remaining-tokens", "800"), ("x-ratelimit-reset-tokens", "1s")]
    >>> [v for _, v in tighter_than(up, ours)], up
    (['60', '59', '1s'], [('x-ratelimit-remaining-tokens', '3')])
    """
    theirs = {name.lower(): (i, value) for i, (name, value) in enumerate(upstream)
              if name[:12].lower() == "x-ratelimit-"}
    if not theirs:
        return ours
    keep: list[tuple[str, str]] = []
    drop: set[int] = set()
    for unit in ("requests", "tokens"):
        mine = [h for h in ours if h[0].endswith(unit)]
        if not mine:
            continue
        other = theirs.get(f"x-ratelimit-remaining-{unit}")
        if other is not None and other[1].strip().isdigit() and int(other[1]) < int(mine[1][1]):
            continue  # the upstream's limit is the tighter one: its trio stays
        keep += mine
        drop.update(theirs[f"x-ratelimit-{part}-{unit}"][0] for part in _PARTS
                    if f"x-ratelimit-{part}-{unit}" in theirs)
    if drop:
        upstream[:] = [h for i, h in enumerate(upstream) if i not in drop]
    return keep


def correction(kind: str, amount: int, sent: bool, tokens: int | None) -> int:
    """How a settled request changes what it counted: a request never forwarded is taken
    back out; a token bound becomes the tokens used (``None``: unknown, the bound stays).

    >>> correction("rpm", 1, False, None), correction("rpm", 1, True, 10)
    (-1, 0)
    >>> correction("tpm", 500, True, 120), correction("tpm", 500, True, None)
    (-380, 0)
    """
    if not sent:
        return -amount
    if kind == "tpm" and tokens is not None:
        return tokens - amount
    return 0


def duration_text(seconds: float) -> str:
    """A duration the way OpenAI's ``x-ratelimit-reset-*`` headers write it (Go style),
    to the millisecond.

    >>> [duration_text(s) for s in (0, 0.02, 1, 1.25, 17.2, 60, 61.5, 360, 3725)]
    ['0s', '20ms', '1s', '1.25s', '17.2s', '1m0s', '1m1.5s', '6m0s', '1h2m5s']
    """
    return _duration_ms(math.ceil(seconds * 1000 - 1e-6))


@functools.lru_cache(maxsize=4096)  # a reset is ~61 s minus a few ms: a few thousand texts
def _duration_ms(ms: int) -> str:
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest // 1000}" + (f".{rest % 1000:03d}".rstrip("0") if rest % 1000 else "")
    text = f"{secs}s"
    if hours or minutes:
        text = f"{minutes}m{text}"
    if hours:
        text = f"{hours}h{text}"
    return text


# -- which limits a request must fit ------------------------------------------------------------
class RatePlan:
    """The configured limits, resolved per scope once: ``needs`` is a few dict lookups.

    ``users_default`` applies to every end user without an entry of their own. Campaigns have
    no rate limits (a client names its own campaign).

    >>> plan = RatePlan({("key", "k1"): RateLimit(rpm=60, tpm=1000)}, RateLimit(concurrent=2))
    >>> plan.needs("acme", "content", "k1", "alice")
    ([(('key', 'k1', 'rpm'), 60), (('key', 'k1', 'tpm'), 1000)], [(('user', 'alice'), 2)])
    """

    def __init__(self, limits: Mapping[ScopeId, RateLimit], users_default: RateLimit | None):
        self.limits = dict(limits)
        self.users_default = users_default
        self._cache: dict[tuple[str, str, str, str | None],
                          tuple[list[Windowed], list[Slot]]] = {}

    def __bool__(self) -> bool:
        return bool(self.limits) or self.users_default is not None

    def needs(self, tenant: str, agent: str, key_name: str,
              user: str | None) -> tuple[list[Windowed], list[Slot]]:
        """The windowed and concurrency limits a request of these scopes must fit (cached:
        requests of one key and end user resolve once)."""
        found = self._cache.get((tenant, agent, key_name, user))
        if found is None:
            if len(self._cache) >= CACHE_MAX:  # end users come and go: never unbounded
                self._cache.clear()
            found = self._cache[(tenant, agent, key_name, user)] = self._resolve(
                tenant, agent, key_name, user)
        return found

    def _resolve(self, tenant: str, agent: str, key_name: str,
                 user: str | None) -> tuple[list[Windowed], list[Slot]]:
        windows: list[Windowed] = []
        slots: list[Slot] = []
        for scope in scopes_for(tenant, agent, None, key_name, user):
            entry = self.limits.get(scope)
            if entry is None:
                if scope[0] != "user" or self.users_default is None:
                    continue
                entry = self.users_default
            if entry.rpm is not None:
                windows.append(((scope[0], scope[1], "rpm"), entry.rpm))
            if entry.tpm is not None:
                windows.append(((scope[0], scope[1], "tpm"), entry.tpm))
            if entry.concurrent is not None:
                slots.append((scope, entry.concurrent))
        return windows, slots

    def describe(self) -> list[dict[str, object]]:
        """The configured limits as JSON-ready rows (admin API)."""
        rows: list[dict[str, object]] = [
            {"scope": s, "id": i, "rpm": v.rpm, "tpm": v.tpm, "concurrent": v.concurrent}
            for (s, i), v in sorted(self.limits.items())]
        if self.users_default is not None:
            d = self.users_default
            rows.append({"scope": "user", "id": "*", "rpm": d.rpm, "tpm": d.tpm,
                         "concurrent": d.concurrent})
        return rows


def scope_kinds(plan: RatePlan) -> Iterable[tuple[str, str]]:
    """(scope, kind) of every configured limit: the metric series that may appear."""
    entries = list(plan.limits.items())
    if plan.users_default is not None:
        entries.append((("user", "*"), plan.users_default))
    seen: dict[tuple[str, str], None] = {}
    for (scope, _), limit in entries:
        for kind in KINDS:
            if getattr(limit, kind) is not None:
                seen[(scope, kind)] = None
    return seen.keys()
