"""The route table: which application's ingress serves a path.

The longest ``route_prefix`` that matches wins (``"/"`` matches everything; another prefix
matches itself and what lies under it). A prefix with a canary release sends a share of its
requests to the canary: by a hash of ``x-session-id`` when the request has one (a session
sticks to one version), else at random.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable, Iterator, Mapping

# (route prefix, app, ingress deployment)
Route = tuple[str, str, str]
# route prefix -> (canary app key, its ingress, percent of requests)
Split = Mapping[str, tuple[str, str, float]]


def canary_share(session: bytes) -> float:
    """A number in [0, 100): a request goes to the canary when it is below the canary's weight.

    With an ``x-session-id`` it is a hash of the id, so a session sticks to one version (and
    raising the weight only moves sessions from the old version to the new); without one it is
    random per request.
    """
    if session:
        return int.from_bytes(hashlib.blake2b(session, digest_size=8).digest(), "big") % 10_000 / 100.0
    return random.random() * 100.0


class RouteTable:
    """Route prefixes to (app, ingress deployment), longest first, plus the canary split.

    ``share`` maps a session id (``b""``: none) to a number in [0, 100); it is injectable so
    that tests can pin the canary decision.
    """

    __slots__ = ("entries", "share", "split")

    def __init__(self, table: Mapping[str, tuple[str, str]] | None = None, split: Split | None = None,
                 share: Callable[[bytes], float] = canary_share) -> None:
        self.entries: list[Route] = sorted(((p, a, d) for p, (a, d) in (table or {}).items()),
                                           key=lambda r: -len(r[0]))
        self.split: dict[str, tuple[str, str, float]] = dict(split or {})
        self.share = share

    @classmethod
    def of_routes(cls, routes: Iterable[Route]) -> RouteTable:
        """A table of (prefix, app, ingress) routes; of two with one prefix, the first matches."""
        table = cls()
        table.entries = sorted(routes, key=lambda r: -len(r[0]))
        return table

    def match(self, path: str) -> Route | None:
        """The route with the longest prefix matching ``path``, or None."""
        for prefix, app, dep in self.entries:
            if prefix == "/" or path == prefix or path.startswith(prefix + "/"):
                return prefix, app, dep
        return None

    def target(self, route: Route, session: bytes) -> tuple[str, str]:
        """The (app, ingress) that serves a request matched to ``route``: the canary's when the
        request falls within the canary's share of its prefix."""
        prefix, app, dep = route
        if self.split:
            canary = self.split.get(prefix)
            if canary is not None and self.share(session) < canary[2]:
                return canary[0], canary[1]
        return app, dep

    def listing(self) -> dict[str, str]:
        """``GET /-/routes``: route prefix -> app name."""
        return {p: a for p, a, _ in self.entries}

    def targets(self) -> Iterator[tuple[str, str]]:
        """Every (app, ingress) a request may go to, canaries included."""
        for _, app, dep in self.entries:
            yield app, dep
        for app, dep, _ in self.split.values():
            yield app, dep
