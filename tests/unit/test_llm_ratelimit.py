"""Token budgets reserved at admission (issue 20 item 7): concurrent requests cannot overshoot a
tokens-per-minute limit by admitting everything while the bucket is positive."""

from __future__ import annotations

import pytest

from shoal.llm._config import GatewayConfig
from shoal.llm._ratelimit import RateLimiter, estimate_tokens, reset_after


def limiter(**limits: float) -> RateLimiter:
    return RateLimiter(GatewayConfig(tenants={"t": limits}))


def test_a_burst_of_concurrent_requests_is_admitted_only_while_reservations_fit() -> None:
    rl = limiter(tokens_per_minute=60)
    # Five concurrent requests, each reserving its prompt (2) and max_tokens (30): only one fits.
    decisions = [rl.admit("t", 0.0, 32) for _ in range(5)]
    assert [d.allowed for d in decisions] == [True, False, False, False, False]
    assert decisions[0].reserved == 32
    refused = decisions[1]
    assert refused.limit == "tokens" and refused.retry_after_s == pytest.approx(4.0)  # 28 there, 32 needed
    # The first ends having used 12 tokens: 20 go back, and a second request fits at once.
    rl.settle("t", decisions[0].reserved, 12, 0.0)
    assert rl.admit("t", 0.0, 32).allowed
    assert not rl.admit("t", 0.0, 32).allowed  # 16 left


def test_the_old_way_overshot_and_this_one_does_not() -> None:
    rl = limiter(tokens_per_minute=60)
    admitted = 0
    for _ in range(5):
        d = rl.admit("t", 0.0, 42)
        admitted += d.allowed
    assert admitted == 1  # at most 42 reserved out of 60; the issue saw 5 admitted (210 tokens)


def test_a_request_larger_than_the_limit_waits_for_a_full_bucket() -> None:
    rl = limiter(tokens_per_minute=60)
    first = rl.admit("t", 0.0, 500)
    assert first.allowed and first.reserved == 60
    rl.settle("t", first.reserved, 90, 0.0)  # used more than it could reserve: 30 in debt
    later = rl.admit("t", 0.0, 500)
    assert not later.allowed and later.retry_after_s == pytest.approx(90.0)
    assert rl.admit("t", 90.0, 500).allowed


def test_unused_reservations_never_fill_the_bucket_beyond_its_depth() -> None:
    rl = limiter(tokens_per_minute=60)
    d = rl.admit("t", 0.0, 10)
    rl.settle("t", d.reserved, 0, 30.0)  # refilled meanwhile, then 10 given back
    assert rl.headers("t", 30.0)["x-ratelimit-remaining-tokens"] == "60"


def test_requests_bucket_untouched_when_tokens_refuse() -> None:
    rl = limiter(tokens_per_minute=60, requests_per_minute=2)
    assert rl.admit("t", 0.0, 60).allowed
    refused = rl.admit("t", 0.0, 10)
    assert not refused.allowed and refused.limit == "tokens"
    headers = rl.headers("t", 0.0)
    assert headers["x-ratelimit-remaining-requests"] == "1"  # the refused request took none
    assert headers["x-ratelimit-reset-requests"] == "30s" and headers["x-ratelimit-reset-tokens"] == "1m0s"


@pytest.mark.parametrize(("seconds", "text"), [(0.0, "0ms"), (0.02, "20ms"), (1.0, "1s"), (59.2, "1m0s"),
                                               (360.0, "6m0s"), (3723.0, "1h2m3s")])
def test_reset_durations_are_openai_style(seconds: float, text: str) -> None:
    assert reset_after(seconds) == text


def test_prompt_estimate() -> None:
    assert estimate_tokens("") == 0 and estimate_tokens("x") == 1 and estimate_tokens("abcdefgh") == 2
