"""The package's layering and the checks CI runs on the code: no import cycle between the
package's modules, ruff (lint and format) and mypy clean."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Set

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "captum_mambalrp"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(current: str, is_package: bool, level: int, target: Optional[str]) -> str:
    base = current.split(".")
    if level:
        base = base if is_package else base[:-1]
        base = base[: len(base) - (level - 1)]
        return ".".join(base + ([target] if target else []))
    return target or ""


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_graph() -> Dict[str, Set[str]]:
    """Module -> the package modules it imports, at module level or inside functions (a lazy
    import that breaks a cycle at run time is still a cycle in the design); imports under
    ``if TYPE_CHECKING:`` do not count."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: Dict[str, Set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip: Set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and _type_checking_only(node):
                skip.update(id(n) for n in ast.walk(node))
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.level, node.module)
                targets = [base]
                targets += [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            for target in targets:
                # the module itself, else the closest package module that holds it
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target.startswith("captum_mambalrp"):
                    graph[name].add(target)
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One import cycle, or None. A package's ``__init__`` importing its own submodules, and a
    submodule importing a sibling, are edges like any other; a submodule importing its own
    package's ``__init__`` closes a cycle."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_find_cycle_detects_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_package_has_no_import_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 40 and graph["captum_mambalrp"], "the import graph was not read"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def _run(tool: List[str]) -> subprocess.CompletedProcess:
    return subprocess.run(tool, cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_ruff_lint_and_format() -> None:
    lint = _run([sys.executable, "-m", "ruff", "check", "."])
    assert lint.returncode == 0, lint.stdout[-4000:]
    fmt = _run([sys.executable, "-m", "ruff", "format", "--check", "."])
    assert fmt.returncode == 0, fmt.stdout[-4000:]


def test_mypy() -> None:
    result = _run([sys.executable, "-m", "mypy", "captum_mambalrp"])
    assert result.returncode == 0, result.stdout[-6000:]
