"""The audit chain's format: event kinds and their files, stored rows, the anchor, the MAC.

Pure (no files, no asyncio): ``gateway.audit`` writes lines in this format and
``gateway.audit_verify`` checks them; both import it from here, so neither imports the other.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

GENESIS = "0" * 64
JSONL = "events.jsonl"
EXECUTION_COLUMNS = ("time", "request_id", "tenant", "agent", "campaign", "task", "model",
                     "estimate_usd", "scope", "limit_usd", "spent_usd", "reason")
ADMIN_COLUMNS = ("time", "actor", "action", "target", "detail", "reason")
# Monthly rotation: at a month's start (in the budget time zone) the files move to
# archive/YYYY-MM/ and a new segment begins; its first line continues the chain (``n`` and
# ``prev`` carry on). The anchor's ``sizes`` also keeps, beside the current segment's file
# sizes, how many events came before it (SEGMENT_START) and its month (SEGMENT_MONTH, YYYYMM).
ARCHIVE = "archive"
MONTH_DIR = re.compile(r"[0-9]{4}-(0[1-9]|1[0-2])")
SEGMENT_START = "@start"
SEGMENT_MONTH = "@month"
FILES = {
    "blocked": ("blocked-executions.md", "Blocked executions", EXECUTION_COLUMNS),
    "override": ("override-executions.md", "Override executions", EXECUTION_COLUMNS),
    "admin": ("admin-actions.md", "Admin actions", ADMIN_COLUMNS),
    "warning": ("budget-warnings.md", "Budget warnings",
                ("time", "scope", "id", "period", "threshold", "limit_usd", "spent_usd")),
    # A request charged more than its reserved upper bound (the upstream billed past it).
    "overshoot": ("overshoot-executions.md", "Overshoot executions",
                  ("time", "request_id", "tenant", "agent", "campaign", "task", "model",
                   "usage_source", "reserved_usd", "cost_usd", "overshoot_usd", "scope")),
}

# Fields an event's JSON line carries beyond its Markdown columns (the tables keep their
# shape; the window is also named in the reason).
JSON_EXTRA = {"blocked": ("window", "period"), "warning": ("window",)}


def md_cell(value: Any) -> str:
    """Escape a value so it stays one Markdown table cell and renders as text, not HTML."""
    text = "" if value is None else str(value)
    text = (text.replace("\\", "\\\\").replace("|", "\\|").replace("&", "&amp;")
            .replace("<", "&lt;").replace(">", "&gt;").replace("`", "\\`"))
    text = " ".join(text.split())  # newlines and tabs would end the row
    return text[:300]


def _text(value: Any) -> Any:
    """Strings as valid UTF-8: a lone surrogate (from bytes that were not UTF-8) becomes
    ``?`` instead of failing the JSON encoder, so recording an event never fails a request."""
    if isinstance(value, str) and not value.isascii():
        return value.encode("utf-8", "replace").decode("utf-8")
    return value


# -- what is stored and how it is rendered (pure) ----------------------------------------------
@dataclass(frozen=True, slots=True)
class AuditRow:
    """One event as stored in ``audit_events``: ``data`` is the JSON of time + columns."""

    kind: str
    ts: str
    data: str


@dataclass(frozen=True, slots=True)
class PendingEvent:
    """A stored event not yet in the files."""

    seq: int
    kind: str
    data: str


@dataclass(slots=True)
class Anchor:
    """The chain's head as the database knows it: what the files must contain."""

    count: int = 0
    head: str = GENESIS
    sizes: dict[str, int] = field(default_factory=dict)
    key_id: str = ""

    def sizes_json(self) -> str:
        return orjson.dumps(self.sizes, option=orjson.OPT_SORT_KEYS).decode()


def key_id(key: bytes) -> str:
    """A short fingerprint of the audit key, stored with the anchor (never the key)."""
    return hmac.new(key, b"costwall audit key id", hashlib.sha256).hexdigest()[:16]


def mac(key: bytes, body: bytes) -> str:
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def render_line(key: bytes, n: int, seq: int, kind: str, data: Mapping[str, Any],
                prev: str) -> tuple[bytes, str]:
    """One JSON line (without newline) and its MAC, which the next line's ``prev`` carries."""
    body = orjson.dumps({"n": n, "seq": seq, "kind": kind, **data, "prev": prev})
    line_mac = mac(key, body)
    return body[:-1] + b',"mac":"' + line_mac.encode() + b'"}', line_mac


def md_header(kind: str) -> str:
    _, title, columns = FILES[kind]
    return f"# {title}\n\n| {' | '.join(columns)} |\n|{'---|' * len(columns)}\n"


def md_row(kind: str, data: Mapping[str, Any]) -> str:
    columns = FILES[kind][2]
    return "| " + " | ".join(md_cell(data.get(c)) for c in columns) + " |\n"


def render_batch(key: bytes, anchor: Anchor, events: list[PendingEvent]
                 ) -> tuple[dict[str, bytes], Anchor, list[tuple[int, int]]]:
    """The bytes to append to each file, the anchor after them, and (seq, line) pairs."""
    lines: list[bytes] = []
    md: dict[str, list[str]] = {}
    prev, n, written = anchor.head, anchor.count, []
    for event in events:
        n += 1
        data = orjson.loads(event.data)
        line, prev = render_line(key, n, event.seq, event.kind, data, prev)
        lines.append(line + b"\n")
        written.append((event.seq, n))
        if event.kind in FILES:
            filename = FILES[event.kind][0]
            rows = md.setdefault(filename, [])
            if not rows and not anchor.sizes.get(filename):
                rows.append(md_header(event.kind))
            rows.append(md_row(event.kind, data))
    out = {JSONL: b"".join(lines)}
    out.update({name: "".join(rows).encode() for name, rows in md.items()})
    sizes = dict(anchor.sizes)
    for name, blob in out.items():
        sizes[name] = sizes.get(name, 0) + len(blob)
    return out, Anchor(n, prev, sizes, key_id(key)), written


