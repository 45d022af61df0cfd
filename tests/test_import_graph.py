"""The project's import graph, read statically (ast, nothing imported): no cycles, and the two libraries
import only torch, numpy, triton and the standard library.

Every import counts, including those inside functions: a lazy import only hides a cycle until someone
imports the modules in the other order. Imports under `if TYPE_CHECKING:` do not run and are skipped.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("memlayers", "scalenet", "launch")
# What memlayers and scalenet may import besides the standard library and themselves (DESIGN: the
# libraries work in a user's own model with torch alone; triton only for the GPU kernels).
LIBRARY_DEPS = {"torch", "numpy", "triton"}


def module_files(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the packages (a package is its __init__.py)."""
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Import nodes of a module, skipping the bodies of `if TYPE_CHECKING:` (their `else` still runs)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def imported_names(name: str, path: Path, modules: set[str]) -> list[tuple[str, int]]:
    """(dotted target, line) for each import in the module: `from x import y` is x.y when that is a
    project module, else x; relative imports are resolved against the module's package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in _imports(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.extend((alias.name, node.lineno) for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        for alias in node.names:
            full = f"{base}.{alias.name}"
            out.append((full if full in modules else base, node.lineno))
    return out


def import_graph(root: Path = REPO, packages=PACKAGES) -> tuple[dict[str, set[str]], dict[str, list]]:
    """(edges between project modules, every import of each module as (target, line))."""
    files = module_files(root, packages)
    modules = set(files)
    edges: dict[str, set[str]] = {m: set() for m in modules}
    raw: dict[str, list] = {}
    for name, path in files.items():
        raw[name] = imported_names(name, path, modules)
        for target, _ in raw[name]:
            # `import a.b.c` names a.b.c; the nearest project module on that path is what it runs.
            while target and target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target in modules and target != name:
                edges[name].add(target)
    return edges, raw


def cycles(edges: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """Per strongly connected component with a cycle: (a shortest closed path a -> ... -> a through it,
    all of its modules; a component can hold more cycles than the one path shows)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan; the graphs are a few hundred modules, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                connect(w)
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

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return [(_cycle_in(comp, edges), comp) for comp in components]


def _cycle_in(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """A shortest closed path through the component's first module (breadth-first inside it)."""
    members = set(component)
    start = component[0]
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in its component")  # unreachable for an SCC


def cycles_in_package(package: str, root: Path = REPO) -> list[tuple[list[str], list[str]]]:
    """Cycles (over the whole project graph) that pass through a module of `package`."""
    edges, _ = import_graph(root)
    return [
        (path, comp)
        for path, comp in cycles(edges)
        if any(m == package or m.startswith(package + ".") for m in comp)
    ]


def foreign_imports(package: str, root: Path = REPO) -> list[str]:
    """'file:line imports X' for each import of `package` outside torch/numpy/triton/stdlib/itself."""
    files = module_files(root, (package,))
    _, raw = import_graph(root, (package,))
    allowed = LIBRARY_DEPS | set(sys.stdlib_module_names) | {package}
    return [
        f"{files[name].relative_to(root)}:{line} imports {target}"
        for name in sorted(raw)
        for target, line in raw[name]
        if target.split(".")[0] not in allowed
    ]


@pytest.mark.parametrize(
    "package",
    [
        "memlayers",
        "scalenet",
        "launch",
    ],
)
def test_no_import_cycles(package):
    found = cycles_in_package(package)
    assert not found, "import cycles:\n" + "\n".join(
        f"{' -> '.join(path)}  (strongly connected: {', '.join(comp)})" for path, comp in found
    )


@pytest.mark.parametrize("package", ["memlayers", "scalenet"])
def test_libraries_import_only_torch_numpy_triton_and_stdlib(package):
    found = foreign_imports(package)
    assert not found, "\n".join(found)


def test_the_checks_see_cycles_relative_imports_and_skip_type_checking(tmp_path):
    """The checker itself, on a made-up tree: a cycle through a relative import and a lazy import is
    found and named; one closed only under TYPE_CHECKING is not; a foreign import is named."""
    pkg = tmp_path / "memlayers"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from memlayers.a import f\n")
    (pkg / "a.py").write_text("from .sub import b\nimport os\n\ndef f():\n    import memlayers.sub.c\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from memlayers import a\n"
    )
    (pkg / "sub" / "c.py").write_text("from .. import a\nimport safetensors\n")
    for other in ("scalenet", "launch"):
        (tmp_path / other).mkdir()
    assert cycles_in_package("memlayers", tmp_path) == [
        (["memlayers.a", "memlayers.sub.c", "memlayers.a"], ["memlayers.a", "memlayers.sub.c"])
    ]
    assert foreign_imports("memlayers", tmp_path) == [
        str(Path("memlayers/sub/c.py")) + ":2 imports safetensors"
    ]
