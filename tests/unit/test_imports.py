"""``compression/`` has no import circles: its modules form a graph without cycles.

The graph is read from the source (ast), not from ``sys.modules``: every ``from compression… import`` and
``import compression…``, at module level and inside functions (a function-level import is still an edge:
it runs as soon as the function does), relative imports resolved. Imports under ``if TYPE_CHECKING:`` are
left out: they never run (annotations only, ``from __future__ import annotations`` everywhere).

Two idioms look circular and are allowed; neither is an edge of this graph, and the tests below check
that each stays the idiom described:

- **The registry's discovery.** ``compression.registry`` imports every technique family by name on the first
  lookup (``pkgutil`` + ``importlib``), and each family imports ``register_technique`` back. The registry
  never names a family in an import statement.
- **The converter's op registration.** ``compression.converter.module`` imports every ``ops_*`` module so
  that their ``@register_op`` decorators run; ``ops_*`` import ``compression.converter.ops``, which names
  ``OnnxModule``/``GraphBuilder`` of ``module`` for annotations only (under ``TYPE_CHECKING``).
"""
from __future__ import annotations

import ast
from pathlib import Path

import compression

ROOT = Path(compression.__file__).parent


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package)."""
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ["compression", *path.relative_to(ROOT).with_suffix("").parts]
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(module: str, path: Path, is_pkg: bool, known: set[str], *, type_checking: bool) -> set[str]:
    """The ``compression`` modules that ``module`` imports (those under TYPE_CHECKING only if asked)."""
    found: set[str] = set()
    package = module.split(".") if is_pkg else module.split(".")[:-1]

    def add(name: str | None) -> None:
        if name in known and name != module:
            found.add(name)

    def visit(node: ast.AST, guarded: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = guarded or (isinstance(child, ast.If) and _is_type_checking(child))
            if inner and not type_checking:
                continue
            if isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package[:len(package) - (child.level - 1)]
                    base = ".".join(up + ([child.module] if child.module else []))
                for alias in child.names:  # "from pkg import submodule" imports the submodule
                    add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name)
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return found


def import_graph(*, type_checking: bool = False) -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, pkg, set(mods), type_checking=type_checking) for m, (p, pkg) in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_compression_has_no_import_circles():
    graph = import_graph()
    assert "compression.modelio" in graph and "compression.converter.module" in graph  # the graph is read
    assert "compression.analysis" in graph["compression.modelio"]  # one direction: describe counts with analysis
    assert "compression.pipeline" not in graph["compression.search"]  # json_default has its own module
    assert cycles(graph) == []


def test_the_registrys_discovery_names_no_family():
    """Discovery stays dynamic: the registry imports the ``techniques`` package, never a family by name."""
    graph = import_graph(type_checking=True)
    families = {m for m in graph if m.startswith("compression.techniques.")}
    assert graph["compression.registry"] & families == set()
    assert "compression.techniques" in graph["compression.registry"]
    for family in (f for f in families if f.count(".") == 2):  # each family registers its techniques
        assert any("compression.registry" in graph[m] for m in families if m == family or m.startswith(family + "."))


def test_the_converters_op_modules_need_the_module_for_annotations_only():
    runtime, annotated = import_graph(), import_graph(type_checking=True)
    ops = {m for m in runtime if m.startswith("compression.converter.ops")}
    assert ops <= runtime["compression.converter.module"] | {"compression.converter.ops"}
    assert all("compression.converter.module" not in runtime[m] for m in ops)
    assert "compression.converter.module" in annotated["compression.converter.ops"]
