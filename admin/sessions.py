"""Admin browser sessions every replica understands: signed, expiring, revocable cookies.

A login gets the cookie ``v1.<role>.<sid>.<expires>.<mac>``: the role, a random session id and
the expiry (Unix seconds) in clear, and an HMAC-SHA256 over them. The HMAC key is derived from
a random secret kept in the ledger's settings table (created once, INSERT-if-absent, so
replicas starting together agree on one) and from the token of the role, so:

- any replica that shares the database verifies a cookie without shared memory;
- a cookie cannot be forged or its role raised without the secret;
- rotating a role's token ends every session of that role (its key changes);
- the CSRF token is an HMAC of the session id: nothing to store, the same on every replica.

Logout stores the session id as revoked (one settings row per logout); every admin page
request looks it up (admin traffic is rare; the proxy's request path never does).

Pure apart from the two ledger helpers at the end: signing and checking take a clock, so
tests can move time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gateway.store.interfaces import Ledger

VERSION = "v1"
SECRET_SETTING = "admin.session_secret"
REVOKED_PREFIX = "admin.session_revoked:"
SESSION_TTL_S = 12 * 3600
MAX_FLASH_CHARS = 600  # per message; three at most keep the cookie well under 4 KB


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class Session:
    """A verified browser session: who (role), which (id), until when, and its CSRF token."""

    id: str
    role: str
    expires: int
    csrf: str


class SessionSigner:
    """Issues and checks session cookies (and signs flash messages) for one set of tokens.

    >>> signer = SessionSigner(b"s" * 32, {"admin": b"admin-token-0123456789"}, clock=lambda: 0)
    >>> cookie, session = signer.issue("admin")
    >>> signer.verify(cookie) == session, signer.verify(cookie + "x")
    (True, None)
    """

    def __init__(self, secret: bytes, tokens: Mapping[str, bytes], ttl_s: int = SESSION_TTL_S,
                 clock: Callable[[], float] = time.time):
        self.ttl_s, self.clock = ttl_s, clock
        self._keys = {role: hmac.new(secret, b"costwall-admin-session\0" + role.encode()
                                     + b"\0" + token, hashlib.sha256).digest()
                      for role, token in tokens.items()}

    def _mac(self, role: str, message: str) -> str:
        return _b64(hmac.new(self._keys[role], message.encode(), hashlib.sha256).digest())

    def _session(self, role: str, sid: str, expires: int) -> Session:
        return Session(sid, role, expires, self._mac(role, f"csrf.{sid}"))

    def issue(self, role: str) -> tuple[str, Session]:
        """A new session of ``role``: the cookie value and what it stands for."""
        sid = _b64(secrets.token_bytes(18))
        expires = int(self.clock()) + self.ttl_s
        payload = f"{VERSION}.{role}.{sid}.{expires}"
        return f"{payload}.{self._mac(role, payload)}", self._session(role, sid, expires)

    def verify(self, cookie: str | None) -> Session | None:
        """The session a cookie stands for, or None (forged, altered, expired, unknown role)."""
        if not cookie or len(cookie) > 256:
            return None
        parts = cookie.split(".")
        if len(parts) != 5 or parts[0] != VERSION or parts[1] not in self._keys:
            return None
        _, role, sid, expires_text, mac = parts
        if not expires_text.isdigit() or len(expires_text) > 12:
            return None
        expected = self._mac(role, cookie.rsplit(".", 1)[0])
        if not hmac.compare_digest(mac.encode(), expected.encode()):
            return None
        expires = int(expires_text)
        now = self.clock()
        if expires <= now or expires > now + self.ttl_s + 300:  # expired, or not ours
            return None
        return self._session(role, sid, expires)

    # -- one-time messages after a redirect (post/redirect/get) ------------------------------
    def sign_flash(self, session: Session, messages: list[tuple[str, str]]) -> str:
        """Messages as a cookie value bound to ``session`` (another session cannot read it)."""
        kept = [(level, text[:MAX_FLASH_CHARS]) for level, text in messages[-3:]]
        data = _b64(json.dumps(kept, ensure_ascii=False).encode())
        return f"{data}.{self._mac(session.role, f'flash.{session.id}.{data}')}"

    def read_flash(self, session: Session, cookie: str | None) -> list[tuple[str, str]]:
        """The messages of a flash cookie signed for ``session``; [] for anything else."""
        if not cookie or "." not in cookie or session.role not in self._keys:
            return []
        data, _, mac = cookie.rpartition(".")
        if not hmac.compare_digest(mac.encode(),
                                   self._mac(session.role, f"flash.{session.id}.{data}").encode()):
            return []
        try:
            return [(str(level), str(text)) for level, text in json.loads(_unb64(data))]
        except (ValueError, TypeError):
            return []


async def shared_secret(ledger: Ledger) -> bytes:
    """The signing secret all replicas on this database share (made by the first to ask)."""
    stored = await ledger.add_setting(SECRET_SETTING, _b64(secrets.token_bytes(32)))
    return _unb64(stored)


async def is_revoked(ledger: Ledger, session: Session) -> bool:
    return await ledger.get_setting(REVOKED_PREFIX + session.id) is not None


async def revoke(ledger: Ledger, session: Session) -> None:
    """End ``session`` on every replica (the row says until when it would have been valid)."""
    await ledger.set_setting(REVOKED_PREFIX + session.id, str(session.expires))
