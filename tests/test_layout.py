"""The layout rules of DESIGN.md §2a, checked on the source: no import cycle between sdrt's modules (every import
counted: module level, inside functions, and `importlib.import_module` with a literal name), no folder with more
than 15 modules side by side, no source file over 600 lines; and pyproject installs every package folder."""

from __future__ import annotations

import ast
import tomllib
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("export", "engines", "runtime", "bench", "cli", "serve", "compat")  # installed as sdrt.<folder> (pyproject)
MAX_MODULES = 15
MAX_LINES = 600


def _sources() -> dict[str, Path]:
    """sdrt's module name → file, for every .py under the package folders (bench/results holds no code)."""
    out = {}
    for top in PACKAGES:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out["sdrt." + ".".join(parts)] = path
    return out


def _imported(module: str, path: Path, modules: dict) -> set[str]:
    """The sdrt modules `module` imports anywhere in its file, each named by the module it loads."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names += [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called == "import_module" and node.args and isinstance(node.args[0], ast.Constant):
                names.append(node.args[0].value)
    found = set()
    for name in names:
        while name and name not in modules:  # `from pkg import name` names an attribute, not a module
            name = name.rpartition(".")[0]
        if name.startswith("sdrt.") and name != module:
            found.add(name)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    modules = _sources()
    graph = {m: _imported(m, p, modules) for m, p in modules.items()}
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    """The check above could fail: a two-module and a three-module cycle are found, a chain is not."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert sorted(_cycles(graph)) == [["a", "b"], ["c", "d", "e"]]


def test_function_level_and_importlib_imports_count(tmp_path):
    (tmp_path / "m.py").write_text("def f():\n    from .n import x\n    import importlib\n"
                                   "    importlib.import_module('sdrt.p.q')\n")
    modules = {"sdrt.p.m": None, "sdrt.p.n": None, "sdrt.p.q": None}
    assert _imported("sdrt.p.m", tmp_path / "m.py", modules) == {"sdrt.p.n", "sdrt.p.q"}


def test_folders_and_files_stay_small():
    crowded = {}
    folders = defaultdict(list)
    for path in _sources().values():
        folders[path.parent.relative_to(ROOT)].append(path.name)
    crowded = {str(f): len(names) for f, names in folders.items() if len(names) > MAX_MODULES}
    long = {str(p.relative_to(ROOT)): n for p in _sources().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert crowded == {} and long == {}


def test_pyproject_installs_every_package_folder():
    """Each folder with an __init__.py is a listed package, so a wheel carries it (and nothing leaks top-level)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(project["packages"])
    assert set(project["package-dir"]) == {f"sdrt.{top}" for top in PACKAGES}
    folders = {"sdrt." + ".".join(p.parent.relative_to(ROOT).parts)
               for top in PACKAGES for p in (ROOT / top).rglob("__init__.py")}
    assert folders == listed


@pytest.mark.parametrize("top", PACKAGES)
def test_every_code_folder_is_a_package(top):
    """A folder of modules without __init__.py would be left out of the wheel silently."""
    bare = [str(d.relative_to(ROOT)) for d in (ROOT / top).rglob("*")
            if d.is_dir() and any(d.glob("*.py")) and not (d / "__init__.py").exists()]
    assert bare == []
