"""Per-tenant rate limits (token buckets) and usage counters. Pure: the caller passes ``now``.

Two buckets per limited tenant:

* **requests**: ``requests_per_minute`` deep, refilled at ``requests_per_minute / 60`` per
  second; a request takes one token or is refused.
* **tokens**: ``tokens_per_minute`` deep, refilled likewise. A request *reserves* what it may
  use when it is admitted, as OpenAI does: its prompt (estimated, about four characters a
  token) plus its ``max_tokens`` (capped at the bucket's depth, so a large request waits for a
  full bucket rather than never running). A request that does not fit is refused with the
  time until it would. When it ends, the reservation is settled against the real usage: what
  it did not use goes back, anything beyond (a prompt longer than estimated, or no
  ``max_tokens`` given, when only the prompt was reserved) is charged, and the bucket may go
  below zero until it refills. Concurrent requests therefore cannot overshoot a limit by more
  than their estimates' error.

Each answer carries OpenAI's ``x-ratelimit-limit-*``, ``x-ratelimit-remaining-*`` and
``x-ratelimit-reset-*`` headers (the reset: the time until that bucket is full again, as
``1s``, ``6m0s`` or ``20ms``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["Decision", "LimitSource", "RateLimiter", "TenantLimits", "TokenBucket", "UsageLedger",
           "estimate_tokens", "reset_after"]


class TenantLimits(Protocol):
    """One tenant's limits (a :class:`~shoal.llm.TenantConfig`, or the controller's copy of one)."""

    @property
    def requests_per_minute(self) -> float | None: ...

    @property
    def tokens_per_minute(self) -> float | None: ...


class LimitSource(Protocol):
    """Where a :class:`RateLimiter` finds each tenant's limits (a :class:`~shoal.llm.GatewayConfig`)."""

    def tenant(self, name: str) -> TenantLimits: ...


@dataclass
class TokenBucket:
    """``capacity`` tokens at most, ``rate`` tokens added per second, starting full."""

    capacity: float
    rate: float
    level: float = math.nan
    updated: float = math.nan

    def _refill(self, now: float) -> None:
        if math.isnan(self.level):
            self.level, self.updated = self.capacity, now
            return
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def take(self, n: float, now: float) -> float:
        """Take ``n`` tokens: 0.0 when taken, else the seconds until ``n`` will be there."""
        self._refill(now)
        if self.level >= n:
            self.level -= n
            return 0.0
        return (n - self.level) / self.rate

    def wait_for(self, n: float, now: float) -> float:
        """Seconds until the bucket holds ``n`` tokens (0.0 if it does now); takes nothing."""
        self._refill(now)
        return 0.0 if self.level >= n else (n - self.level) / self.rate

    def charge(self, n: float, now: float) -> None:
        """Remove ``n`` tokens, going below zero if need be."""
        self._refill(now)
        self.level -= n

    def give_back(self, n: float, now: float) -> None:
        """Return ``n`` unused tokens (never above ``capacity``)."""
        self._refill(now)
        self.level = min(self.capacity, self.level + n)

    def remaining(self, now: float) -> int:
        self._refill(now)
        return max(0, math.floor(self.level))

    def until_full(self, now: float) -> float:
        self._refill(now)
        return max(0.0, (self.capacity - self.level) / self.rate)


def estimate_tokens(text: str) -> int:
    """A prompt's tokens before a tokenizer has seen it: about four characters each."""
    return max(1, math.ceil(len(text) / 4)) if text else 0


def reset_after(seconds: float) -> str:
    """OpenAI's ``x-ratelimit-reset-*`` duration: ``20ms``, ``1s``, ``6m0s``, ``1h2m3s``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    total = math.ceil(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


@dataclass(frozen=True)
class Decision:
    """The answer to :meth:`RateLimiter.admit`: admitted, or which limit refused and for how long."""

    allowed: bool
    retry_after_s: float = 0.0
    limit: str = ""  # "requests" or "tokens"
    limit_value: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    reserved: float = 0.0  # tokens taken from the token bucket at admission (settle them at the end)
    shared: bool = False  # admitted by the budgets shared across gateway replicas (settle it there)


class RateLimiter:
    """Token buckets per tenant, from a :class:`~shoal.llm.GatewayConfig` (or any
    :class:`LimitSource`). Not thread-safe (one event loop)."""

    def __init__(self, config: LimitSource) -> None:
        self._config = config
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}

    def _buckets(self, tenant: str) -> tuple[TokenBucket | None, TokenBucket | None]:
        limits = self._config.tenant(tenant)
        req = self._requests.get(tenant)
        if req is None and limits.requests_per_minute:
            req = self._requests[tenant] = TokenBucket(limits.requests_per_minute, limits.requests_per_minute / 60)
        tok = self._tokens.get(tenant)
        if tok is None and limits.tokens_per_minute:
            tok = self._tokens[tenant] = TokenBucket(limits.tokens_per_minute, limits.tokens_per_minute / 60)
        return req, tok

    def forget(self, tenant: str) -> None:
        """Drop the tenant's buckets (its limits changed): the next request starts full ones."""
        self._requests.pop(tenant, None)
        self._tokens.pop(tenant, None)

    def admit(self, tenant: str, now: float, reserve: int = 1) -> Decision:
        """Admit one request of ``tenant``, taking a request token and reserving ``reserve``
        tokens (at most the bucket's depth), or say which limit refuses it and for how long."""
        req, tok = self._buckets(tenant)
        amount = 0.0
        if tok is not None:
            amount = float(min(max(1, reserve), tok.capacity))
            wait = tok.wait_for(amount, now)
            if wait > 0:
                return Decision(False, wait, "tokens", tok.capacity, self.headers(tenant, now))
        if req is not None:
            wait = req.take(1, now)
            if wait > 0:
                return Decision(False, wait, "requests", req.capacity, self.headers(tenant, now))
        if tok is not None:
            tok.charge(amount, now)
        return Decision(True, headers=self.headers(tenant, now), reserved=amount)

    def settle(self, tenant: str, reserved: float, used: int, now: float) -> None:
        """A finished (or cancelled) request used ``used`` prompt plus completion tokens after
        reserving ``reserved``: give back the rest, or charge what went beyond."""
        _, tok = self._buckets(tenant)
        if tok is None:
            return
        if used < reserved:
            tok.give_back(reserved - used, now)
        elif used > reserved:
            tok.charge(used - reserved, now)

    def charge(self, tenant: str, tokens: int, now: float) -> None:
        """Charge ``tokens`` that were not reserved."""
        self.settle(tenant, 0.0, tokens, now)

    def headers(self, tenant: str, now: float) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*`` headers for the tenant's limits (none when it has none)."""
        req, tok = self._buckets(tenant)
        out: dict[str, str] = {}
        if req is not None:
            out["x-ratelimit-limit-requests"] = str(math.floor(req.capacity))
            out["x-ratelimit-remaining-requests"] = str(req.remaining(now))
            out["x-ratelimit-reset-requests"] = reset_after(req.until_full(now))
        if tok is not None:
            out["x-ratelimit-limit-tokens"] = str(math.floor(tok.capacity))
            out["x-ratelimit-remaining-tokens"] = str(tok.remaining(now))
            out["x-ratelimit-reset-tokens"] = reset_after(tok.until_full(now))
        return out


@dataclass
class _Counts:
    requests: int = 0
    errors: int = 0
    rate_limited: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, other: _Counts) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.rate_limited += other.rate_limited
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {"requests": self.requests, "errors": self.errors, "rate_limited": self.rate_limited,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class UsageLedger:
    """What each tenant used, per model, since the gateway replica started."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], _Counts] = {}

    def _at(self, tenant: str, model: str) -> _Counts:
        key = (tenant, model)
        counts = self._counts.get(key)
        if counts is None:
            counts = self._counts[key] = _Counts()
        return counts

    def record(self, tenant: str, model: str, *, prompt_tokens: int = 0, completion_tokens: int = 0,
               error: bool = False) -> None:
        c = self._at(tenant, model)
        c.requests += 1
        c.errors += int(error)
        c.prompt_tokens += prompt_tokens
        c.completion_tokens += completion_tokens

    def rate_limited(self, tenant: str, model: str) -> None:
        self._at(tenant, model).rate_limited += 1

    def snapshot(self) -> dict[str, Any]:
        """``{tenant: {requests, errors, rate_limited, *_tokens, models: {model: {...}}}}``."""
        out: dict[str, Any] = {}
        for (tenant, model), counts in sorted(self._counts.items()):
            entry = out.setdefault(tenant, {"total": _Counts(), "models": {}})
            entry["total"].add(counts)
            entry["models"][model] = counts.as_dict()
        return {tenant: {**v["total"].as_dict(), "models": v["models"]} for tenant, v in out.items()}
