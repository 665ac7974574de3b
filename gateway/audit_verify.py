"""Verifying the audit trail: the keyed chain, its anchor, and the Markdown views.

Pure checks over files already read (plus the key and the database's anchor); the first bad
line of each file is named. What each check catches:

- a line's own ``mac`` (HMAC-SHA256 keyed with the audit key) fails: that line was edited,
  inserted, forged, or the whole file was re-chained without the key;
- a line's ``n`` is not its position: lines before it were deleted (``n`` too big) or it is a
  copy (``n`` too small); its ``prev`` is not the MAC of the line before: they were reordered;
- fewer lines than the anchor's count: the tail was cut (or the file deleted); more lines:
  the extra ones were never anchored; the anchored line's MAC is not the anchor's head: the
  file was rewritten by someone holding the key;
- a Markdown row that is not exactly the row of its event, or a missing or extra row.

What it cannot catch: someone holding the key *and* write access to the database can rewrite
both consistently (docs/operations.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from gateway.audit_chain import (
    ARCHIVE,
    FILES,
    GENESIS,
    JSONL,
    MONTH_DIR,
    SEGMENT_START,
    mac,
    md_header,
    md_row,
)

if TYPE_CHECKING:
    from gateway.audit_chain import Anchor

_MAC = b',"mac":"'


@dataclass(frozen=True, slots=True)
class ChainReport:
    ok: bool
    lines: int
    first_bad_line: int | None = None
    message: str = ""
    problems: tuple[str, ...] = field(default_factory=tuple)
    file: str = JSONL  # the segment ``first_bad_line`` is in (``archive/YYYY-MM/events.jsonl``)


def _line_problem(line: bytes, i: int, prev: str, key: bytes | None, before: int = 0
                  ) -> tuple[str | None, dict[str, Any] | None]:
    """The problem of line ``i`` of a segment that starts after event ``before``."""
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return f"line {i}: not valid JSON (edited or cut short)", None
    if not isinstance(record, dict):
        return f"line {i}: not a JSON object (edited)", None
    stated = record.get("mac")
    at = line.rfind(_MAC)
    if not isinstance(stated, str) or at < 0:
        return f"line {i}: has no MAC (forged, or re-chained without the audit key)", record
    if key is not None and not _equal(mac(key, line[:at] + b"}"), stated):
        return (f"line {i}: its MAC does not match its content (edited, forged, or the "
                "file re-chained without the audit key)"), record
    n, want = record.get("n"), before + i
    if n != want:
        if isinstance(n, int) and not isinstance(n, bool) and n > want:
            gone = f"event {want}" if n == want + 1 else f"events {want}..{n - 1}"
            return f"line {i}: is event {n}; {gone} deleted before it", record
        return f"line {i}: claims to be event {n!r} (a copied or inserted line)", record
    if record.get("prev") != prev:
        what = f"line {i - 1}" if i > 1 else "the previous segment's last line"
        return (f"line {i}: prev is not the MAC of {what} (lines deleted, inserted or "
                "reordered before it)"), record
    return None, record


def _equal(a: str, b: str) -> bool:
    import hmac

    return hmac.compare_digest(a.encode(), b.encode())


@dataclass
class _Segment:
    """One segment's lines as read: events, MACs, and its first problem."""

    label: str
    count: int = 0
    macs: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    first_bad: int | None = None
    problems: list[str] = field(default_factory=list)


def _read_segment(path: Path, label: str, key: bytes | None, before: int, prev: str
                  ) -> _Segment:
    seg = _Segment(label)
    content = path.read_bytes() if path.exists() else b""
    lines = content.split(b"\n") if content else []
    if lines and lines[-1] == b"":
        lines.pop()
    for i, line in enumerate(lines, start=1):
        problem, record = _line_problem(line, i, prev, key, before)
        if problem is not None and seg.first_bad is None:
            seg.first_bad = i
            seg.problems.append(f"{label} {problem}")
        if record is not None:
            seg.events.append(record)
        stated = record.get("mac") if record is not None else None
        prev = stated if isinstance(stated, str) else ""
        seg.macs.append(prev)
    seg.count = len(lines)
    return seg


def archived_segments(directory: Path) -> list[Path]:
    """``archive/YYYY-MM/events.jsonl`` under ``directory``, oldest first."""
    root = directory / ARCHIVE
    if not root.is_dir():
        return []
    return sorted(p / JSONL for p in root.iterdir()
                  if MONTH_DIR.fullmatch(p.name) and (p / JSONL).is_file())


def _verify_archives(directory: Path, key: bytes | None
                     ) -> tuple[int, str, tuple[str, int] | None, list[str]]:
    """The archived segments, oldest first: events, last MAC, first bad line, problems."""
    problems: list[str] = []
    first_bad: tuple[str, int] | None = None
    before, prev = 0, GENESIS
    for archived in archived_segments(directory):
        label = f"{ARCHIVE}/{archived.parent.name}/{JSONL}"
        seg = _read_segment(archived, label, key, before, prev)
        if seg.first_bad is not None and first_bad is None:
            first_bad = (label, seg.first_bad)
        problems.extend(seg.problems)
        problems.extend(f"{ARCHIVE}/{archived.parent.name}/{p}"
                        for p in _markdown_problems(archived.parent, seg.events))
        before += seg.count
        prev = seg.macs[-1] if seg.macs else prev
    return before, prev, first_bad, problems


def verify(path: Path, key: bytes | None = None, anchor: Anchor | None = None) -> ChainReport:
    """Check ``events.jsonl`` at ``path``, the archived segments beside it
    (``archive/YYYY-MM/events.jsonl``, oldest first: each continues the one before) and the
    Markdown files of every segment.

    Without ``key`` only the structure (numbers and ``prev`` links) is checked; without
    ``anchor`` truncation and forged appends at the end go unnoticed.
    """
    directory = path.parent
    before, prev, first_bad, problems = _verify_archives(directory, key)
    start = anchor.sizes.get(SEGMENT_START, 0) if anchor is not None else before
    if anchor is not None and first_bad is None and before != start:
        first_bad = (JSONL, 1)
        problems.append(f"the archived segments hold {before} events but the current segment "
                        f"starts after event {start} (an archived segment was deleted, cut "
                        "or added)")
    anchored = anchor.count - start if anchor is not None else 0
    if not path.exists():
        if anchored:
            problems.append(f"{path.name} is missing, but the database anchor records "
                            f"{anchored} events in it (deleted)")
            return _report(before, first_bad or (JSONL, 1), problems)
        if not problems:
            return ChainReport(True, before, message=f"{before} events, chain intact"
                               if before else f"{path} does not exist yet (no events)")
        return _report(before, first_bad, problems)
    seg = _read_segment(path, path.name, key, start, prev)
    current_bad = seg.first_bad
    problems.extend(seg.problems)
    count, macs = seg.count, seg.macs
    if current_bad is None and anchor is not None:
        if count < anchored:
            current_bad = count + 1
            gone = f"event {anchor.count}" if anchored == count + 1 else \
                f"events {start + count + 1}..{anchor.count}"
            problems.append(f"{path.name} has {count} events but the database anchor records "
                            f"{anchored}: {gone} deleted (truncated)")
        elif anchored and macs[anchored - 1] != anchor.head:
            current_bad = anchored
            problems.append(f"{path.name} line {anchored}: not the anchored last event (the "
                            "file was rewritten)")
        elif count > anchored:
            current_bad = anchored + 1
            problems.append(f"{path.name} line {anchored + 1}: not anchored in the database "
                            "(appended after the last written event)")
        elif not anchored and before and prev != anchor.head:
            current_bad = 1
            problems.append("the last archived event is not the anchored last event (an "
                            "archived segment was rewritten)")
    if first_bad is None and current_bad is not None:
        first_bad = (JSONL, current_bad)
    problems.extend(_markdown_problems(directory, seg.events))
    return _report(before + count, first_bad, problems)


def _report(count: int, first_bad: tuple[str, int] | None, problems: list[str]
            ) -> ChainReport:
    if not problems:
        return ChainReport(True, count, message=f"{count} events, chain intact")
    where, line = first_bad if first_bad is not None else (JSONL, None)
    return ChainReport(False, count, line, problems[0], tuple(problems), where)


def _markdown_problems(directory: Path, events: list[dict[str, Any]]) -> list[str]:
    """Every event has exactly its row in its kind's Markdown file, in order, and no more."""
    problems = []
    for kind, (filename, _title, _columns) in FILES.items():
        expected = [(e.get("n"), md_row(kind, e)) for e in events if e.get("kind") == kind]
        problem = _table_problem(directory / filename, kind, expected)
        if problem:
            problems.append(problem)
    return problems


def _table_problem(path: Path, kind: str, expected: list[tuple[Any, str]]) -> str | None:
    name = path.name
    if not path.exists():
        return f"{name} is missing ({len(expected)} events of kind {kind})" if expected else None
    text = path.read_bytes().decode("utf-8", "replace").splitlines(keepends=True)
    header = md_header(kind).splitlines(keepends=True)
    for j, want in enumerate(header):
        if j >= len(text) or text[j] != want:
            return f"{name} line {j + 1}: the table header was changed"
    rows = text[len(header):]
    first = len(header) + 1
    for j in range(max(len(rows), len(expected))):
        if j < len(rows) and j < len(expected) and rows[j] == expected[j][1]:
            continue
        line = first + j
        if j >= len(rows):
            return (f"{name}: the row of event {expected[j][0]} is missing after line "
                    f"{line - 1} (deleted)")
        if j >= len(expected):
            return f"{name} line {line}: a row without an event (added)"
        if j + 1 < len(expected) and rows[j] == expected[j + 1][1]:
            return f"{name} line {line}: the row of event {expected[j][0]} is missing (deleted)"
        if j + 1 < len(rows) and rows[j + 1] == expected[j][1]:
            return f"{name} line {line}: a row without an event (inserted)"
        return f"{name} line {line}: does not match event {expected[j][0]} (edited)"
    return None


def anchor_from(values: Mapping[str, Any]) -> Anchor:
    """An ``Anchor`` from a database row (``count``, ``head``, ``sizes`` JSON, ``key_id``)."""
    from gateway.audit_chain import Anchor

    return Anchor(int(values["count"]), str(values["head"]),
                  {str(k): int(v) for k, v in orjson.loads(values["sizes"] or "{}").items()},
                  str(values["key_id"] or ""))
