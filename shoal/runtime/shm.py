"""Large arguments and results through shared memory, between the processes of one instance.

A handle call's arguments, and its result, are pickles on the connection between caller and
replica (:mod:`shoal.runtime.wire`). On a local Unix-socket connection, a message whose
out-of-band buffers (pickle protocol 5: numpy arrays, CPU torch tensors, ``bytes`` and
``bytearray`` arguments or results) add up to at least :func:`threshold` bytes travels
differently: the sender writes the buffers into a new file in the instance's *segment
directory* and the frame carries only the small in-band pickle and where each buffer lies.
The receiver maps the file and unpickles with its buffers pointing into the mapping: numpy
arrays and torch tensors alias the mapping (no copy), ``bytes`` and ``bytearray`` are copied
out of it.

Semantics:

* the mapping is private copy-on-write (``MAP_PRIVATE``): the arrays a receiver gets are
  writable as before, a write changes only the receiver's copy of the page it touches;
* it stays mapped while any object built on it lives; every buffer of one message shares it,
  so keeping one array of a message keeps that message's memory (``arr.copy()`` detaches);
* streamed items, HTTP requests and every TCP connection (Kubernetes pods) use the socket.

Segments are reused: a connection's sender keeps a pool of segments mapped once by both sides
(at most ``$SHOAL_SHM_POOL_BYTES`` per process, default 512 MiB), and writes a message into one
only once the receiver has acknowledged that every object built on the last message there is
gone; such mappings are shared, not private (see :mod:`shoal.runtime.shm_pool`). A message that
finds no free pooled segment takes a fresh one, as follows.

Lifetime: the receiver unlinks a fresh segment the moment it has mapped it (the memory goes when
the last array built on it goes) and acknowledges it. Pooled segments live while their connection
does, and go like unacknowledged fresh ones when it ends. The sender unlinks what was not acknowledged
when the connection ends (at once when the peer process is dead, else after
:data:`UNACKED_GRACE_S`). When a connection ends because the peer process died, what that
process may have left (a segment it was writing when it was killed) is removed too: segment
names start with the writer's pid. The controller removes the segment directory when the
instance shuts down, and segments of dead processes when it starts.

The segment directory is ``/dev/shm/shoal-<uid>/<key>``, ``<key>`` a hash of the real path of
the instance directory (the directory of the connection's socket): memory-backed, and checked
like the instance directory (:func:`~shoal.runtime.rundir.open_private_dir`: every component
on the way safe, the last two this user's and mode 0700). Where there is no usable
``/dev/shm`` (or it is full) messages take the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import copyreg
import hashlib
import io
import itertools
import logging
import mmap
import os
import pickle
import re
import secrets
import socket
import stat
import struct
import sys
import threading
from collections.abc import Callable
from typing import Any, Protocol

import cloudpickle

from shoal.runtime.rundir import open_private_dir
from shoal.runtime.shm_pool import ByteSetting, MapCache, SendPool, is_pooled, pool_budget
from shoal.runtime.wire_codec import ACK, SHM, dumps_user

__all__ = ["DEFAULT_THRESHOLD", "THRESHOLD_ENV", "ShmLink", "attach", "prepare", "remove_dir", "segment_dir",
           "stats", "threshold"]


class Connection(Protocol):
    """What a link needs of its connection (:class:`shoal.runtime.wire.FramedProtocol`)."""

    closed: bool
    transport: asyncio.Transport | None
    peer_check: Callable[[asyncio.BaseTransport], str | None] | None
    shm: ShmLink | None

    def send_bytes(self, payload: bytes) -> None: ...


logger = logging.getLogger("shoal.shm")

THRESHOLD_ENV = "SHOAL_SHM_THRESHOLD_BYTES"
DEFAULT_THRESHOLD = 1 << 20
# Buffers smaller than this stay inside the pickle (copying them costs less than a buffer entry).
MIN_BUFFER = 64 * 1024
# Each buffer starts at a multiple of this in its segment (aligned for numpy and SIMD loads).
ALIGN = 64
# A sender removes an unacknowledged segment this long after its connection ended (the peer
# alive: it may still be reading what it received before the end).
UNACKED_GRACE_S = 2.0
# When a connection ends and its peer process still runs, whether it died is checked again after
# each of these delays (a process being killed closes its sockets before it is a zombie).
PEER_RECHECK_S = (0.05, 0.2, 1.0)
SHM_ROOT = "/dev/shm"
# The frame after the tag byte: name length, buffer count; then the name, (offset, length) per
# buffer, then the pickle.
_HEAD = struct.Struct(">BBI")
_SPAN = struct.Struct(">QQ")
_PEERCRED = struct.Struct("3i")  # pid, uid, gid
_NAME = re.compile(rb"[0-9]{1,10}-p?[0-9]{1,20}-[0-9a-f]{8}\Z")
_CHUNK = 1 << 30  # one pwrite at most (Linux writes under 2 GiB per call)

_counter = itertools.count(1)
_stats = {"segments_sent": 0, "bytes_sent": 0, "segments_received": 0, "bytes_received": 0, "fallbacks": 0,
          "pooled_sent": 0}
_warned: set[str] = set()
_dirs: dict[str, int] = {}  # segment directory -> its descriptor, checked once (see _open_dir)
_dirs_lock = threading.Lock()


#: The smallest total of out-of-band bytes that travels through shared memory
#: (``$SHOAL_SHM_THRESHOLD_BYTES``, default 1 MiB; 0 turns it off).
threshold = ByteSetting(THRESHOLD_ENV, DEFAULT_THRESHOLD, "0 turns shared memory off")


def stats() -> dict[str, int]:
    """What this process sent and received through shared memory so far (segments and bytes), and
    how many large messages took the socket because no segment could be written."""
    return dict(_stats)


def segment_dir(instance_dir: str) -> str:
    """The segment directory of the instance whose directory (where its sockets are) is ``instance_dir``."""
    key = hashlib.sha256(os.fsencode(os.path.realpath(instance_dir))).hexdigest()[:24]
    return os.path.join(SHM_ROOT, f"shoal-{os.getuid()}", key)


def _open_dir(path: str, create: bool) -> int:
    """A descriptor of the segment directory (the caller closes it), checked when first opened
    (see the module's docstring) and kept open by this process until the directory is removed."""
    with _dirs_lock:
        fd = _dirs.get(path)
        if fd is not None:
            with contextlib.suppress(OSError):
                if os.fstat(fd).st_nlink > 0:
                    return os.dup(fd)
            del _dirs[path]  # removed (and maybe made again): checked again
            os.close(fd)
        if create and not os.path.isdir(SHM_ROOT):
            raise FileNotFoundError(f"{SHM_ROOT} does not exist")
        fd = open_private_dir(path, create=create, private=2)
        _dirs[path] = fd
        return os.dup(fd)


# ---- pickling: buffers out of band -------------------------------------------------------------


def _rebuild_tensor(array: Any, view: str) -> Any:
    import torch

    tensor = torch.from_numpy(array)
    return tensor.view(getattr(torch, view)) if view else tensor


_CARRIERS = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}


def _reduce_tensor(t: Any) -> Any:
    """A CPU tensor as a numpy array (whose buffer goes out of band), rebuilt by ``torch.from_numpy``."""
    import torch

    if (t.requires_grad or t.device.type != "cpu" or t.layout is not torch.strided or t.is_quantized
            or t.nbytes < MIN_BUFFER):
        return t.__reduce_ex__(5)
    t = t.detach().resolve_conj().resolve_neg().contiguous()
    try:
        return _rebuild_tensor, (t.numpy(), "")
    except TypeError:  # no numpy dtype (bfloat16, float8...): carried as integers of its size
        carrier = _CARRIERS.get(t.element_size())
        if carrier is None:
            return t.__reduce_ex__(5)
        return _rebuild_tensor, (t.view(getattr(torch, carrier)).numpy(), str(t.dtype).removeprefix("torch."))


class _Bytes:
    """A large ``bytes`` or ``bytearray`` value, pickled as a buffer out of band."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self.data), (pickle.PickleBuffer(self.data),)


_pickler: tuple[tuple[int, bool], type[pickle.Pickler]] | None = None


def _pickler_class() -> type[pickle.Pickler]:
    """cloudpickle's pickler, its dispatch table a plain dict (quick lookups) with CPU torch
    tensors added once torch is imported."""
    global _pickler
    torch = sys.modules.get("torch")
    tensor = getattr(torch, "Tensor", None)
    key = (len(copyreg.dispatch_table), tensor is not None)
    if _pickler is None or _pickler[0] != key:
        table = dict(cloudpickle.Pickler.dispatch_table)
        if tensor is not None:
            table[tensor] = _reduce_tensor
        _pickler = key, type("ShmPickler", (cloudpickle.Pickler,), {"dispatch_table": table})
    return _pickler[1]


def _wrap(value: Any, floor: int) -> Any:
    return _Bytes(value) if type(value) in (bytes, bytearray) and len(value) >= floor else value


def _wrap_bytes(msg: Any, floor: int) -> Any:
    """``msg`` with its large ``bytes``/``bytearray`` values (the message itself, a field, or an
    item of a tuple, list or dict field: call arguments, keyword arguments, a result) wrapped."""
    if type(msg) is not tuple:
        return _wrap(msg, floor)
    found = False
    for field in msg:
        t = type(field)
        if t is tuple or t is list:
            found = any(type(v) in (bytes, bytearray) and len(v) >= floor for v in field)
        elif t is dict:
            found = any(type(v) in (bytes, bytearray) and len(v) >= floor for v in field.values())
        else:
            found = t in (bytes, bytearray) and len(field) >= floor
        if found:
            break
    if not found:
        return msg
    out: list[Any] = []
    for field in msg:
        t = type(field)
        if t is tuple or t is list:
            out.append(t(_wrap(v, floor) for v in field))
        elif t is dict:
            out.append({k: _wrap(v, floor) for k, v in field.items()})
        else:
            out.append(_wrap(field, floor))
    return tuple(out)


def encode(msg: Any, limit: int) -> tuple[bytes, list[memoryview]]:
    """The in-band pickle of ``msg`` and its out-of-band buffers (none: the pickle is the whole
    message), when they add up to ``limit`` bytes or more; else a plain pickle and no buffers."""
    floor = min(MIN_BUFFER, limit)
    raws: list[memoryview] = []

    def keep(buf: pickle.PickleBuffer) -> bool:
        try:
            raw = buf.raw()
        except BufferError:  # not contiguous: inside the pickle
            return True
        if raw.nbytes < floor:
            return True
        raws.append(raw)
        return False

    with io.BytesIO() as f:
        _pickler_class()(f, protocol=5, buffer_callback=keep).dump(_wrap_bytes(msg, floor))
        head = f.getvalue()
    if raws and sum(r.nbytes for r in raws) < limit:
        return dumps_user(msg), []
    return head, raws


# ---- segments ----------------------------------------------------------------------------------


def _layout(raws: list[memoryview]) -> tuple[list[tuple[int, int]], int]:
    """Each buffer's (offset, length) in a segment, and the segment's length."""
    spans: list[tuple[int, int]] = []
    end = 0
    for raw in raws:
        offset = -(-end // ALIGN) * ALIGN
        spans.append((offset, raw.nbytes))
        end = offset + raw.nbytes
    return spans, end


def _write_pooled(pool: SendPool, directory: str, raws: list[memoryview]) -> tuple[str, list[tuple[int, int]]] | None:
    """Write ``raws`` into a free pooled segment (None: none to be had, or none could be made)."""
    spans, end = _layout(raws)
    dfd = _open_dir(directory, create=True)
    try:
        got = pool.acquire(dfd, end)
    except OSError as e:  # no room in /dev/shm for a pooled segment, say: a one-off one may still fit
        logger.debug("no pooled shared-memory segment: %s", e)
        got = None
    finally:
        os.close(dfd)
    if got is None:
        return None
    name, mapping = got
    for raw, (offset, length) in zip(raws, spans, strict=True):
        mapping[offset:offset + length] = raw
    _stats["segments_sent"] += 1
    _stats["pooled_sent"] += 1
    _stats["bytes_sent"] += end
    return name, spans


def _write_segment(directory: str, raws: list[memoryview]) -> tuple[str, list[tuple[int, int]]]:
    """Write ``raws`` into a new segment; its name and each buffer's (offset, length)."""
    spans, end = _layout(raws)
    dfd = _open_dir(directory, create=True)
    try:
        vfs = os.fstatvfs(dfd)
        if vfs.f_bavail * vfs.f_frsize < end:
            raise OSError(f"{SHM_ROOT} has less than {end} bytes free")
        name = f"{os.getpid()}-{next(_counter)}-{secrets.token_hex(4)}"
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            for raw, (offset, length) in zip(raws, spans, strict=True):
                done = 0
                while done < length:
                    done += os.pwrite(fd, raw[done:done + _CHUNK], offset + done)
        except BaseException:
            _unlink(dfd, name)
            raise
        finally:
            os.close(fd)
    finally:
        os.close(dfd)
    _stats["segments_sent"] += 1
    _stats["bytes_sent"] += end
    return name, spans


def _unlink(dfd: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dfd)


def _map_segment(directory: str, name: str, spans: list[tuple[int, int]]) -> mmap.mmap:
    """Open segment ``name``, unlink it, and map it copy-on-write."""
    need = max((o + n for o, n in spans), default=0)
    dfd = _open_dir(directory, create=False)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            os.unlink(name, dir_fd=dfd)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size < need or need <= 0:
                raise ValueError(f"shared-memory segment {name} is not a {need}-byte file of this user")
            mapping = mmap.mmap(fd, need, access=mmap.ACCESS_COPY)
        finally:
            os.close(fd)
    finally:
        os.close(dfd)
    _stats["segments_received"] += 1
    _stats["bytes_received"] += need
    return mapping


def _unlink_all(directory: str, names: set[str]) -> None:
    try:
        dfd = _open_dir(directory, create=False)
    except OSError:
        return
    try:
        for name in names:
            _unlink(dfd, name)
    finally:
        os.close(dfd)


def _pid_dead(pid: int) -> bool:
    """Whether process ``pid`` is gone (or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[:1] in ([b"Z"], [b"X"])
    except FileNotFoundError:
        return True
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        pass
    return False


def sweep(directory: str, keep: Callable[[int], bool]) -> int:
    """Remove the segments in ``directory`` whose writer's pid ``keep`` refuses; how many."""
    try:
        dfd = _open_dir(directory, create=False)
    except OSError:
        return 0
    removed = 0
    try:
        for name in os.listdir(dfd):
            pid = name.split("-", 1)[0]
            if pid.isdigit() and not keep(int(pid)):
                _unlink(dfd, name)
                removed += 1
    finally:
        os.close(dfd)
    return removed


def prepare(instance_dir: str) -> None:
    """At an instance's start: check ``$SHOAL_SHM_THRESHOLD_BYTES`` (``ValueError`` naming it) and
    remove segments that processes which are gone left behind. ``$SHOAL_SHM_POOL_BYTES`` too."""
    threshold()
    pool_budget()
    if sweep(segment_dir(instance_dir), lambda pid: not _pid_dead(pid)):
        logger.info("removed shared-memory segments left by processes that are gone")


def remove_dir(instance_dir: str) -> None:
    """At an instance's shutdown: remove its segment directory and whatever is left in it."""
    path = segment_dir(instance_dir)
    sweep(path, lambda pid: False)
    with _dirs_lock:
        fd = _dirs.pop(path, None)
    if fd is not None:
        os.close(fd)
    with contextlib.suppress(OSError):
        parent = open_private_dir(os.path.dirname(path), private=1)  # shoal-<uid>: ours; /dev/shm: root's
        try:
            os.rmdir(os.path.basename(path), dir_fd=parent)
        finally:
            os.close(parent)


# ---- one connection ----------------------------------------------------------------------------


class ShmLink:
    """The shared-memory side of one local (Unix-socket) connection: see the module's docstring."""

    __slots__ = ("_dir", "_maps", "_pending", "_pool", "_proto", "_socket_dir", "peer_pid")

    def __init__(self, proto: Connection, socket_path: str) -> None:
        self._proto = proto
        self._socket_dir = os.path.dirname(os.path.abspath(socket_path))
        self._dir = ""
        self._pending: set[str] = set()  # fresh segments sent, not acknowledged yet
        self._pool = SendPool()  # segments this side writes into again and again
        self._maps = MapCache()  # the peer's pooled segments, mapped here
        self.peer_pid = 0

    @property
    def directory(self) -> str:
        if not self._dir:
            self._dir = segment_dir(self._socket_dir)
        return self._dir

    def note_peer(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        with contextlib.suppress(OSError, AttributeError):
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            self.peer_pid = _PEERCRED.unpack(raw)[0]

    def send(self, msg: Any) -> None:
        """Send a message of user values: through a segment when large enough, else as a pickle."""
        proto = self._proto
        limit = threshold()
        if limit <= 0:
            proto.send_bytes(dumps_user(msg))
            return
        head, raws = encode(msg, limit)
        if not raws:
            proto.send_bytes(head)
            return
        if proto.closed or proto.transport is None or proto.transport.is_closing():
            raise ConnectionError("connection is closed")
        try:
            pooled = _write_pooled(self._pool, self.directory, raws) if pool_budget() > 0 else None
            name, spans = pooled if pooled is not None else _write_segment(self.directory, raws)
        except (OSError, ValueError) as e:
            _stats["fallbacks"] += 1
            if type(e).__name__ not in _warned:
                _warned.add(type(e).__name__)
                logger.warning("large message sent through the socket, not shared memory: %s", e)
            proto.send_bytes(dumps_user(msg))
            return
        finally:
            for raw in raws:
                raw.release()
        encoded = name.encode()
        frame = b"".join([_HEAD.pack(SHM, len(encoded), len(spans)), encoded,
                          *(_SPAN.pack(o, n) for o, n in spans), head])
        if pooled is None:
            self._pending.add(name)
        try:
            proto.send_bytes(frame)
        except BaseException:
            if pooled is None:
                self._pending.discard(name)
                _unlink_all(self.directory, {name})
            else:
                self._drop_pooled({name})
            raise

    def _drop_pooled(self, names: set[str]) -> None:
        with contextlib.suppress(OSError):
            dfd = _open_dir(self.directory, create=False)
            try:
                self._pool.close(dfd, names)
            finally:
                os.close(dfd)

    def _release(self, name: bytes) -> None:
        """Every object built on the peer's pooled segment ``name`` is gone: tell the peer."""
        if not self._proto.closed:
            with contextlib.suppress(ConnectionError, RuntimeError):
                self._proto.send_bytes(bytes([ACK]) + name)

    def receive(self, frame: memoryview) -> Any:
        """The message of a shared-memory frame (``frame[0] == SHM``), or None for an acknowledgement."""
        if frame[0] == ACK:
            acked = bytes(frame[1:]).decode("ascii", "replace")
            if not self._pool.release(acked):
                self._pending.discard(acked)
            return None
        _, name_len, count = _HEAD.unpack_from(frame, 0)
        at = _HEAD.size + name_len
        name = bytes(frame[_HEAD.size:at])
        if not _NAME.match(name) or at + count * _SPAN.size > len(frame):
            raise ValueError("malformed shared-memory frame")
        spans = [_SPAN.unpack_from(frame, at + i * _SPAN.size) for i in range(count)]
        head = frame[at + count * _SPAN.size:]
        if is_pooled(name.decode()):
            return self._receive_pooled(name, spans, head)
        mapping = _map_segment(self.directory, name.decode(), spans)
        with contextlib.suppress(ConnectionError):
            self._proto.send_bytes(bytes([ACK]) + name)
        whole = memoryview(mapping)
        return pickle.loads(head, buffers=[whole[o:o + n] for o, n in spans])

    def _receive_pooled(self, name: bytes, spans: list[tuple[int, int]], head: memoryview) -> Any:
        need = max((o + n for o, n in spans), default=0)
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        dfd = _open_dir(self.directory, create=False)
        try:
            whole = self._maps.view(dfd, name.decode(), need, loop, lambda _: self._release(name))
        finally:
            os.close(dfd)
        _stats["segments_received"] += 1
        _stats["bytes_received"] += need
        return pickle.loads(head, buffers=[whole[o:o + n] for o, n in spans])

    def lost(self) -> None:
        """The connection ended: remove what the peer will not read, and what it left if it died."""
        try:
            self._lost()
        except Exception:  # the connection's owner must learn of its end whatever happens here
            logger.exception("cleaning up the shared-memory segments of a closed connection")

    def _lost(self) -> None:
        pending, self._pending = self._pending, set()
        self._maps.clear()
        dead = self.peer_pid > 0 and _pid_dead(self.peer_pid)
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        busy = self._pool.names(busy=True)  # the peer may not have mapped them yet: as unacknowledged
        if dead or loop is None:
            self._drop_pooled(self._pool.names(busy=False) | busy)
        else:
            self._drop_pooled(self._pool.names(busy=False))
            if busy:
                loop.call_later(UNACKED_GRACE_S, self._drop_pooled, busy)
        if pending:
            if dead or loop is None:
                _unlink_all(self.directory, pending)
            else:
                loop.call_later(UNACKED_GRACE_S, _unlink_all, self.directory, pending)
        if dead:
            self._sweep_peer()
        elif self.peer_pid > 0 and loop is not None:
            # A killed process's sockets close before it is a zombie: look again a little later.
            loop.call_later(PEER_RECHECK_S[0], self._recheck, loop, 1)

    def _recheck(self, loop: asyncio.AbstractEventLoop, attempt: int) -> None:
        if _pid_dead(self.peer_pid):
            self._sweep_peer()
        elif attempt < len(PEER_RECHECK_S):
            loop.call_later(PEER_RECHECK_S[attempt], self._recheck, loop, attempt + 1)

    def _sweep_peer(self) -> None:
        peer = self.peer_pid
        sweep(self.directory, lambda pid: pid != peer)


def attach(proto: Connection, socket_path: str) -> None:
    """Give a Unix-socket connection its :class:`ShmLink` (and note the peer's pid when it connects)."""
    link = ShmLink(proto, socket_path)
    check = proto.peer_check

    def noted(transport: asyncio.BaseTransport) -> str | None:
        link.note_peer(transport)
        return check(transport) if check is not None else None

    proto.peer_check = noted
    proto.shm = link
