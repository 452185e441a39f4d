"""The package's shape: no import cycles between `loracli` modules, no command importing another
command, no module past 400 lines.

Every module under loracli/ is parsed with `ast`; every import counts wherever it is written
(module level, inside a function, under `if TYPE_CHECKING:`), because a cycle through a
function-level import is still two modules that cannot be understood, tested or moved apart.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "loracli"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    """Dotted module name → file, for every .py under loracli/ (a package is its __init__)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, package: str, level: int) -> str:
    """An import's absolute dotted name (`from ..x import y` inside package `package`)."""
    if not level:
        return name
    base = package.split(".")
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _imports(module: str, source: str, is_package: bool, modules) -> set[str]:
    """The loracli modules `module` imports (anywhere in its source)."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source, module)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    found.add(_longest_module(alias.name, modules))
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node.module or "", package, node.level)
            if target.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else _longest_module(target, modules))
    found.discard(module)
    found.discard(None)
    return found


def _longest_module(name: str, modules) -> str | None:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in modules:
            return ".".join(parts[:i])
    return None


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p.read_text("utf-8"), p.name == "__init__.py", modules)
            for m, p in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete cycle (a → … → a) per strongly connected group of modules (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_path_within(group, graph) for group in sorted(groups)]


def _path_within(group: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the group's first module, staying inside the group."""
    start, members = group[0], set(group)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in sorted(graph[path[-1]] & members):
            if w == start:
                return path + [start]
            if w not in seen:
                seen.add(w)
                paths.append(path + [w])
    return group  # unreachable for a strongly connected group


def test_the_import_graph_is_read_from_every_kind_of_import():
    modules = {"loracli", "loracli.a", "loracli.b", "loracli.c", "loracli.d", "loracli.e",
               "loracli.pkg", "loracli.pkg.x", "loracli.pkg.y"}
    source = ("import os\nimport loracli.a\nfrom loracli import b, __version__\n"
              "from loracli.c import thing\nif TYPE_CHECKING:\n    from loracli.d import T\n"
              "def f():\n    from loracli.pkg import x\n    import loracli.e.sub\n")
    assert _imports("loracli.z", source, False, modules) == {
        "loracli", "loracli.a", "loracli.b", "loracli.c", "loracli.d", "loracli.e",
        "loracli.pkg.x"}
    assert _imports("loracli.pkg.x", "from . import y\nfrom ..a import z\n", False,
                    modules) == {"loracli.pkg.y", "loracli.a"}
    graph = import_graph()  # and the real package is read
    assert "loracli.errors" in graph["loracli.cli"]  # module level
    assert "loracli.training.jobs" in graph["loracli.commands.train"]  # inside a function
    assert "loracli.commands.train" in graph["loracli.cli"]  # `from loracli.commands import …`
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_loracli_modules():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_no_command_imports_another_command():
    graph = import_graph()
    bad = sorted(f"{m} imports {t}" for m, targets in graph.items()
                 if m.startswith(f"{PACKAGE}.commands.") for t in targets
                 if t.startswith(f"{PACKAGE}.commands.") and t != m)
    assert not bad, "\n".join(bad)


def test_no_module_is_over_400_lines():
    sizes = {str(p.relative_to(ROOT.parent)): len(p.read_text("utf-8").splitlines())
             for p in sorted(ROOT.rglob("*.py"))}
    over = {path: n for path, n in sizes.items() if n > MAX_LINES}
    assert not over, "modules over 400 lines: " + ", ".join(f"{p} ({n})" for p, n in over.items())
