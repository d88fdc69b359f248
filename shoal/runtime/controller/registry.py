"""Where the controller keeps its apps, deployments, replicas and gang ranks, indexed so that
a deployment's replicas are found without scanning every replica of the instance."""

from __future__ import annotations

from collections.abc import Iterator

from shoal.runtime.controller.records import AppRecord, DeploymentRecord, ReplicaRecord
from shoal.runtime.gang import RankRecord

DepKey = tuple[str, str]  # (app key, deployment name)


class Registry:
    """Records by key. ``replicas`` and ``apps`` are read freely (metrics and the CLI read
    them); replicas are added and removed only through :meth:`add` and :meth:`remove`, which
    keep the per-deployment and per-app indexes."""

    def __init__(self) -> None:
        self.apps: dict[str, AppRecord] = {}
        # Deployments removed from a redeployed app, still stopping: (app, name) -> record.
        self.retiring: dict[DepKey, DeploymentRecord] = {}
        self.replicas: dict[str, ReplicaRecord] = {}
        # Ranks 1..N-1 of gang replicas, by their own replica id.
        self.ranks: dict[str, RankRecord] = {}
        self._by_dep: dict[DepKey, dict[str, ReplicaRecord]] = {}
        self._by_app: dict[str, int] = {}

    # -- replicas
    def add(self, rec: ReplicaRecord) -> None:
        """Register a replica (and its gang ranks)."""
        self.replicas[rec.replica_id] = rec
        self._by_dep.setdefault((rec.app, rec.deployment), {})[rec.replica_id] = rec
        self._by_app[rec.app] = self._by_app.get(rec.app, 0) + 1
        for member in rec.ranks:
            self.ranks[member.replica_id] = member

    def remove(self, replica_id: str) -> ReplicaRecord | None:
        """Forget a replica and its ranks; None if it was not registered."""
        rec = self.replicas.pop(replica_id, None)
        if rec is None:
            return None
        key = (rec.app, rec.deployment)
        mine = self._by_dep[key]
        del mine[replica_id]
        if not mine:
            del self._by_dep[key]
        self._by_app[rec.app] -= 1
        if not self._by_app[rec.app]:
            del self._by_app[rec.app]
        for member in rec.ranks:
            self.ranks.pop(member.replica_id, None)
        return rec

    def of(self, app: str, deployment: str) -> list[ReplicaRecord]:
        """The deployment's replicas (every version and state), in the order they started."""
        return list(self._by_dep.get((app, deployment), {}).values())

    def has_replicas(self, app: str, deployment: str | None = None) -> bool:
        if deployment is None:
            return app in self._by_app
        return (app, deployment) in self._by_dep

    def __iter__(self) -> Iterator[ReplicaRecord]:
        return iter(list(self.replicas.values()))

    # -- deployments
    def deployment(self, app: str, name: str) -> DeploymentRecord | None:
        """The deployment's record: in its app, or retiring after a redeploy removed it."""
        a = self.apps.get(app)
        rec = a.deployments.get(name) if a is not None else None
        return rec if rec is not None else self.retiring.get((app, name))
