"""The append-only audit trail: Markdown tables people read, JSON Lines machines verify.

An event is first a row in the ledger database (``audit_events``), queued on the request
path without waiting and without touching the file system, or committed in the same
transaction as the admin change it describes. A background task (``AuditTrail``'s writer)
then appends the database's unwritten events, in order, to ``logs/budget/events.jsonl`` and
the Markdown tables, and advances the chain's *anchor* in the database (line count, last MAC,
file sizes). While the directory cannot be written the events wait in the database and the
writer retries with backoff, so a broken audit directory never changes a request's answer.

Each JSON line carries its number ``n``, ``prev`` (the previous line's MAC) and ``mac``, an
HMAC-SHA256 of the line itself keyed with the audit key (``gateway.audit_store``): an edited,
inserted or forged line fails its own MAC and is named exactly; a deleted line breaks ``n``
and ``prev`` where the gap is; truncation, tail edits and deletion of the file disagree with
the anchor. ``gateway.audit_verify`` does the checking. Nothing here ever holds a prompt, a
completion or a key: callers pass attribution and money only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import orjson

from gateway.audit_chain import (  # the chain's format (GENESIS re-exported for callers)
    ARCHIVE,
    FILES,
    GENESIS,
    JSON_EXTRA,
    JSONL,
    SEGMENT_MONTH,
    SEGMENT_START,
    Anchor,
    AuditRow,
    PendingEvent,
    _text,
    key_id,
    render_batch,
)
from gateway.audit_files import (  # re-exported: tests and tools use them from here
    AuditTampered,
    _until_later,
    append_files,
    files_of,
    first_month,
    month_of,
    move_aside_unanchored,
    period_now,
    rotate_files,
    segment_month,
)
from gateway.audit_verify import ChainReport, verify

__all__ = ["GENESIS", "Anchor", "AuditRow", "AuditStore", "AuditTampered", "AuditTrail",
           "PendingEvent", "month_of", "rotate_files", "verify_chain"]

log = logging.getLogger("costwall.audit")

BATCH = 500  # events appended per writer step
RETRY_MAX_S = 30.0  # backoff ceiling while the directory cannot be written
POLL_S = 1.0  # how often the writer looks for events other replicas stored


def verify_chain(path: Path, key: bytes | None = None, anchor: Anchor | None = None
                 ) -> ChainReport:
    """Check an ``events.jsonl`` (and the Markdown files beside it); see ``audit_verify``."""
    return verify(path, key, anchor)


class AuditStore(Protocol):
    """What the trail needs from the ledger (both backends implement it)."""

    def audit(self, row: AuditRow) -> None: ...

    async def audit_secret(self) -> bytes: ...

    async def audit_lock(self) -> bool: ...

    async def audit_pending(self, limit: int) -> tuple[Anchor, list[PendingEvent]]: ...

    async def audit_advance(self, old: Anchor, new: Anchor,
                            written: list[tuple[int, int]]) -> None: ...

    async def audit_backlog(self) -> int: ...

    async def flush(self) -> None: ...


def _now(clock: Callable[[], datetime]) -> str:
    return clock().astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class AuditTrail:
    """Records audit events (never raising, never waiting on files) and writes them out.

    Without a store (``AuditTrail(dir)``, used by tools and tests) events are appended at once
    with an in-memory anchor and ``key`` (or a random one).
    """

    def __init__(self, logs_dir: Path, clock: Any = None, store: AuditStore | None = None,
                 key: bytes | None = None, tz: ZoneInfo | None = None):
        self.dir = Path(logs_dir) / "budget"
        self.jsonl = self.dir / JSONL
        self._clock = clock or (lambda: datetime.now(UTC))
        self.store = store
        self.key = key
        self.error: str | None = None  # why the files lag behind, while they do
        self._lock = threading.Lock()
        self._local = Anchor()
        self._wake: asyncio.Event | None = None
        self._drained: asyncio.Event | None = None
        self._kick: asyncio.Event | None = None  # ``flush``: retry now, not after the backoff
        self._task: asyncio.Task[None] | None = None
        self._adopted = False  # files from before the anchor have been moved aside
        self.tz = tz or ZoneInfo("UTC")  # months for rotation, as the budgets count them

    # -- recording (the request path) ---------------------------------------------------------
    def row(self, kind: str, fields: Mapping[str, Any]) -> AuditRow:
        """The stored form of an event (for admin changes that commit it themselves)."""
        columns = (*FILES[kind][2], *JSON_EXTRA.get(kind, ()))
        now = _now(self._clock)
        data = {"time": now, **{c: _text(fields.get(c)) for c in columns if c != "time"}}
        return AuditRow(kind, now, orjson.dumps(data).decode())

    def record(self, kind: str, fields: Mapping[str, Any]) -> None:
        """Queue one event of ``kind`` (blocked, override, admin, warning); never raises."""
        try:
            row = self.row(kind, fields)
            if self.store is None:
                self._write_now(row)
                return
            self.store.audit(row)
            self.wake()
        except Exception:
            log.exception("audit event %s could not be queued", kind)

    def wake(self) -> None:
        """Tell the writer there is something to write (after a committed admin change)."""
        if self._wake is not None:
            self._wake.set()

    def _write_now(self, row: AuditRow) -> None:
        with self._lock:
            if self.key is None:
                self.key = secrets.token_bytes(32)
            event = PendingEvent(self._local.count + 1, row.kind, row.data)
            blobs, anchor, _ = render_batch(self.key, self._local, [event])
            append_files(self.dir, self._local, blobs)
            self._local = anchor

    # -- the writer ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the key and start writing the stored backlog (call once the store is open)."""
        assert self.store is not None
        if self.key is None:
            env = os.environ.get("COSTWALL_AUDIT_KEY", "")
            self.key = env.encode() if env else await self.store.audit_secret()
        self._wake, self._drained, self._kick = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self._wake.set()
        self._task = asyncio.create_task(self._run(), name="costwall-audit-writer")

    async def close(self, timeout: float = 5.0) -> None:
        """Write what can still be written, then stop (what is left stays in the database)."""
        if self._task is None:
            return
        await self.flush(timeout)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every stored event is in the files; False if the writer is failing or
        ``timeout`` passed (the events then stay queued; nothing is lost)."""
        if self.store is None or self._drained is None:
            return True
        try:
            return await asyncio.wait_for(self._flush(), timeout)
        except TimeoutError:
            return False

    async def _flush(self) -> bool:
        assert self.store is not None and self._drained is not None
        await self.store.flush()
        while True:
            self._drained.clear()
            self.wake()
            if self._kick is not None:
                self._kick.set()
            await self._drained.wait()
            if self.error is not None:
                return False
            if await self.store.audit_backlog() == 0:
                return True
            await asyncio.sleep(0.05)  # another replica may be the one writing them

    async def _run(self) -> None:
        assert self._wake is not None and self._drained is not None and self._kick is not None
        delay = 0.05
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_S)
            self._wake.clear()
            try:
                while await self._step():
                    pass
                if self.error is not None:
                    log.warning("audit files written again (backlog caught up)")
                self.error, delay = None, 0.05
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the files or the database: keep the events, retry
                message = f"{type(exc).__name__}: {exc}"
                if message != self.error:
                    log.error("audit files cannot be written (events stay queued in the "
                              "database, retrying): %s", message)
                self.error = message
                self._drained.set()
                self._kick.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._kick.wait(), delay)
                delay = min(delay * 2, RETRY_MAX_S)
                self._wake.set()
                continue
            self._drained.set()

    async def _step(self) -> bool:
        """Append one batch; True if there may be more."""
        assert self.store is not None and self.key is not None
        if not await self.store.audit_lock():
            return False  # another replica writes the files (PostgreSQL)
        anchor, events = await self.store.audit_pending(BATCH)
        if not self._adopted:
            self._adopted = True
            if not anchor.count and not anchor.sizes:
                await asyncio.to_thread(move_aside_unanchored, self.dir)
        if anchor.count and anchor.key_id and anchor.key_id != key_id(self.key):
            raise AuditTampered("the audit key differs from the one the trail was written "
                                "with (COSTWALL_AUDIT_KEY changed?)")
        month = segment_month(anchor)
        if month is None and files_of(anchor):  # written before rotation existed
            month = await asyncio.to_thread(first_month, self.jsonl, self.tz)
        next_month = (month_of(orjson.loads(events[0].data)["time"], self.tz) if events
                      else period_now(self._clock, self.tz))
        if month is not None and files_of(anchor) and next_month > month:
            await self._rotate(anchor, month, next_month)
            return True
        if not events:
            return False
        month = month or next_month
        # One segment per month: events of a later month wait for the rotation.
        events = _until_later(events, month, self.tz)
        anchor = Anchor(anchor.count, anchor.head,
                        {**anchor.sizes, SEGMENT_MONTH: int(month.replace("-", ""))},
                        anchor.key_id)
        blobs, new, written = render_batch(self.key, anchor, events)
        await asyncio.to_thread(append_files, self.dir, anchor, blobs)
        await self.store.audit_advance(anchor, new, written)
        return True

    async def _rotate(self, anchor: Anchor, month: str, next_month: str) -> None:
        """Archive the current segment (month ``month``) and start an empty one for
        ``next_month`` that continues the chain: same count and head, no file sizes.

        The new segment is of ``next_month`` from the start: an event stamped in the archived
        month that reaches the queue only now (recorded just before midnight, or under a clock
        stepped back) joins it, instead of giving it the archived month and a second archive
        of that month."""
        assert self.store is not None
        await asyncio.to_thread(rotate_files, self.dir, month, [JSONL, *files_of(anchor)])
        new = Anchor(anchor.count, anchor.head,
                     {SEGMENT_START: anchor.count,
                      SEGMENT_MONTH: int(next_month.replace("-", ""))}, anchor.key_id)
        await self.store.audit_advance(anchor, new, [])
        log.info("audit trail: %s archived to %s/%s/ (%d events so far)", month, ARCHIVE,
                 month, anchor.count)

    async def status(self) -> dict[str, Any]:
        """For ``/readyz``: events not yet in the files and why, if the writer is failing."""
        backlog = await self.store.audit_backlog() if self.store is not None else 0
        state = "error" if self.error else ("pending" if backlog else "ok")
        out: dict[str, Any] = {"audit": state, "audit_backlog": backlog}
        if self.error:
            out["audit_error"] = self.error
        return out

    async def verify(self) -> ChainReport:
        """Check the files against the key and the database's anchor (tests, tools)."""
        assert self.store is not None and self.key is not None
        anchor, _ = await self.store.audit_pending(0)
        return await asyncio.to_thread(verify_chain, self.jsonl, self.key, anchor)

    # -- reading ------------------------------------------------------------------------------
    def events(self, kind: str | None = None) -> Iterator[dict[str, Any]]:
        """Every event written to the files (optionally of one kind), oldest first: the
        archived months' segments, then the current one."""
        from gateway.audit_verify import archived_segments

        for path in [*archived_segments(self.dir), self.jsonl]:
            if not path.exists():
                continue
            with open(path, "rb") as fh:
                for line in fh:
                    try:
                        record = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        continue
                    if kind is None or record.get("kind") == kind:
                        yield record
