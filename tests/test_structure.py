"""The shape of the code: the pure core imports no network, database or web library.

Read from the source with ``ast`` (nothing is imported), following every import of a
project module transitively, lazy imports inside functions included (they run too), and
leaving out only ``if TYPE_CHECKING:`` blocks, which never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("gateway", "admin")

# The pure core: arithmetic on money, prices, token counts, estimates, usage, headers and
# budgets, the bounds of what the gateway cannot count, errors, admin number formatting and
# charts. Reading a bundled data file (prices, tiktoken ranks) is allowed; talking to a
# network, a database or a web framework is not: that belongs at the edges.
PURE_MODULES = (
    "gateway.money", "gateway.pricing", "gateway.tokens", "gateway.estimate", "gateway.usage",
    "gateway.headers", "gateway.budget", "gateway.budget_rules", "gateway.bounds",
    "gateway.errors", "gateway.endpoints", "gateway.settlement", "gateway.forecast",
    "gateway.messages", "gateway.providers", "gateway.routing", "gateway.ratelimit",
    "admin.fmt", "admin.charts", "admin.errors",
)
# Network, database, web and process libraries (a module or any submodule of it).
IO_LIBRARIES = frozenset({
    "aiohttp", "aiohttp_jinja2", "aiosqlite", "asyncpg", "sqlite3", "socket", "ssl",
    "selectors", "socketserver", "subprocess", "multiprocessing", "http", "urllib.request",
    "ftplib", "smtplib", "imaplib", "poplib", "xmlrpc", "wsgiref", "webbrowser", "requests",
    "httpx", "uvloop", "prometheus_client", "xhtml2pdf", "jinja2", "asyncio.subprocess",
    "asyncio.streams",
})


def _source(module: str, root: Path) -> Path | None:
    """The file of a project module (``a.b`` → ``a/b.py`` or ``a/b/__init__.py``)."""
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(module: str, path: Path, root: Path) -> set[str]:
    """Every module ``module`` may import when it runs (``TYPE_CHECKING`` blocks left out)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            found.add(name)
            # ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one
            found.update(f"{name}.{alias.name}" for alias in node.names
                         if _source(f"{name}.{alias.name}", root) is not None)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return found


def _is_io(name: str) -> bool:
    parts = name.split(".")
    return any(".".join(parts[:i]) in IO_LIBRARIES for i in range(1, len(parts) + 1))


def io_import_chains(start: str, root: Path = ROOT,
                     project: tuple[str, ...] = PROJECT) -> list[list[str]]:
    """Each I/O library reachable from ``start``, with the chain of imports that reaches it."""
    chains: list[list[str]] = []
    seen = {start}
    queue = [[start]]
    while queue:
        chain = queue.pop(0)
        path = _source(chain[-1], root)
        if path is None:
            continue
        for name in sorted(_imported(chain[-1], path, root)):
            if _is_io(name):
                chains.append([*chain, name])
                continue
            if name.split(".")[0] not in project:
                continue
            # importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` first
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                step = ".".join(parts[:i])
                if step not in seen and _source(step, root) is not None:
                    seen.add(step)
                    queue.append([*chain, step])
    return chains


def test_pure_modules_import_no_io() -> None:
    missing = [m for m in PURE_MODULES if _source(m, ROOT) is None]
    assert not missing, f"listed as pure but not found (moved? update the list): {missing}"
    problems = {m: [" → ".join(c) for c in io_import_chains(m)] for m in PURE_MODULES}
    problems = {m: chains for m, chains in problems.items() if chains}
    assert not problems, "pure modules reach I/O libraries:\n" + "\n".join(
        f"  {m}: {chain}" for m, chains in problems.items() for chain in chains)


def test_io_import_check_sees_through_lazy_and_indirect_imports(tmp_path: Path) -> None:
    """The checker itself: it must find I/O behind a chain, a lazy or a relative import."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    for name, text in {
        "__init__.py": "",
        "pure.py": "from typing import TYPE_CHECKING\nfrom pkg import helper\n"
                   "if TYPE_CHECKING:\n    import aiohttp\n",
        "helper.py": "def f():\n    from .sub import db\n",
        "sub/__init__.py": "",
        "sub/db.py": "import asyncpg.pool\n",
        "clean.py": "import math\nif TYPE_CHECKING:\n    import sqlite3\nelse:\n    import json\n",
        "web.py": "from urllib.request import urlopen\nfrom urllib.parse import quote\n",
    }.items():
        (pkg / name).write_text(text)
    chains = io_import_chains("pkg.pure", tmp_path, ("pkg",))
    assert chains == [["pkg.pure", "pkg.helper", "pkg.sub.db", "asyncpg.pool"]]
    assert io_import_chains("pkg.clean", tmp_path, ("pkg",)) == []
    assert io_import_chains("pkg.web", tmp_path, ("pkg",)) == [["pkg.web", "urllib.request"]]
