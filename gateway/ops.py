"""Operations endpoints and the graceful drain: ``/healthz``, ``/readyz``, ``/metrics``.

Shutdown (SIGTERM in ``costwall serve``, or ``AppRunner.cleanup``) runs in this order:
aiohttp stops listening and closes idle keep-alive connections; ``drain`` (an ``on_shutdown``
hook) marks the gateway not ready and waits until no proxied request is in flight, up to
``limits.shutdown_grace_s``; aiohttp then waits for (and after the grace period cancels) any
handler still running; finally ``cleanup_ctx`` closes the upstream session and the ledger, whose
``close`` commits every queued settlement. Streams that finish within the grace period are
therefore relayed to the end, settled from the upstream's usage and durable before exit.
"""

from __future__ import annotations

import asyncio
import logging
import time
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
    """Ready for traffic: the ledger answers within ``READY_TIMEOUT_S`` and we are not draining."""
    if request.app[OPS].draining:
        return web.json_response({"status": "draining"}, status=503)
    gw = request.app[GATEWAY]
    try:
        ok = await asyncio.wait_for(gw.ledger.ping(), READY_TIMEOUT_S)
    except Exception:  # a timeout or any driver error: not ready
        ok = False
    if ok:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "database unreachable"}, status=503)


async def drain(app: web.Application) -> None:
    """Wait for in-flight proxied requests to finish, up to the configured grace period."""
    app[OPS].draining = True
    gw = app[GATEWAY]
    grace = gw.settings.shutdown_grace_s
    if gw.inflight:
        log.info("shutting down: waiting up to %.0f s for %d in-flight requests", grace,
                 gw.inflight, extra={"inflight": gw.inflight})
    deadline = time.monotonic() + grace
    while gw.inflight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if gw.inflight:
        log.warning("grace period over with %d requests still in flight; they are cut and "
                    "charged what was produced", gw.inflight)


def setup_ops(app: web.Application) -> None:
    """Register the health and metrics endpoints and the shutdown drain."""
    gw = app[GATEWAY]
    app[OPS] = OpsState()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", gw.metrics.handle)
    gw.metrics.watch_state(lambda: gw.inflight, lambda: gw.overrides.state.enabled)
    app.on_shutdown.append(drain)
