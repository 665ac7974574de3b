"""Which backend a ``database`` URL names: the one place that decides SQLite vs PostgreSQL.

Imports nothing of the package, so every module that must know (the store factory, the audit
state reader, the start-up checks) can ask it without an import cycle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

Backend = Literal["sqlite", "postgresql"]
_SCHEMES: dict[str, Backend] = {"sqlite:///": "sqlite", "postgresql://": "postgresql",
                                "postgres://": "postgresql"}


def backend_of(url: str) -> Backend:
    """Which backend serves a ``database`` URL.

    >>> backend_of("sqlite:///data/costwall.db"), backend_of("postgres://db/costwall")
    ('sqlite', 'postgresql')
    """
    for scheme, backend in _SCHEMES.items():
        if url.startswith(scheme):
            return backend
    raise ValueError(f"unsupported database URL {url!r}")


def sqlite_path(url: str) -> Path:
    """The file of a ``sqlite:///PATH`` URL."""
    return Path(url.removeprefix("sqlite:///"))
