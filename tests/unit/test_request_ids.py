"""Request ids (shoal/runtime/ids.py): the format, uniqueness, and no repeats across a fork."""

from __future__ import annotations

import os
import re

from shoal.runtime.ids import new_request_id


def test_ids_are_16_hex_characters_and_do_not_repeat() -> None:
    ids = [new_request_id() for _ in range(100_000)]
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids[:1000])
    assert len(set(ids)) == len(ids)


def test_a_forked_child_does_not_make_its_parents_ids() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, then out without running the parent's cleanup
        try:
            os.write(write, ",".join(new_request_id() for _ in range(5)).encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        child = os.read(read, 4096).decode().split(",")
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    parent = [new_request_id() for _ in range(5)]
    assert len(child) == 5 and not set(child) & set(parent)
