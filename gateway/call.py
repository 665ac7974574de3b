"""``Call``: everything known about one proxied request as it moves down the request path.

The stages of ``gateway.proxy`` fill it in; ``gateway.services`` records from it. The facts
for settling are gathered here and judged in one place (``gateway.settlement.decide``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.budget import Reservation
from gateway.config import VirtualKey
from gateway.config.upstreams import UpstreamEntry
from gateway.endpoints import Endpoint
from gateway.errors import BudgetExceeded
from gateway.estimate import Estimate
from gateway.ledger import LedgerEntry
from gateway.pricing import ModelPrice, Usage
from gateway.ratelimit import RateTicket
from gateway.settlement import UsageSource


def _nothing_to_count() -> int:
    return 0


@dataclass(slots=True)
class Call:
    """Everything known about one proxied request as it moves down the path."""

    id: str
    started: float
    route: Endpoint
    key: VirtualKey
    agent: str
    campaign: str | None
    task: str | None
    model: str
    price: ModelPrice
    payload: dict[str, Any]
    body: bytes
    estimate: Estimate
    stream: bool
    user: str | None = None  # the end user (``gateway.inbound.end_user``)
    upstream: UpstreamEntry | None = None  # where it goes (``gateway.routing``)
    strip_usage: bool = False
    reservation: Reservation | None = None
    override_reason: str | None = None
    blocked_by: BudgetExceeded | None = None  # the scope an override let this request past
    entry: LedgerEntry | None = None
    rate: RateTicket | None = None  # what its rate limits counted (gateway.rates)
    # Facts for settling (gateway.settlement.decide), gathered by forward and the relays.
    sent: bool = False       # the request may have reached the upstream
    answered: bool = False   # an answer arrived (a whole body, or a stream however it ended)
    status: int = 0
    reported: Usage | None = None  # the upstream's usage as parsed
    partial: Usage | None = None   # the input side a stream reported before it was cut
    problem: str | None = None     # why the upstream's usage could not be parsed
    count: Callable[[], int] = _nothing_to_count  # output tokens of the answer, by counting
    response: Any = None           # the answered response object (server-side state routes)
    # What settling decided.
    usage: Usage | None = None
    usage_source: UsageSource = UsageSource.NONE
    fee: int = 0  # built-in tool fees of the answer, pico-USD (gateway.bounds)
    upstream_seconds: float = 0.0

    @property
    def provider(self) -> str:
        """The upstream's name, as the ledger's ``provider`` column records it."""
        return self.upstream.name if self.upstream is not None else ""

    @property
    def endpoint(self) -> str:
        """The route's name, as the ledger and the metrics label it."""
        return self.route.name
