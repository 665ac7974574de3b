"""Logging setup: plain text or one JSON object per line, every line tagged with its request id.

What may be logged: request ids, tenant, key *names*, agent, campaign, model, status, cost,
durations. What never is: prompts, completions, request or response bodies, and secrets
(virtual keys, the upstream key, admin tokens). Call sites pass facts as ``extra={...}``; both
formats render them as fields, so operators can filter on them.

The request id lives in a context variable that the error middleware sets for the duration of
each request, so any line logged while serving it — by the proxy, the ledger or a library —
carries ``request_id`` without each call site passing it.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import orjson

REQUEST_ID: ContextVar[str | None] = ContextVar("costwall_request_id", default=None)

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (from the context, unless given in ``extra``) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        return True


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items()
            if k not in _STANDARD and k != "request_id" and v is not None}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            data["request_id"] = request_id
        for key, value in _fields(record).items():
            data.setdefault(key, value)
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(data, default=str).decode()


class TextFormatter(logging.Formatter):
    """``time LEVEL logger [request id]: message key=value ...`` for people reading a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(rid)s: %(message)s%(kv)s")
        self._second: int | None = None
        self._second_text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """The default ``2026-11-28 19:24:32,700``, with the strftime part kept per second
        (it is the same for every line of that second)."""
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._second_text = time.strftime(self.default_time_format,
                                              self.converter(record.created))
            self._second = second
        return f"{self._second_text},{int(record.msecs):03d}"  # default_msec_format

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        extra = vars(record)  # %(rid)s and %(kv)s of the format, for this call only
        extra["rid"] = f" [{request_id}]" if request_id else ""
        pairs = [f"{k}={_text_value(v)}" for k, v in _fields(record).items()
                 if k not in ("rid", "kv")]
        extra["kv"] = (" " + " ".join(pairs)) if pairs else ""
        try:
            return super().format(record)
        finally:
            del extra["rid"], extra["kv"]

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The line without its traceback; a message with a newline or another control
        character (a model name from a request, say) is escaped, so it cannot forge a line."""
        if not record.message.isprintable():
            record.message = escape_controls(record.message)
        return super().formatMessage(record)


def escape_controls(text: str) -> str:
    """``text`` with every non-printable character as a visible escape (``\\n``, ``\\x1b``).

    Only called when ``str.isprintable`` says there is something to escape (rare), so the
    common line pays one C-level scan.
    """
    return "".join(ch if ch.isprintable() else _ESCAPES.get(ch) or (
        f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}") for ch in text)


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


_NEEDS_QUOTES = re.compile(r'[ "=\\]')


def _text_value(value: Any) -> str:
    if type(value) is int:  # no character of an int needs quoting
        return str(value)
    text = str(value)
    if not text.isprintable():  # a newline or a control character: never a raw one
        return '"' + escape_controls(text).replace('"', '\\"') + '"'
    if not text or _NEEDS_QUOTES.search(text):
        return orjson.dumps(text).decode()
    return text


def configure(fmt: str = "text", level: str = "INFO", access: bool = True) -> None:
    """Route every logger to stderr in ``fmt`` (``text`` or ``json``) at ``level``.

    ``access=False`` (``logging.access: false``) silences ``costwall.access``, the line per
    proxied request: under heavy load it is a noticeable share of the gateway's CPU.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Neither format shows the process id; not asking for it saves a getpid() per line.
    logging.logProcesses = False
    logging.getLogger("costwall.access").setLevel(logging.NOTSET if access else logging.WARNING)
    # aiohttp's access log would duplicate the proxy's own request lines (it is off in
    # ``costwall serve``); keep library chatter at WARNING unless debugging.
    if level != "DEBUG":
        for noisy in ("aiosqlite", "asyncio"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
