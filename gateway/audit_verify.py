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

from gateway.audit_chain import FILES, GENESIS, mac, md_header, md_row

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


def _line_problem(line: bytes, i: int, prev: str, key: bytes | None
                  ) -> tuple[str | None, dict[str, Any] | None]:
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
    n = record.get("n")
    if n != i:
        if isinstance(n, int) and not isinstance(n, bool) and n > i:
            gone = f"event {i}" if n == i + 1 else f"events {i}..{n - 1}"
            return f"line {i}: is event {n}; {gone} deleted before it", record
        return f"line {i}: claims to be event {n!r} (a copied or inserted line)", record
    if record.get("prev") != prev:
        return (f"line {i}: prev is not the MAC of line {i - 1} (lines deleted, inserted or "
                "reordered before it)"), record
    return None, record


def _equal(a: str, b: str) -> bool:
    import hmac

    return hmac.compare_digest(a.encode(), b.encode())


def verify(path: Path, key: bytes | None = None, anchor: Anchor | None = None) -> ChainReport:
    """Check ``events.jsonl`` at ``path`` and the Markdown files beside it.

    Without ``key`` only the structure (numbers and ``prev`` links) is checked; without
    ``anchor`` truncation and forged appends at the end go unnoticed.
    """
    problems: list[str] = []
    first_bad: int | None = None
    events: list[dict[str, Any]] = []
    anchored = anchor.count if anchor is not None else 0
    if not path.exists():
        if anchored:
            return _report(0, 1, [f"{path.name} is missing, but the database anchor records "
                                  f"{anchored} events (deleted)"])
        return ChainReport(True, 0, message=f"{path} does not exist yet (no events)")
    content = path.read_bytes()
    lines = content.split(b"\n") if content else []
    if lines and lines[-1] == b"":
        lines.pop()
    prev, macs = GENESIS, []
    for i, line in enumerate(lines, start=1):
        problem, record = _line_problem(line, i, prev, key)
        if problem is not None and first_bad is None:
            first_bad = i
            problems.append(f"{path.name} {problem}")
        if record is not None:
            events.append(record)
        stated = record.get("mac") if record is not None else None
        prev = stated if isinstance(stated, str) else ""
        macs.append(prev)
    count = len(lines)
    if first_bad is None and anchor is not None:
        if count < anchored:
            first_bad = count + 1
            gone = f"event {anchored}" if anchored == count + 1 else \
                f"events {count + 1}..{anchored}"
            problems.append(f"{path.name} has {count} events but the database anchor records "
                            f"{anchored}: {gone} deleted (truncated)")
        elif anchored and macs[anchored - 1] != anchor.head:
            first_bad = anchored
            problems.append(f"{path.name} line {anchored}: not the anchored last event (the "
                            "file was rewritten)")
        elif count > anchored:
            first_bad = anchored + 1
            problems.append(f"{path.name} line {anchored + 1}: not anchored in the database "
                            "(appended after the last written event)")
    problems.extend(_markdown_problems(path.parent, events))
    return _report(count, first_bad, problems)


def _report(count: int, first_bad: int | None, problems: list[str]) -> ChainReport:
    if not problems:
        return ChainReport(True, count, message=f"{count} events, chain intact")
    return ChainReport(False, count, first_bad, problems[0], tuple(problems))


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
