"""Schema validation of generated objects.

Built-in kinds are checked against the Kubernetes OpenAPI schemas shipped by the
``kubernetes-validate`` package, in strict mode (unknown fields are errors). The custom
resources shoal emits are not in that set, so each gets a JSON schema of the fields shoal uses
(:mod:`shoal.kubernetes.crd_schemas`), strict as well (``additionalProperties: false`` wherever
the field set is known from the CRD's documentation):

* KEDA ``ScaledObject`` and ``TriggerAuthentication`` (keda.sh/v1alpha1)
* Gateway API ``HTTPRoute`` and ``GRPCRoute`` (gateway.networking.k8s.io/v1)
* Prometheus Operator ``PodMonitor`` and ``PrometheusRule`` (monitoring.coreos.com/v1)
* ``LeaderWorkerSet`` (leaderworkerset.x-k8s.io/v1), whose two pod templates are then checked
  against the Kubernetes schema of a ``PodTemplateSpec`` (strict, like a Deployment's)
* cert-manager ``Issuer`` and ``Certificate`` (cert-manager.io/v1; ``--tls cert-manager``)

Both packages come with shoal's ``dev`` extra; ``shoal k8s build --validate`` uses them too.
Objects with an image volume (``--model-volume DEP=image:...``) are checked against Kubernetes
1.33 at the least (:data:`IMAGE_VOLUME_VERSION`): older releases have no ``volumes[].image``
(1.31 and 1.32 only as alpha), and such a build needs 1.33 or later anyway.
:func:`restricted_violations` checks a pod spec against the Pod Security Standards'
"restricted" profile (plus a read-only root filesystem), with no dependency.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from shoal.exceptions import ObjectInvalid
from shoal.kubernetes.crd_schemas import CRD_SCHEMAS

__all__ = [
    "CRD_SCHEMAS",
    "IMAGE_VOLUME_VERSION",
    "KUBERNETES_VERSION",
    "ObjectInvalid",
    "check_restricted",
    "has_image_volume",
    "restricted_violations",
    "validate_object",
    "validate_objects",
]

KUBERNETES_VERSION = "1.30.0"
# The first release whose image volumes (volumes[].image) are beta; objects with one validate against it.
IMAGE_VOLUME_VERSION = "1.33.0"

Obj = dict[str, Any]


def _where(obj: Obj) -> str:
    meta = obj.get("metadata") or {}
    return f"{obj.get('kind')}/{meta.get('name')}"


def validate_object(obj: Obj, version: str = KUBERNETES_VERSION) -> str:
    """Validate one object; returns which schema was used ("kubernetes 1.30" or "crd").

    Raises :class:`ObjectInvalid` (naming the object and the field path) when it does not
    match, and :class:`ImportError` with an install hint when the validators are missing.
    """
    try:
        import jsonschema
    except ImportError:
        raise ImportError("validation needs jsonschema and kubernetes-validate: pip install 'shoal[dev]'") from None
    key = (str(obj.get("apiVersion")), str(obj.get("kind")))
    if _minor(version) < _minor(IMAGE_VOLUME_VERSION) and has_image_volume(obj):
        version = IMAGE_VOLUME_VERSION
    if key in CRD_SCHEMAS:
        validator = jsonschema.Draft202012Validator(CRD_SCHEMAS[key])
        errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
        if errors:
            e = errors[0]
            path = ".".join(str(p) for p in e.absolute_path) or "(root)"
            raise ObjectInvalid(f"{_where(obj)}: {path}: {e.message}")
        for field, template in _pod_templates(obj):
            _validate_pod_template(obj, field, template, version)
        return "crd"
    try:
        import kubernetes_validate
    except ImportError:
        raise ImportError("validation needs kubernetes-validate: pip install 'shoal[dev]'") from None
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        raise ObjectInvalid(f"{_where(obj)}: no schema for {key[0]} {key[1]} in Kubernetes {version}") from None
    except kubernetes_validate.ValidationError as e:
        # kubernetes-validate copies the jsonschema error's attributes onto its own.
        path = ".".join(str(p) for p in getattr(e, "absolute_path", [])) or "(root)"
        raise ObjectInvalid(f"{_where(obj)}: {path}: {getattr(e, 'message', e)}") from None
    return "kubernetes " + ".".join(version.split(".")[:2])


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def has_image_volume(node: Any) -> bool:
    """Whether an object (any pod template in it) has an image volume (``volumes[].image``)."""
    if isinstance(node, dict):
        vols = node.get("volumes")
        if isinstance(vols, list) and any(isinstance(v, dict) and "image" in v for v in vols):
            return True
        return any(has_image_volume(v) for v in node.values())
    if isinstance(node, list):
        return any(has_image_volume(v) for v in node)
    return False


def _pod_templates(obj: Obj) -> list[tuple[str, Obj]]:
    """The pod templates inside a custom resource, by field path (a LeaderWorkerSet's two)."""
    if obj.get("kind") != "LeaderWorkerSet":
        return []
    lwt = (obj.get("spec") or {}).get("leaderWorkerTemplate") or {}
    return [(f"spec.leaderWorkerTemplate.{key}", lwt[key]) for key in ("leaderTemplate", "workerTemplate")
            if key in lwt]


def _validate_pod_template(owner: Obj, field: str, template: Obj, version: str) -> None:
    """A PodTemplateSpec checked as Kubernetes checks a Deployment's: wrapped in a v1 PodTemplate."""
    try:
        import kubernetes_validate
    except ImportError:
        raise ImportError("validation needs kubernetes-validate: pip install 'shoal[dev]'") from None

    wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "template"}, "template": template}
    try:
        kubernetes_validate.validate(wrapped, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        inner = [str(p) for p in getattr(e, "absolute_path", [])]
        path = ".".join([field, *inner[1:]] if inner[:1] == ["template"] else [field, *inner])
        raise ObjectInvalid(f"{_where(owner)}: {path}: {getattr(e, 'message', e)}") from None


def validate_objects(objects: Iterable[Obj], version: str = KUBERNETES_VERSION) -> None:
    """Validate every object, and every pod template against "restricted"; the first failure raises."""
    objects = list(objects)
    for obj in objects:
        validate_object(obj, version)
    check_restricted(objects)


# --------------------------------------------------------------------------------------------
# Pod Security Standards
# --------------------------------------------------------------------------------------------

# Pod Security admission admits image volumes in "restricted" since Kubernetes 1.33.
_RESTRICTED_VOLUMES = frozenset({"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "image",
                                 "persistentVolumeClaim", "projected", "secret"})
_SAFE_SYSCTLS = frozenset({"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.tcp_syncookies",
                           "net.ipv4.ping_group_range", "net.ipv4.ip_unprivileged_port_start",
                           "net.ipv4.ip_local_reserved_ports", "net.ipv4.tcp_keepalive_time",
                           "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                           "net.ipv4.tcp_keepalive_probes"})


def restricted_violations(pod_spec: Obj, *, read_only_root: bool = True) -> list[str]:
    """What keeps a pod spec from the Pod Security Standards' "restricted" profile (empty: none).

    Checks the baseline and restricted controls that apply to a pod spec (host namespaces,
    privileged containers, capabilities, hostPath and other volume types, host ports,
    sysctls, /proc mount, privilege escalation, non-root, seccomp) and, with
    ``read_only_root``, shoal's own rule of a read-only root filesystem.
    """
    problems: list[str] = []
    pod_sc = pod_spec.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(field):
            problems.append(f"spec.{field} is true")
    for vol in pod_spec.get("volumes") or []:
        kinds = set(vol) - {"name"}
        if not kinds <= _RESTRICTED_VOLUMES:
            problems.append(f"volume {vol.get('name')!r} has type {', '.join(sorted(kinds - _RESTRICTED_VOLUMES))}")
    for sysctl in pod_sc.get("sysctls") or []:
        if sysctl.get("name") not in _SAFE_SYSCTLS:
            problems.append(f"sysctl {sysctl.get('name')!r} is not in the safe set")
    pod_non_root = pod_sc.get("runAsNonRoot") is True
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    if pod_sc.get("runAsUser") == 0:
        problems.append("spec.securityContext.runAsUser is 0")
    if pod_seccomp in ("Unconfined",):
        problems.append("spec.securityContext.seccompProfile is Unconfined")
    containers = [*(pod_spec.get("initContainers") or []), *(pod_spec.get("containers") or []),
                  *(pod_spec.get("ephemeralContainers") or [])]
    for c in containers:
        where = f"container {c.get('name')!r}"
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            problems.append(f"{where}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            problems.append(f"{where}: capabilities do not drop ALL")
        extra = set(caps.get("add") or []) - {"NET_BIND_SERVICE"}
        if extra:
            problems.append(f"{where}: adds capabilities {sorted(extra)}")
        if not (sc.get("runAsNonRoot") is True or (pod_non_root and sc.get("runAsNonRoot") is not False)):
            problems.append(f"{where}: runAsNonRoot is not true")
        if sc.get("runAsUser") == 0:
            problems.append(f"{where}: runAsUser is 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type") or pod_seccomp
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{where}: seccompProfile is not RuntimeDefault or Localhost")
        if sc.get("procMount") not in (None, "Default"):
            problems.append(f"{where}: procMount is {sc.get('procMount')!r}")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            problems.append(f"{where}: windowsOptions.hostProcess")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                problems.append(f"{where}: hostPort {port['hostPort']}")
        if read_only_root and sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: readOnlyRootFilesystem is not true")
    return problems


def check_restricted(objects: Iterable[Obj]) -> None:
    """Raise :class:`ObjectInvalid` for the first pod template that is not "restricted"."""
    for obj in objects:
        template = (obj.get("spec") or {}).get("template")
        templates = _pod_templates(obj)
        if obj.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job") and template:
            templates = [("spec.template", template)]
        for field, tmpl in templates:
            problems = restricted_violations(tmpl.get("spec") or {})
            if problems:
                where = "" if field == "spec.template" else f" ({field})"
                raise ObjectInvalid(f"{_where(obj)}{where}: not Pod Security restricted: {'; '.join(problems)}")
