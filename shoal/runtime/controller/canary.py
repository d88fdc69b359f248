"""Canary releases: which app record is an app's stable version and which its canary, and
the share of HTTP traffic each canary takes.

Internally an app record is keyed by :class:`AppKey` (name and :class:`Track`); its string
form (``"<name>"`` or ``"<name>#canary"``) is what the state file, the status and the route
table have always shown, and stays so.
"""

from __future__ import annotations

import enum
import json
from collections.abc import ItemsView
from dataclasses import dataclass

from shoal.runtime.state import Store

CANARY_SUFFIX = "#canary"


class Track(enum.Enum):
    STABLE = "stable"
    CANARY = "canary"


@dataclass(frozen=True)
class AppKey:
    """An app record's identity: the app's name and which release track it is."""

    name: str
    track: Track = Track.STABLE

    @classmethod
    def canary(cls, name: str) -> AppKey:
        return cls(name, Track.CANARY)

    @classmethod
    def parse(cls, key: str) -> AppKey:
        """The key of a record stored or shown as ``key``."""
        if key.endswith(CANARY_SUFFIX):
            return cls(key[: -len(CANARY_SUFFIX)], Track.CANARY)
        return cls(key)

    @property
    def key(self) -> str:
        """The string form (record key, app name shown to routers and in the state file)."""
        return self.name + CANARY_SUFFIX if self.track is Track.CANARY else self.name

    @property
    def is_canary(self) -> bool:
        return self.track is Track.CANARY


def is_canary_key(key: str) -> bool:
    return AppKey.parse(key).is_canary


class CanaryTable:
    """The weights (percent of HTTP traffic) of canaries in progress, by app name, saved in
    the store's ``canaries`` meta value on every change."""

    META_KEY = "canaries"

    def __init__(self, store: Store) -> None:
        self.store = store
        self.weights: dict[str, float] = {}

    def load(self, existing: set[str]) -> None:
        """Read the saved weights, keeping those whose stable and canary records both exist."""
        saved = json.loads(self.store.get_meta(self.META_KEY) or "{}")
        self.weights = {k: float(w) for k, w in saved.items()
                        if k in existing and AppKey.canary(k).key in existing}

    def set(self, name: str, weight: float) -> None:
        self.weights[name] = weight
        self._save()

    def drop(self, name: str) -> None:
        self.weights.pop(name, None)
        self._save()

    def get(self, name: str, default: float = 0.0) -> float:
        return self.weights.get(name, default)

    def __contains__(self, name: object) -> bool:
        return name in self.weights

    def items(self) -> ItemsView[str, float]:
        return self.weights.items()

    def _save(self) -> None:
        self.store.set_meta(self.META_KEY, json.dumps(self.weights))
