"""A small in-memory fake of the Kubernetes API, implementing shoal.kubernetes.apply.ClusterAPI.

It keeps objects by (apiVersion, kind, namespace, name), bumps resourceVersion when an apply
changes something, adds a server default to Deployments (so server-side and local diffs differ),
answers label-selector lists, can refuse kinds it does not serve (no KEDA installed), can refuse
dry runs, and can pretend another field manager owns an object.
"""

from __future__ import annotations

import copy
from typing import Any

from shoal.kubernetes.apply import FIELD_MANAGER, ApplyConflict, ApplyRejected, KindNotServed, Ref

Obj = dict[str, Any]
Key = tuple[str, str, str, str]


class FakeCluster:
    def __init__(self, *, unserved: tuple[str, ...] = (), refuse_dry_run: bool = False) -> None:
        self.objects: dict[Key, Obj] = {}
        self.unserved = set(unserved)
        self.refuse_dry_run = refuse_dry_run
        self.owners: dict[Key, str] = {}
        self.calls: list[tuple[str, Any]] = []
        self._rv = 0

    def _check(self, kind: str) -> None:
        if kind in self.unserved:
            raise KindNotServed(kind)

    @staticmethod
    def key(obj: Obj) -> Key:
        ref = Ref.of(obj)
        return (ref.api_version, ref.kind, ref.namespace, ref.name)

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Obj | None:
        self._check(kind)
        obj = self.objects.get((api_version, kind, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def list(self, api_version: str, kind: str, namespace: str, label_selector: str) -> list[Obj]:
        self._check(kind)
        self.calls.append(("list", (kind, label_selector)))
        want = dict(part.split("=", 1) for part in label_selector.split(","))
        return [copy.deepcopy(o) for (av, k, ns, _), o in self.objects.items()
                if av == api_version and k == kind and ns == namespace
                and all((o["metadata"].get("labels") or {}).get(a) == b for a, b in want.items())]

    def _persisted(self, obj: Obj, old: Obj | None) -> Obj:
        new = copy.deepcopy(obj)
        if new["kind"] == "Deployment":
            new["spec"]["template"]["spec"].setdefault("dnsPolicy", "ClusterFirst")  # a server default
            if "replicas" not in obj["spec"]:  # 1 on creation, then the autoscaler's
                new["spec"]["replicas"] = old["spec"].get("replicas", 1) if old is not None else 1
        meta = new["metadata"]
        body = {k: v for k, v in new.items() if k != "metadata"}
        old_body = {k: v for k, v in (old or {}).items() if k not in ("metadata", "status")}
        same = old is not None and body == old_body and \
            {k: old["metadata"].get(k) for k in ("labels", "annotations")} == \
            {k: meta.get(k) for k in ("labels", "annotations")}
        if old is not None:
            meta["uid"] = old["metadata"]["uid"]
        else:
            meta["uid"] = f"uid-{len(self.objects)}"
        if same and old is not None:
            meta["resourceVersion"] = old["metadata"]["resourceVersion"]
        else:
            self._rv += 1
            meta["resourceVersion"] = str(self._rv)
        meta["managedFields"] = [{"manager": FIELD_MANAGER}]
        new["status"] = {"observedGeneration": 1}
        return new

    def apply(self, obj: Obj, *, field_manager: str, force: bool, dry_run: bool) -> Obj:
        assert field_manager == FIELD_MANAGER
        self._check(obj["kind"])
        if dry_run and self.refuse_dry_run:
            raise ApplyRejected("dry run not allowed by an admission webhook")
        key = self.key(obj)
        owner = self.owners.get(key)
        if owner and owner != field_manager and not force:
            raise ApplyConflict(f"{obj['kind']}/{key[3]}: conflict with {owner!r}")
        persisted = self._persisted(obj, self.objects.get(key))
        if not dry_run:
            self.calls.append(("apply", key))
            self.objects[key] = persisted
            self.owners[key] = field_manager
        return copy.deepcopy(persisted)

    def delete(self, api_version: str, kind: str, namespace: str, name: str, *, dry_run: bool) -> None:
        self._check(kind)
        if not dry_run:
            self.calls.append(("delete", (kind, name)))
            self.objects.pop((api_version, kind, namespace, name), None)

    def names(self, kind: str) -> list[str]:
        return sorted(k[3] for k in self.objects if k[1] == kind)
