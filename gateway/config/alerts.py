"""The ``alerts`` section: channels, routing rules and their checks (SPEC "Alerts").

Channels and rules are lists of small mappings, read by this section's own ``parse`` (they are
``EXTRA`` keys, documented in README's table). Secrets and URLs taken from the environment
are kept in internal fields; problems never echo them.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self
from urllib.parse import urlsplit

from gateway.config.fields import Context, Section, setting
from gateway.config.kinds import Bool, Int, Seconds

CHANNEL_TYPES = ("webhook", "slack", "email")
EVENT_TYPES = ("budget.threshold", "budget.exhausted", "budget.forecast_exceeded",
               "spend.anomaly", "override.changed", "cap.changed", "invoice.issued", "alert.test")
CHANNEL_KEYS = frozenset({"name", "type", "url", "url_env", "secret_env", "to"})
SMTP_KEYS = frozenset({"host", "port", "from", "username_env", "password_env", "starttls"})


@dataclass(frozen=True, slots=True)
class Channel:
    """One configured destination. ``url`` and ``secret`` are resolved (from the environment
    where named) and must never be logged or shown."""

    name: str
    type: str
    url: str = field(default="", repr=False)
    secret: bytes = field(default=b"", repr=False)
    to: tuple[str, ...] = ()

    @property
    def host(self) -> str:
        """What pages may show of the target."""
        if self.type == "email":
            return ", ".join(self.to)
        return urlsplit(self.url).hostname or ""


@dataclass(frozen=True, slots=True)
class Rule:
    events: tuple[str, ...]
    channels: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Smtp:
    host: str = "127.0.0.1"
    port: int = 25
    sender: str = "costwall@localhost"
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    starttls: bool = False


def decode_secret(secret: str) -> bytes | None:
    """The key of a Standard Webhooks ``whsec_<base64>`` secret, None when malformed."""
    if not secret.startswith("whsec_"):
        return None
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        return None
    return key or None


def is_private_address(host: str) -> bool:
    """True when ``host`` is a loopback, private, link-local or reserved address literal, or
    ``localhost``. Names are not resolved here (a config check must not depend on DNS); the
    sender resolves them before every attempt (``gateway.alerts.resolves_private``)."""
    if host.lower().rstrip(".") in ("localhost", "localhost.localdomain") or \
            host.lower().endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return False
    return bool(address.is_private or address.is_loopback or address.is_link_local
                or address.is_reserved or address.is_unspecified or address.is_multicast)


@dataclass(frozen=True, slots=True)
class AlertSettings(Section):
    KEY = "alerts"
    EXTRA: ClassVar[Mapping[str, str]] = {
        "channels": "list of {name, type: webhook|slack|email, url or url_env, secret_env "
                    "(webhook, a whsec_ secret), to (email)}",
        "rules": "list of {events: [patterns], channels: [names]}; default: every event to "
                 "every channel",
        "anomaly": "{factor}: spend.anomaly when an hour's spend passes factor x the "
                   "trailing 7-day hourly mean",
        "smtp": "{host, port, from, username_env, password_env, starttls} for email channels",
    }
    allow_private_targets: bool = setting(False, "allow webhook/Slack targets on loopback or "
                                          "private addresses", Bool())
    timeout_s: float = setting(10.0, "one delivery attempt, connection to answer (or SMTP "
                               "conversation)", Seconds(0.1, 300))
    lease_s: float = setting(60.0, "a claimed delivery is retried by another replica only "
                             "after this long; at least 2 x timeout_s", Seconds(0.2, 86400))
    retry_s: float = setting(5.0, "the first retry's delay; doubles per attempt (at most 1 h, "
                             "+-25 % jitter)", Seconds(0.01, 3600))
    max_attempts: int = setting(15, "attempts before a delivery is marked failed",
                                Int(1, 1000))
    give_up_s: float = setting(86400.0, "a delivery still failing this long after its event "
                               "is marked failed", Seconds(1, 30 * 86400))
    channels: tuple[Channel, ...] = ()
    rules: tuple[Rule, ...] = ()
    anomaly_factor: int | None = None
    smtp: Smtp = field(default_factory=Smtp)

    def routes(self, event_type: str) -> list[Channel]:
        """The channels an event of ``event_type`` goes to."""
        if not self.rules:
            return list(self.channels)
        names: dict[str, None] = {}
        for rule in self.rules:
            if any(fnmatch.fnmatchcase(event_type, p) for p in rule.events):
                names |= dict.fromkeys(rule.channels)
        return [c for c in self.channels if c.name in names]

    def channel(self, name: str) -> Channel | None:
        return next((c for c in self.channels if c.name == name), None)

    @classmethod
    def parse(cls, ctx: Context) -> Self:
        own = ctx.mapping(cls)
        values = ctx.read(cls, own)
        problems = ctx.problems
        channels = _channels(own.get("channels") or [], ctx, values["allow_private_targets"])
        names = {c.name for c in channels}
        rules: list[Rule] = []
        raw_rules = own.get("rules") or []
        if not isinstance(raw_rules, list):
            problems.append("alerts.rules: must be a list of {events, channels}")
            raw_rules = []
        for i, raw in enumerate(raw_rules):
            where = f"alerts.rules[{i}]"
            if not isinstance(raw, Mapping):
                problems.append(f"{where}: must be a mapping of events and channels")
                continue
            events = tuple(str(e) for e in (raw.get("events") or ["*"]))
            targets = tuple(str(c) for c in (raw.get("channels") or []))
            for pattern in events:
                if not any(fnmatch.fnmatchcase(t, pattern) for t in EVENT_TYPES):
                    problems.append(f"{where}.events: {pattern!r} matches no event type "
                                    f"({', '.join(EVENT_TYPES)})")
            for name in targets:
                if name not in names:
                    problems.append(f"{where}.channels: unknown channel {name!r}")
            rules.append(Rule(events, targets))
        factor = None
        anomaly = own.get("anomaly")
        if anomaly is not None:
            raw_factor = anomaly.get("factor") if isinstance(anomaly, Mapping) else None
            if not isinstance(raw_factor, int) or isinstance(raw_factor, bool) or raw_factor < 2:
                problems.append("alerts.anomaly.factor: expected a whole number >= 2")
            else:
                factor = raw_factor
        smtp = _smtp(own.get("smtp"), ctx)
        # An attempt is cut at timeout_s; a claim must outlive it (and the write that ends it),
        # or a live replica's slow delivery would be taken over and sent twice.
        if values["lease_s"] < 2 * values["timeout_s"]:
            problems.append(f"alerts.lease_s: must be at least 2 x alerts.timeout_s "
                            f"({2 * values['timeout_s']:g} s)")
        return cls(**values, channels=tuple(channels), rules=tuple(rules),
                   anomaly_factor=factor, smtp=smtp)


def _channels(raw: Any, ctx: Context, allow_private: bool) -> list[Channel]:
    problems = ctx.problems
    if not isinstance(raw, list):
        problems.append("alerts.channels: must be a list of channels")
        return []
    out: list[Channel] = []
    for i, item in enumerate(raw):
        where = f"alerts.channels[{i}]"
        if not isinstance(item, Mapping):
            problems.append(f"{where}: must be a mapping (name, type, url, ...)")
            continue
        for key in item:
            if str(key) not in CHANNEL_KEYS:
                problems.append(f"{where}.{key}: unknown setting (known: "
                                f"{', '.join(sorted(CHANNEL_KEYS))})")
        name, kind = str(item.get("name") or ""), str(item.get("type") or "")
        if not name:
            problems.append(f"{where}.name: required")
        elif any(c.name == name for c in out):
            problems.append(f"{where}.name: {name!r} is used twice")
        where = f"alerts.channels.{name or i}"
        if kind not in CHANNEL_TYPES:
            problems.append(f"{where}.type: expected one of {', '.join(CHANNEL_TYPES)}")
            continue
        url, secret, to = "", b"", tuple[str, ...]()
        if kind == "email":
            raw_to = item.get("to") or []
            to = tuple(str(t) for t in (raw_to if isinstance(raw_to, list) else [raw_to]))
            if not to or any("@" not in t for t in to):
                problems.append(f"{where}.to: expected a list of e-mail addresses")
        else:
            if item.get("url_env"):
                url = ctx.env.get(str(item["url_env"]), "")
                if not url:
                    ctx.warnings.append(f"{where}: environment variable {item['url_env']} is "
                                        "not set (the channel is skipped)")
            else:
                url = str(item.get("url") or "")
            if url or not item.get("url_env"):
                parts = urlsplit(url)
                if parts.scheme not in ("http", "https") or not parts.hostname:
                    problems.append(f"{where}.url: expected an http(s) URL")
                elif parts.username or parts.password:
                    problems.append(f"{where}.url: credentials in the URL are not supported")
                elif not allow_private and is_private_address(parts.hostname):
                    problems.append(f"{where}.url: the target is a loopback or private "
                                    "address (set alerts.allow_private_targets: true to allow)")
            if kind == "webhook" and item.get("secret_env"):
                raw_secret = ctx.env.get(str(item["secret_env"]))
                if raw_secret is None:
                    problems.append(f"{where}.secret_env: environment variable "
                                    f"{item['secret_env']} is not set")
                else:
                    key = decode_secret(raw_secret)
                    if key is None:
                        problems.append(f"{where}.secret_env: the secret must be whsec_ "
                                        "followed by base64")
                    secret = key or b""
        out.append(Channel(name, kind, url, secret, to))
    return out


def _smtp(raw: Any, ctx: Context) -> Smtp:
    if raw is None:
        return Smtp()
    if not isinstance(raw, Mapping):
        ctx.problems.append("alerts.smtp: must be a mapping")
        return Smtp()
    for key in raw:
        if str(key) not in SMTP_KEYS:
            ctx.problems.append(f"alerts.smtp.{key}: unknown setting (known: "
                                f"{', '.join(sorted(SMTP_KEYS))})")
    port = raw.get("port", 25)
    if not isinstance(port, int) or not 0 < port < 65536:
        ctx.problems.append("alerts.smtp.port: expected a port number")
        port = 25
    user_env, pass_env = raw.get("username_env"), raw.get("password_env")
    return Smtp(str(raw.get("host", "127.0.0.1")), port,
                str(raw.get("from", "costwall@localhost")),
                ctx.env.get(str(user_env)) if user_env else None,
                ctx.env.get(str(pass_env)) if pass_env else None, bool(raw.get("starttls")))
