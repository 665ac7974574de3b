"""Operations endpoints and the graceful drain: ``/healthz``, ``/readyz``, ``/metrics``.

Shutdown (SIGTERM in ``costwall serve``, or ``AppRunner.cleanup``) runs in this order:
aiohttp stops listening and closes idle keep-alive connections; ``drain`` (an ``on_shutdown``
hook) marks the gateway not ready and logs what is still in flight; aiohttp then waits for the
running handlers up to its ``shutdown_timeout`` (``costwall serve`` passes
``limits.shutdown_grace_s``) and cancels those still running; finally ``cleanup_ctx`` closes the
upstream session and the ledger, whose ``close`` commits every queued settlement. Streams that
finish within the grace period are relayed to the end, settled from the upstream's usage and
durable before exit; a stream cut by the deadline is charged for the tokens it streamed.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from aiohttp import web

from gateway.services import GATEWAY

log = logging.getLogger("costwall.ops")
READY_TIMEOUT_S = 2.0


@dataclass
class OpsState:
    """Mutable run state (aiohttp app state is frozen once the app starts)."""

    draining: bool = False


OPS = web.AppKey("costwall_ops", OpsState)


async def healthz(request: web.Request) -> web.Response:
    """The process is up and its event loop answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready for traffic: the ledger answers within ``READY_TIMEOUT_S`` and we are not draining.

    Also reports the audit trail: ``audit_backlog`` events are stored in the database but not
    yet in the files, ``audit`` is ``ok``, ``pending`` or ``error`` (with ``audit_error``).
    A backlog never makes the gateway unready: the events are durable in the database and
    are written once the files can be; refusing traffic would not help them get there.
    """
    if request.app[OPS].draining:
        return web.json_response({"status": "draining"}, status=503)
    gw = request.app[GATEWAY]
    try:
        ok = await asyncio.wait_for(gw.ledger.ping(), READY_TIMEOUT_S)
        audit = await asyncio.wait_for(gw.audit.status(), READY_TIMEOUT_S)
    except Exception:  # a timeout or any driver error: not ready
        ok, audit = False, {}
    if ok:
        return web.json_response({"status": "ready", **audit})
    return web.json_response({"status": "database unreachable"}, status=503)


async def drain(app: web.Application) -> None:
    """Stop being ready and say what is still running; aiohttp does the waiting.

    A second wait here would add to aiohttp's own ``shutdown_timeout`` and so could double the
    time to exit past the orchestrator's kill deadline.
    """
    app[OPS].draining = True
    gw = app[GATEWAY]
    log.info("shutting down: %d proxied requests in flight, grace period %.0f s",
             gw.inflight, gw.settings.limits.shutdown_grace_s,
             extra={"inflight": gw.inflight, "grace_s": gw.settings.limits.shutdown_grace_s})


def setup_ops(app: web.Application) -> None:
    """Register the health and metrics endpoints and the shutdown drain."""
    gw = app[GATEWAY]
    app[OPS] = OpsState()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", gw.metrics.handle)
    gw.metrics.watch_state(lambda: gw.inflight, lambda: gw.overrides.state.enabled)
    app.on_shutdown.append(drain)
