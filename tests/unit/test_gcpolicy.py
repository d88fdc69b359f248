"""The controller's garbage-collection schedule (shoal/runtime/controller/gcpolicy.py)."""

from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace
from typing import Any

from shoal.runtime.controller.gcpolicy import FREEZE_EVERY_S, FULL_EVERY_S, GcPolicy


def fake_gc() -> tuple[Any, list[str]]:
    calls: list[str] = []
    mod = SimpleNamespace(unfreeze=lambda: calls.append("unfreeze"), collect=lambda: calls.append("collect") or 0,
                          freeze=lambda: calls.append("freeze"), get_freeze_count=lambda: 0)
    return mod, calls


def test_freezes_often_and_collects_fully_on_a_longer_schedule() -> None:
    mod, calls = fake_gc()
    policy = GcPolicy(gc_module=mod)  # type: ignore[arg-type]
    t = 100.0
    assert policy.tick(t) == "" and calls == []  # the first tick starts the clocks
    assert policy.tick(t + FREEZE_EVERY_S / 2) == ""
    assert policy.tick(t + FREEZE_EVERY_S) == "freeze" and calls == ["freeze"]
    assert policy.tick(t + FREEZE_EVERY_S + 1) == ""  # not again before its period
    calls.clear()
    done = [policy.tick(t + s) for s in range(11, int(FULL_EVERY_S) + 1)]
    assert done.count("full") == 1 and done[-1] == "full"
    assert calls[-3:] == ["unfreeze", "collect", "freeze"] and calls.count("collect") == 1
    assert policy.full_collections == 1 and policy.freezes == 1 + done.count("freeze")


def test_frozen_objects_are_still_freed_and_cycles_after_a_full_collection() -> None:
    class Node:
        other: Any = None

    policy = GcPolicy(freeze_every_s=1.0, full_every_s=10.0)
    before = gc.get_freeze_count()
    try:
        a, b, c = Node(), Node(), Node()
        a.other, b.other = b, a  # a cycle: only the collector frees it
        cycle, plain = weakref.ref(a), weakref.ref(c)
        policy.tick(0.0)
        assert policy.tick(1.0) == "freeze" and gc.get_freeze_count() > before
        del a, b, c
        assert plain() is None  # reference counting frees frozen objects
        gc.collect()
        assert cycle() is not None  # a frozen cycle waits for the next full collection
        assert policy.tick(10.0) == "full"
        assert cycle() is None
    finally:
        gc.unfreeze()
