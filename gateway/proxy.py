"""The request path, top to bottom, like a filter chain:

authenticate -> read -> attribute -> estimate -> reserve -> record pending -> forward ->
relay -> settle -> record.

Local answers (401, 400, 403, 413, 402) happen before anything is forwarded. Once a
reservation exists, ``settle`` runs in a ``finally``: a disconnect, an upstream error or a
failure mid-stream can never leave a reservation open or a forwarded request unrecorded.
What a route needs (estimator, output field, usage format, ...) comes from its
``gateway.endpoints`` entry; what a request is charged is decided by ``gateway.settlement``,
called from ``settle`` only: the stages above it only gather facts on the ``Call``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from gateway.bounds import SeenResponses
from gateway.budget import ClampRequest, scopes_for
from gateway.call import Call
from gateway.endpoints import BY_PATH, FREE_ROUTES, PATTERN, Endpoint
from gateway.errors import (
    BadRequest,
    BudgetExceeded,
    ServiceUnavailable,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.headers import client_response_headers, redact_key, upstream_request_headers
from gateway.inbound import (
    REQUEST_ID_KEY,
    attribute,
    end_user,
    new_request_id,
    read_payload,
    requested_override,
    resolve_model,
)
from gateway.ledger import LedgerEntry
from gateway.money import format_usd
from gateway.pricing import Usage
from gateway.ratelimit import tighter_than, used_tokens
from gateway.services import GATEWAY, Gateway
from gateway.settlement import LEDGER_MAX_COST, Charge, UsageSource, decide, output_items
from gateway.upstream import (
    handle_free,
    handle_models,
    is_stream,
    json_or_none,
    upstream_auth_failed,
    upstream_timeout,
)
from gateway.usage import InvalidUsage, StreamMeter, usage_from_body

# Imported from here by gateway.app and gateway.services.
__all__ = ["OFFLOAD_BYTES", "REQUEST_ID_KEY", "Call", "handle_api", "new_request_id", "settle",
           "setup_routes"]

log = logging.getLogger("costwall.proxy")

OFFLOAD_BYTES = 64 * 1024  # count large prompts in a thread so the event loop keeps serving
_SEEN = "bounds.seen_responses"  # gw.extras key of this process's SeenResponses
_NO_USAGE = Usage()


# -- request stages ---------------------------------------------------------------------------
async def admit(gw: Gateway, request: web.Request, route: Endpoint) -> Call:
    """Authenticate, read, attribute, estimate and reserve; raises before forwarding."""
    key = gw.keys.authenticate(request.headers.get("Authorization"),
                               request.headers.get("x-api-key"))
    body, payload = await read_payload(request, gw.settings.max_body_bytes)
    model, price, upstream = resolve_model(gw, payload, route.kind)
    if price.kind != route.model_kind:
        raise BadRequest(f"The model '{model[:100]}' does not support this endpoint.",
                         param="model")
    agent, campaign, task = attribute(request, key)
    user = end_user(request, payload)
    override_reason = requested_override(request, key)
    seen, max_calls = _seen(gw).get, gw.settings.budgets.max_tool_calls
    if len(body) > OFFLOAD_BYTES:
        est = await asyncio.to_thread(route.estimate, payload, price, seen, max_calls)
    else:
        est = route.estimate(payload, price, seen, max_calls)
    call = Call(request[REQUEST_ID_KEY], time.perf_counter(), route, key, agent, campaign,
                task, model, price, payload, body, est, payload.get("stream") is True, user,
                upstream)
    if gw.rates is not None:  # before the budget: a 429 is never reserved, sent or charged
        await gw.rates.admit(call)
    try:
        await reserve(gw, call, override_reason)
        rewrite_body(call)
    except BaseException:
        if call.rate is not None:  # refused (402) or failed before forwarding: give it back
            call.rate.close(False, None)
        raise
    return call


def _tier(payload: Mapping[str, Any]) -> str | None:
    tier = payload.get("service_tier")
    return tier if isinstance(tier, str) else None


async def reserve(gw: Gateway, call: Call, override_reason: str | None) -> None:
    """Reserve the request's upper bound in all its scopes (402 past a cap, unless overridden)."""
    est, price, key = call.estimate, call.price, call.key
    tier = _tier(call.payload)
    amount = price.upper_bound(est.prompt_tokens, est.total_output, tier, est.fee)
    if amount > LEDGER_MAX_COST:  # e.g. max_tokens 10**17: no model allows it, no row holds it
        raise BadRequest(f"The output limit '{est.output_field or 'max_tokens'}' is too large: "
                         "this request's cost bound does not fit costwall's ledger.",
                         param=est.output_field)
    clamp = None
    if est.output_field and est.output_tokens:
        clamp = ClampRequest(price.upper_bound(est.prompt_tokens, 0, tier, est.fee),
                             price.output_price_bound(est.prompt_tokens, tier),
                             est.output_tokens, est.choices)
    scopes = scopes_for(key.tenant, call.agent, call.campaign, key.name, call.user)
    try:
        call.reservation = await gw.budgets.reserve(scopes, amount, clamp=clamp)
    except BudgetExceeded as exc:
        reason = override_reason or gw.overrides.reason()
        if reason is None:
            gw.record_blocked(call, exc)
            raise
        call.reservation = await gw.budgets.reserve(scopes, amount, force=True)
        call.override_reason = reason
        call.blocked_by = exc


def rewrite_body(call: Call) -> None:
    """The body to forward: the clamped output field, the ``max_tool_calls`` (or other
    fields, ``Estimate.set_fields``) the bound assumed (the upstream enforces them), and
    stream usage asked for on the client's behalf."""
    payload, est, changed = call.payload, call.estimate, bool(call.estimate.set_fields)
    payload.update(est.set_fields)
    assert call.reservation is not None
    if call.reservation.clamped_tokens is not None and est.output_field:
        payload[est.output_field] = call.reservation.clamped_tokens
        changed = True
    if est.tools is not None and est.tools.set_max_tool_calls is not None:
        payload["max_tool_calls"] = est.tools.set_max_tool_calls
        changed = True
    if call.stream and call.route.ask_stream_usage:
        options = payload.get("stream_options")
        options = options if isinstance(options, dict) else {}
        if options.get("include_usage") is not True:
            payload["stream_options"] = {**options, "include_usage": True}
            call.strip_usage = changed = True
    if changed:
        call.body = orjson.dumps(payload)


async def record_pending(gw: Gateway, call: Call) -> None:
    """The pending ledger row, written before forwarding: a request the ledger cannot record
    is not forwarded (503)."""
    assert call.reservation is not None
    # The admission instant: the ledger and the budget books agree on the period of every
    # window the request counts in (a ledger read of a window finds it there).
    at = call.reservation.at or gw.clock()
    call.entry = LedgerEntry(
        id=call.id, ts=at, period=call.reservation.period, tenant=call.key.tenant,
        key_name=call.key.name, agent=call.agent, campaign=call.campaign, task=call.task,
        model=call.model, endpoint=call.route.name, stream=call.stream,
        reserved=call.reservation.amount, override=call.override_reason is not None,
        override_reason=call.override_reason, end_user=call.user, provider=call.provider,
    )
    try:
        await gw.ledger.begin(call.entry, call.reservation)
    except Exception as exc:
        call.entry = None
        # One line, no traceback: a full disk would otherwise flood the log per request.
        log.error("ledger unavailable; request %s not forwarded: %s: %s", call.id,
                  type(exc).__name__, exc)
        raise ServiceUnavailable(
            "costwall cannot record this request (its ledger is unavailable), so it was "
            "not forwarded. Try again shortly.", code="ledger_unavailable") from None


# -- forwarding -------------------------------------------------------------------------------
def _our_headers(gw: Gateway, call: Call,
                 relayed: list[tuple[str, str]]) -> list[tuple[str, str]]:
    headers = [("X-Costwall-Request-Id", call.id)]
    if call.rate is not None:  # x-ratelimit-*: the tighter of ours and the upstream's
        headers += tighter_than(relayed, call.rate.headers)
    if call.reservation is not None:
        if call.reservation.clamped_tokens is not None:
            headers.append(("X-Costwall-Clamped-Max-Tokens", str(call.reservation.clamped_tokens)))
        for warning in gw.budgets.warnings(call.reservation):
            headers.append(("X-Costwall-Budget-Warning", warning))
    return headers


async def forward(gw: Gateway, request: web.Request, call: Call) -> web.StreamResponse:
    """Send the call upstream and relay the answer, gathering what settling needs.

    An exception after sending leaves ``call.answered`` False: the upstream may have
    processed the request, so it is settled at its reserved bound.
    """
    target, kind = call.upstream, call.route.kind
    assert target is not None
    url = kind.url(target.base_url, call.route.path)
    timeout = upstream_timeout(call.stream, target.timeout_s, target.connect_timeout_s)
    headers = upstream_request_headers(request.headers.items(), target.api_key, kind.auth)
    sent = time.perf_counter()
    call.sent = True
    try:
        upstream = await gw.sessions[target.name].post(url, data=call.body, headers=headers,
                                                       timeout=timeout)
    except aiohttp.ClientConnectorError as exc:  # nothing reached the upstream: costs nothing
        call.sent = False
        raise UpstreamUnavailable(f"The upstream API is unreachable ({type(exc).__name__}).") \
            from None
    except TimeoutError:
        raise UpstreamTimeout("The upstream API did not answer in time.") from None
    except aiohttp.ClientError as exc:
        raise UpstreamUnavailable(f"The upstream API failed ({type(exc).__name__}).") from None
    call.status = upstream.status
    call.upstream_seconds = time.perf_counter() - sent  # to the headers; streams add the body
    try:
        if is_stream(call.stream, upstream.content_type):
            return await relay_stream(gw, request, call, upstream)
        try:
            body = await upstream.read()
        except TimeoutError:
            raise UpstreamTimeout("The upstream API did not finish its answer in time.") \
                from None
        except aiohttp.ClientError:
            raise UpstreamUnavailable("The upstream API closed the connection mid-answer.") \
                from None
        call.upstream_seconds = time.perf_counter() - sent
        body_answered(call, body)
        settle(gw, call)
        return relay_body(gw, call, upstream, body)
    finally:
        upstream.release()


def body_answered(call: Call, body: bytes) -> None:
    """What a whole (non-streaming) answer tells settling: its usage and how to count it."""
    route = call.route
    try:
        call.reported = usage_from_body(route.usage, body)
    except InvalidUsage as exc:
        call.problem = str(exc)
    if route.server_state:  # parsed once: for its id, token total, output items and text
        call.response = json_or_none(body)
        call.count = lambda: route.count(route.answer_text(call.response), call.price,
                                         call.estimate)
    else:
        call.count = lambda: route.count(route.answer_text(json_or_none(body)), call.price,
                                         call.estimate)
    call.answered = True


def relay_body(gw: Gateway, call: Call, upstream: aiohttp.ClientResponse,
               body: bytes) -> web.Response:
    """The client's copy of a whole answer, with costwall's headers and the settled cost."""
    assert call.upstream is not None
    key = call.upstream.api_key
    # All headers as one list: the response builds its header dict once from it.
    out = client_response_headers(upstream.headers.items(), key)
    out += _our_headers(gw, call, out)
    if upstream.status == 401:  # the upstream refused costwall's key, not the agent's
        return upstream_auth_failed(call.upstream, call.route.kind, out)
    if upstream.status == 403:  # relayed as is, marked as the upstream's refusal
        out.append(("X-Costwall-Upstream-Auth", "forbidden"))
    response = web.Response(status=upstream.status, body=redact_key(body, key), headers=out)
    response.headers["X-Costwall-Cost-Usd"] = format_usd(call.entry.cost if call.entry else 0)
    remaining = gw.budgets.remaining(call.reservation) if call.reservation else None
    if remaining is not None:
        response.headers["X-Costwall-Budget-Remaining-Usd"] = format_usd(max(remaining, 0))
    return response


async def relay_stream(
    gw: Gateway, request: web.Request, call: Call, upstream: aiohttp.ClientResponse
) -> web.StreamResponse:
    """Relay SSE chunk by chunk as it arrives; charge what was produced however it ends."""
    assert call.upstream is not None
    key = call.upstream.api_key
    headers = client_response_headers(upstream.headers.items(), key)
    headers += _our_headers(gw, call, headers)
    response = web.StreamResponse(status=upstream.status, headers=headers)
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    meter = StreamMeter(call.route.usage, strip_usage_chunk=call.strip_usage)
    # The meter hands out whole events only, so an echoed upstream key never straddles two
    # writes: redacting each write catches it (one substring search per write).
    client_alive, upstream_cut = True, False
    await response.prepare(request)
    first = time.perf_counter()
    try:
        async for chunk in upstream.content.iter_any():
            out = meter.feed(chunk)
            if out:
                if key:
                    out = redact_key(out, key)
                try:
                    await response.write(out)
                except (ConnectionResetError, aiohttp.ClientConnectionResetError):
                    client_alive = False
                    log.info("client went away mid-stream (request %s)", call.id)
                    break
    except (aiohttp.ClientError, TimeoutError) as exc:
        upstream_cut = True
        log.warning("upstream stream cut (request %s): %s", call.id, type(exc).__name__)
    finally:
        call.upstream_seconds += time.perf_counter() - first
        tail = meter.finish()
        # However it ended, what was produced is charged: the usage, else the text counted.
        call.reported, call.problem, call.response = meter.usage, meter.invalid, meter.response
        call.partial = meter.partial
        call.count = lambda: call.route.count(meter.streamed_text, call.price, call.estimate)
        call.answered = True
        settle(gw, call)
    if upstream_cut and request.transport is not None:
        # Pass the cut on: a clean end would tell the client an incomplete answer was whole.
        request.transport.close()
    elif client_alive:
        try:
            if tail:
                await response.write(redact_key(tail, key))
            await response.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass
    return response


# -- settlement -------------------------------------------------------------------------------
def _seen(gw: Gateway) -> SeenResponses:
    seen = gw.extras.get(_SEEN)
    if seen is None:
        seen = gw.extras[_SEEN] = SeenResponses()
    return seen


def settle(gw: Gateway, call: Call) -> None:
    """Turn the reservation into the charge ``gateway.settlement.decide`` finds, once, and
    record it: budgets, the final ledger row, metrics, overshoot and invalid-usage records."""
    reservation = call.reservation
    if reservation is None or reservation.settled:
        return
    charge = decide(
        reserved=reservation.amount, sent=call.sent, answered=call.answered,
        status=call.status, reported=call.reported, problem=call.problem, count=call.count,
        price=call.price, estimate=call.estimate, tier=_tier(call.payload),
        output=output_items(call.response),
        queued=call.route.server_state and call.payload.get("background") is True,
        partial=call.partial, countable=call.route.countable)
    call.usage, call.usage_source, call.fee = charge.usage, charge.source, charge.fee
    if call.rate is not None:  # the slot is freed and the token bound corrected, once
        call.rate.close(call.sent, used_tokens(charge))
    for problem in charge.problems:
        gw.record_invalid_usage(call, problem)
    if charge.source is UsageSource.UPSTREAM and call.route.server_state \
            and isinstance(call.response, Mapping) and charge.usage is not None:
        # A later ``previous_response_id`` to it is bounded by its input + output tokens.
        _seen(gw).remember(call.response.get("id"),
                           charge.usage.prompt_tokens + charge.usage.completion_tokens)
    crossings = gw.budgets.settle(reservation, charge.cost)
    if call.entry is not None:
        _settled_entry(call.entry, call, charge)
        gw.ledger.settle(call.entry)
    gw.record_settled(call, charge.cost, crossings)
    if charge.overshoot > 0:
        gw.record_overshoot(call, charge.cost, charge.overshoot)


def _settled_entry(entry: LedgerEntry, call: Call, charge: Charge) -> None:
    usage = charge.usage or _NO_USAGE
    entry.state = "settled"
    entry.status = call.status
    entry.prompt_tokens = usage.prompt_tokens
    entry.cached_tokens = usage.cached_tokens
    entry.completion_tokens = usage.completion_tokens
    entry.reasoning_tokens = usage.reasoning_tokens
    entry.cost = charge.cost
    entry.usage_source = charge.source.value
    entry.latency_ms = int((time.perf_counter() - call.started) * 1000)
    entry.overshoot = charge.overshoot


# -- the handlers -----------------------------------------------------------------------------
async def handle_api(request: web.Request) -> web.StreamResponse:
    """POST /v1/<path> of a route in the endpoint table (``gateway.endpoints``)."""
    gw = request.app[GATEWAY]
    route = BY_PATH[request.match_info["endpoint"]]
    call = await admit(gw, request, route)
    gw.inflight += 1
    try:
        await record_pending(gw, call)
        return await forward(gw, request, call)
    finally:
        gw.inflight -= 1
        settle(gw, call)
        gw.metrics.child(gw.metrics.request_duration, route.name).observe(
            time.perf_counter() - call.started)


def setup_routes(app: web.Application) -> None:
    """POST /v1/<path> for every route of the endpoint table, the free routes
    (``/v1/messages/count_tokens``), GET /v1/models[/id]."""
    app.router.add_post(f"/v1/{{endpoint:{PATTERN}}}", handle_api)
    for path in FREE_ROUTES:
        app.router.add_post(f"/v1/{path}", handle_free)
    app.router.add_get("/v1/{tail:models(/[^{}]+)?}", handle_models)

