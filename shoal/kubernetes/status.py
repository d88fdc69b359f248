"""``shoal k8s status``: what the cluster says about shoal's applications, one row per deployment.

Read-only. :func:`collect` lists the objects shoal manages in a namespace (label
``app.kubernetes.io/managed-by=shoal``): the workloads (Deployments, LeaderWorkerSets), their
autoscalers (KEDA ScaledObjects, HPAs), the HTTPRoutes and the pods; :func:`summarize` (pure)
turns them into rows: ready and desired replicas, the autoscaler's bounds and whether it works,
whether the route was accepted, and the reasons pods are not running (CrashLoopBackOff, image
pulls, OOMKilled, unschedulable) — what ``kubectl get isvc`` gives a KServe user, for shoal.
A kind the cluster does not serve (no KEDA, no Gateway API) is simply absent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

__all__ = ["AppRow", "DeploymentRow", "collect", "render_rows", "summarize"]

Obj = dict[str, Any]

MANAGED = "app.kubernetes.io/managed-by=shoal"
PART_OF = "app.kubernetes.io/part-of"
COMPONENT = "app.kubernetes.io/component"
A_APP = "shoal.dev/app"
A_DEPLOYMENT = "shoal.dev/deployment"

# What is listed, by (apiVersion, kind).
WORKLOADS = (("apps/v1", "Deployment"), ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"))
AUTOSCALERS = (("keda.sh/v1alpha1", "ScaledObject"), ("autoscaling/v2", "HorizontalPodAutoscaler"))
ROUTES = (("gateway.networking.k8s.io/v1", "HTTPRoute"),)
PODS = (("v1", "Pod"),)

# Container waiting reasons worth showing (the normal "ContainerCreating" is not).
_BAD_WAITING = {"CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "CreateContainerConfigError",
                "CreateContainerError", "InvalidImageName", "RunContainerError"}


class Lister(Protocol):
    def list(self, api_version: str, kind: str, namespace: str, label_selector: str) -> list[Obj]: ...


@dataclass
class DeploymentRow:
    """One shoal deployment as the cluster runs it."""

    deployment: str
    workload: str  # "Deployment/name" or "LeaderWorkerSet/name"
    desired: int
    ready: int
    autoscaler: str = ""  # "keda 0..5", "hpa 1..4", "" when fixed
    autoscaler_problem: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.ready >= self.desired and not self.problems and not self.autoscaler_problem


@dataclass
class AppRow:
    app: str
    deployments: list[DeploymentRow] = field(default_factory=list)
    route: str = ""  # "HTTPRoute/name" when there is one
    route_problem: str = ""

    @property
    def ready(self) -> bool:
        return bool(self.deployments) and all(d.ok for d in self.deployments) and not self.route_problem

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ready"] = self.ready
        for row, dep in zip(out["deployments"], self.deployments, strict=True):
            row["ok"] = dep.ok
        return out


def collect(api: Lister, namespace: str, app: str | None = None) -> list[AppRow]:
    """List shoal's objects in ``namespace`` (only ``app``'s when given) and summarize them.

    Kinds the cluster does not serve are skipped; other errors (unreachable, forbidden) propagate."""
    from shoal.kubernetes.apply import KindNotServed

    selector = MANAGED + (f",{PART_OF}={app}" if app else "")

    def listed(kinds: Iterable[tuple[str, str]]) -> list[Obj]:
        out: list[Obj] = []
        for api_version, kind in kinds:
            try:
                out.extend(api.list(api_version, kind, namespace, selector))
            except KindNotServed:
                continue
        return out

    return summarize(listed(WORKLOADS), listed(AUTOSCALERS), listed(ROUTES), listed(PODS))


def summarize(workloads: Sequence[Obj], autoscalers: Sequence[Obj], routes: Sequence[Obj],
              pods: Sequence[Obj]) -> list[AppRow]:
    """Rows per application, sorted by app and deployment name. Pure."""
    apps: dict[str, AppRow] = {}
    for w in workloads:
        app, dep = _names(w)
        row = DeploymentRow(deployment=dep, workload=f"{w['kind']}/{_meta(w).get('name', '')}",
                            desired=_desired(w), ready=_ready(w))
        row.problems.extend(_workload_problems(w))
        scaler = _autoscaler_for(w, autoscalers)
        if scaler is not None:
            row.autoscaler, row.autoscaler_problem = _describe_autoscaler(scaler)
        row.problems.extend(_pod_problems([p for p in pods if _selects(w, p)]))
        apps.setdefault(app, AppRow(app)).deployments.append(row)
    for r in routes:
        app = _labels(r).get(PART_OF) or _annotations(r).get(A_APP, "")
        target = apps.setdefault(app, AppRow(app))
        target.route = f"HTTPRoute/{_meta(r).get('name', '')}"
        target.route_problem = _route_problem(r)
    for a in apps.values():
        a.deployments.sort(key=lambda d: d.deployment)
    return [apps[k] for k in sorted(apps)]


def render_rows(rows: Sequence[AppRow]) -> list[tuple[str, ...]]:
    """Table rows: APP, DEPLOYMENT, READY, AUTOSCALER, ROUTE, PROBLEMS."""
    out: list[tuple[str, ...]] = []
    for a in rows:
        route = a.route + (f" ({a.route_problem})" if a.route_problem else (" (accepted)" if a.route else ""))
        for i, d in enumerate(a.deployments):
            problems = "; ".join([*d.problems, *([d.autoscaler_problem] if d.autoscaler_problem else [])])
            out.append((a.app if i == 0 else "", d.deployment, f"{d.ready}/{d.desired}", d.autoscaler,
                        route if i == 0 else "", problems))
        if not a.deployments:
            out.append((a.app, "", "", "", route, "no workloads found"))
    return out


# --- reading objects ---------------------------------------------------------------------------


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _labels(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return _meta(obj).get("labels") or {}


def _annotations(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return _meta(obj).get("annotations") or {}


def _names(w: Obj) -> tuple[str, str]:
    ann, labels = _annotations(w), _labels(w)
    app = ann.get(A_APP) or labels.get(PART_OF, "")
    if A_DEPLOYMENT in ann:
        return app, ann[A_DEPLOYMENT]
    # shoal's own parts of the app (the autoscaler pod): named by their component, in parentheses.
    return app, f"({labels.get(COMPONENT) or _meta(w).get('name', '')})"


def _status(obj: Obj) -> Mapping[str, Any]:
    status = obj.get("status")
    return status if isinstance(status, Mapping) else {}


def _desired(w: Obj) -> int:
    spec = w.get("spec") or {}
    if isinstance(spec.get("replicas"), int):
        return int(spec["replicas"])
    return int(_status(w).get("replicas") or 0)


def _ready(w: Obj) -> int:
    status = _status(w)
    return int(status.get("readyReplicas") or 0)


def _conditions(obj: Obj) -> dict[str, Mapping[str, Any]]:
    return {str(c.get("type")): c for c in _status(obj).get("conditions") or [] if isinstance(c, Mapping)}


def _workload_problems(w: Obj) -> list[str]:
    progressing = _conditions(w).get("Progressing")
    if progressing is not None and progressing.get("status") == "False":
        return [f"rollout stuck: {progressing.get('reason', '')} {progressing.get('message', '')}".strip()]
    return []


def _autoscaler_for(w: Obj, autoscalers: Sequence[Obj]) -> Obj | None:
    name, kind = _meta(w).get("name"), w.get("kind")
    for a in autoscalers:
        spec = a.get("spec") or {}
        ref = spec.get("scaleTargetRef") or {}
        if ref.get("name") == name and ref.get("kind", "Deployment") == kind:
            return a
    return None


def _describe_autoscaler(a: Obj) -> tuple[str, str]:
    spec = a.get("spec") or {}
    conditions = _conditions(a)
    if a.get("kind") == "ScaledObject":
        text = f"keda {spec.get('minReplicaCount', 0)}..{spec.get('maxReplicaCount', 100)}"
        ready = conditions.get("Ready")
        if ready is not None and ready.get("status") == "False":
            return text, f"ScaledObject not ready: {ready.get('reason', '')} {ready.get('message', '')}".strip()
        if _status(a).get("health"):
            failing = [k for k, v in (_status(a).get("health") or {}).items()
                       if isinstance(v, Mapping) and v.get("status") == "Failing"]
            if failing:
                return text, f"KEDA cannot read {', '.join(sorted(failing))} (the fallback replica count applies)"
        return text, ""
    text = f"hpa {spec.get('minReplicas', 1)}..{spec.get('maxReplicas', '?')}"
    able = conditions.get("ScalingActive")
    if able is not None and able.get("status") == "False":
        return text, f"HPA inactive: {able.get('reason', '')} {able.get('message', '')}".strip()
    return text, ""


def _selects(w: Obj, pod: Obj) -> bool:
    selector = ((w.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
    if not selector:  # a LeaderWorkerSet: its pods carry its name
        return _labels(pod).get("leaderworkerset.sigs.k8s.io/name") == _meta(w).get("name")
    labels = _labels(pod)
    return all(labels.get(k) == v for k, v in selector.items())


def _pod_problems(pods: Sequence[Obj]) -> list[str]:
    """One line per distinct reason, with how many pods have it."""
    counts: dict[str, int] = {}
    for p in pods:
        for reason in _pod_reasons(p):
            counts[reason] = counts.get(reason, 0) + 1
    return [f"{n} pod{'s' if n > 1 else ''}: {reason}" for reason, n in sorted(counts.items())]


def _pod_reasons(pod: Obj) -> list[str]:
    status = _status(pod)
    reasons: list[str] = []
    scheduled = _conditions(pod).get("PodScheduled")
    if status.get("phase") == "Pending" and scheduled is not None and scheduled.get("status") == "False":
        reasons.append(f"unschedulable ({scheduled.get('message', scheduled.get('reason', ''))})")
    for c in status.get("containerStatuses") or []:
        waiting = ((c.get("state") or {}).get("waiting") or {})
        if waiting.get("reason") in _BAD_WAITING:
            reasons.append(str(waiting["reason"]))
        last = ((c.get("lastState") or {}).get("terminated") or {})
        if last.get("reason") == "OOMKilled":
            reasons.append("OOMKilled (raise its memory)")
    return reasons


def _route_problem(route: Obj) -> str:
    parents = _status(route).get("parents") or []
    if not parents:
        return "not accepted by any Gateway yet"
    for parent in parents:
        for c in parent.get("conditions") or []:
            if c.get("type") in ("Accepted", "ResolvedRefs") and c.get("status") == "False":
                return f"{c.get('type')} False: {c.get('reason', '')} {c.get('message', '')}".strip()
    return ""
