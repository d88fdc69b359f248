"""``shoal logs``: print and follow the log files of a local instance's replicas and proxy.

Files live under ``<instance dir>/logs/<session>`` (see :mod:`shoal.observability.logs`; a
session per ``shoal run``/``shoal start``, :mod:`shoal.runtime.ownership`): one per replica in
``<app>/<deployment>/<replica id>.log``, and ``proxy.log``; a detached instance's controller writes
``<instance dir>/controller.log``. Each printed line is prefixed with the replica's id.
Following (``-f``) works like ``tail -f`` over every replica of the deployment, picks up
replicas that start later, and survives rotation.
"""

from __future__ import annotations

import glob
import os
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

import click

from shoal.observability.logs import is_live, proxy_log_path, safe_name
from shoal.observability.safefiles import log_files, open_for_reading
from shoal.observability.safetext import escape
from shoal.runtime.rundir import InstanceNotFoundError, RunDir

__all__ = ["Follower", "catalog", "logs", "tail_lines"]

POLL_S = 0.25
_COLORS = ("cyan", "green", "yellow", "magenta", "blue", "bright_cyan", "bright_green", "bright_magenta")


def _tail(f: IO[bytes], n: int | None) -> list[str]:
    """The last ``n`` complete lines of an open file (all for None), without reading all of a
    big one; leaves the file positioned after them."""
    end = f.seek(0, os.SEEK_END)
    if n is None:
        f.seek(0)
        data = f.read(end)
    elif n <= 0:
        return []
    else:
        size, data = end, b""
        while size > 0 and data.count(b"\n") <= n:
            step = min(64 * 1024, size)
            size -= step
            f.seek(size)
            data = f.read(step) + data
        f.seek(end)
    lines = data.decode("utf-8", "replace").splitlines()
    return lines if n is None else lines[-n:]


def tail_lines(path: str, n: int | None) -> list[str]:
    """The last ``n`` lines of a file (all of them for None); nothing for a file that is not a
    log file (another user's link, a FIFO: see :func:`open_for_reading`)."""
    try:
        with open(open_for_reading(path), "rb") as f:
            return _tail(f, n)
    except OSError:
        return []


def catalog(root: str) -> dict[str, list[str]]:
    """``"app/deployment"`` -> its replicas' log files (oldest first), for every deployment with logs."""
    out: dict[str, list[str]] = {}
    for d in sorted(glob.glob(os.path.join(glob.escape(root), "*", "*"))):
        if _linked_dir(d):
            continue
        files = _replica_files(d)
        if files:
            out[f"{os.path.basename(os.path.dirname(d))}/{os.path.basename(d)}"] = files
    return out


def _linked_dir(d: str) -> bool:
    """Whether ``<root>/<app>/<deployment>`` goes through a symbolic link (not followed: shoal
    makes real folders there)."""
    return os.path.islink(d) or os.path.islink(os.path.dirname(d))


def _replica_files(directory: str) -> list[str]:
    """The log files in a deployment's folder, oldest first: regular files, and the links
    shoal made into a ``logs_dir`` (not anyone else's)."""
    return [p for p, _ in sorted(log_files(directory), key=lambda f: (f[1], f[0]))]


def _label(path: str) -> str:
    name = os.path.basename(path)
    return name[:-4] if name.endswith(".log") else name


@dataclass
class _Open:
    path: str
    f: IO[bytes]
    ino: int
    partial: bytes = field(default=b"")


class Follower:
    """New lines of a changing set of files, like ``tail -F`` on each.

    :meth:`backlog` starts with the files there are now; ``list_files`` is asked again on
    every :meth:`poll`, and files it returns later are read from their start (a replica that
    started after us). A file replaced under its name (rotated) is read to its end, then the
    new one from its start.
    """

    def __init__(self, list_files: Callable[[], list[str]]) -> None:
        self.list_files = list_files
        self.files: dict[str, _Open] = {}

    def _open(self, path: str, at_end: bool = False) -> _Open | None:
        try:
            f = open(open_for_reading(path), "rb")  # noqa: SIM115 - kept open while following; close() closes it
        except OSError:
            return None
        if at_end:
            f.seek(0, os.SEEK_END)
        o = self.files[path] = _Open(path, f, os.fstat(f.fileno()).st_ino)
        return o

    def backlog(self, n: int | None) -> list[tuple[str, str]]:
        """The last ``n`` lines (all for None) of each file there is now; following goes on
        exactly from there."""
        out: list[tuple[str, str]] = []
        for path in self.list_files():
            o = self._open(path)
            if o is not None:
                out.extend((_label(path), line) for line in _tail(o.f, n))
        return out

    @staticmethod
    def _read(o: _Open, final: bool = False) -> list[str]:
        data = o.partial + o.f.read()
        lines = data.split(b"\n")
        o.partial = lines.pop()
        if final and o.partial:
            lines.append(o.partial)
            o.partial = b""
        return [x.decode("utf-8", "replace") for x in lines]

    def poll(self) -> list[tuple[str, str]]:
        """``(label, line)`` for every complete line written since the last poll."""
        out: list[tuple[str, str]] = []
        for path in self.list_files():
            if path not in self.files:
                self._open(path)
        for path, o in list(self.files.items()):
            label = _label(path)
            out.extend((label, line) for line in self._read(o))
            try:
                st = os.stat(path)
            except OSError:
                continue  # being rotated this very moment, or removed: look again next time
            if st.st_ino != o.ino:
                out.extend((label, line) for line in self._read(o, final=True))
                o.f.close()
                del self.files[path]
                new = self._open(path)
                if new is not None:
                    out.extend((label, line) for line in self._read(new))
            elif st.st_size < o.f.tell():  # truncated
                o.f.seek(0)
                o.partial = b""
        return out

    def close(self) -> None:
        for o in self.files.values():
            o.f.close()
        self.files.clear()


def _instance_dir(address: str | None) -> str:
    """The instance whose logs to read: a stopped instance's files can be read too. Checked
    like every instance directory: one another user could have made or could swap is refused."""
    try:
        with RunDir.find_for_logs(address) as found:
            return found.path
    except (InstanceNotFoundError, PermissionError) as e:
        raise click.ClickException(str(e)) from None


def _print(label: str, line: str, color: bool) -> None:
    """One line on the terminal, escape sequences in it shown, not obeyed: shoal escapes what
    it writes, but a replica's own print() reaches the file as it was (tabs are kept)."""
    prefix = f"[{escape(label)}]"
    if color:
        prefix = click.style(prefix, fg=_COLORS[zlib.crc32(label.encode()) % len(_COLORS)])
    click.echo(f"{prefix} {escape(line)}", color=color)


def _session_root(instance: str, session: str | None) -> str:
    """The log folder to read: the current session's (or the instance's only one), or the
    session named with ``--session``."""
    from shoal.runtime.ownership import sessions

    rd = RunDir(instance)
    if session is None:
        return rd.logs_dir
    kept = sessions(rd.logs_root)
    if session not in kept:
        choices = ", ".join(kept) or "none"
        raise click.ClickException(f"no session {session!r} in {rd.logs_root} (--session; kept: {choices})")
    return os.path.join(rd.logs_root, session)


def _list(instance: str, root: str) -> None:
    from shoal.runtime.ownership import sessions

    entries = catalog(root)
    here = os.path.basename(root)
    kept = sessions(RunDir(instance).logs_root)
    click.echo(f"logs of the instance at {instance}" + (f", session {here}:" if here in kept else ":"))
    if not entries and not os.path.exists(proxy_log_path(root)):
        click.echo("  none yet")
    width = max([len(k) for k in entries] + [10])
    for key, files in entries.items():
        replicas = ", ".join(f"{_label(p)} ({'running' if is_live(p) else 'exited'})" for p in reversed(files))
        click.echo(escape(f"  {key.ljust(width)}  {replicas}"))  # names are folder and file names
    if os.path.exists(proxy_log_path(root)):
        click.echo(f"  {'proxy'.ljust(width)}  {proxy_log_path(root)}")
    controller = RunDir(instance).controller_log
    if os.path.exists(controller):
        click.echo(f"  {'controller'.ljust(width)}  {controller}")
    click.echo("Print one with `shoal logs APP/DEPLOYMENT` (or just DEPLOYMENT); -f follows it.")
    older = [s for s in kept if s != here]
    if older:
        click.echo(f"Earlier sessions (--session NAME): {', '.join(reversed(older))}")


def _files_for(instance: str, root: str, target: str) -> Callable[[], list[str]]:
    """What TARGET names: a deployment's replica files (a function: replicas come and go),
    or the proxy's or the controller's file."""
    if "/" in target:
        app, dep = target.split("/", 1)
        dirs = [os.path.join(root, safe_name(app), safe_name(dep))]
    else:
        dirs = [d for d in glob.glob(os.path.join(glob.escape(root), "*", glob.escape(safe_name(target))))
                if os.path.isdir(d) and not _linked_dir(d)]
    if len(dirs) > 1:
        choices = ", ".join(f"{os.path.basename(os.path.dirname(d))}/{target}" for d in sorted(dirs))
        raise click.ClickException(f"deployment {target!r} exists in several applications; pick one: {choices}")
    if dirs and os.path.isdir(dirs[0]) and not _linked_dir(dirs[0]):
        directory = dirs[0]
        return lambda: _replica_files(directory)
    special = {"proxy": proxy_log_path(root), "controller": RunDir(instance).controller_log}
    if target in special and os.path.exists(special[target]):
        path = special[target]
        return lambda: [path]
    raise click.ClickException(f"no logs for {target!r} in {root} (`shoal logs` lists what there is)")


@click.command()
@click.argument("target", required=False)
@click.option("-f", "--follow", is_flag=True,
              help="Keep printing new lines as they are written, from every replica (also ones that start later).")
@click.option("--replica", "replica", default=None, metavar="TAG",
              help="Only this replica (its replica id, or the start of it).")
@click.option("-n", "--tail", "tail", type=click.IntRange(min=0), default=None, metavar="N",
              help="Start with the last N lines of each file (default: all of them).")
@click.option("--address", default=None, help="Instance directory (default: the running instance, or the last one).")
@click.option("--session", default=None, metavar="NAME",
              help="Read an earlier session's logs (`shoal logs` lists the sessions kept; default: the current one).")
def logs(target: str | None, follow: bool, replica: str | None, tail: int | None, address: str | None,
         session: str | None) -> None:
    """Print the logs of TARGET: ``APP/DEPLOYMENT`` (or ``DEPLOYMENT`` when its name is unique),
    ``proxy`` or ``controller``. Without TARGET, list the logs there are.

    Every replica writes its own file, ``<instance dir>/logs/<session>/<app>/<deployment>/<replica id>.log``
    (its log records, access log and stdout/stderr); lines are printed with the replica's id
    in front. Files rotate at 50 MB, keeping 3 old ones (``<replica id>.log.1`` ...). Each
    ``shoal run``/``shoal start`` is a session; the 5 newest sessions are kept.
    """
    instance = _instance_dir(address)
    root = _session_root(instance, session)
    if not target:
        _list(instance, root)
        return
    all_files = _files_for(instance, root, target)

    def list_files() -> list[str]:
        return [p for p in all_files() if not replica or _label(p).startswith(replica)]

    if replica and not list_files():
        raise click.ClickException(f"no replica of {target!r} has a replica id starting with {replica!r}")
    color = sys.stdout.isatty()
    if not follow:
        for path in list_files():
            for line in tail_lines(path, tail):
                _print(_label(path), line, color)
        return
    follower = Follower(list_files)
    try:
        for label, line in follower.backlog(tail):
            _print(label, line, color)
        while True:
            for label, line in follower.poll():
                _print(label, line, color)
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        pass
    finally:
        follower.close()
