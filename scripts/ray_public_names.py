"""List the public names of Ray Serve's modules that shoal mirrors, read from a Ray wheel.

``python scripts/ray_public_names.py [WHEEL] [-o OUT]`` writes ``shoal/_ray_names.json``::

    {"ray_version": "2.60.0", "modules": {"ray.serve": ["Application", ...], ...}}

``tests/unit/test_compat_table.py`` compares shoal's compatibility table (``shoal/_compat.py``)
against that file, so the wheel is needed only to refresh it (for a new Ray release), never at
test time. The wheel is read as a zip archive and its sources parsed with :mod:`ast`: nothing of
Ray is installed or imported.

Which names count as public, per module:

1. A module that defines ``__all__`` (list or tuple literals, assigned and extended with
   ``+=``): the names in it, except those starting with ``_`` (``ray.serve`` lists ``_run`` and
   ``_run_many``, private by Python's convention and undocumented).
2. A module without ``__all__``: the classes and functions defined at its top level whose
   decorators include one of Ray's API annotations (``@PublicAPI``, ``@DeveloperAPI``,
   ``@Deprecated``, with or without arguments), and top-level assignments whose value is such an
   annotation applied to something (``X = PublicAPI(...)(Y)``); names starting with ``_`` never.
   Names a module merely imports (``ray.serve.schema`` imports ``AutoscalingConfig`` from
   ``ray.serve.config``) belong to the module that defines them, and helpers, constants and
   loggers without an annotation are not Ray's API.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import zipfile
from email.parser import HeaderParser
from pathlib import Path

DEFAULT_WHEEL = "/tmp/raywhl/ray-2.60.0-cp311-cp311-manylinux2014_x86_64.whl"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "shoal" / "_ray_names.json"

# The Ray modules shoal mirrors (shoal.serve, shoal.handle, shoal.config, shoal.schema,
# shoal.exceptions, shoal.llm).
MODULES = ("ray.serve", "ray.serve.handle", "ray.serve.config", "ray.serve.schema", "ray.serve.exceptions",
           "ray.serve.llm")
PACKAGES = frozenset({"ray.serve", "ray.serve.llm"})
ANNOTATIONS = frozenset({"PublicAPI", "DeveloperAPI", "Deprecated"})


def module_path(module: str) -> str:
    """The path of ``module``'s source inside the wheel."""
    base = module.replace(".", "/")
    return f"{base}/__init__.py" if module in PACKAGES else f"{base}.py"


def _literal_names(node: ast.expr, where: str) -> list[str]:
    if not isinstance(node, ast.List | ast.Tuple):
        raise ValueError(f"{where}: __all__ is not a list or tuple literal")
    names = []
    for elt in node.elts:
        if not isinstance(elt, ast.Constant) or not isinstance(elt.value, str):
            raise ValueError(f"{where}: __all__ holds something other than string literals")
        names.append(elt.value)
    return names


def dunder_all(tree: ast.Module, where: str) -> list[str] | None:
    """The module's ``__all__`` (assignments and ``+=`` at top level), or None if it has none."""
    found: list[str] | None = None
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in stmt.targets):
            found = _literal_names(stmt.value, where)
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == "__all__":
            if stmt.value is not None:
                found = _literal_names(stmt.value, where)
        elif (isinstance(stmt, ast.AugAssign) and isinstance(stmt.target, ast.Name)
              and stmt.target.id == "__all__" and isinstance(stmt.op, ast.Add)):
            if found is None:
                raise ValueError(f"{where}: __all__ += before __all__ is assigned")
            found += _literal_names(stmt.value, where)
    return found


def _annotation_name(node: ast.expr) -> str:
    """``PublicAPI`` for ``PublicAPI``, ``PublicAPI(...)`` and ``annotations.PublicAPI(...)``."""
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _is_annotated_value(node: ast.expr) -> bool:
    # PublicAPI(stability="beta")(thing): a call whose callee is an annotation call.
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Call) and _annotation_name(node.func) in ANNOTATIONS


def annotated_names(tree: ast.Module) -> list[str]:
    """Top-level definitions marked with one of Ray's API annotations."""
    names = []
    for stmt in tree.body:
        if isinstance(stmt, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            if any(_annotation_name(d) in ANNOTATIONS for d in stmt.decorator_list):
                names.append(stmt.name)
        elif isinstance(stmt, ast.Assign) and _is_annotated_value(stmt.value):
            names.extend(t.id for t in stmt.targets if isinstance(t, ast.Name))
    return names


def public_names(source: str, where: str) -> list[str]:
    """The public names of one module's source, by the rules of this script's docstring."""
    tree = ast.parse(source, filename=where)
    listed = dunder_all(tree, where)
    names = listed if listed is not None else annotated_names(tree)
    return sorted({n for n in names if not n.startswith("_")})


def ray_version(wheel: zipfile.ZipFile) -> str:
    """The ``Version`` of the wheel's ``*.dist-info/METADATA``."""
    for name in wheel.namelist():
        if name.endswith(".dist-info/METADATA") and name.count("/") == 1:
            version = HeaderParser().parsestr(wheel.read(name).decode("utf-8"))["Version"]
            if version:
                return str(version)
    raise ValueError("the wheel has no *.dist-info/METADATA with a Version")


def read_wheel(path: str) -> dict[str, object]:
    """The JSON document for the wheel at ``path``."""
    with zipfile.ZipFile(path) as wheel:
        modules: dict[str, list[str]] = {}
        for module in MODULES:
            member = module_path(module)
            try:
                source = wheel.read(member).decode("utf-8")
            except KeyError:
                raise ValueError(f"{path}: the wheel has no {member} (is it a Ray wheel?)") from None
            modules[module] = public_names(source, f"{path}:{member}")
        return {"ray_version": ray_version(wheel), "modules": modules}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", nargs="?", default=DEFAULT_WHEEL, help=f"a Ray wheel (default {DEFAULT_WHEEL})")
    parser.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT, help="the JSON file to write")
    args = parser.parse_args(argv)
    try:
        doc = read_wheel(args.wheel)
    except (OSError, zipfile.BadZipFile, ValueError, SyntaxError) as e:
        print(f"ray_public_names: {e}", file=sys.stderr)
        return 1
    args.out.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    modules = doc["modules"]
    assert isinstance(modules, dict)
    counts = ", ".join(f"{m} {len(n)}" for m, n in modules.items())
    print(f"wrote {args.out}: Ray {doc['ray_version']}; {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
