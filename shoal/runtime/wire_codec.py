"""How wire messages become frame payloads and back: pickles (protocol 5, cloudpickle for user
values), and frames that carry large buffers out of band (:mod:`shoal.runtime.wire`)."""

from __future__ import annotations

import pickle
import struct
from typing import Any

import cloudpickle

__all__ = ["ACK", "IN_PLACE_BYTES", "OOB", "OOB_HEAD", "OOB_LEN", "PICKLE", "SHM", "decode", "dumps", "dumps_user"]


def dumps(msg: Any) -> bytes:
    """Pickle a message; user values may need cloudpickle (classes defined in __main__)."""
    try:
        return pickle.dumps(msg, protocol=5)
    except (pickle.PicklingError, TypeError, AttributeError):
        return dumps_user(msg)


def dumps_user(msg: Any) -> bytes:
    data: bytes = cloudpickle.dumps(msg, protocol=5)
    return data


# A frame whose first byte is OOB (never the first byte of a pickle, b"\x80") carries
# out-of-band buffers: (OOB, pickle length, buffer count), each buffer's length, the pickle,
# then the buffers (FramedProtocol.send_oob).
OOB = 0
# A frame whose first byte is SHM carries a message whose buffers lie in a shared-memory segment,
# one whose first byte is ACK says such a segment was mapped (shoal.runtime.shm; local connections only).
SHM, ACK = 1, 2
PICKLE = 0x80  # the first byte of every pickle (protocol 2 and up)
# Frames from this size on are unpickled in place in the receive buffer (smaller ones are copied).
IN_PLACE_BYTES = 64 * 1024
OOB_HEAD = struct.Struct(">BII")
OOB_LEN = struct.Struct(">Q")


def decode(view: memoryview, start: int, end: int, link: Any = None) -> Any:
    """The message in ``view[start:end]``, a frame's payload (None: nothing for the connection's
    owner). ``link``: the connection's :class:`~shoal.runtime.shm.ShmLink`, None if it has none."""
    if view[start] in (SHM, ACK):
        if link is None:
            raise ValueError("shared-memory frame on a connection that cannot carry one")
        return link.receive(view[start:end])
    if view[start] != OOB:
        return pickle.loads(view[start:end])
    _, head_len, count = OOB_HEAD.unpack_from(view, start)
    at = start + OOB_HEAD.size
    lengths = [OOB_LEN.unpack_from(view, at + i * OOB_LEN.size)[0] for i in range(count)]
    at += count * OOB_LEN.size
    head = view[at:at + head_len]
    at += head_len
    buffers: list[bytes] = []
    for length in lengths:
        buffers.append(bytes(view[at:at + length]))
        at += length
    if at != end:
        raise ValueError("malformed out-of-band frame")
    try:
        return pickle.loads(head, buffers=buffers)
    finally:
        head.release()
