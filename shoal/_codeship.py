"""How a deployment's class or function travels to its replicas so that tracebacks show the
user's file and line.

cloudpickle ships code *by value* when it cannot find it by name, and then renames every code
object's file to ``<dynamic-code>`` (tracebacks lose the file and the source line). A class
decorated with ``@serve.deployment`` is never found by name: its module's attribute is the
:class:`~shoal.deployment.Deployment`, not the class. So:

* By reference, when the module is a file the replica can import (it gets the deployer's
  ``sys.path`` and working directory): the pickle says "attribute ``Model`` of module ``app``",
  and the replica imports that module, so tracebacks are the real file's. The pickle also
  carries the module file's digest and a by-value copy: a replica started after the file
  changed (a crash replacement, a scale-up) runs the deployed code, not the edited file.
* By value otherwise (``__main__``, notebooks, classes defined in a function), keeping each code
  object's file name and carrying the source lines, which the replica registers in
  :mod:`linecache` when it unpickles them.

The version hash (``DeploymentSpec.code_version``) does not come from these bytes (see there).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import io
import linecache
import logging
import os
import sys
import types
from collections import ChainMap
from typing import Any

import cloudpickle
from cloudpickle import cloudpickle as _cp

__all__ = ["dumps", "file_digest"]

logger = logging.getLogger("shoal.replica")

# cloudpickle's code reducer returns (CodeType, args); the file name is argument 10 of
# CodeType's constructor (Python 3.11 to 3.14), which cloudpickle sets to this string.
_FILENAME_ARG = 10
_DYNAMIC = "<dynamic-code>"

_digests: dict[str, str] = {}


def file_digest(path: str | None) -> str:
    """The SHA-256 of a module file's bytes ("" when it cannot be read)."""
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return ""


def _restore_code(args: tuple[Any, ...], lines: tuple[str, ...]) -> types.CodeType:
    """Unpickling a code object shipped by value: rebuild it and make its source lines (as
    deployed) available to tracebacks."""
    filename = args[_FILENAME_ARG]
    if lines and isinstance(filename, str):
        # mtime None: linecache.checkcache keeps the entry (the deployed source, not the file's
        # current one, which may have been edited since).
        linecache.cache[filename] = (sum(map(len, lines)), None, list(lines), filename)
    return types.CodeType(*args)


def _deployment_target(obj: Any) -> tuple[str, str] | None:
    """(module, qualname) when ``obj`` is the class/function of a module-level deployment in an
    importable module file (not ``__main__``), else None."""
    module_name = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", "")
    if not module_name or module_name == "__main__" or not qualname or "<" in qualname:
        return None
    module = sys.modules.get(module_name)
    spec = getattr(module, "__spec__", None)
    if module is None or spec is None or spec.name != module_name or not getattr(module, "__file__", None):
        return None
    value: Any = module
    for part in qualname.split("."):
        value = getattr(value, part, None)
    if _is_deployment(value) and value.func_or_class is obj:
        return module_name, qualname
    return None


def _is_deployment(value: Any) -> bool:
    """Whether ``value`` is a :class:`shoal.deployment.Deployment` (that module imports this one)."""
    kind = type(value)
    return kind.__name__ == "Deployment" and kind.__module__ == "shoal.deployment"


def _import_target(module_name: str, qualname: str, digest: str, fallback: bytes) -> Any:
    """Unpickling a target shipped by reference: import its module when its file is the one
    deployed (same digest), else load the by-value copy."""
    module = sys.modules.get(module_name)
    if module is None:
        try:
            spec = importlib.util.find_spec(module_name)
        except (ImportError, ValueError):
            spec = None
        origin = spec.origin if spec is not None else None
        if not digest or _cached_digest(origin) != digest:
            return _by_value(module_name, qualname, fallback, "is not importable here" if origin is None
                             else "changed since it was deployed")
        try:
            module = importlib.import_module(module_name)
        except Exception as e:
            # The module's top level failed here (e.g. a module-level serve.run(), refused in a
            # replica, or an import the deployer had): the deployed by-value copy still runs.
            logger.warning("importing module %s in this replica raised %s: %s", module_name, type(e).__name__, e)
            return _by_value(module_name, qualname, fallback, "could not be imported here")
    elif _cached_digest(getattr(module, "__file__", None)) != digest:
        return _by_value(module_name, qualname, fallback, "changed since it was deployed")
    value: Any = module
    for part in qualname.split("."):
        value = getattr(value, part)
    return value.func_or_class if _is_deployment(value) else value


def _cached_digest(path: str | None) -> str:
    if not path:
        return ""
    path = os.path.abspath(path)
    if path not in _digests:
        _digests[path] = file_digest(path)
    return _digests[path]


def _by_value(module_name: str, qualname: str, fallback: bytes, why: str) -> Any:
    logger.info("module %s %s: running the deployed copy of %s", module_name, why, qualname)
    return cloudpickle.loads(fallback)


class _ShipPickler(cloudpickle.Pickler):  # type: ignore[misc]  # (cloudpickle has no type hints)
    """cloudpickle, but deployment targets go by reference (with a by-value copy) and code
    shipped by value keeps its file name and source lines."""

    def __init__(self, file: io.BytesIO, *, by_reference: bool = True) -> None:
        self._lines: dict[str, tuple[str, ...]] = {}
        self._by_reference = by_reference
        # The C pickler reads dispatch_table when it is initialised: set it first.
        self.dispatch_table = ChainMap({types.CodeType: self._reduce_code}, cloudpickle.Pickler.dispatch_table)
        super().__init__(file, protocol=5)

    def reducer_override(self, obj: Any) -> Any:
        if self._by_reference and isinstance(obj, (types.FunctionType, type)):
            target = _deployment_target(obj)
            if target is not None:
                module = sys.modules[target[0]]
                copy = _dumps(obj, by_reference=False)
                return _import_target, (*target, file_digest(module.__file__), copy)
        return super().reducer_override(obj)

    def _reduce_code(self, code: types.CodeType) -> Any:
        reduced = _cp._code_reduce(code)
        args = tuple(reduced[1])
        if len(args) <= _FILENAME_ARG or args[_FILENAME_ARG] not in (_DYNAMIC, code.co_filename):
            return reduced  # a layout this module does not know: cloudpickle's own
        filename = sys.intern(code.co_filename)
        args = (*args[:_FILENAME_ARG], filename, *args[_FILENAME_ARG + 1:])
        if filename not in self._lines:
            # One tuple per file: the pickle's memo stores it once for all its code objects.
            self._lines[filename] = tuple(linecache.getlines(filename))
        return _restore_code, (args, self._lines[filename])


def _dumps(obj: Any, *, by_reference: bool) -> bytes:
    buf = io.BytesIO()
    _ShipPickler(buf, by_reference=by_reference).dump(obj)
    return buf.getvalue()


def dumps(obj: Any) -> bytes:
    """Pickle ``obj`` (a deployment's target and constructor arguments) for its replicas."""
    return _dumps(obj, by_reference=True)
