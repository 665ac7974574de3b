"""Checks run before ``serve`` and ``demo`` start, and one-line descriptions of what failed.

A gateway that cannot start must say why in one line and exit non-zero: never a traceback,
never a process that stays alive without listening. Whatever can be checked before anything
is opened (the price table, the PostgreSQL driver, the upstream key, the port) is checked
here; what fails while starting (the database, recovery) is described by ``describe``.
"""

from __future__ import annotations

import importlib
import socket
import sqlite3
from urllib.parse import urlsplit, urlunsplit

from gateway.config import Settings, is_loopback_url
from gateway.config.upstreams import resolved
from gateway.pricing import PriceTable, load_price_table
from gateway.store.urls import backend_of


class StartupError(Exception):
    """Start-up cannot go on; the message is the one line the operator sees."""


def load_prices(settings: Settings) -> PriceTable:
    """The configured price table, or one line naming the file and its first problem."""
    path = settings.general.pricing
    if not path.is_file():
        raise StartupError(f"price table {path} not found (leave `pricing` "
                           "unset to use the table shipped with costwall)")
    prices, problems = load_price_table(path)
    if problems:
        more = f" (and {len(problems) - 1} more; run `costwall check`)" if len(problems) > 1 \
            else ""
        raise StartupError(f"price table: {problems[0]}{more}")
    return prices


def require_database_driver(database: str) -> None:
    """A postgresql:// URL needs the optional asyncpg driver (imported here, once, so a broken
    install is caught too)."""
    try:
        if backend_of(database) != "postgresql":
            return
    except ValueError:  # not a database URL at all: configuration checks report it
        return
    try:
        importlib.import_module("asyncpg")
    except ImportError:
        raise StartupError("database is PostgreSQL but its driver is not installed: "
                           "pip install 'costwall[postgres]'") from None


def require_upstream_key(settings: Settings) -> None:
    """Refuse to forward to a remote upstream without the gateway's own key: every request
    would come back 401 and agents would blame their virtual keys. A keyless upstream is
    declared with ``api_key_env: ""``; one on this machine (a local model server, the
    simulator) is let through. Checked for every upstream."""
    for upstream in resolved(settings):
        if upstream.api_key or not upstream.api_key_env:
            continue
        if is_loopback_url(upstream.base_url):
            continue
        where = "upstream" if not settings.upstreams else f"upstreams '{upstream.name}'"
        raise StartupError(
            f"environment variable {upstream.api_key_env} (the gateway's key for "
            f"{upstream.base_url}) is not set; set it, or declare a keyless upstream with "
            f"api_key_env: \"\" ({where})")


def require_free_port(host: str, port: int) -> None:
    """Fail before anything is opened or written when the port is taken."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds
        try:
            sock.bind(address)
        except OSError as exc:
            raise StartupError(listen_error(host, port, exc)) from None


def listen_error(host: str, port: int, exc: OSError) -> str:
    """The line for a port that cannot be bound."""
    reason = exc.strerror or str(exc)
    hint = " (another process uses it; pick another with --port)" \
        if "in use" in reason.lower() else ""
    return f"cannot listen on {host}:{port}: {reason}{hint}"


def safe_url(url: str) -> str:
    """A database URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def describe(exc: BaseException, settings: Settings) -> str:
    """One line for an exception that stopped the gateway from starting."""
    text = " ".join(str(exc).split())[:300] or type(exc).__name__
    if isinstance(exc, StartupError):
        return text
    module = type(exc).__module__ or ""
    if isinstance(exc, sqlite3.Error) or module.startswith(("asyncpg", "aiosqlite")) or \
            isinstance(exc, (ConnectionError, TimeoutError)):
        return f"database {safe_url(settings.ledger.database)} cannot be used: {text}"
    if isinstance(exc, OSError) and exc.errno is not None and "address" in text.lower():
        return listen_error(settings.server.host, settings.server.port, exc)
    return f"could not start: {type(exc).__name__}: {text}"
