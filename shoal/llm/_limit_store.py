"""The rate-limit budgets that every replica of a gateway deployment shares, kept in one place.

A local instance keeps them in the controller (:mod:`shoal.runtime.controller.shared_limits`
answers the two calls below on the controller socket); gateway replicas reach it through
:class:`~shoal.llm._shared_limits.GatewayLimits`. One :class:`SharedLimitStore` holds, per
gateway deployment (its *scope*: application and deployment name) and tenant, the same token
buckets a lone replica would hold (:class:`~shoal.llm._ratelimit.RateLimiter`), so N replicas
admit what one would.

The calls (arguments as a dict, all required):

``llm_limits_admit``
    ``app``, ``deployment``, ``tenant``, ``requests_per_minute`` and ``tokens_per_minute``
    (a number or ``None``: no such limit), ``reserve`` (tokens to reserve). Answers
    ``{"allowed", "retry_after_s", "limit", "limit_value", "headers", "reserved"}``, the fields
    of a :class:`~shoal.llm._ratelimit.Decision`.
``llm_limits_settle``
    the same scope, tenant and limits, ``reserved`` (what admission reserved) and ``used``
    (what the request really used): the difference goes back to the bucket, or is charged.

Each call carries the tenant's limits, so the store needs no configuration: when a tenant's
limits change (a redeployed gateway), its buckets start over, full.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shoal.llm._ratelimit import RateLimiter

__all__ = ["MAX_TENANTS", "OP_ADMIT", "OP_SETTLE", "SharedLimitStore"]

OP_ADMIT = "llm_limits_admit"
OP_SETTLE = "llm_limits_settle"
#: Tenants one gateway deployment may keep budgets for (they come from its config file).
MAX_TENANTS = 10_000
_MAX_NAME = 1024


@dataclass(frozen=True)
class _Limits:
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None


class _ScopeLimits:
    """The limits the replicas of one gateway deployment sent, by tenant (a ``LimitSource``)."""

    def __init__(self) -> None:
        self.tenants: dict[str, _Limits] = {}

    def tenant(self, name: str) -> _Limits:
        return self.tenants.get(name, _Limits())


def _name(args: dict[str, Any], field: str) -> str:
    value = args.get(field)
    if not isinstance(value, str) or not value or len(value) > _MAX_NAME:
        raise ValueError(f"{field} must be a non-empty string of at most {_MAX_NAME} characters, got {value!r}")
    return value


def _limit(args: dict[str, Any], field: str) -> float | None:
    value = args.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{field} must be a positive number or null, got {value!r}")
    return float(value)


def _count(args: dict[str, Any], field: str) -> float:
    value = args.get(field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{field} must be a number >= 0, got {value!r}")
    return float(value)


class SharedLimitStore:
    """Budgets by (application, gateway deployment) and tenant. Pure: the caller passes ``now``."""

    def __init__(self) -> None:
        self._scopes: dict[tuple[str, str], tuple[_ScopeLimits, RateLimiter]] = {}

    @property
    def scopes(self) -> list[tuple[str, str]]:
        return list(self._scopes)

    def _limiter(self, args: dict[str, Any]) -> tuple[str, RateLimiter]:
        if not isinstance(args, dict):
            raise ValueError("the call's arguments must be a mapping")
        scope = (_name(args, "app"), _name(args, "deployment"))
        tenant = _name(args, "tenant")
        wanted = _Limits(_limit(args, "requests_per_minute"), _limit(args, "tokens_per_minute"))
        entry = self._scopes.get(scope)
        if entry is None:
            source = _ScopeLimits()
            entry = self._scopes[scope] = (source, RateLimiter(source))
        limits, limiter = entry
        if limits.tenants.get(tenant) != wanted:
            if tenant not in limits.tenants and len(limits.tenants) >= MAX_TENANTS:
                raise ValueError(f"gateway {scope[0]}/{scope[1]} already has budgets for {MAX_TENANTS} tenants")
            limits.tenants[tenant] = wanted
            limiter.forget(tenant)
        return tenant, limiter

    def admit(self, args: dict[str, Any], now: float) -> dict[str, Any]:
        """Answer an ``llm_limits_admit`` call (see the module docstring)."""
        tenant, limiter = self._limiter(args)
        reserve = _count(args, "reserve")
        d = limiter.admit(tenant, now, math.ceil(reserve))
        return {"allowed": d.allowed, "retry_after_s": d.retry_after_s, "limit": d.limit,
                "limit_value": d.limit_value, "headers": d.headers, "reserved": d.reserved}

    def settle(self, args: dict[str, Any], now: float) -> None:
        """Answer an ``llm_limits_settle`` call: give back what a request did not use, or charge more."""
        tenant, limiter = self._limiter(args)
        limiter.settle(tenant, _count(args, "reserved"), math.ceil(_count(args, "used")), now)

    def prune(self, alive: Callable[[str, str], bool]) -> None:
        """Forget the budgets of gateway deployments that no longer exist."""
        for scope in [s for s in self._scopes if not alive(*s)]:
            del self._scopes[scope]
