"""What one request is charged, decided in one place from what is known about it; pure.

``decide`` takes the facts the request path gathered (was the request sent, did an answer
arrive, the upstream's usage report or why it could not be parsed, how to count the answer,
the built-in tool bound) and returns a ``Charge``: the cost, the usage recorded and where it
came from (``UsageSource``, the strings the ledger's ``usage_source`` column stores).

The rules, in order:

- never sent (the ledger could not record it, or nothing reached the upstream): nothing;
- sent but no answer (timeout, dropped connection, cancelled): the reserved bound, since the
  upstream may have processed it (``reserved``);
- the upstream's usage, if believable (``check_usage``): its cost plus tool fees, even above
  the reservation (the excess is the ``overshoot``, recorded, never hidden) (``upstream``);
- a usage that is malformed or impossible is not believed: an error answer then costs nothing;
  otherwise the answer is counted, and with no text to count the bound is charged
  (``invalid``);
- no usage: an error answer costs nothing (``none``); a queued background answer is charged
  its bound (``reserved``); otherwise the counted answer plus tool fees (``counted``);
- counting: a stream whose start reported its input side (``partial``: Anthropic's
  ``message_start``) is charged that input exactly plus its output counted, never below the
  output tokens it reported so far; a route that cannot count (``countable`` False: no
  tokenizer for it ships offline) is charged its reserved bound instead;
- a cost past what the ledger can hold is not believed either: the bound (``invalid``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from gateway.bounds import settled_fee
from gateway.pricing import Usage
from gateway.usage import check_usage, usage_bounds

if TYPE_CHECKING:
    from gateway.estimate import Estimate
    from gateway.pricing import ModelPrice

LEDGER_MAX_COST = 2**63 - 1  # the ledger's money columns are signed 64-bit integers
TOO_COSTLY = "its cost does not fit the ledger"


class UsageSource(StrEnum):
    """Where the recorded usage of a request came from (the ledger's ``usage_source``)."""

    UPSTREAM = "upstream"  # the upstream's report, believed
    COUNTED = "counted"    # no report: the answer was counted
    RESERVED = "reserved"  # outcome unknown: charged the reserved bound
    INVALID = "invalid"    # a report not believed: counted, else the reserved bound
    NONE = "none"          # not sent, or an error answer: nothing charged


@dataclass(frozen=True, slots=True)
class Charge:
    """The outcome of settling one request.

    ``problems`` says why an upstream usage (or its cost) was not believed, for the log and
    the ``costwall_usage_invalid_total`` metric. ``fee`` is the part of ``cost`` that is
    built-in tool fees.
    """

    cost: int
    usage: Usage | None
    source: UsageSource
    overshoot: int = 0
    fee: int = 0
    problems: tuple[str, ...] = ()


def decide(*, reserved: int, sent: bool, answered: bool, status: int,
           reported: Usage | None, problem: str | None, count: Callable[[], int],
           price: ModelPrice, estimate: Estimate, tier: str | None = None,
           output: Any = None, queued: bool = False, partial: Usage | None = None,
           countable: bool = True) -> Charge:
    """The charge of a request reserved at ``reserved`` pico-USD, from what is known.

    ``reported`` is the upstream's parsed usage (``problem``: why it could not be parsed);
    ``count`` counts the answer's output tokens, called only when no report is believed.
    ``output`` is the answer's output items (tool fees); ``queued``: a background answer.
    ``partial``: the input side the upstream reported before the answer was cut;
    ``countable``: whether ``count`` alone may price an answer with no usage.

    >>> from gateway.pricing import ModelPrice
    >>> from gateway.estimate import Estimate
    >>> p = ModelPrice("m", 1, 0, 2)
    >>> decide(reserved=50, sent=True, answered=False, status=0, reported=None, problem=None,
    ...        count=lambda: 0, price=p, estimate=Estimate(10, 20)).source
    <UsageSource.RESERVED: 'reserved'>
    """
    if not sent:
        return Charge(0, None, UsageSource.NONE)
    if not answered:
        return Charge(reserved, None, UsageSource.RESERVED)
    problems: tuple[str, ...] = ()
    if reported is not None:
        problem = check_usage(reported, usage_bounds(price, estimate))
        if problem is None:
            return _priced(reserved, reported, UsageSource.UPSTREAM, price, estimate, tier,
                           status, output)
    if problem is not None:
        problems = (problem,)
        if status >= 400:
            return Charge(0, None, UsageSource.NONE, problems=problems)
        return _counted(reserved, count, UsageSource.INVALID, price, estimate, tier, status,
                        output, problems, partial, countable)
    if status >= 400:
        return Charge(0, None, UsageSource.NONE)
    if queued:  # the upstream bills it later, out of costwall's sight
        return Charge(reserved, None, UsageSource.RESERVED)
    return _counted(reserved, count, UsageSource.COUNTED, price, estimate, tier, status, output,
                    (), partial, countable)


def _counted(reserved: int, count: Callable[[], int], source: UsageSource, price: ModelPrice,
             estimate: Estimate, tier: str | None, status: int, output: Any,
             problems: tuple[str, ...], partial: Usage | None, countable: bool) -> Charge:
    """The charge of an answer without a believable usage: counted, or the bound."""
    if partial is not None and check_usage(partial, usage_bounds(price, estimate)) is None:
        out = max(partial.completion_tokens, count())
        return _priced(reserved, replace(partial, completion_tokens=out), source, price,
                       estimate, tier, status, output, problems)
    if not countable:  # nothing reported that could be priced: never under the bound
        kept = UsageSource.INVALID if problems else UsageSource.RESERVED
        return Charge(reserved, None, kept, problems=problems)
    out = count()
    if out <= 0 and problems:  # nothing to count: never under the bound
        return Charge(reserved, None, source, problems=problems)
    return _priced(reserved, Usage(estimate.prompt_tokens, completion_tokens=out), source,
                   price, estimate, tier, status, output, problems)


def _priced(reserved: int, usage: Usage, source: UsageSource, price: ModelPrice,
            estimate: Estimate, tier: str | None, status: int, output: Any,
            problems: tuple[str, ...] = ()) -> Charge:
    """The cost of ``usage`` plus the tool fees of a successful answer."""
    fee = 0
    if estimate.tools is not None and status < 400:
        fee = settled_fee(estimate.tools, output)
    cost = price.cost(usage, tier) + fee
    if cost > LEDGER_MAX_COST:  # only a price table with absurd prices gets here
        return Charge(reserved, None, UsageSource.INVALID, problems=(*problems, TOO_COSTLY))
    return Charge(cost, usage, source, max(cost - reserved, 0), fee, problems)


def output_items(response: Any) -> Any:
    """The ``output`` items of an answered response (tool fees), or None."""
    return response.get("output") if isinstance(response, Mapping) else None
