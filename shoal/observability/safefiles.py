"""Opening, rotating and deleting log files without following another user's symbolic links.

A ``logging_config.logs_dir`` may be a folder other users can write (``/tmp/logs``, a shared
volume). Whoever can write there can put a symbolic link where a log file will be: written
through, it appends to a file of the link's choosing with shoal's privileges; pruned through,
it deletes one. So a log file's own name is never followed (``O_NOFOLLOW``), a folder on the
way to it is entered without following links (``openat`` one component at a time), and only
links that nobody else could have made or changed are followed on the way: owned by root or
by this user, in a folder others cannot write (or one with the sticky bit, like ``/tmp``).
Everything after that is done relative to the folder's descriptor, so the path cannot be
swapped under us between a check and the change it guards.

Folders that other users can write and that lack the sticky bit let them rename or replace
our files at will; they are reported (a warning) rather than refused, since an operator may
have made one on purpose. Linux and other POSIX systems only.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

__all__ = ["UnsafeLogPath", "is_loose", "log_files", "open_dir", "open_for_reading", "open_log", "own_link_target"]

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_WRITE = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
MODE = 0o640  # a new log file: the owner writes, its group may read
_MAX_LINKS = 40  # as the kernel's own limit on links followed in one path


class UnsafeLogPath(OSError):
    """A log path that would follow a symbolic link someone else controls, or write into a
    file that is not ours (callers that catch ``OSError`` fall back as for any unwritable file)."""


def is_loose(st: os.stat_result) -> bool:
    """A folder other users (its group, or anyone) can write, without the sticky bit: they
    can rename, delete or replace whatever is in it."""
    return bool(st.st_mode & 0o022) and not st.st_mode & stat.S_ISVTX


def _note(notes: list[str] | None, text: str) -> None:
    if notes is not None and text not in notes:
        notes.append(text)


def open_dir(path: str, *, create: bool = False, notes: list[str] | None = None) -> int:
    """A descriptor of the folder ``path`` (made, mode 0700, where missing with ``create``),
    reached without following a symbolic link that another user owns or could have replaced.

    Folders on the way that others can write without the sticky bit are added to ``notes``.
    Raises :class:`UnsafeLogPath` for a link it will not follow, ``OSError`` otherwise.
    """
    full = path if os.path.isabs(path) else os.path.join(os.getcwd(), path)
    for _ in range(_MAX_LINKS):
        got = _walk(full, create, notes)
        if isinstance(got, int):
            return got
        full = got
    raise UnsafeLogPath(errno.ELOOP, "too many symbolic links on the way to a log folder", path)


def _walk(full: str, create: bool, notes: list[str] | None) -> int | str:
    """The folder's descriptor, or the path to walk instead (a trusted link was met)."""
    parts = [p for p in full.split(os.sep) if p]
    fd = os.open("/", _DIR)
    try:
        for i, name in enumerate(parts):
            try:
                nxt = _enter(fd, name, create)
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                return _through_link(fd, parts, i, e)
            os.close(fd)
            fd = nxt
            st = os.fstat(fd)
            if is_loose(st):
                _note(notes, f"{os.sep + os.sep.join(parts[:i + 1])} is writable by other users and has no sticky "
                             "bit: they can replace the log files in it (chmod o-w,g-w, or +t)")
        out, fd = fd, -1
        return out
    finally:
        if fd >= 0:
            os.close(fd)


def _enter(fd: int, name: str, create: bool) -> int:
    try:
        return os.open(name, _DIR | os.O_NOFOLLOW, dir_fd=fd)
    except FileNotFoundError:
        if not create:
            raise
    try:
        os.mkdir(name, 0o700, dir_fd=fd)
    except FileExistsError:
        pass
    return os.open(name, _DIR | os.O_NOFOLLOW, dir_fd=fd)


def _through_link(fd: int, parts: list[str], i: int, error: OSError) -> str:
    where = os.sep + os.sep.join(parts[:i + 1])
    st = os.stat(parts[i], dir_fd=fd, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        raise error
    if st.st_uid not in (0, os.geteuid()):
        raise UnsafeLogPath(errno.ELOOP, f"not following a symbolic link owned by uid {st.st_uid} "
                                         "on the way to a log folder", where)
    if is_loose(os.fstat(fd)):
        raise UnsafeLogPath(errno.ELOOP, "not following a symbolic link in a folder other users can write "
                                         "(no sticky bit) on the way to a log folder", where)
    target = os.readlink(parts[i], dir_fd=fd)
    # Relative to the link's folder; ".." is then taken by the walk as the real parent.
    return os.path.join(os.sep + os.sep.join(parts[:i]), target, *parts[i + 1:])


def _checked(fd: int) -> str:
    """Why the open file ``fd`` is no log file of ours ('' when it is one)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}"
    if st.st_nlink > 1:
        return f"has {st.st_nlink} names (a hard link)"
    return ""


def open_log(dir_fd: int, name: str, where: str, notes: list[str] | None = None) -> tuple[int, str]:
    """A descriptor for appending to the log file ``name`` in the folder ``dir_fd`` (created
    with mode 0640), never through a symbolic link and never into a file that is not ours; and
    the name it has.

    What is found under the name instead (a link, another user's file, a FIFO) is removed,
    only the name, never what a link points to, and a fresh file is made in its place; where
    the name cannot be removed (another user's, in a sticky folder) the fresh file gets a new
    name, ``<name>-<random>.log``. Either way a note says so. :class:`UnsafeLogPath` only when
    not even that can be made.
    """
    try:
        fd = os.open(name, _WRITE, MODE, dir_fd=dir_fd)
    except OSError as e:
        # A link (ELOOP); a FIFO nobody reads (ENXIO); another user's file in a sticky folder
        # (EACCES, fs.protected_regular and _symlinks): which one, lstat() tells.
        if e.errno not in (errno.ELOOP, errno.ENXIO, errno.EACCES, errno.EPERM):
            raise
        why = _found(dir_fd, name)
        if not why:
            raise
    else:
        why = _checked(fd)
        if not why:
            _blocking(fd)
            return fd, name
        os.close(fd)
    shown = f"{why} -> {_link_text(dir_fd, name)}" if why == "a symbolic link" else why
    try:
        os.unlink(name, dir_fd=dir_fd)
        fd = os.open(name, _WRITE | os.O_EXCL, MODE, dir_fd=dir_fd)
    except OSError:
        pass
    else:
        _blocking(fd)
        _note(notes, f"{where} was {shown}: not followed; removed that name and started a fresh log file")
        return fd, name
    fresh = f"{name[:-4] if name.endswith('.log') else name}-{os.urandom(4).hex()}.log"
    try:
        fd = os.open(fresh, _WRITE | os.O_EXCL, MODE, dir_fd=dir_fd)
    except OSError as e:
        raise UnsafeLogPath(errno.EPERM, f"refusing the log file: it is {shown}, and no fresh file can be made "
                                         f"next to it ({e.strerror})", where) from None
    _blocking(fd)
    _note(notes, f"{where} is {shown} that cannot be removed: not followed; writing {fresh} in the same folder")
    return fd, fresh


def _blocking(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)


def _found(dir_fd: int, name: str) -> str:
    """Why what is under ``name`` is no log file of ours, by its ``lstat`` ('' when it is one)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return ""
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    return f"owned by uid {st.st_uid}" if st.st_uid != os.geteuid() else ""


def _link_text(dir_fd: int, name: str) -> str:
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except OSError:
        return "?"


def own_link_target(path: str, st: os.stat_result) -> str | None:
    """Where the symbolic link ``path`` (its ``lstat`` is ``st``) points, when it is one shoal
    made (owned by this user, or root's); None for anyone else's."""
    if not stat.S_ISLNK(st.st_mode) or st.st_uid not in (0, os.geteuid()):
        return None
    return os.path.join(os.path.dirname(path), os.readlink(path))


def log_files(directory: str) -> list[tuple[str, float]]:
    """``(path, mtime)`` of the ``*.log`` files in ``directory`` that can be read: regular files,
    and the links shoal made into a ``logs_dir`` (not anyone else's); unsorted."""
    import glob

    found: list[tuple[str, float]] = []
    for path in glob.glob(os.path.join(glob.escape(directory), "*.log")):
        try:
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                target = own_link_target(path, st)
                if target is None:
                    continue
                st = os.lstat(target)
            if stat.S_ISREG(st.st_mode):
                found.append((path, st.st_mtime))
        except OSError:
            continue
    return found


def open_for_reading(path: str) -> int:
    """A descriptor for reading the log file ``path``: a regular file, or one link shoal made
    to one (``logging_config.logs_dir``); anything else raises ``OSError``. Never blocks on a
    FIFO, never follows a second link."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        target = own_link_target(path, st)
        if target is None:
            raise UnsafeLogPath(errno.ELOOP, f"not following a symbolic link owned by uid {st.st_uid}", path)
        path = target
    fd = os.open(path, _READ)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeLogPath(errno.EINVAL, "not a regular file", path)
    _blocking(fd)
    return fd
