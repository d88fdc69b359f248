"""Pure parts of the development loop: change descriptions, the source watcher."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from shoal import serve
from shoal.cli.devloop import SourceWatcher, describe_changes, forget_modules
from shoal.deployment import build_app_spec


@serve.deployment
class A:
    def __init__(self, x: int = 1) -> None:
        self.x = x


@serve.deployment
class B:
    pass


def test_describe_changes() -> None:
    old = build_app_spec(A.bind(), "app")
    assert describe_changes(None, old) == ["app: new application"]
    assert describe_changes(old, build_app_spec(A.bind(), "app")) == ["app: no change"]
    assert describe_changes(old, build_app_spec(A.bind(2), "app")) == [
        "app/A: code or restart-requiring options changed (rolling update)"]
    lines = describe_changes(old, build_app_spec(A.options(num_replicas=3, user_config={"k": 1}).bind(), "app"))
    assert lines == ["app/A: num_replicas, user_config changed (applied in place)"]
    renamed = build_app_spec(B.bind(), "app", route_prefix="/b")
    assert describe_changes(old, renamed) == ["app/B: added", "app/A: removed", "app: route_prefix '/' -> '/b'"]


def test_watcher_sees_edits_new_baseline_and_forgets_modules(tmp_path: Path) -> None:
    mod = tmp_path / "watched_mod_xyz.py"
    mod.write_text("X = 1\n")
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("applications: []\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import watched_mod_xyz  # type: ignore[import-not-found]  # noqa: F401

        w = SourceWatcher([str(tmp_path)], [str(cfg)])
        assert str(mod) in w.files() and str(cfg) in w.files()
        assert w.changed() == []
        time.sleep(0.01)
        mod.write_text("X = 2\n")
        os.utime(cfg)
        assert w.changed() == sorted([str(mod), str(cfg)])
        assert w.changed() == []
        assert forget_modules([str(tmp_path)]) == ["watched_mod_xyz"]
        assert "watched_mod_xyz" not in sys.modules
        # Forgotten (e.g. failed to import) modules stay watched.
        mod.write_text("X = 3\n")
        assert w.changed() == [str(mod)]
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("watched_mod_xyz", None)


def test_shoal_itself_is_never_watched_or_forgotten() -> None:
    import shoal

    root = os.path.dirname(os.path.dirname(os.path.abspath(shoal.__file__)))
    w = SourceWatcher([root])
    assert not any(f.startswith(os.path.dirname(os.path.abspath(shoal.__file__))) for f in w.files())
    saved = dict(sys.modules)
    try:
        forgotten = forget_modules([root])
        assert not any(name == "shoal" or name.startswith("shoal.") for name in forgotten)
    finally:
        sys.modules.update(saved)  # put back what this test removed (test modules of this checkout)
