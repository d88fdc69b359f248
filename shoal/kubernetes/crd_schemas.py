"""JSON schemas of the custom resources shoal emits, for :mod:`shoal.kubernetes.validate`.

Written here from each CRD's documentation for the fields shoal uses, strict
(``additionalProperties: false`` wherever the field set is known): KEDA ``ScaledObject``
(with the prometheus and metrics-api triggers, fallback and HPA behavior) and
``TriggerAuthentication``, Gateway API ``HTTPRoute`` and ``GRPCRoute``, Prometheus Operator ``PodMonitor`` and
``PrometheusRule``, ``LeaderWorkerSet`` and cert-manager ``Issuer`` / ``Certificate``. The
TriggerAuthentication and PrometheusRule schemas follow the openAPIV3Schema of the projects' CRDs
(config/crd/bases/keda.sh_triggerauthentications.yaml of KEDA,
example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml of the Prometheus
Operator). :data:`CRD_SCHEMAS` maps (apiVersion, kind) to each.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CRD_SCHEMAS"]

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
                    "authenticationRef": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name"],
                        "properties": {"name": {"type": "string", "minLength": 1},
                                       "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]}},
                    },
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
                                    "authMode": {"enum": ["apiKey", "basic", "tls", "bearer"]},
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

_ROUTE_SPEC = HTTP_ROUTE["properties"]["spec"]["properties"]
_MATCH_TYPE = {"enum": ["Exact", "RegularExpression"]}
# GRPCRoute (standard channel since Gateway API v1.1, config/crd/standard/gateway.networking.k8s.io_grpcroutes.yaml).
GRPC_ROUTE = _object("gateway.networking.k8s.io/v1", "GRPCRoute", {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "parentRefs": _ROUTE_SPEC["parentRefs"],
        "hostnames": _ROUTE_SPEC["hostnames"],
        "rules": {
            "type": "array",
            "maxItems": 16,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "matches": {
                        "type": "array",
                        "maxItems": 8,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "method": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {"type": _MATCH_TYPE,
                                                   "service": {"type": "string", "maxLength": 1024},
                                                   "method": {"type": "string", "maxLength": 1024}},
                                },
                                "headers": {
                                    "type": "array",
                                    "maxItems": 16,
                                    "items": {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "required": ["name", "value"],
                                        "properties": {
                                            "type": _MATCH_TYPE,
                                            "name": {"type": "string", "minLength": 1, "maxLength": 256,
                                                     "pattern": r"^[A-Za-z0-9!#$%&'*+\-.^_\x60|~]+$"},
                                            "value": {"type": "string", "minLength": 1, "maxLength": 4096},
                                        },
                                    },
                                },
                            },
                        },
                    },
                    "filters": {"type": "array", "maxItems": 16},
                    "backendRefs": _ROUTE_SPEC["rules"]["items"]["properties"]["backendRefs"],
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

# monitoring.coreos.com/v1 PrometheusRule: spec.groups[] (name required, unique) of rules[] (expr
# required; exactly one of record and alert); durations in Prometheus' own syntax.
_PROM_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
                                               r"(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
PROMETHEUS_RULE = _object("monitoring.coreos.com/v1", "PrometheusRule", {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "groups": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "interval": _PROM_DURATION,
                    "query_offset": _PROM_DURATION,
                    "labels": _STR_MAP,
                    "limit": {"type": "integer"},
                    "partial_response_strategy": {"type": "string", "pattern": r"(?i)^(abort|warn)?$"},
                    "rules": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["expr"],
                            "properties": {
                                "alert": {"type": "string", "minLength": 1},
                                "record": {"type": "string", "minLength": 1},
                                "expr": {"anyOf": [{"type": "integer"}, {"type": "string", "minLength": 1}]},
                                "for": _PROM_DURATION,
                                "keep_firing_for": {**_PROM_DURATION, "minLength": 1},
                                "labels": _STR_MAP,
                                "annotations": _STR_MAP,
                            },
                            "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                        },
                    },
                },
            },
        },
    },
})

# keda.sh/v1alpha1 TriggerAuthentication: where a trigger's parameters come from. Every source of the
# CRD is listed; the ones shoal writes (secretTargetRef) and their close kin are checked field by field.
_KEDA_REF = {"type": "array", "items": {
    "type": "object", "additionalProperties": False, "required": ["parameter", "name", "key"],
    "properties": {"parameter": {"type": "string", "minLength": 1},
                   "name": {"type": "string", "pattern": _DNS_SUBDOMAIN},
                   "key": {"type": "string", "minLength": 1}},
}}
TRIGGER_AUTHENTICATION = _object("keda.sh/v1alpha1", "TriggerAuthentication", {
    "type": "object",
    "additionalProperties": False,
    "minProperties": 1,
    "properties": {
        "secretTargetRef": _KEDA_REF,
        "configMapTargetRef": _KEDA_REF,
        "env": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["name", "parameter"],
            "properties": {"name": {"type": "string"}, "parameter": {"type": "string"},
                           "containerName": {"type": "string"}},
        }},
        "boundServiceAccountToken": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["parameter", "serviceAccountName"],
            "properties": {"parameter": {"type": "string"}, "serviceAccountName": {"type": "string"}},
        }},
        "filePath": {"type": "string"},
        "podIdentity": {"type": "object", "required": ["provider"], "properties": {
            "provider": {"enum": ["azure-workload", "gcp", "aws", "aws-eks", "none"]}}},
        "awsSecretManager": {"type": "object"},
        "azureKeyVault": {"type": "object"},
        "gcpSecretManager": {"type": "object"},
        "hashiCorpVault": {"type": "object"},
        "oauth2": {"type": "object"},
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
    ("keda.sh/v1alpha1", "TriggerAuthentication"): TRIGGER_AUTHENTICATION,
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): HTTP_ROUTE,
    ("gateway.networking.k8s.io/v1", "GRPCRoute"): GRPC_ROUTE,
    ("monitoring.coreos.com/v1", "PodMonitor"): POD_MONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): LEADER_WORKER_SET,
}
