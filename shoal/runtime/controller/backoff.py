"""The proxy's restart policy, CrashLoopBackOff style (pure; the caller passes the clock's now).

The first restart is at once; each further crash in a row waits twice as long as the one
before, from :data:`FIRST_DELAY_S` up to :data:`MAX_DELAY_S`. A proxy that stayed up for
:data:`RESET_AFTER_S` ends the streak: its crash is restarted at once again. The policy never
gives up: the proxy is restarted for as long as the instance runs.
"""

from __future__ import annotations

FIRST_DELAY_S = 1.0
MAX_DELAY_S = 30.0
RESET_AFTER_S = 60.0


def streak(restarts: int, last_start: float, now: float) -> int:
    """Crashes in a row before this one: ``restarts``, or 0 when the proxy that just died
    (started at ``last_start``) stayed up for :data:`RESET_AFTER_S` or more."""
    if restarts < 0:
        raise ValueError(f"restarts must be >= 0, got {restarts}")
    return 0 if now - last_start >= RESET_AFTER_S else restarts


def delay_for(streak_count: int) -> float:
    """Seconds to wait before the restart that follows ``streak_count`` crashes in a row."""
    if streak_count < 0:
        raise ValueError(f"streak_count must be >= 0, got {streak_count}")
    if streak_count == 0:
        return 0.0
    # 2 ** 6 * 1 s already passes the cap; clamp the exponent so huge counts cannot overflow.
    return min(MAX_DELAY_S, FIRST_DELAY_S * 2.0 ** min(streak_count - 1, 30))


def next_delay(restarts: int, last_start: float, now: float) -> float:
    """Seconds from ``now`` until a proxy that just died should be started again."""
    return delay_for(streak(restarts, last_start, now))
