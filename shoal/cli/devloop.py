"""The inner development loop of ``shoal run``: deploy progress, and ``--reload``.

* :func:`deploy_with_progress` deploys an app and shows each deployment's replicas coming up
  (a live progress display on a terminal, one final summary otherwise), naming a deployment
  that is slow or failed.
* :class:`SourceWatcher` notices edits to the app's own files (modules imported from the
  project directory, and the config file), :func:`forget_modules` drops those modules so the
  next import reads the new code, and :func:`describe_changes` says what a redeploy changes
  per deployment.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from shoal.deployment import AppSpec

SLOW_AFTER_S = 15.0
# After this long without a replica of a deployment running, its newest log line is shown
# (its message, at most this many characters: the line fits 80 columns).
SHOW_LOG_AFTER_S = 3.0
LAST_LINE_CHARS = 40
# The head of a TEXT record ("<date> <time> <LEVEL> <logger> [request_id=..]: "), dropped there.
_MESSAGE = re.compile(r"^\S+ \S+ [A-Z]+ [^:]*: ")


# shoal itself is never reloaded, also when it is installed from a checkout under the project.
_SHOAL_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _project_file(path: str | None, roots: tuple[str, ...]) -> bool:
    if not path:
        return False
    path = os.path.abspath(path)
    if "site-packages" in path or "dist-packages" in path or path.startswith(sys.prefix + os.sep) \
            or path.startswith(_SHOAL_DIR + os.sep):
        return False
    return any(path == r or path.startswith(r + os.sep) for r in roots)


class SourceWatcher:
    """Modification times of the project's Python modules (those imported from under
    ``roots``) and of ``extra`` files (e.g. the config file); polled, no dependency."""

    def __init__(self, roots: Iterable[str], extra: Iterable[str] = ()) -> None:
        self.roots = tuple(os.path.abspath(r) for r in roots)
        self.extra = [os.path.abspath(e) for e in extra]
        # Every file seen stays watched: a module whose import failed is not in sys.modules,
        # and its fix must still be noticed.
        self.known: set[str] = set()
        self.mtimes = self._scan()

    def files(self) -> list[str]:
        mods = [getattr(m, "__file__", None) for m in list(sys.modules.values())]
        out = {os.path.abspath(f) for f in mods if isinstance(f, str) and _project_file(f, self.roots)}
        self.known |= out | set(self.extra)
        return sorted(self.known)

    def _scan(self) -> dict[str, int]:
        out = {}
        for f in self.files():
            try:
                out[f] = os.stat(f).st_mtime_ns
            except OSError:
                out[f] = -1
        return out

    def changed(self) -> list[str]:
        """Files changed since the last call that returned them (new files count once seen)."""
        now = self._scan()
        diff = [f for f, m in now.items() if self.mtimes.get(f) != m]
        diff += [f for f in self.mtimes if f not in now]
        if diff:
            self.mtimes = now
        return sorted(set(diff))

    def watch(self, paths: Iterable[str]) -> None:
        """Also watch these files (e.g. a module whose import failed, named by its traceback)."""
        self.known |= {os.path.abspath(p) for p in paths}
        self.mtimes = self._scan()

    def rescan(self) -> None:
        """Take the current files as the baseline (after a reload imported new modules)."""
        self.mtimes = self._scan()


def load_error_details(exc: BaseException, roots: Iterable[str]) -> tuple[str, list[str]]:
    """Where in the user's code an error raised while importing the app comes from: the
    traceback lines of the project's own frames (the innermost three, with their source line;
    for a SyntaxError, the file, line and caret), and those files (to watch them: a module
    whose import failed is not in ``sys.modules``)."""
    import traceback

    roots_t = tuple(os.path.abspath(r) for r in roots)
    cause: BaseException = exc
    while cause.__cause__ is not None and cause.__cause__ is not cause:
        cause = cause.__cause__
    files: list[str] = []
    lines: list[str] = []
    if isinstance(cause, SyntaxError) and cause.filename and _project_file(cause.filename, roots_t):
        files.append(os.path.abspath(cause.filename))
        lines = [ln for ln in traceback.format_exception_only(type(cause), cause)[:-1]]
    frames = [f for f in traceback.extract_tb(cause.__traceback__)
              if not f.filename.startswith("<") and _project_file(f.filename, roots_t)]
    files += [os.path.abspath(f.filename) for f in frames]
    if frames and not lines:
        lines = ["Traceback (your code, innermost last):\n", *traceback.format_list(frames[-3:])]
    return "".join(lines).rstrip("\n"), sorted(set(files))


def forget_modules(roots: Iterable[str]) -> list[str]:
    """Drop the project's modules from ``sys.modules`` so the next import reads them again."""
    roots_t = tuple(os.path.abspath(r) for r in roots)
    gone = [name for name, m in list(sys.modules.items())
            if _project_file(getattr(m, "__file__", None), roots_t)]
    for name in gone:
        del sys.modules[name]
    return gone


def describe_changes(old: AppSpec | None, new: AppSpec) -> list[str]:
    """One line per deployment: what a redeploy of ``new`` over ``old`` does to it."""
    if old is None:
        return [f"{new.name}: new application"]
    lines = []
    for name, d in new.deployments.items():
        prev = old.deployments.get(name)
        if prev is None:
            lines.append(f"{new.name}/{name}: added")
            continue
        if prev.code_version != d.code_version:
            lines.append(f"{new.name}/{name}: code or restart-requiring options changed (rolling update)")
            continue
        a, b = prev.config.model_dump(), d.config.model_dump()
        fields = sorted(k for k in b if a.get(k) != b[k])
        if fields:
            lines.append(f"{new.name}/{name}: {', '.join(fields)} changed (applied in place)")
    lines += [f"{new.name}/{name}: removed" for name in old.deployments if name not in new.deployments]
    if old.route_prefix != new.route_prefix:
        lines.append(f"{new.name}: route_prefix {old.route_prefix!r} -> {new.route_prefix!r}")
    return lines or [f"{new.name}: no change"]


def deploy_with_progress(console: Any, application: Any, name: str, route_prefix: str | None,
                         timeout: float | None = None,
                         last_line: Callable[[str], str | None] | None = None) -> AppSpec:
    """Deploy through the running instance and show replicas coming up until the app runs.

    Raises ``DeployError`` (naming the deployment and the reason) if it fails to deploy, and
    ``TimeoutError`` after ``timeout`` seconds.
    """
    from shoal import api
    from shoal.deployment import build_app_spec
    from shoal.runtime.controller import DeployError

    inst = api._require()
    spec = build_app_spec(application, name, route_prefix)
    inst.loop.run(inst.controller.deploy(spec))
    failed = show_progress(console, lambda: api.status().to_dict(), [name], timeout, last_line)
    if failed:
        raise DeployError(failed[0])
    inst.loop.run(inst.controller.wait_proxy())
    return spec


def progress_note(dep: dict[str, Any], running: int, target: int, waited: float,
                  last: str | None) -> str:
    """What the progress display says after a deployment's count: failed, the time it has
    waited for replicas (so the line moves while a constructor runs), the newest line its
    replicas logged once it takes a while, and "slow" after ``SLOW_AFTER_S``."""
    message = dep.get("message") or ""
    if dep["status"] == "DEPLOY_FAILED":
        return "[red]failed[/red]"
    if running >= target:
        return ""
    note = f"{waited:.0f}s"
    if waited > SLOW_AFTER_S:
        note += f" [yellow]slow: {_markup_safe(message or 'constructor still running')}[/yellow]"
    elif "pending" in message:
        note += f" [yellow]{_markup_safe(message)}[/yellow]"
    if last and waited > SHOW_LOG_AFTER_S:
        message = _MESSAGE.sub("", last, count=1)
        shown = message if len(message) <= LAST_LINE_CHARS else message[:LAST_LINE_CHARS - 1] + "…"
        note += f" [dim]| {_markup_safe(shown)}[/dim]"
    return note


def _markup_safe(text: str) -> str:
    from rich.markup import escape

    return str(escape(text))


def show_progress(console: Any, get_status: Callable[[], dict[str, Any]], names: list[str],
                  timeout: float | None = None,
                  last_line: Callable[[str], str | None] | None = None) -> list[str]:
    """Show each deployment of the apps ``names`` (and their canaries) coming up, until every
    app is RUNNING or DEPLOY_FAILED, with the seconds each has waited for its replicas and,
    when ``last_line`` (``"app/deployment"`` -> its replicas' newest log line) says, what its
    replicas logged last; a deployment still short of replicas after ``SLOW_AFTER_S`` is named
    as slow, with its status message. Returns one message per app that failed; raises
    ``TimeoutError`` after ``timeout`` seconds."""
    from rich.progress import BarColumn, Progress, TextColumn

    t0 = time.monotonic()
    since: dict[str, float] = {}
    progress = Progress(TextColumn("  {task.description}"), BarColumn(bar_width=20),
                        TextColumn("{task.completed}/{task.total} replicas {task.fields[note]}"),
                        console=console, transient=False, auto_refresh=console.is_terminal)
    tasks: dict[str, Any] = {}
    with progress:
        while True:
            apps = get_status()["applications"]
            elapsed = time.monotonic() - t0
            done, failed = True, []
            for name in names:
                app = apps.get(name)
                if app is None:
                    failed.append(f"application {name!r} was deleted while deploying")
                    continue
                views = [(f"{name}/{d}" if len(names) > 1 else d, f"{name}/{d}", dep)
                         for d, dep in app["deployments"].items()]
                canary = app.get("canary")
                if canary:
                    views += [(f"{name}/{d} (canary)", f"{name}/{d}", dep) for d, dep in canary["deployments"].items()]
                for label, key, dep in views:
                    running = dep["replica_states"].get("RUNNING", 0)
                    target = max(int(dep.get("target_replicas", 1)), 0)
                    started = since.setdefault(label, time.monotonic())
                    if running >= target:
                        since[label] = time.monotonic()  # a later shortfall counts from then
                    last = last_line(key) if last_line is not None else None
                    note = progress_note(dep, running, target, time.monotonic() - started, last)
                    if label not in tasks:
                        tasks[label] = progress.add_task(label, total=1, note="")
                    progress.update(tasks[label], total=max(target, 1), completed=min(running, target) if target
                                    else 1, note=note)
                states = [app["status"]] + ([canary["status"]] if canary else [])
                if "DEPLOY_FAILED" in states:
                    failed.append(f"application {name!r} failed to deploy: "
                                  f"{app['message'] or (canary or {}).get('message', '')}")
                elif any(s != "RUNNING" for s in states):
                    done = False
            if done:  # every app runs or failed
                progress.refresh()
                return failed
            if timeout is not None and elapsed > timeout:
                raise TimeoutError(f"not running after {timeout:.0f}s: {', '.join(names)}")
            time.sleep(0.1)
