"""The shape of the package: no import cycles inside ``gateway/``, small modules and functions
in the storage and budget layers (issue 13)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GATEWAY = ROOT / "gateway"
# Modules reshaped for issue 13's storage/budget seams: held to the size limits.
SIZED = [*sorted((GATEWAY / "store").glob("*.py")), GATEWAY / "budget.py",
         GATEWAY / "budget_rules.py", GATEWAY / "ledger.py", GATEWAY / "audit.py",
         GATEWAY / "audit_chain.py", GATEWAY / "audit_verify.py"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Imports under ``if TYPE_CHECKING:`` never run, so they cannot form a cycle."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (at import time or inside functions)."""
    modules = {_module_name(p): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(tree):
            if _type_checking_only(node, parents):
                continue
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    if full in modules:
                        deps.add(full)
                    elif base in modules:
                        deps.add(base)
        graph[name] = deps - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_in_gateway() -> None:
    graph = import_graph(GATEWAY)
    assert "gateway.store.sqlite" in graph["gateway.store"]  # the graph sees lazy imports
    assert cycles(graph) == []


def test_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_storage_and_budget_modules_stay_small() -> None:
    too_long = []
    for path in SIZED:
        source = path.read_text()
        if source.count("\n") > 400:
            too_long.append(f"{path.name}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > 60:
                    too_long.append(f"{path.name}:{node.name}: {length} lines")
    assert too_long == []


def test_store_backends_are_chosen_in_one_place() -> None:
    """Only ``gateway.store.urls`` (and config validation) look at the database URL's scheme."""
    allowed = {GATEWAY / "store" / "urls.py", GATEWAY / "config" / "kinds.py"}
    branch = re.compile(r"""startswith\(\(?["'](sqlite|postgres)""")
    offenders = [str(p.relative_to(ROOT)) for p in GATEWAY.rglob("*.py")
                 if p not in allowed and branch.search(p.read_text())]
    assert offenders == []
