"""An append-only journal of pending ledger rows, so ``begin`` need not wait for a commit.

Why: a request must not reach the upstream unless its pending row survives a crash. A SQLite
commit on the request path costs a wait (for the group commit's loop pass or the writer
thread), and that wait was most of costwall's added latency. A ``write()`` that has returned
is in the kernel's page cache and survives the process being killed (``kill -9``, OOM, a
crash); only a power loss can drop it, and only ``synchronous=FULL`` promises more than that.
So with ``synchronous=NORMAL`` the ledger appends each pending row here (one JSON line, one
``os.write``), hands the insert to its background writer and lets the request go on.

The journal is a series of segment files ``<db>.journal.<seq>``. A segment is sealed after
``SEGMENT_ENTRIES`` lines and deleted once the writer has committed every row it holds (the
ledger reports each commit through ``committed``), so the journal stays small. Segments left
by a crashed process are read by the ledger's ``recover`` (``read`` tolerates a torn last
line: a ``write()`` cut short by the crash) and then deleted.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("costwall.ledger")

SEGMENT_ENTRIES = 4096  # lines per segment before a new one is started
_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


class Journal:
    """The segments of one ledger file. Used from the event loop only (no locking)."""

    def __init__(self, db_path: Path, segment_entries: int | None = None):
        self._dir = db_path.parent
        self._prefix = f"{db_path.name}.journal."
        self._segment_entries = segment_entries or SEGMENT_ENTRIES
        self._fd: int | None = None
        self._seq = 0  # the open segment's number (valid while _fd is set)
        self._lines = 0  # lines in the open segment
        self._outstanding: dict[int, int] = {}  # this instance's segments: uncommitted lines
        self._kept: set[int] = set()  # segments with a row the writer failed to commit

    # -- segments on disk ---------------------------------------------------------------------
    def path(self, seq: int) -> Path:
        return self._dir / f"{self._prefix}{seq}"

    def segments(self) -> dict[int, Path]:
        """Every segment file of this ledger on disk, by number."""
        found: dict[int, Path] = {}
        if not self._dir.is_dir():
            return found
        for p in self._dir.iterdir():
            suffix = p.name.removeprefix(self._prefix)
            if suffix != p.name and suffix.isdigit():
                found[int(suffix)] = p
        return found

    def leftovers(self) -> list[Path]:
        """Segments not written by this instance (a previous process's), oldest first."""
        return [p for seq, p in sorted(self.segments().items()) if seq not in self._outstanding]

    @staticmethod
    def read(path: Path) -> list[list[Any]]:
        """The rows of a segment; a torn or unreadable line (a crash mid-write) is skipped."""
        rows: list[list[Any]] = []
        bad = 0
        for line in path.read_bytes().split(b"\n"):
            if not line:
                continue
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError:
                bad += 1
                continue
            if isinstance(row, list):
                rows.append(row)
            else:
                bad += 1
        if bad:
            log.warning("ledger journal %s: skipped %d torn line(s)", path.name, bad)
        return rows

    # -- appending ----------------------------------------------------------------------------
    def append(self, row: tuple[Any, ...]) -> int:
        """Write one row (durable against a process crash once this returns); its segment."""
        if self._fd is None:
            self._open()
        data = orjson.dumps(row) + b"\n"
        fd, seq = self._fd, self._seq
        assert fd is not None
        written = os.write(fd, data)
        while written < len(data):  # a regular file only writes short when the disk is full
            more = os.write(fd, data[written:])
            if more == 0:
                raise OSError("ledger journal: write made no progress")
            written += more
        self._outstanding[seq] += 1
        self._lines += 1
        if self._lines >= self._segment_entries:
            self._seal()
        return seq

    def _open(self) -> None:
        seq = max(self.segments(), default=0) + 1
        while True:
            try:
                self._fd = os.open(self.path(seq), _FLAGS, 0o600)
                break
            except FileExistsError:
                seq += 1
        self._seq, self._lines = seq, 0
        self._outstanding[seq] = 0

    def _seal(self) -> None:
        """Stop appending to the open segment; delete it at once if nothing is outstanding."""
        if self._fd is None:
            return
        os.close(self._fd)
        self._fd = None
        self._maybe_delete(self._seq)

    # -- the writer's reports -----------------------------------------------------------------
    def committed(self, seq: int) -> None:
        """One row of segment ``seq`` is committed to the database."""
        self._outstanding[seq] -= 1
        if self._outstanding[seq] == 0 and not (self._fd is not None and seq == self._seq):
            self._maybe_delete(seq)

    def keep(self, seq: int) -> None:
        """A row of ``seq`` could not be committed: the segment stays for the next recovery."""
        self._kept.add(seq)

    def _maybe_delete(self, seq: int) -> None:
        if self._outstanding.get(seq) or seq in self._kept:
            return
        self._outstanding.pop(seq, None)
        try:
            self.path(seq).unlink(missing_ok=True)
        except OSError as exc:  # harmless: recovery skips rows that are already stored
            log.warning("cannot delete ledger journal %s: %s", self.path(seq).name, exc)

    def settle_all(self) -> None:
        """Everything appended so far is committed (after a flush): close and delete."""
        self._seal()
        for seq in list(self._outstanding):
            self._maybe_delete(seq)

    @property
    def pending(self) -> int:
        """Rows appended but not yet committed (tests and health)."""
        return sum(self._outstanding.values())
