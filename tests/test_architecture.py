"""The house rules, checked on the source itself: dependencies run one way
(app.py -> analysis -> dirotq, kernels below modules), the import graph has no cycle, and nothing
edits the interpreter's module search path. Every import counts, including those inside functions: a lazy import is still a
dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dirotq", "analysis")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    mods = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    mods["app"] = ROOT / "app.py"
    return mods


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that module ``name`` imports (a ``from X import Y`` of a submodule Y counts
    as an import of X.Y, else of X)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # "dirotq.eval.protocol.Evaluator" -> the module that defines it
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {n: imports_of(n, p, set(mods)) for n, p in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_checker_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "dirotq.eval.judge" in graph["dirotq.eval.protocol"]  # from .judge import …
    assert "dirotq.kernels" in graph["dirotq.modules"]  # the lazy `from .kernels import kernel_forward`
    assert "dirotq.registry" in graph["dirotq.methods.rtn"]  # from ..registry import …
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_import_graph_has_no_cycle():
    assert find_cycle(import_graph()) is None


def test_dependencies_run_one_way():
    graph = import_graph()
    upward = {n: sorted(m for m in deps if m == "app" or m.split(".")[0] == "analysis")
              for n, deps in graph.items() if n.startswith("dirotq")}
    assert not {n: d for n, d in upward.items() if d}, "the library imports the explorer layer"
    assert not [n for n, deps in graph.items() if n.startswith("analysis") and "app" in deps]
    below = {n: sorted(d for d in deps if not d.startswith("dirotq.kernels") and d.startswith("dirotq.")
                       and d not in ("dirotq.activations", "dirotq.bases", "dirotq.quantizers"))
             for n, deps in graph.items() if n.startswith("dirotq.kernels")}
    assert not {n: d for n, d in below.items() if d}, "kernels are ops: they import no module above them"


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.py")
                                        if ".git" not in p.parts and "site-packages" not in p.parts))
def test_no_file_edits_the_module_search_path(path):
    tree = ast.parse((ROOT / path).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys":
            pytest.fail(f"{path}:{node.lineno} edits the module search path: install the package "
                        "(pip install -e .) or run it as a module (python -m …) instead")
