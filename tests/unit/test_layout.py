"""The shape of the package: no import cycles, no oversized modules, no long functions on the
request path or in the controller, a fixed public surface.

Imports are read with ``ast`` (nothing is imported), module-level and function-level alike
(also those under ``if TYPE_CHECKING:``): a cycle hidden in a function is still a cycle in the
design. ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to
``pkg``; importing ``a.b.c`` is an edge to ``a.b.c`` only (not to the packages above it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import shoal.serve

ROOT = Path(__file__).resolve().parents[2] / "shoal"

MAX_LINES = 650
# The request path and the controller: no function (or method) there spans more than this.
MAX_FUNCTION_LINES = 60
SHORT_FUNCTIONS = ("runtime/http", "runtime/controller", "runtime/replica", "runtime/proxy.py",
                   "runtime/router.py", "runtime/httpguard.py")

SERVE_ALL = {
    "Application", "AutoscalingConfig", "BackPressureError", "Deployment", "DeploymentHandle", "DeploymentResponse",
    "DeploymentResponseGenerator", "DeploymentUnavailableError", "HTTPOptions", "RayServeException",
    "RequestCancelledError", "batch", "delete", "deployment", "get_app_handle", "get_deployment_handle",
    "get_multiplexed_model_id", "get_replica_context", "http_address", "ingress", "multiplexed", "run", "shutdown",
    "shutdown_async", "start", "status",
}


def _modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``root`` (a package directory)."""
    out: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Edges from each module under ``root`` to the modules under ``root`` it imports."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = _resolve_relative(name, path.name == "__init__.py", node.level, node.module)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, todo = work[-1]
            if todo:
                nxt = todo.pop()
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, sorted(graph[nxt])))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component: set[str] = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def test_cycle_finder_finds_a_cycle(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import x\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\nx = 1\n")
    (pkg / "d.py").write_text("import pkg.c\n")
    graph = import_graph(pkg)
    assert graph["pkg.sub.b"] == {"pkg.c"}
    assert cycles(graph) == [{"pkg.a", "pkg.sub.b", "pkg.c"}]


def test_no_import_cycles() -> None:
    found = [sorted(c) for c in cycles(import_graph(ROOT))]
    assert found == [], f"import cycles in shoal/: {found}"


def test_no_oversized_modules() -> None:
    too_big = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).as_posix()
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            too_big[rel] = lines
    assert too_big == {}, f"modules over {MAX_LINES} lines (split them by job): {too_big}"


def long_functions(path: Path, limit: int) -> dict[str, int]:
    """``name:line`` -> length in lines (``def`` to last line, decorators not counted) of every
    function or method in ``path`` longer than ``limit``, nested ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return {f"{node.name}:{node.lineno}": node.end_lineno - node.lineno + 1
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno is not None and node.end_lineno - node.lineno + 1 > limit}


def test_long_function_finder(tmp_path: Path) -> None:
    body = "\n".join(f"        x{i} = {i}" for i in range(5))
    (tmp_path / "m.py").write_text(f"def short():\n    pass\n\n\nclass C:\n    async def long(self):\n{body}\n")
    assert long_functions(tmp_path / "m.py", 5) == {"long:6": 6}


def test_no_long_functions_on_the_request_path_or_in_the_controller() -> None:
    too_long = {}
    for entry in SHORT_FUNCTIONS:
        target = ROOT / entry
        assert target.exists(), f"{entry} moved: update SHORT_FUNCTIONS"
        for path in sorted(target.rglob("*.py")) if target.is_dir() else [target]:
            too_long.update({f"{path.relative_to(ROOT.parent).as_posix()}:{k}": v
                             for k, v in long_functions(path, MAX_FUNCTION_LINES).items()})
    assert too_long == {}, f"functions over {MAX_FUNCTION_LINES} lines (split them): {too_long}"


def test_serve_exports_exactly_the_public_names() -> None:
    assert set(shoal.serve.__all__) == SERVE_ALL
    assert len(shoal.serve.__all__) == len(SERVE_ALL)
    for name in SERVE_ALL:
        assert getattr(shoal.serve, name) is not None


def test_public_top_level_modules_declare_what_they_export() -> None:
    """The modules right under ``shoal/`` are what users import (Ray Serve's module names):
    each declares ``__all__``, and every name it lists exists. Private ones start with ``_``."""
    import importlib

    missing, dangling = [], {}
    for path in sorted(ROOT.glob("*.py")):
        if path.stem.startswith("_") and path.stem != "__init__":
            continue
        name = "shoal" if path.stem == "__init__" else f"shoal.{path.stem}"
        module = importlib.import_module(name)
        exported = getattr(module, "__all__", None)
        if exported is None:
            missing.append(name)
            continue
        absent = [n for n in exported if not hasattr(module, n)]
        if absent:
            dangling[name] = absent
    assert missing == [], f"public modules without __all__: {missing}"
    assert dangling == {}, f"names in __all__ that the module does not define: {dangling}"
