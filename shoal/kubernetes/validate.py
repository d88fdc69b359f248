"""Schema validation of generated objects.

Built-in kinds are checked against the Kubernetes OpenAPI schemas shipped by the
``kubernetes-validate`` package, in strict mode (unknown fields are errors). The custom
resources shoal emits are not in that set, so each gets a JSON schema written here for the
fields shoal uses, strict as well (``additionalProperties: false`` wherever the field set is
known from the CRD's documentation):

* KEDA ``ScaledObject`` (keda.sh/v1alpha1)
* Gateway API ``HTTPRoute`` (gateway.networking.k8s.io/v1)
* Prometheus Operator ``PodMonitor`` (monitoring.coreos.com/v1)
* ``LeaderWorkerSet`` (leaderworkerset.x-k8s.io/v1), whose two pod templates are then checked
  against the Kubernetes schema of a ``PodTemplateSpec`` (strict, like a Deployment's)
* cert-manager ``Issuer`` and ``Certificate`` (cert-manager.io/v1; ``--tls cert-manager``)

Both packages come with shoal's ``dev`` extra; ``shoal k8s build --validate`` uses them too.
:func:`restricted_violations` checks a pod spec against the Pod Security Standards'
"restricted" profile (plus a read-only root filesystem), with no dependency.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from shoal.exceptions import ObjectInvalid

__all__ = [
    "CRD_SCHEMAS",
    "KUBERNETES_VERSION",
    "ObjectInvalid",
    "check_restricted",
    "restricted_violations",
    "validate_object",
    "validate_objects",
]

KUBERNETES_VERSION = "1.30.0"

Obj = dict[str, Any]


_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": _STR_MAP,
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}


def _object(api_version: str, kind: str, spec: Obj) -> Obj:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "pattern": _DNS_SUBDOMAIN, "maxLength": 253},
                    "namespace": {"type": "string", "pattern": _DNS_LABEL, "maxLength": 63},
                    "labels": _STR_MAP,
                    "annotations": _STR_MAP,
                },
            },
            "spec": spec,
        },
    }


_BEHAVIOR_RULES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "policies": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type", "value", "periodSeconds"],
                "properties": {
                    "type": {"enum": ["Pods", "Percent"]},
                    "value": {"type": "integer", "minimum": 1},
                    "periodSeconds": {"type": "integer", "minimum": 1, "maximum": 1800},
                },
            },
        },
    },
}

SCALED_OBJECT = _object("keda.sh/v1alpha1", "ScaledObject", {
    "type": "object",
    "additionalProperties": False,
    "required": ["scaleTargetRef", "triggers"],
    "properties": {
        "scaleTargetRef": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "name": {"type": "string"},
                "envSourceContainerName": {"type": "string"},
            },
        },
        "pollingInterval": {"type": "integer", "minimum": 1},
        "cooldownPeriod": {"type": "integer", "minimum": 0},
        "initialCooldownPeriod": {"type": "integer", "minimum": 0},
        "idleReplicaCount": {"type": "integer", "minimum": 0},
        "minReplicaCount": {"type": "integer", "minimum": 0},
        "maxReplicaCount": {"type": "integer", "minimum": 1},
        # KEDA: fallback.replicas once a trigger failed failureThreshold times in a row; only for
        # triggers of metricType AverageValue (checked below); behavior since KEDA 2.15.
        "fallback": {
            "type": "object",
            "additionalProperties": False,
            "required": ["failureThreshold", "replicas"],
            "properties": {
                "failureThreshold": {"type": "integer", "minimum": 1},
                "replicas": {"type": "integer", "minimum": 0},
                "behavior": {"enum": ["static", "currentReplicas", "currentReplicasIfHigher",
                                      "currentReplicasIfLower"]},
            },
        },
        "advanced": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "restoreToOriginalReplicaCount": {"type": "boolean"},
                "scalingModifiers": {"type": "object"},
                "horizontalPodAutoscalerConfig": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string"},
                        "behavior": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"scaleUp": _BEHAVIOR_RULES, "scaleDown": _BEHAVIOR_RULES},
                        },
                    },
                },
            },
        },
        "triggers": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["type", "metadata"],
                "properties": {
                    "type": {"type": "string"},
                    "name": {"type": "string"},
                    "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                    "useCachedMetrics": {"type": "boolean"},
                    "authenticationRef": {"type": "object"},
                    # KEDA trigger metadata values are all strings.
                    "metadata": _STR_MAP,
                },
                "allOf": [{
                    "if": {"properties": {"type": {"const": "prometheus"}}},
                    "then": {
                        "properties": {
                            "metadata": {
                                "required": ["serverAddress", "query", "threshold"],
                                "properties": {
                                    "threshold": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
                                    "activationThreshold": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
                                    "ignoreNullValues": {"enum": ["true", "false"]},
                                },
                            }
                        }
                    },
                }, {
                    # KEDA's metrics-api scaler: a JSON value at valueLocation (GJSON path) of url.
                    "if": {"properties": {"type": {"const": "metrics-api"}}},
                    "then": {
                        "properties": {
                            "metadata": {
                                "required": ["url", "valueLocation", "targetValue"],
                                "properties": {
                                    "url": {"type": "string", "pattern": r"^https?://[^/\s]+(/\S*)?$"},
                                    "targetValue": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
                                    "activationTargetValue": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
                                    "format": {"enum": ["json", "xml", "yaml", "prometheus"]},
                                },
                            }
                        }
                    },
                }],
            },
        },
    },
    # A fallback is only honoured for triggers of metricType AverageValue (KEDA refuses others).
    "if": {"required": ["fallback"]},
    "then": {"properties": {"triggers": {"items": {"required": ["metricType"],
                                                    "properties": {"metricType": {"const": "AverageValue"}}}}}},
})

_DURATION = {"type": "string", "pattern": r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"}
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}

HTTP_ROUTE = _object("gateway.networking.k8s.io/v1", "HTTPRoute", {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "parentRefs": {
            "type": "array",
            "maxItems": 32,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name"],
                "properties": {
                    "group": {"type": "string"},
                    "kind": {"type": "string"},
                    "namespace": {"type": "string", "pattern": _DNS_LABEL},
                    "name": {"type": "string", "minLength": 1, "maxLength": 253},
                    "sectionName": {"type": "string", "pattern": _DNS_SUBDOMAIN},
                    "port": _PORT,
                },
            },
        },
        "hostnames": {
            "type": "array",
            "maxItems": 16,
            "items": {"type": "string", "pattern": r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*"
                                                   r"[a-z0-9])?)*$"},
        },
        "rules": {
            "type": "array",
            "maxItems": 16,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string"},
                    "matches": {
                        "type": "array",
                        "maxItems": 64,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "path": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {
                                        "type": {"enum": ["Exact", "PathPrefix", "RegularExpression"]},
                                        "value": {"type": "string", "pattern": "^/", "maxLength": 1024},
                                    },
                                },
                                "headers": {"type": "array"},
                                "queryParams": {"type": "array"},
                                "method": {"type": "string"},
                            },
                        },
                    },
                    "filters": {"type": "array"},
                    "backendRefs": {
                        "type": "array",
                        "maxItems": 16,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["name"],
                            "properties": {
                                "group": {"type": "string"},
                                "kind": {"type": "string"},
                                "name": {"type": "string", "minLength": 1, "maxLength": 253},
                                "namespace": {"type": "string"},
                                "port": _PORT,
                                "weight": {"type": "integer", "minimum": 0, "maximum": 1000000},
                                "filters": {"type": "array"},
                            },
                            # A Service backend needs a port.
                            "if": {"properties": {"kind": {"const": "Service"}}},
                            "then": {"required": ["name", "port"]},
                        },
                    },
                    "timeouts": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"request": _DURATION, "backendRequest": _DURATION},
                    },
                    "retry": {"type": "object"},
                    "sessionPersistence": {"type": "object"},
                },
            },
        },
    },
})

POD_MONITOR = _object("monitoring.coreos.com/v1", "PodMonitor", {
    "type": "object",
    "required": ["selector"],
    "properties": {
        "selector": _LABEL_SELECTOR,
        "namespaceSelector": {"type": "object"},
        "jobLabel": {"type": "string"},
        "podMetricsEndpoints": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "port": {"type": "string"},
                    "path": {"type": "string"},
                    "interval": _DURATION,
                    "scheme": {"enum": ["http", "https"]},
                },
            },
        },
    },
})

_INT_OR_PERCENT = {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": r"^[0-9]+%$"}]}

# The fields of the LeaderWorkerSet CRD (api/leaderworkerset/v1 of kubernetes-sigs/lws, v0.6+).
# Pod templates are objects here; validate_object checks them against Kubernetes' own schema.
LEADER_WORKER_SET = _object("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet", {
    "type": "object",
    "additionalProperties": False,
    "required": ["leaderWorkerTemplate"],
    "properties": {
        "replicas": {"type": "integer", "minimum": 0},
        "startupPolicy": {"enum": ["LeaderCreated", "LeaderReady"]},
        "rolloutStrategy": {
            "type": "object",
            "additionalProperties": False,
            "required": ["type"],
            "properties": {
                "type": {"enum": ["RollingUpdate"]},
                "rollingUpdateConfiguration": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "partition": {"type": "integer", "minimum": 0},
                        "maxUnavailable": _INT_OR_PERCENT,
                        "maxSurge": _INT_OR_PERCENT,
                    },
                    # The controller refuses a rollout that can neither surge nor take a group down.
                    "not": {"properties": {"maxUnavailable": {"const": 0}, "maxSurge": {"const": 0}},
                            "required": ["maxUnavailable", "maxSurge"]},
                },
            },
        },
        "networkConfig": {
            "type": "object",
            "additionalProperties": False,
            "required": ["subdomainPolicy"],
            "properties": {"subdomainPolicy": {"enum": ["Shared", "UniquePerReplica"]}},
        },
        "leaderWorkerTemplate": {
            "type": "object",
            "additionalProperties": False,
            "required": ["workerTemplate"],
            "properties": {
                "leaderTemplate": {"type": "object"},
                "workerTemplate": {"type": "object"},
                "size": {"type": "integer", "minimum": 1},
                "restartPolicy": {"enum": ["RecreateGroupOnPodRestart", "RecreateGroupAfterStart", "None",
                                           "Default"]},
                "subGroupPolicy": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "subGroupPolicyType": {"enum": ["LeaderWorker", "LeaderExcluded"]},
                        "subGroupSize": {"type": "integer", "minimum": 1},
                    },
                },
                "volumeClaimTemplates": {"type": "array", "items": {"type": "object"}},
                "persistentVolumeClaimRetentionPolicy": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"whenDeleted": {"enum": ["Retain", "Delete"]},
                                   "whenScaled": {"enum": ["Retain", "Delete"]}},
                },
            },
        },
    },
})

# cert-manager.io/v1 (deploy/crds of cert-manager): the fields shoal writes, and their neighbours.
_CM_DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"}
_CM_ISSUER_REF = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {"name": {"type": "string"}, "kind": {"enum": ["Issuer", "ClusterIssuer"]},
                   "group": {"type": "string"}},
}
_CM_USAGES = ["signing", "digital signature", "content commitment", "key encipherment", "key agreement",
              "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any", "server auth",
              "client auth", "code signing", "email protection", "s/mime", "ipsec end system", "ipsec tunnel",
              "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc"]
CERTIFICATE = _object("cert-manager.io/v1", "Certificate", {
    "type": "object",
    "additionalProperties": False,
    "required": ["secretName", "issuerRef"],
    "properties": {
        "secretName": {"type": "string", "pattern": _DNS_SUBDOMAIN},
        "issuerRef": _CM_ISSUER_REF,
        "commonName": {"type": "string", "maxLength": 64},
        "dnsNames": {"type": "array", "items": {"type": "string"}},
        "ipAddresses": {"type": "array", "items": {"type": "string"}},
        "uris": {"type": "array", "items": {"type": "string"}},
        "duration": _CM_DURATION,
        "renewBefore": _CM_DURATION,
        "isCA": {"type": "boolean"},
        "usages": {"type": "array", "items": {"enum": _CM_USAGES}},
        "privateKey": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                "size": {"type": "integer"},
                "encoding": {"enum": ["PKCS1", "PKCS8"]},
                "rotationPolicy": {"enum": ["Never", "Always"]},
            },
        },
        "secretTemplate": {"type": "object"},
        "subject": {"type": "object"},
    },
    # cert-manager refuses a Certificate that names nothing.
    "anyOf": [{"required": ["commonName"]}, {"required": ["dnsNames"]}, {"required": ["ipAddresses"]},
              {"required": ["uris"]}],
})
ISSUER = _object("cert-manager.io/v1", "Issuer", {
    "type": "object",
    "minProperties": 1,
    "maxProperties": 1,  # exactly one issuer type
    "additionalProperties": False,
    "properties": {
        "selfSigned": {"type": "object", "additionalProperties": False,
                       "properties": {"crlDistributionPoints": {"type": "array", "items": {"type": "string"}}}},
        "ca": {
            "type": "object",
            "additionalProperties": False,
            "required": ["secretName"],
            "properties": {
                "secretName": {"type": "string", "pattern": _DNS_SUBDOMAIN},
                "crlDistributionPoints": {"type": "array", "items": {"type": "string"}},
                "ocspServers": {"type": "array", "items": {"type": "string"}},
                "issuingCertificateURLs": {"type": "array", "items": {"type": "string"}},
            },
        },
    },
})

CRD_SCHEMAS: dict[tuple[str, str], Obj] = {
    ("cert-manager.io/v1", "Certificate"): CERTIFICATE,
    ("cert-manager.io/v1", "Issuer"): ISSUER,
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): HTTP_ROUTE,
    ("monitoring.coreos.com/v1", "PodMonitor"): POD_MONITOR,
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): LEADER_WORKER_SET,
}


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

_RESTRICTED_VOLUMES = frozenset({"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
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
