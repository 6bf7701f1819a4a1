"""The floor plan holds: one direction of imports, no cycle, no library module importing a
command line, no function too long to read at once.

The layers of the one import package ``surprise_monitor`` are ranked ``kernels`` < ``monitor`` <
``calibrate`` < the package's own top (``surprise_monitor/``: its ``__init__`` and the service): a
module may import modules of its own layer or of a layer below it, never above. Every import counts:
at module level, inside functions (lazy imports) and under ``TYPE_CHECKING``. ``from p import name``
counts as an edge to ``p.name`` when that is a module, else to the package ``p`` itself (its
``__init__``), so a cycle through a package's re-exports is caught too. Command-line modules are the
ones named ``cli.py`` or ``__main__.py``; only they may import one another.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP = "surprise_monitor"
# (dotted package, its folder under the repository root), bottom to top
LAYERS = (
    (f"{TOP}.kernels", "kernels"),
    (f"{TOP}.monitor", "monitor"),
    (f"{TOP}.calibrate", "calibrate"),
    (TOP, TOP),
)
PACKAGES = tuple(package for package, _ in LAYERS)
CLI_NAMES = ("cli", "__main__")
MAX_FUNCTION_LINES = 80


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """``{dotted module name: file}`` of every module of the layers' folders under ``root``."""
    found = {}
    for package, folder in LAYERS:
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def layer_of(module: str) -> int:
    """The rank of the layer ``module`` belongs to (its longest layer prefix)."""
    for rank, (package, _) in enumerate(LAYERS):
        if module == package or module.startswith(package + "."):
            return rank
    raise ValueError(f"{module} is in no layer")


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name ``from ... import`` refers to (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, modules: set[str]) -> set[str]:
    """The modules of the three packages that ``module`` imports anywhere in its file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(module, path.name == "__init__.py", node)
            names = [
                f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target
                for a in node.names
            ]
        else:
            continue
        for name in names:
            while name and name not in modules:  # `import a.b.c` of a non-module c: a.b
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """``{module: modules it imports}`` over the three packages."""
    files = module_files(root)
    return {m: imports_of(m, p, set(files)) for m, p in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    """``a -> b`` for every import of a higher-ranked package."""
    rank = {m: layer_of(m) for m in graph}
    return sorted(f"{a} -> {b}" for a, bs in graph.items() for b in bs if rank[b] > rank[a])


def is_cli(module: str) -> bool:
    """Command-line modules: ``cli.py`` and ``__main__.py``."""
    return module.rpartition(".")[2] in CLI_NAMES


def library_to_cli_edges(graph: dict[str, set[str]]) -> list[str]:
    """``a -> b`` for every library module ``a`` importing a command-line module ``b``."""
    return sorted(
        f"{a} -> {b}" for a, bs in graph.items() if not is_cli(a) for b in bs if is_cli(b)
    )


def _is_triton_jit(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """True for a function decorated with ``triton.jit`` (a kernel: long by nature)."""
    for deco in node.decorator_list:
        target = deco.func if isinstance(deco, ast.Call) else deco
        if ast.unparse(target) == "triton.jit":
            return True
    return False


def long_functions(root: Path = ROOT, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``file:line name (n lines)`` of every function longer than ``limit`` lines (from ``def``
    to its last line, docstring included), Triton kernels aside."""
    out = []
    for path in sorted(module_files(root).values()):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > limit and not _is_triton_jit(node):
                    out.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({n} lines)")
    return sorted(out)


def _functions(tree: ast.Module) -> list[tuple[ast.FunctionDef | ast.AsyncFunctionDef, bool]]:
    """Every function of a module and whether it is nested in another function."""
    out = []

    def walk(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                out.append((child, nested))
                walk(child, True)
            else:
                walk(child, nested)

    walk(tree, False)
    return out


def untyped_or_undocumented(root: Path = ROOT) -> list[str]:
    """``file:line name: what is missing`` for functions with an unannotated parameter or
    return, and for functions that are not nested in another one and lack a docstring (dunder
    methods may go without); Triton kernels aside."""
    out = []
    for path in module_files(root).values():
        for node, nested in _functions(ast.parse(path.read_text(), filename=str(path))):
            if _is_triton_jit(node):
                continue
            a = node.args
            params = a.posonlyargs + a.args + a.kwonlyargs + [p for p in (a.vararg, a.kwarg) if p]
            missing = [p.arg for p in params if not p.annotation and p.arg not in ("self", "cls")]
            if node.returns is None:
                missing.append("return")
            dunder = node.name.startswith("__") and node.name.endswith("__")
            if not nested and not dunder and ast.get_docstring(node) is None:
                missing.append("docstring")
            if missing:
                where = f"{path.relative_to(root)}:{node.lineno} {node.name}"
                out.append(f"{where}: {', '.join(missing)}")
    return sorted(out)


# ----------------------------------------------------------------------------- the checks
@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_graph_sees_every_module_and_real_edges(graph):
    """The walk itself works: every package found, and edges of each kind it must see (a lazy
    import, a TYPE_CHECKING import, an import of a package's re-export)."""
    assert set(PACKAGES) <= set(graph) and len(graph) > 40
    k, m, c = (f"{TOP}.{name}" for name in ("kernels", "monitor", "calibrate"))
    assert f"{k}.amap_triton" in graph[f"{k}.amap"]  # imported inside grad_amap()
    assert f"{m}.explain.explanation" in graph[f"{m}.surprise_monitor"]  # TYPE_CHECKING
    assert f"{m}.probe" in graph[f"{c}.inference_probe"]  # from ...monitor.probe import ..
    assert f"{m}.table" in graph[c]  # a re-export downward is fine
    assert f"{c}.builder" in graph[TOP]  # the top re-exports every layer


def test_no_import_cycle(graph):
    assert cycles(graph) == []


def test_imports_point_down_only(graph):
    assert upward_edges(graph) == []


def test_library_modules_do_not_import_command_lines(graph):
    assert {m for m in graph if is_cli(m)} >= {
        f"{TOP}.calibrate.__main__",
        f"{TOP}.calibrate.cli",
        f"{TOP}.monitor.explain.cli",
    }
    assert library_to_cli_edges(graph) == []


def test_functions_are_short_enough_to_read_at_once():
    assert long_functions() == []


def test_functions_are_typed_and_documented():
    """Private helpers as much as the public API (the developer guide's rule)."""
    assert untyped_or_undocumented() == []


def test_the_checks_catch_what_they_are_for(tmp_path):
    """A small tree with every fault: a cycle through a package ``__init__``, an upward lazy
    import, a library module importing a CLI, a long function; a long Triton kernel is fine."""
    files = {
        "kernels/__init__.py": "",
        "kernels/ops.py": "def f():\n    from surprise_monitor.monitor import thing\n",
        "monitor/__init__.py": "from surprise_monitor.monitor.a import thing\n",
        "monitor/a.py": "from surprise_monitor.monitor import other\nthing = 1\n",
        "monitor/cli.py": "",
        "monitor/b.py": "import surprise_monitor.monitor.cli\n",
        "surprise_monitor/__init__.py": '"""Top."""\nfrom surprise_monitor import kernels\n',
        "calibrate/__init__.py": "",
        "calibrate/long.py": '"""A module."""\ndef g():\n' + "    x = 1\n" * 81,
        "calibrate/typed.py": 'def h(a: int) -> int:\n    """Doc."""\n    def inner(b):\n'
        "        return b\n    return a\n",
        "calibrate/kernel.py": "import triton\n@triton.jit\ndef k():\n" + "    x = 1\n" * 90,
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    g = import_graph(tmp_path)
    m = f"{TOP}.monitor"
    assert cycles(g) == [[m, f"{m}.a"]]
    assert upward_edges(g) == [f"{TOP}.kernels.ops -> {m}"]
    assert library_to_cli_edges(g) == [f"{m}.b -> {m}.cli"]
    assert g[TOP] == {f"{TOP}.kernels"}
    assert long_functions(tmp_path) == ["calibrate/long.py:2 g (82 lines)"]
    assert untyped_or_undocumented(tmp_path) == [
        "calibrate/long.py:2 g: return, docstring",
        "calibrate/typed.py:3 inner: b, return",
        "kernels/ops.py:1 f: return, docstring",
    ]


def generic_imports(root: Path = ROOT) -> list[str]:
    """``file:line`` of every import of ``kernels``, ``monitor`` or ``calibrate`` as a top-level
    name, in any Python file of the repository (they are ``surprise_monitor``'s layers only).
    ``tests/data`` is left out: its generator runs the code from before the rename on purpose."""
    out = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(part.startswith(".") for part in parts) or parts[:2] == ("tests", "data"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            if any(n.split(".")[0] in ("kernels", "monitor", "calibrate") for n in names):
                out.append(f"{path.relative_to(root)}:{node.lineno}")
    return out


def test_nothing_imports_the_layers_as_top_level_names():
    assert generic_imports() == []
