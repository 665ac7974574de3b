"""The audit trail's files: appending at the anchored sizes, monthly rotation, moving aside.

Plain file operations for ``gateway.audit``'s writer (which runs them in a thread): every
append starts where the database anchor says the file ends, so a crash between writing and
anchoring is cut back and rewritten, never duplicated; a file that does not end there is
reported (``AuditTampered``) instead of extended.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from gateway.audit_chain import (
    ARCHIVE,
    FILES,
    JSONL,
    SEGMENT_MONTH,
    Anchor,
    PendingEvent,
)

log = logging.getLogger("costwall.audit")


class AuditTampered(Exception):
    """The files do not end where the anchor says: the writer stops rather than fork."""


def append_files(directory: Path, anchor: Anchor, blobs: Mapping[str, bytes]) -> None:
    """Append each blob at its file's anchored end (blocking I/O: run in a thread).

    Bytes past the anchored end that are the start of this very blob were written by an
    attempt whose anchor update never landed (a crash, a database error): they are cut and
    written again. Anything else there, or a file shorter than anchored, is tampering.
    A file the anchor knows nothing about (an unkeyed trail from before the chain was keyed,
    or a database started afresh) is moved aside to ``<name>.before-<time>``, not extended.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for name, blob in blobs.items():
        if not blob:
            continue
        path = directory / name
        at = anchor.sizes.get(name, 0)
        flags = os.O_RDWR | (os.O_CREAT if at == 0 else 0)
        try:
            fd = os.open(path, flags, 0o644)
        except FileNotFoundError:
            raise AuditTampered(f"{name} is missing; the anchor records {at} bytes") from None
        try:
            size = os.fstat(fd).st_size
            if size < at:
                raise AuditTampered(f"{name} has {size} bytes; the anchor records {at}")
            if size > at:
                extra = os.pread(fd, size - at, at)
                if at == 0 and not blob.startswith(extra):
                    _move_aside(path)
                    os.close(fd)
                    fd = -1
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                    extra = b""
                if not blob.startswith(extra):
                    raise AuditTampered(f"{name} has {size - at} unexpected bytes after its "
                                        "anchored end")
                os.ftruncate(fd, at)
            os.pwrite(fd, blob, at)
            os.fsync(fd)
        finally:
            if fd >= 0:
                os.close(fd)


def _move_aside(path: Path) -> None:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    os.replace(path, path.with_name(f"{path.name}.before-{stamp}"))
    log.warning("audit file %s was not written by this trail: moved aside to %s.before-%s",
                path.name, path.name, stamp)


def segment_month(anchor: Anchor) -> str | None:
    """The month (``YYYY-MM``) of the current segment, if the anchor records it."""
    value = anchor.sizes.get(SEGMENT_MONTH)
    return f"{value // 100:04d}-{value % 100:02d}" if value else None


def files_of(anchor: Anchor) -> list[str]:
    """The current segment's files that hold bytes."""
    return [name for name, size in anchor.sizes.items() if not name.startswith("@") and size]


def month_of(stamp: str, tz: ZoneInfo) -> str:
    """``YYYY-MM`` of an event's ``time`` (ISO 8601 UTC) in ``tz``."""
    moment = datetime.fromisoformat(stamp.replace("Z", "+00:00")).astimezone(tz)
    return f"{moment.year:04d}-{moment.month:02d}"


def first_month(path: Path, tz: ZoneInfo) -> str | None:
    """The month of the first event in ``path`` (a segment written before rotation
    existed records no month in the anchor)."""
    try:
        with open(path, "rb") as fh:
            return month_of(str(orjson.loads(fh.readline())["time"]), tz)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def rotate_files(directory: Path, month: str, names: list[str]) -> None:
    """Move the current segment's files into ``archive/<month>/`` (blocking: run in a
    thread). Safe to repeat after a crash: files already moved are skipped; a file present
    on both sides is not overwritten."""
    target = directory / ARCHIVE / month
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        src, dst = directory / name, target / name
        if not src.exists():
            if dst.exists():
                continue  # moved by an attempt whose anchor update never landed
            raise AuditTampered(f"{name} is missing; the anchor records bytes in it")
        if dst.exists():
            raise AuditTampered(f"{ARCHIVE}/{month}/{name} already exists; not overwritten")
        os.replace(src, dst)
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move_aside_unanchored(directory: Path) -> None:
    """With an empty anchor, audit files already there (an unkeyed trail from before the
    chain was keyed, or a database started afresh) belong to no chain: keep them aside."""
    for name in (JSONL, *(f[0] for f in FILES.values())):
        path = directory / name
        if path.is_file() and path.stat().st_size:
            _move_aside(path)


def period_now(clock: Any, tz: ZoneInfo) -> str:
    moment = clock().astimezone(tz)
    return f"{moment.year:04d}-{moment.month:02d}"


def _until_later(events: list[PendingEvent], month: str, tz: ZoneInfo) -> list[PendingEvent]:
    """The leading events that are not of a month after ``month``."""
    out = []
    for event in events:
        if month_of(orjson.loads(event.data)["time"], tz) > month:
            break
        out.append(event)
    return out
