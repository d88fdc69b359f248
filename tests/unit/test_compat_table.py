"""The Ray Serve compatibility table (shoal/_compat.py) against Ray's public names.

shoal/_ray_names.json lists the public names of the Ray Serve modules shoal mirrors, read from a
Ray wheel by scripts/ray_public_names.py. Every one of them has exactly one entry in the table;
a supported or partial name resolves in shoal, and a name shoal does not support raises
NotSupportedError with its reason (never AttributeError); docs/compatibility.md is what
scripts/gen_compat_docs.py generates from the table now.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from shoal import _compat
from shoal.exceptions import NotSupportedError, RayServeException

ROOT = Path(__file__).resolve().parents[2]
NAMES: dict[str, list[str]] = json.loads((ROOT / "shoal" / "_ray_names.json").read_text(encoding="utf-8"))["modules"]


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_compat_docs", ROOT / "scripts" / "gen_compat_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _entries(*statuses: str) -> list[Any]:
    return [pytest.param(module, name, location, note, id=f"{module}.{name}")
            for module, names in NAMES.items()
            for name in names
            for status, location, note in [_compat.TABLE[module].get(name, ("missing", "", ""))]
            if status in statuses]


def _resolve(location: str) -> Any:
    where, _, attr = location.rpartition(".")
    return getattr(importlib.import_module(where), attr)


def test_the_names_file_covers_the_mirrored_modules() -> None:
    doc = json.loads((ROOT / "shoal" / "_ray_names.json").read_text(encoding="utf-8"))
    assert doc["ray_version"] == "2.60.0"
    assert set(NAMES) == set(_compat.MIRRORS) == set(_compat.TABLE)
    for module, names in NAMES.items():
        assert names == sorted(set(names)), module
        assert names and not any(n.startswith("_") for n in names), module
    assert "get_deployment_actor" in NAMES["ray.serve"] and "DeploymentHandle" in NAMES["ray.serve.handle"]


def test_every_ray_name_has_exactly_one_entry_and_no_entry_is_invented() -> None:
    for module, names in NAMES.items():
        entries = _compat.TABLE[module]
        missing = sorted(set(names) - set(entries))
        invented = sorted(set(entries) - set(names))
        assert not missing, f"{module}: no entry in shoal/_compat.py for {missing}"
        assert not invented, f"{module}: entries for names Ray does not have: {invented}"
        for name, (status, location, note) in entries.items():
            assert status in _compat.STATUSES, (module, name, status)
            if status == _compat.NOT_SUPPORTED:
                assert not location and note, f"{module}.{name}: a name not supported needs a reason and no location"
            else:
                assert location.startswith("shoal."), (module, name, location)
            assert not note.endswith("."), f"{module}.{name}: the note ends a sentence of the error message"


@pytest.mark.parametrize(("module", "name", "location", "note"), _entries(_compat.SUPPORTED, _compat.PARTIAL))
def test_supported_names_resolve_in_shoal(module: str, name: str, location: str, note: str) -> None:
    target = _resolve(location)
    mirror = importlib.import_module(_compat.MIRRORS[module])
    # The mirror module answers with the same object, whether it defines the name or the table
    # points elsewhere (shoal.schema.RayActorOptionsSchema is shoal.config.RayActorOptions).
    assert getattr(mirror, name) is target


@pytest.mark.parametrize(("module", "name", "location", "note"), _entries(_compat.NOT_SUPPORTED))
def test_unsupported_names_raise_not_supported_error(module: str, name: str, location: str, note: str) -> None:
    mirror = importlib.import_module(_compat.MIRRORS[module])
    with pytest.raises(NotSupportedError) as caught:
        getattr(mirror, name)
    message = str(caught.value)
    assert message == f"{module}.{name} is not supported by shoal: {note}. See docs/compatibility.md"
    assert not isinstance(caught.value, AttributeError)
    assert isinstance(caught.value, NotImplementedError) and isinstance(caught.value, RayServeException)
    with pytest.raises(NotSupportedError, match=f"{module}.{name} is not supported"):
        exec(f"from {mirror.__name__} import {name}", {})


def test_other_unknown_names_are_attribute_errors() -> None:
    for mirror in _compat.MIRRORS.values():
        module = importlib.import_module(mirror)
        with pytest.raises(AttributeError, match="no_such_name"):
            module.no_such_name  # noqa: B018
        assert not hasattr(module, "no_such_name") and not hasattr(module, "__no_such_dunder__")


def test_importing_serve_does_not_load_the_table() -> None:
    # Replica processes import shoal.serve at start; the table loads only when a name is missing.
    code = ("import sys\nimport shoal.serve, shoal.handle, shoal.config, shoal.schema, shoal.exceptions, shoal.llm\n"
            "from shoal.serve import run, deployment\nprint('shoal._compat' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_the_page_is_what_the_generator_produces_now() -> None:
    page = (ROOT / "docs" / "compatibility.md").read_text(encoding="utf-8")
    assert page == _generator().render(), "docs/compatibility.md is stale: run `make compat-docs`"


def test_counts(capsys: pytest.CaptureFixture[str]) -> None:
    counts = _generator().counts(NAMES)
    assert {m: sum(c.values()) for m, c in counts.items()} == {m: len(n) for m, n in NAMES.items()}
    with capsys.disabled():
        print()
        for module, per in counts.items():
            print(f"{module:22} " + ", ".join(f"{status} {n}" for status, n in per.items()))
        totals = {s: sum(per[s] for per in counts.values()) for s in _compat.STATUSES}
        print(f"{'all':22} " + ", ".join(f"{status} {n}" for status, n in totals.items()))
