"""Who is asking: admin and finance tokens, browser sessions, CSRF and failed-login limits.

Two roles: ``admin`` (everything) and ``finance`` (reads only). Browsers log in once with a
token and then carry a signed session cookie (HttpOnly, SameSite=Strict; ``admin.sessions``):
role, expiry and CSRF token need no server memory, so a login is valid on every replica that
shares the database, survives a restart, and logout revokes it everywhere. Scripts send
``Authorization: Bearer <token>`` on every request and need no CSRF token,
because browsers never attach that header on their own. Tokens are compared in constant time,
and failed attempts are limited per client address.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import ipaddress
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from aiohttp import web
from aiohttp.web_request import FileField
from multidict import MultiDictProxy

from admin.errors import AdminClosed, BadInput, NotAuthenticated, RateLimited, ReadOnly, TooLarge
from admin.sessions import Session, SessionSigner, is_revoked, shared_secret
from gateway.config import AdminSettings, Settings
from gateway.services import GATEWAY
from gateway.store.interfaces import Ledger

log = logging.getLogger("costwall.admin")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
FormValue = str | bytes | bytearray | FileField  # what aiohttp's ``request.post()`` holds
COOKIE = "costwall_admin"
FAILURES_PER_WINDOW = 5
FAILURE_WINDOW_S = 60.0
MAX_FORM_BYTES = 64 * 1024
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
PERMISSIONS = {"read": frozenset({"admin", "finance"}), "write": frozenset({"admin"})}
CLOSED_MESSAGE = ("The admin UI and API are closed: no admin token is configured. Set the "
                  "environment variable named by admin.token_env (default "
                  f"{AdminSettings.default('token_env')}) and restart.")


class FailureLimiter:
    """At most ``limit`` failed attempts per client address in a sliding window."""

    def __init__(self, limit: int = FAILURES_PER_WINDOW, window_s: float = FAILURE_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic):
        self.limit, self.window_s, self.clock = limit, window_s, clock
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, ip: str) -> deque[float]:
        now = self.clock()
        times = self._failures.get(ip, deque())
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return times

    def retry_after(self, ip: str) -> int | None:
        """Seconds until ``ip`` may try again, or None if it may try now."""
        times = self._recent(ip)
        if len(times) < self.limit:
            return None
        return max(1, int(times[0] + self.window_s - self.clock()) + 1)

    def failed(self, ip: str) -> int:
        """Record a failure; returns how many ``ip`` had in the window."""
        if len(self._failures) > 10_000:  # forget quiet addresses so memory stays bounded
            self._failures = {k: v for k, v in self._failures.items() if self._recent(k)}
        times = self._recent(ip)
        times.append(self.clock())
        self._failures[ip] = times
        return len(times)


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: role, how they came in (ui/api) and from where."""

    role: str
    channel: str
    ip: str
    session: Session | None = None

    @property
    def actor(self) -> str:
        """Who did it, for the audit trail (tokens are shared, so role + channel + address)."""
        return f"{self.role} ({self.channel}, {self.ip})"

    @property
    def can_write(self) -> bool:
        return self.role in PERMISSIONS["write"]

    @property
    def csrf(self) -> str:
        return self.session.csrf if self.session else ""


class AdminAuth:
    """The tokens, the session signer and the failure limiter of one app."""

    def __init__(self, settings: Settings):
        admin = settings.admin
        self._tokens = [(role, tok.encode()) for role, tok in
                        (("admin", admin.token), ("finance", admin.finance_token)) if tok]
        self.closed = admin.token is None
        self.limiter = FailureLimiter()
        self.signer: SessionSigner | None = None  # set on first use: the secret is in the DB
        self._signer_lock = asyncio.Lock()

    async def load_signer(self, ledger: Ledger) -> SessionSigner:
        """The signer, keyed by the secret every replica on this database shares."""
        if self.signer is None:
            async with self._signer_lock:
                if self.signer is None:
                    self.signer = SessionSigner(await shared_secret(ledger), dict(self._tokens))
        return self.signer

    async def session_of(self, request: web.Request) -> Session | None:
        """The valid, unrevoked session behind the request's cookie, if any."""
        cookie = request.cookies.get(COOKIE)
        if not cookie:
            return None
        ledger = request.app[GATEWAY].ledger
        session = (await self.load_signer(ledger)).verify(cookie)
        if session is None or await is_revoked(ledger, session):
            return None
        return session

    def role_for(self, token: str) -> str | None:
        """The role a token grants; every configured token is compared, in constant time."""
        try:
            presented = token.encode()
        except UnicodeEncodeError:  # a header with bytes that are not UTF-8: no token
            return None
        role = None
        for name, expected in self._tokens:
            if hmac.compare_digest(presented, expected):
                role = name
        return role

    def check_attempt(self, ip: str) -> None:
        wait = self.limiter.retry_after(ip)
        if wait is not None:
            raise RateLimited(f"Too many failed logins from this address; try again in {wait} "
                              "seconds.", retry_after=wait)

    def record_failure(self, ip: str, channel: str) -> None:
        count = self.limiter.failed(ip)
        log.warning("failed admin %s authentication from %s (%d in the last %ds)",
                    channel, ip, count, int(self.limiter.window_s))


AUTH = web.AppKey("costwall_admin_auth", AdminAuth)
PRINCIPAL = web.RequestKey("costwall_admin_principal", Principal)


def client_ip(request: web.Request) -> str:
    """The peer address (forwarded headers are not trusted: anyone can send them)."""
    return request.remote or "unknown"


def secure_cookies(request: web.Request) -> bool:
    """Whether admin cookies get the ``Secure`` flag.

    ``admin.secure_cookies: true/false`` decides outright; by default (``auto``) they are
    Secure when the browser talks HTTPS to us: directly, or through a reverse proxy listed in
    ``admin.trusted_proxies`` that says so with ``X-Forwarded-Proto: https`` (from anyone
    else that header is ignored: a client could send it).
    """
    admin = request.app[GATEWAY].settings.admin
    if admin.secure_cookies is not None:
        return admin.secure_cookies
    if request.secure:
        return True
    proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return proto == "https" and _from_trusted_proxy(request, admin.trusted_proxies)


def _from_trusted_proxy(request: web.Request, proxies: tuple[str, ...]) -> bool:
    if not proxies or not request.remote:
        return False
    try:
        peer = ipaddress.ip_address(request.remote)
    except ValueError:  # e.g. a Unix socket
        return False
    return any(peer in ipaddress.ip_network(net) for net in proxies)


def is_api(request: web.Request) -> bool:
    return request.path.startswith("/admin/api/")


def login_redirect(request: web.Request) -> web.HTTPSeeOther:
    target = request.path_qs if request.method in SAFE_METHODS else "/admin"
    return web.HTTPSeeOther(f"/admin/login?next={quote(target, safe='')}")


async def authenticate(request: web.Request) -> Principal:
    """The caller behind a bearer token or a session cookie; raises 401/429/503 or redirects."""
    auth = request.app[AUTH]
    if auth.closed:
        raise AdminClosed(CLOSED_MESSAGE)
    ip = client_ip(request)
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise NotAuthenticated("Send 'Authorization: Bearer <admin or finance token>'.")
        auth.check_attempt(ip)
        role = auth.role_for(token.strip())
        if role is None:
            auth.record_failure(ip, "API")
            raise NotAuthenticated("Invalid admin token.", code="invalid_admin_token")
        return Principal(role, "api", ip)
    if is_api(request):
        raise NotAuthenticated("The admin API needs 'Authorization: Bearer <admin or finance "
                               "token>'.")
    session = await auth.session_of(request)
    if session is None:
        raise login_redirect(request)
    return Principal(session.role, "ui", ip, session)


def form_text(form: Any, name: str, limit: int | None = None) -> str:
    """A text field of a submitted form ('' if absent or a file), cut to ``limit``."""
    value = form.get(name, "")
    text = value if isinstance(value, str) else ""
    return text if limit is None else text[:limit]


async def read_form(request: web.Request) -> MultiDictProxy[FormValue]:
    """The posted form (at most ``MAX_FORM_BYTES``); a body that is no form is a 400."""
    if (request.content_length or 0) > MAX_FORM_BYTES:
        raise TooLarge("Form too large.")
    try:
        return await request.post()
    except ValueError:  # e.g. multipart without a boundary, or bytes that are not UTF-8
        raise BadInput("The form could not be read; send it as "
                       "application/x-www-form-urlencoded.") from None


async def check_csrf(request: web.Request, session: Session) -> None:
    """A state-changing form must carry this session's CSRF token."""
    form = await read_form(request)
    token = form.get("csrf")
    if not isinstance(token, str) or not hmac.compare_digest(token.encode(),
                                                             session.csrf.encode()):
        raise ReadOnly("The form's security token is missing or out of date. Reload the page "
                       "and try again.", code="csrf_failed")


def requires(permission: str) -> Callable[[Handler], Handler]:
    """Decorate a view: ``@requires("read")`` for both roles, ``@requires("write")`` for admin.

    Also checks the CSRF token of every state-changing request that came with a session.
    """
    allowed = PERMISSIONS[permission]

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def wrapped(request: web.Request) -> web.StreamResponse:
            principal = await authenticate(request)
            if principal.session is not None and request.method not in SAFE_METHODS:
                await check_csrf(request, principal.session)
            if principal.role not in allowed:
                raise ReadOnly(f"The {principal.role} role is read-only: this change needs the "
                               "admin token.")
            request[PRINCIPAL] = principal
            return await handler(request)

        return wrapped

    return decorate


def principal(request: web.Request) -> Principal:
    """The caller ``requires`` authenticated for this request."""
    return request[PRINCIPAL]
