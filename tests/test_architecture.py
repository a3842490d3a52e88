"""The shape of ptune/, read from its source with ``ast``: no import circle between its modules, counting imports
inside functions (only ``if TYPE_CHECKING:`` hints are left out), and method folders under ptune/tuners/ that share
code through the tuners package, never by importing each other."""

from __future__ import annotations

import ast
from pathlib import Path

PTUNE = Path(__file__).resolve().parents[1] / "ptune"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Every import node of a module, at any depth, except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path = PTUNE) -> dict[str, set[str]]:
    """Module -> the ptune modules it imports (``from . import x`` counts as importing the module ``x`` when that
    is a module, else its package)."""
    modules = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]
            for target in targets:
                while target and target not in modules:  # `import ptune.x.y` -> the deepest ptune module named
                    target = target.rpartition(".")[0]
                if target and target != name:
                    deps.add(target)
        graph[name] = deps
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), as a path a -> ... -> a."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, comp) for comp in components]


def _cycle_in(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """A shortest cycle through the first module of a strongly connected component (breadth first)."""
    start, members = comp[0], set(comp)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                return [*paths[v], start]
            if w not in paths:
                paths[w] = [*paths[v], w]
                queue.append(w)
    return comp


def test_no_import_circle_in_ptune():
    cycles = find_cycles(import_graph())
    assert not cycles, "import circles (imports inside functions count):\n" + "\n".join(
        " -> ".join(c) for c in cycles
    )


def test_method_folders_do_not_import_each_other():
    graph = import_graph()
    folders = {p.parent.name for p in (PTUNE / "tuners").glob("*/__init__.py")}
    crossing = [
        f"{name} imports {dep}"
        for name, deps in graph.items()
        for dep in deps
        if name.startswith("ptune.tuners.") and dep.startswith("ptune.tuners.")
        and (own := name.split(".")[2]) in folders
        and (other := dep.split(".")[2]) in folders and other != own
    ]
    assert not crossing, "method folders share code through ptune/tuners/base.py, not each other: " + "; ".join(
        crossing
    )


def test_the_checks_find_a_circle_and_a_crossing(tmp_path):
    """The scanner itself: a function-level import closing a circle is found, a TYPE_CHECKING one is not."""
    pkg = tmp_path / "ptune"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (pkg / "c.py").write_text("import ptune.a\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import e\n")
    (pkg / "e.py").write_text("from . import d\n")
    graph = import_graph(pkg)
    assert graph["ptune.a"] == {"ptune.sub.b"} and graph["ptune.sub.b"] == {"ptune.c"}
    assert find_cycles(graph) == [["ptune.a", "ptune.sub.b", "ptune.c", "ptune.a"]]


def _importers_of(module: str, root: Path = PTUNE) -> list[str]:
    """The ptune modules that import ``module`` (an outside package's module), at any depth."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(n == module or n.startswith(module + ".") for n in names):
                found.append(_module_name(path, root))
    return sorted(set(found))


def test_helpers_sit_in_their_homes():
    """Hydra's override grammar is read in config.py only (config.parse_overrides, override_value, apply_overrides;
    report, the API and `ptune train` each called it themselves), console tables are drawn in progress.py only (eval,
    report and search each built theirs); the checkpoint loader and the backbone identity
    checks are defined once, where they belong, and checkpoints are read through the one loader."""
    assert _importers_of("hydra.core.override_parser") == ["ptune.config"]
    assert _importers_of("rich.table") == ["ptune.progress"]  # tables are drawn by progress.print_table
    defined: dict[str, list[str]] = {}
    for path in sorted(PTUNE.rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                defined.setdefault(node.name, []).append(_module_name(path, PTUNE))
    homes = {
        "identity_mismatch": "ptune.backbone.identity", "check_same_backbone": "ptune.backbone.identity",
        "parse_overrides": "ptune.config", "override_value": "ptune.config", "apply_overrides": "ptune.config",
        "autocast": "ptune.runtime", "table_console": "ptune.progress", "predict_generate": "ptune.predict",
        "load_task": "ptune.inference", "read_saved": "ptune.inference", "rebuild": "ptune.inference",
    }
    assert {name: defined.get(name) for name in homes} == {name: [home] for name, home in homes.items()}
    # a saved prompt is read (found, read, overridden) by inference.read_saved only; training reads back its own
    readers = [m for m in _callers_of("read_checkpoint") if m not in ("ptune.checkpoint", "ptune.training")]
    assert readers == ["ptune.inference"], readers


def _callers_of(function: str, root: Path = PTUNE) -> list[str]:
    """The ptune modules that call ``function`` by name (plain or as an attribute)."""
    found = set()
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name == function:
                    found.add(_module_name(path, root))
    return sorted(found)
