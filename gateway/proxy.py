"""The request path, top to bottom, like a filter chain:

authenticate -> read -> attribute -> estimate -> reserve -> record pending -> forward ->
relay -> settle -> record.

Local answers (401, 400, 403, 413, 402) happen before anything is forwarded. Once a
reservation exists, ``settle`` runs in a ``finally``: a disconnect, an upstream error or a
failure mid-stream can never leave a reservation open or a forwarded request unrecorded.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from gateway.bounds import SeenResponses, settled_fee
from gateway.budget import ClampRequest, Reservation, scopes_for
from gateway.config import VirtualKey
from gateway.errors import (
    BadRequest,
    BudgetExceeded,
    Forbidden,
    GatewayError,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    UnknownModel,
    UnsupportedEncoding,
    UpstreamAuthFailed,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.estimate import Estimate, counted_output, estimate
from gateway.headers import client_response_headers, redact_key, upstream_request_headers
from gateway.ledger import LedgerEntry
from gateway.money import format_usd
from gateway.pricing import ModelPrice, Usage
from gateway.services import GATEWAY, Gateway
from gateway.tokens import count_text, encoding
from gateway.usage import (
    InvalidUsage,
    StreamMeter,
    check_usage,
    usage_bounds,
    usage_from_body,
)

log = logging.getLogger("costwall.proxy")

ENDPOINTS = {
    "chat/completions": "chat",
    "completions": "completions",
    "embeddings": "embeddings",
    "responses": "responses",
}
REQUEST_ID_KEY = web.RequestKey("costwall_request_id", str)
OFFLOAD_BYTES = 64 * 1024  # count large prompts in a thread so the event loop keeps serving
_HEADER_VALUE_MAX = 128
_MODEL_MAX = 256
# A model id as OpenAI spells them (``gpt-4o``, ``ft:gpt-4o-mini:org::abc123``): no "/" or
# "..", so the pass-through cannot reach other upstream paths with the gateway's key.
_MODELS_PATH = re.compile(r"models(/[A-Za-z0-9][A-Za-z0-9._:@+-]{0,255})?")
_SEEN = "bounds.seen_responses"  # gw.extras key of this process's SeenResponses
LEDGER_MAX_COST = 2**63 - 1  # the ledger's money columns are signed 64-bit integers


@dataclass(slots=True)
class Call:
    """Everything known about one proxied request as it moves down the path."""

    id: str
    started: float
    endpoint: str
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
    strip_usage: bool = False
    reservation: Reservation | None = None
    override_reason: str | None = None
    blocked_by: BudgetExceeded | None = None  # the scope an override let this request past
    entry: LedgerEntry | None = None
    status: int = 0
    usage: Usage | None = None
    usage_source: str = "none"
    fee: int = 0  # built-in tool fees of the answer, pico-USD (gateway.bounds)
    upstream_seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


# -- request stages ---------------------------------------------------------------------------
def _decoded_encodings() -> frozenset[str]:
    """The request ``Content-Encoding`` values aiohttp inflates before the handler reads."""
    from aiohttp import http_parser

    found = {"gzip", "deflate"}
    if getattr(http_parser, "HAS_BROTLI", False):
        found.add("br")
    if getattr(http_parser, "HAS_ZSTD", False):
        found.add("zstd")
    return frozenset(found)


DECODED_ENCODINGS = _decoded_encodings()


def check_content_encoding(request: web.Request) -> None:
    """415 for a compressed body aiohttp does not inflate (``compress``, a list, ``br``
    without Brotli...): its bytes would otherwise be parsed, or forwarded, as they are."""
    encoding = request.headers.get("Content-Encoding")
    if encoding is None:
        return
    value = encoding.lower()  # as aiohttp matches it (it has stripped the value)
    if value in ("", "identity") or value in DECODED_ENCODINGS:
        return
    raise UnsupportedEncoding(
        f"Content-Encoding '{encoding[:50]}' is not supported; send the body uncompressed "
        f"or as one of: {', '.join(sorted(DECODED_ENCODINGS))}.", param="Content-Encoding")


async def read_payload(request: web.Request, limit: int) -> tuple[bytes, dict[str, Any]]:
    """The body as bytes and as a JSON object; 413 past ``limit``, 400 if not a JSON object.

    A gzip or deflate body arrives inflated (aiohttp decodes it); it is forwarded inflated,
    without the ``Content-Encoding`` header (``headers.upstream_request_headers``).
    """
    check_content_encoding(request)
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"Request body is larger than the {limit}-byte limit.")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"Request body is larger than the {limit}-byte limit.") from None
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("We could not parse the JSON body of your request (it must be "
                         "UTF-8 encoded JSON).") from None
    if not isinstance(payload, dict):
        raise BadRequest("The request body must be a JSON object.")
    return body, payload


def _header(request: web.Request, name: str) -> str | None:
    value = request.headers.get(name)
    if value is None or not value.strip():
        return None
    value = value.strip()
    if len(value) > _HEADER_VALUE_MAX or not value.isprintable():
        raise BadRequest(f"Header {name} must be at most {_HEADER_VALUE_MAX} printable "
                         "characters.", param=name)
    return value


def resolve_model(gw: Gateway, payload: dict[str, Any]) -> tuple[str, ModelPrice]:
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("You must provide a model parameter.", param="model")
    if len(model) > _MODEL_MAX:  # it is stored per request and cached by the price lookup
        raise BadRequest(f"The model name is longer than {_MODEL_MAX} characters.",
                         param="model")
    price = gw.prices.lookup(model)
    if price is None and gw.settings.unknown_model != "reject":
        price = gw.prices.lookup(gw.settings.unknown_model)
    if price is None:
        raise UnknownModel(
            f"The model '{model[:100]}' has no price in costwall's price table, so it "
            "cannot be budgeted.", param="model")
    return model, price


def requested_override(request: web.Request, key: VirtualKey) -> str | None:
    """The per-request override reason, if the header is present and the key may use it."""
    if "X-Costwall-Override" not in request.headers:
        return None
    if not key.can_override:
        raise Forbidden(f"Key '{key.name}' is not allowed to override budgets "
                        "(X-Costwall-Override needs a key with can_override: true).")
    reason = request.headers["X-Costwall-Override"].strip()
    if not reason.isprintable():  # control characters or bytes that are not UTF-8
        raise BadRequest("X-Costwall-Override must be printable UTF-8 text.",
                         param="X-Costwall-Override")
    if not reason:
        raise BadRequest("X-Costwall-Override needs a reason, e.g. "
                         "'X-Costwall-Override: incident 4711'.", param="X-Costwall-Override")
    return reason[:200]


async def admit(gw: Gateway, request: web.Request, endpoint: str) -> Call:
    """Authenticate, read, attribute, estimate and reserve; raises before forwarding."""
    key = gw.keys.authenticate(request.headers.get("Authorization"))
    body, payload = await read_payload(request, gw.settings.max_body_bytes)
    model, price = resolve_model(gw, payload)
    if (endpoint == "embeddings" and price.kind != "embedding") or (
            endpoint != "embeddings" and price.kind == "embedding"):
        raise BadRequest(f"The model '{model[:100]}' does not support this endpoint.",
                         param="model")
    agent = _header(request, "X-Costwall-Agent")
    if agent is None:
        agent = key.agent
    elif not key.allows_agent(agent):  # else a header could leave a capped agent scope
        raise Forbidden(f"Key '{key.name}' may not attribute requests to agent type "
                        f"'{agent}' (X-Costwall-Agent may name only the agent types in the "
                        "key's agents list).", param="X-Costwall-Agent",
                        code="agent_not_allowed")
    campaign = _header(request, "X-Costwall-Campaign")
    task = _header(request, "X-Costwall-Task")
    override_reason = requested_override(request, key)
    seen, max_calls = _seen(gw).get, gw.settings.budgets.max_tool_calls
    if len(body) > OFFLOAD_BYTES:
        est = await asyncio.to_thread(estimate, endpoint, payload, price, seen, max_calls)
    else:
        est = estimate(endpoint, payload, price, seen, max_calls)
    stream = payload.get("stream") is True
    call = Call(request[REQUEST_ID_KEY], time.perf_counter(), endpoint, key, agent, campaign,
                task, model, price, payload, body, est, stream)

    tier = payload.get("service_tier")
    tier = tier if isinstance(tier, str) else None
    amount = price.upper_bound(est.prompt_tokens, est.total_output, tier, est.fee)
    if amount > LEDGER_MAX_COST:  # e.g. max_tokens 10**17: no model allows it, no row holds it
        raise BadRequest(f"The output limit '{est.output_field or 'max_tokens'}' is too large: "
                         "this request's cost bound does not fit costwall's ledger.",
                         param=est.output_field)
    clamp = None
    if est.output_field and est.output_tokens:
        clamp = ClampRequest(price.upper_bound(est.prompt_tokens, 0, tier, est.fee),
                             price.upper_bound(0, 1, tier), est.output_tokens, est.choices)
    scopes = scopes_for(key.tenant, agent, campaign, key.name)
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
    if call.reservation.clamped_tokens is not None and est.output_field:
        payload[est.output_field] = call.reservation.clamped_tokens
        call.body = orjson.dumps(payload)
    if est.tools is not None and est.tools.set_max_tool_calls is not None:
        # The bound assumed this many built-in tool calls: let the upstream enforce it.
        payload["max_tool_calls"] = est.tools.set_max_tool_calls
        call.body = orjson.dumps(payload)
    if stream and endpoint in ("chat", "completions"):
        options = payload.get("stream_options")
        options = options if isinstance(options, dict) else {}
        if options.get("include_usage") is not True:
            payload["stream_options"] = {**options, "include_usage": True}
            call.strip_usage = True
            call.body = orjson.dumps(payload)
    return call


# -- forwarding -------------------------------------------------------------------------------
def _our_headers(gw: Gateway, call: Call) -> list[tuple[str, str]]:
    headers = [("X-Costwall-Request-Id", call.id)]
    if call.reservation is not None:
        if call.reservation.clamped_tokens is not None:
            headers.append(("X-Costwall-Clamped-Max-Tokens", str(call.reservation.clamped_tokens)))
        for warning in gw.budgets.warnings(call.reservation):
            headers.append(("X-Costwall-Budget-Warning", warning))
    return headers


async def forward(gw: Gateway, request: web.Request, call: Call) -> web.StreamResponse:
    """Send the call upstream and relay the answer; fills ``call.status`` and ``call.usage``."""
    settings = gw.settings
    url = f"{settings.upstream_url}/{request.match_info['endpoint']}"
    timeout = _timeout(call.stream, settings.upstream_timeout_s,
                       settings.upstream_connect_timeout_s)
    headers = upstream_request_headers(request.headers.items(), settings.upstream_key)
    sent = time.perf_counter()
    try:
        upstream = await gw.session.post(url, data=call.body, headers=headers, timeout=timeout)
    except aiohttp.ClientConnectorError as exc:  # nothing reached the upstream: costs nothing
        raise UpstreamUnavailable(f"The upstream API is unreachable ({type(exc).__name__}).") \
            from None
    except TimeoutError:
        call.usage_source = "reserved"  # it may have been processed: never under-count
        raise UpstreamTimeout("The upstream API did not answer in time.") from None
    except aiohttp.ClientError as exc:
        call.usage_source = "reserved"
        raise UpstreamUnavailable(f"The upstream API failed ({type(exc).__name__}).") from None
    call.status = upstream.status
    call.upstream_seconds = time.perf_counter() - sent  # to the headers; streams add the body
    try:
        if is_stream(call.stream, upstream.content_type):
            return await relay_stream(gw, request, call, upstream)
        try:
            body = await upstream.read()
        except TimeoutError:
            call.usage_source = "reserved"
            raise UpstreamTimeout("The upstream API did not finish its answer in time.") from None
        except aiohttp.ClientError:
            call.usage_source = "reserved"
            raise UpstreamUnavailable("The upstream API closed the connection mid-answer.") \
                from None
        call.upstream_seconds = time.perf_counter() - sent
        try:
            usage, problem = usage_from_body(call.endpoint, body), None
        except InvalidUsage as exc:
            usage, problem = None, str(exc)
        take_usage(gw, call, usage, problem,
                   lambda: counted_usage(call, _json_or_none(body)))
        if call.endpoint == "responses" or call.estimate.tools is not None:
            answered(gw, call, _json_or_none(body) if call.endpoint == "responses" else None)
        settle(gw, call)
        key = settings.upstream_key
        # All headers as one list: the response builds its header dict once from it.
        out = client_response_headers(upstream.headers.items(), key)
        out += _our_headers(gw, call)
        if upstream.status == 401:  # the upstream refused costwall's key, not the agent's
            return upstream_auth_failed(settings.upstream_key_env, out)
        if upstream.status == 403:  # relayed as is, marked as the upstream's refusal
            out.append(("X-Costwall-Upstream-Auth", "forbidden"))
        response = web.Response(status=upstream.status, body=redact_key(body, key), headers=out)
        response.headers["X-Costwall-Cost-Usd"] = format_usd(call.entry.cost if call.entry else 0)
        remaining = gw.budgets.remaining(call.reservation) if call.reservation else None
        if remaining is not None:
            response.headers["X-Costwall-Budget-Remaining-Usd"] = format_usd(max(remaining, 0))
        return response
    finally:
        upstream.release()


def upstream_auth_failed(key_env: str, headers: list[tuple[str, str]]) -> web.Response:
    """A 502 that says whose key failed: agents must not blame (or rotate) their virtual key.
    ``x-should-retry: false``: retrying cannot help until the operator fixes the key."""
    where = f" (environment variable {key_env})" if key_env else " (none is configured)"
    error = UpstreamAuthFailed(
        "The upstream API rejected costwall's own upstream key; your virtual key is fine. "
        f"The gateway operator must fix the upstream key{where}.")
    headers = [(k, v) for k, v in headers
               if k.lower() not in ("content-type", "content-length", "content-encoding",
                                    "www-authenticate")]
    headers += [("X-Costwall-Upstream-Auth", "failed"), ("x-should-retry", "false")]
    return web.Response(status=error.status, body=error.to_json(), headers=headers,
                        content_type="application/json")


def is_stream(asked: bool, content_type: str) -> bool:
    """Relay as SSE: what says it is SSE, and whatever answers a ``stream: true`` request
    unless it is JSON (an upstream error, or an upstream that ignored ``stream``), whose
    usage is read from the body. Some upstreams label a stream ``text/plain``, or nothing."""
    return content_type == "text/event-stream" or (asked and content_type != "application/json")


def take_usage(gw: Gateway, call: Call, usage: Usage | None, problem: str | None,
               counted: Callable[[], Usage]) -> None:
    """Set ``call.usage`` and its source from what the upstream reported, never blindly.

    A usage that is malformed (``problem``) or beyond what the request could produce
    (``check_usage``) is not believed: the answer is counted instead (``usage_source``
    ``invalid``), and with no text to count the request is charged its reserved bound.
    An error answer (status >= 400) without a believable usage costs nothing.
    """
    if usage is not None:
        problem = check_usage(usage, usage_bounds(call.price, call.estimate))
        if problem is None:
            call.usage, call.usage_source = usage, "upstream"
            return
    if problem is not None:
        gw.record_invalid_usage(call, problem)
        if call.status >= 400:
            return
        usage = counted()
        call.usage_source = "invalid"
        # Nothing to count: charge the bound (settle does, for usage None and "invalid").
        call.usage = usage if usage.completion_tokens > 0 else None
        return
    if call.status < 400:
        call.usage = counted()


@functools.lru_cache(maxsize=8)
def _timeout(stream: bool, timeout_s: float, connect_s: float) -> aiohttp.ClientTimeout:
    """The upstream timeouts (immutable, so one object per setting serves every request)."""
    return aiohttp.ClientTimeout(total=None if stream else timeout_s, sock_connect=connect_s,
                                 sock_read=timeout_s)


def _json_or_none(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def counted_usage(call: Call, data: Any = None, streamed_text: str | None = None) -> Usage:
    """Usage by counting, for answers that carried none: estimate in, counted text out."""
    call.usage_source = "counted"
    if streamed_text is not None:
        out = count_text(streamed_text, encoding(call.price.encoding))
    else:
        out = counted_output(call.endpoint, data, call.price.encoding)
    return Usage(prompt_tokens=call.estimate.prompt_tokens, completion_tokens=out)


async def relay_stream(
    gw: Gateway, request: web.Request, call: Call, upstream: aiohttp.ClientResponse
) -> web.StreamResponse:
    """Relay SSE chunk by chunk as it arrives; charge what was produced however it ends."""
    out = client_response_headers(upstream.headers.items(), gw.settings.upstream_key)
    out += _our_headers(gw, call)
    response = web.StreamResponse(status=upstream.status, headers=out)
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    meter = StreamMeter(call.endpoint, strip_usage_chunk=call.strip_usage)
    # The meter hands out whole events only, so an echoed upstream key never straddles two
    # writes: redacting each write catches it (one substring search per write).
    key = gw.settings.upstream_key
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
        take_usage(gw, call, meter.usage, meter.invalid,
                   lambda: counted_usage(call, streamed_text=meter.streamed_text))
        if call.endpoint == "responses" or call.estimate.tools is not None:
            answered(gw, call, meter.response)
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
    return seen  # type: ignore[no-any-return]


def answered(gw: Gateway, call: Call, response: Any) -> None:
    """After a /v1/responses answer or one with built-in tools: fees and the token total.

    The fee is counted from the answer's ``*_call`` output items (its bound when there is no
    answer to count). A response answered with upstream usage is remembered, so a later
    ``previous_response_id`` to it is bounded by its input + output tokens. A ``background``
    response answered without usage is charged at its reserved bound.
    """
    if call.payload.get("background") is True and call.usage_source == "counted" \
            and call.status < 400:
        # Queued: the upstream bills it later, out of costwall's sight. Charge the bound.
        call.usage, call.usage_source = None, "reserved"
        return
    if call.estimate.tools is not None and call.status < 400:
        output = response.get("output") if isinstance(response, Mapping) else None
        call.fee = settled_fee(call.estimate.tools, output)
    if call.usage is not None and call.usage_source == "upstream" and isinstance(
            response, Mapping):
        _seen(gw).remember(response.get("id"),
                           call.usage.prompt_tokens + call.usage.completion_tokens)


def settle(gw: Gateway, call: Call) -> None:
    """Turn the reservation into the actual cost, once, and record the final ledger row."""
    reservation, entry = call.reservation, call.entry
    if reservation is None or reservation.settled:
        return
    tier = call.payload.get("service_tier")
    if call.usage is not None:
        cost = call.price.cost(call.usage, tier if isinstance(tier, str) else None) + call.fee
        if cost > LEDGER_MAX_COST:  # only a price table with absurd prices gets here
            gw.record_invalid_usage(call, "its cost does not fit the ledger")
            call.usage, call.usage_source = None, "invalid"
            cost = reservation.amount
    elif entry is not None and call.usage_source in ("reserved", "invalid"):
        # Reached the upstream, outcome unknown or usage not believable and nothing to count:
        # never under-count.
        cost = reservation.amount
    else:
        cost = 0
    overshoot = cost - reservation.amount
    crossings = gw.budgets.settle(reservation, cost)
    if entry is not None:
        usage = call.usage or Usage()
        entry.state = "settled"
        entry.status = call.status
        entry.prompt_tokens = usage.prompt_tokens
        entry.cached_tokens = usage.cached_tokens
        entry.completion_tokens = usage.completion_tokens
        entry.reasoning_tokens = usage.reasoning_tokens
        entry.cost = cost
        entry.usage_source = call.usage_source
        entry.latency_ms = int((time.perf_counter() - call.started) * 1000)
        entry.overshoot = max(overshoot, 0)
        gw.ledger.settle(entry)
    gw.record_settled(call, cost, crossings)
    if overshoot > 0:
        gw.record_overshoot(call, cost, overshoot)


# -- the handlers -----------------------------------------------------------------------------
async def handle_api(request: web.Request) -> web.StreamResponse:
    """POST /v1/{chat/completions,completions,embeddings,responses}."""
    gw = request.app[GATEWAY]
    endpoint = ENDPOINTS[request.match_info["endpoint"]]
    call = await admit(gw, request, endpoint)
    assert call.reservation is not None
    gw.inflight += 1
    try:
        call.entry = LedgerEntry(
            id=call.id, ts=gw.clock(), period=call.reservation.period, tenant=call.key.tenant,
            key_name=call.key.name, agent=call.agent, campaign=call.campaign, task=call.task,
            model=call.model, endpoint=endpoint, stream=call.stream,
            reserved=call.reservation.amount, override=call.override_reason is not None,
            override_reason=call.override_reason,
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
        try:
            return await forward(gw, request, call)
        except GatewayError:
            raise
        except BaseException:
            # Reached (or may have reached) the upstream and the outcome is unknown.
            if call.usage is None:
                call.usage_source = "reserved"
            raise
    finally:
        gw.inflight -= 1
        settle(gw, call)
        gw.metrics.child(gw.metrics.request_duration, endpoint).observe(
            time.perf_counter() - call.started)


async def handle_models(request: web.Request) -> web.StreamResponse:
    """GET /v1/models[/id]: authenticated pass-through, costs nothing."""
    gw = request.app[GATEWAY]
    gw.keys.authenticate(request.headers.get("Authorization"))
    tail = request.match_info["tail"]
    if not _MODELS_PATH.fullmatch(tail):  # no "..": only /models[/id] upstream, never beyond
        raise NotFound(f"Unknown endpoint GET /v1/{tail[:100]}.")
    url = f"{gw.settings.upstream_url}/{tail}"
    headers = upstream_request_headers(request.headers.items(), gw.settings.upstream_key)
    try:
        async with gw.session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(
                total=gw.settings.upstream_timeout_s)) as upstream:
            key = gw.settings.upstream_key
            if upstream.status == 401:  # costwall's key, not the agent's (see forward)
                return upstream_auth_failed(gw.settings.upstream_key_env, [
                    ("X-Costwall-Request-Id", request[REQUEST_ID_KEY])])
            response = web.Response(status=upstream.status,
                                    body=redact_key(await upstream.read(), key))
            for name, value in client_response_headers(upstream.headers.items(), key):
                response.headers.add(name, value)
    except TimeoutError:
        raise UpstreamTimeout("The upstream API did not answer in time.") from None
    except aiohttp.ClientError as exc:
        raise UpstreamUnavailable(f"The upstream API is unreachable ({type(exc).__name__}).") \
            from None
    response.headers["X-Costwall-Request-Id"] = request[REQUEST_ID_KEY]
    return response


def new_request_id() -> str:
    return "cw-" + secrets.token_hex(12)


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/v1/{endpoint:chat/completions|completions|embeddings|responses}",
                        handle_api)
    app.router.add_get("/v1/{tail:models(/[^{}]+)?}", handle_models)

