"""Package layout rules: no import circle between modules, no oversized module.

The import graph is built from the source with ``ast`` (every ``import`` statement, also those
inside functions), so a circle hidden behind a function-level import is caught as well.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dllm2rec", "teacher")
MAX_LINES = 400


def module_files(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports (``from a.b import c`` counts a.b.c if c is a module)."""
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        deps: set[str] = set()
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for name in names:
                while name and name not in files:
                    name = name.rpartition(".")[0]
                if name and name != mod:
                    deps.add(name)
        graph[mod] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_cycle_finder_finds_a_planted_circle(tmp_path):
    pkg = tmp_path / "dllm2rec"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from dllm2rec import b\n")
    (pkg / "b.py").write_text("def f():\n    from dllm2rec.a import x\n")  # hidden in a function
    (pkg / "c.py").write_text("import dllm2rec.a\n")
    (tmp_path / "teacher").mkdir()
    graph = import_graph(module_files(tmp_path))
    assert graph["dllm2rec.c"] == {"dllm2rec.a"}
    assert find_cycle(graph) in (["dllm2rec.a", "dllm2rec.b", "dllm2rec.a"], ["dllm2rec.b", "dllm2rec.a", "dllm2rec.b"])
    (pkg / "b.py").write_text("import os\n")
    assert find_cycle(import_graph(module_files(tmp_path))) is None


def test_no_import_circle_in_the_packages():
    graph = import_graph(module_files())
    assert len(graph) > 40  # the walk really saw the packages
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


@pytest.mark.parametrize("pkg", PACKAGES)
def test_no_module_over_the_size_limit(pkg):
    big = {str(f.relative_to(ROOT)): n for f in (ROOT / pkg).rglob("*.py")
           if (n := len(f.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines (split them along a real seam): {big}"


def test_every_stage_folder_is_a_package():
    for d in (ROOT / "dllm2rec").iterdir():
        if d.is_dir() and d.name != "__pycache__":
            assert (d / "__init__.py").is_file(), f"{d} has no __init__.py"
