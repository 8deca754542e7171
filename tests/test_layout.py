"""The package layout's contracts: vitq.config is plain data (no method zoo behind it), no import circle in src/,
every registered method documented."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import vitq
from vitq.methods import method_class, method_names

SRC = Path(vitq.__file__).parent
REPO = SRC.parent.parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every vitq module ``path`` imports, at any depth (deferred imports in functions count too), except under
    ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
               and "TYPE_CHECKING" in ast.unparse(block.test) for node in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found & modules


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), i.e. the import circles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_src():
    files = {_module_name(path): path for path in SRC.rglob("*.py")}
    graph = {name: _imports(path, set(files)) - {name} for name, path in files.items()}
    assert _cycles(graph) == []


def test_config_imports_without_the_methods():
    """A fresh interpreter (the point of the test: nothing imported yet) loads vitq.config alone."""
    code = "import sys, vitq.config; print(sorted(m for m in sys.modules if m.startswith('vitq.methods')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_method_has_its_docs_page():
    for name in method_names():
        page = REPO / "docs" / "methods" / f"{name}.md"
        assert page.is_file(), page
        cls = method_class(name)
        text = page.read_text(encoding="utf-8")
        for option in cls.option_names():  # every option a user can set is explained
            assert f"`{option}`" in text, (name, option)


def test_public_names_resolve():
    assert set(vitq.__all__) == {*vitq._PUBLIC, "__version__"}
    for name in vitq.__all__:
        assert getattr(vitq, name) is not None, name
