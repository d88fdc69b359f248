"""The proxy's CrashLoopBackOff policy, driven by a fake clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.runtime.controller.backoff import MAX_DELAY_S, RESET_AFTER_S, delay_for, next_delay, streak


def test_first_restart_is_at_once_then_delays_double_up_to_the_cap() -> None:
    assert [delay_for(n) for n in range(8)] == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert delay_for(10_000) == MAX_DELAY_S  # no overflow, never gives up


def test_a_crash_loop_keeps_backing_off() -> None:
    now, restarts, delays = 0.0, 0, []
    for _ in range(8):
        started = now
        now = started + 0.5  # each proxy dies half a second after it starts
        delays.append(next_delay(restarts, started, now))
        restarts = streak(restarts, started, now) + 1
        now += delays[-1]
    assert delays == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_a_proxy_that_stayed_up_resets_the_count() -> None:
    assert next_delay(6, last_start=100.0, now=100.0 + RESET_AFTER_S - 0.001) == MAX_DELAY_S
    assert next_delay(6, last_start=100.0, now=100.0 + RESET_AFTER_S) == 0.0
    assert streak(6, 100.0, 100.0 + RESET_AFTER_S) == 0


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="restarts must be >= 0"):
        next_delay(-1, 0.0, 0.0)
    with pytest.raises(ValueError, match="streak_count must be >= 0"):
        delay_for(-1)


def test_front_restarts_with_back_off_and_never_gives_up(tmp_path: Path) -> None:
    from shoal.observability.controller_metrics import ControllerMetrics
    from shoal.runtime.controller.clock import Clock
    from shoal.runtime.controller.front import Front
    from shoal.runtime.controller.records import ProxyRecord, Settings
    from shoal.runtime.state import MemoryStore
    from tests.unit.fixtures.fake_processes import FakeProc

    now = [100.0]
    spawned: list[int] = []
    front = Front(Settings(run_dir=str(tmp_path)), b"s", "", None, MemoryStore(),  # type: ignore[arg-type]
                  ControllerMetrics(str(tmp_path)), Clock(monotonic=lambda: now[0]))
    front.spawn_proxy = lambda: spawned.append(1)  # type: ignore[method-assign]
    front.proxy = ProxyRecord("proxy-1", FakeProc(7, code=1), ready=True, restarts=6,  # type: ignore[arg-type]
                              started_at=now[0])
    now[0] += 1.0
    front.watch()
    assert front.proxy.restarts == 7 and not front.proxy.ready and spawned == []
    assert front.restart_message() == "restarting in 30 s (crashed 7 times)"
    # serve.status() and `shoal status` carry it next to the proxy's state.
    from shoal.config import HTTPOptions
    from shoal.runtime.controller.canary import CanaryTable
    from shoal.runtime.controller.overview import serve_status
    from shoal.runtime.controller.registry import Registry

    st = serve_status(Registry(), CanaryTable(MemoryStore()), front.proxy, HTTPOptions(), 8000, "",
                      front.restart_message())
    assert st.to_dict()["proxies"] == {"proxy-1": "UNHEALTHY"}
    assert st.to_dict()["proxy_messages"] == {"proxy-1": "restarting in 30 s (crashed 7 times)"}
    now[0] += 29.9
    front.watch()
    assert spawned == []
    now[0] += 0.1
    front.watch()
    assert spawned == [1]  # still restarted after 7 crashes

