"""The append-only audit trail: Markdown tables people read, JSON Lines machines verify.

Every event goes to ``logs/budget/events.jsonl``; each line carries the SHA-256 of the line
before it, so editing or deleting a line breaks the chain at a place ``verify_chain`` names.
The Markdown files are the familiar view of the same events. Nothing here ever holds a
prompt, a completion or a key: callers pass attribution and money only.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

GENESIS = "0" * 64
EXECUTION_COLUMNS = ("time", "request_id", "tenant", "agent", "campaign", "task", "model",
                     "estimate_usd", "scope", "limit_usd", "spent_usd", "reason")
ADMIN_COLUMNS = ("time", "actor", "action", "target", "detail", "reason")
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


def _line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


@dataclass(frozen=True, slots=True)
class ChainReport:
    ok: bool
    lines: int
    first_bad_line: int | None = None
    message: str = ""


def verify_chain(path: Path) -> ChainReport:
    """Check every line's ``prev`` against the hash of the line before it."""
    if not path.exists():
        return ChainReport(True, 0, message=f"{path} does not exist yet (no events)")
    prev = GENESIS
    count = 0
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, start=1):
            count = number
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                return ChainReport(False, number, number, f"line {number} is not valid JSON")
            if not isinstance(record, dict) or record.get("prev") != prev:
                return ChainReport(
                    False, number, number,
                    f"line {number}: hash chain broken (the line or the one before it was "
                    "edited, inserted or deleted)",
                )
            prev = _line_hash(line)
    return ChainReport(True, count, message=f"{count} events, chain intact")


class AuditTrail:
    """Appends audit events; safe to call from the event loop (small buffered appends)."""

    def __init__(self, logs_dir: Path, clock: Any = None):
        self.dir = Path(logs_dir) / "budget"
        self.jsonl = self.dir / "events.jsonl"
        self._clock = clock or (lambda: datetime.now(UTC))
        self._lock = threading.Lock()
        self._prev: str | None = None

    def _last_hash(self) -> str:
        if not self.jsonl.exists() or self.jsonl.stat().st_size == 0:
            return GENESIS
        with open(self.jsonl, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 65536))
            last = fh.read().rstrip(b"\n").rsplit(b"\n", 1)[-1]
        return _line_hash(last)

    def record(self, kind: str, fields: Mapping[str, Any]) -> None:
        """Append one event of ``kind`` (blocked, override, admin, warning) to both views."""
        filename, title, columns = FILES[kind]
        now = self._clock().astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        row = {"time": now, **{c: _text(fields.get(c)) for c in columns if c != "time"}}
        with self._lock:
            self.dir.mkdir(parents=True, exist_ok=True)
            if self._prev is None:
                self._prev = self._last_hash()
            line = orjson.dumps({"kind": kind, **row, "prev": self._prev})
            with open(self.jsonl, "ab") as fh:
                fh.write(line + b"\n")
            self._prev = _line_hash(line)
            md = self.dir / filename
            new = not md.exists()
            with open(md, "a", encoding="utf-8") as fh:
                if new:
                    fh.write(f"# {title}\n\n| {' | '.join(columns)} |\n")
                    fh.write(f"|{'---|' * len(columns)}\n")
                fh.write("| " + " | ".join(md_cell(row.get(c)) for c in columns) + " |\n")

    def events(self, kind: str | None = None) -> Iterator[dict[str, Any]]:
        """Every recorded event (optionally of one kind), oldest first."""
        if not self.jsonl.exists():
            return
        with open(self.jsonl, "rb") as fh:
            for line in fh:
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if kind is None or record.get("kind") == kind:
                    yield record
