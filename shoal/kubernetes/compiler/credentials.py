"""An application's credentials in Kubernetes: the RPC secret, the pod certificate for TLS
between pods, and the HTTP API keys. They only ever live in Secrets, never in the ConfigMap.

* ``<app>-rpc`` (Opaque): ``rpc-secret``, and ``rpc-secret-previous`` during a rotation; every
  pod reads them as environment variables (the previous one optional).
* ``<app>-rpc-tls`` (``kubernetes.io/tls``): ``tls.crt``, ``tls.key``, ``ca.crt``; mounted
  read-only into every pod. Written by ``--create-secret`` (from the local secrets file), by
  cert-manager (``--tls cert-manager``: the objects below), or by the operator.
* ``<app>-api-keys`` (Opaque): ``api-keys``, one key per line; mounted into the ingress pods only,
  and only when the serve config has inline ``http_options.api_keys`` (stripped from the ConfigMap).
* ``<app>-scaler-token`` (Opaque): ``token``, the bearer token of the application's scaler
  (``--scaler-auth bearer``); the scaler, the replicas (demand posts) and KEDA's
  TriggerAuthentication read it (compiler/autoscaling.py).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any

from shoal.exceptions import CompileError
from shoal.kubernetes import names
from shoal.kubernetes.compiler.common import A_APP, AppContext, Obj
from shoal.kubernetes.secretstore import AppSecrets, fresh_secrets

__all__ = [
    "CERT_MANAGER_API",
    "api_keys",
    "cert_manager_objects",
    "credential_env",
    "credential_mounts",
    "credential_volumes",
    "generated_secrets",
    "hash_gateway_keys",
]

CERT_MANAGER_API = "cert-manager.io/v1"
# Pod certificates from cert-manager: renewed in place (pods reload them) well before they end.
POD_CERT_DURATION = "2160h"  # 90 days
POD_CERT_RENEW_BEFORE = "720h"  # 30 days
# The CA signs pod certificates for its whole life; replacing it takes a two-step rotation.
CA_DURATION = "87600h"  # 10 years
CA_RENEW_BEFORE = "8760h"  # 1 year
# Secret files: readable by the pod's user and group only (the kubelet adds the fsGroup's read bit).
SECRET_FILE_MODE = 0o440


def api_keys(http_options: Mapping[str, Any]) -> list[str]:
    """The inline ``http_options.api_keys`` of a serve config (what must not reach the ConfigMap)."""
    keys = http_options.get("api_keys") or []
    return [str(k) for k in keys]


def serves_http(ctx: AppContext, dep_ingress: bool, rank: int | None) -> bool:
    """Whether a pod template is one that serves HTTP (the ingress, rank 0 of a gang)."""
    return dep_ingress and ctx.spec.route_prefix is not None and not rank


def _secret(ctx: AppContext, name: str, component: str, data: Mapping[str, str], kind: str = "Opaque") -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": ctx.opts.namespace,
            "labels": ctx.labels(component=component),
            "annotations": {A_APP: ctx.app},
        },
        "type": kind,
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def generated_secrets(ctx: AppContext, keys: Sequence[str], *, scaler_token: bool = False) -> list[Obj]:
    """The Secrets of ``--create-secret``: from the stored material the CLI passed in
    (``CompileOptions.secret_material``), else fresh random material (a library call).
    ``scaler_token``: the scaler requires a bearer token (its Secret is written too)."""
    opts = ctx.opts
    with_tls = opts.tls == "secret"
    material: AppSecrets | None = opts.secret_material.get(ctx.app)
    if material is None:
        material = fresh_secrets(ctx.app, opts.namespace, with_tls=with_tls, with_scaler_token=scaler_token)
    out = [_secret(ctx, names.secret_name(ctx.app), "rpc-secret", {names.SECRET_KEY: material.rpc_secret})]
    if with_tls:
        if material.tls is None:
            raise CompileError(f"the stored secrets of application {ctx.app!r} have no certificates")
        out.append(_secret(ctx, names.tls_secret_name(ctx.app), "rpc-tls", material.tls.secret_data(),
                           kind="kubernetes.io/tls"))
    if keys:
        out.append(_secret(ctx, names.api_keys_secret_name(ctx.app), "api-keys",
                           {names.API_KEYS_KEY: "".join(k + "\n" for k in keys)}))
    if scaler_token:
        if not material.scaler_token:
            raise CompileError(f"the stored secrets of application {ctx.app!r} have no scaler token")
        out.append(_secret(ctx, names.scaler_token_secret_name(ctx.app), "scaler-token",
                           {names.SCALER_TOKEN_KEY: material.scaler_token}))
    return out


def cert_manager_objects(ctx: AppContext) -> list[Obj]:
    """``--tls cert-manager``: a self-signed Issuer that makes the application's CA (a Certificate
    with isCA), a CA Issuer on it, and the pod Certificate written to ``<app>-rpc-tls``."""
    app, ns = ctx.app, ctx.opts.namespace
    selfsigned, ca = names.dns_label(app, "rpc-selfsigned"), names.dns_label(app, "rpc-ca")

    def meta(name: str, component: str) -> Obj:
        return {"name": name, "namespace": ns, "labels": ctx.labels(component=component), "annotations": {A_APP: app}}

    def issuer_ref(name: str) -> Obj:
        return {"name": name, "kind": "Issuer", "group": "cert-manager.io"}

    key = {"algorithm": "ECDSA", "size": 256, "encoding": "PKCS8", "rotationPolicy": "Always"}
    return [
        {"apiVersion": CERT_MANAGER_API, "kind": "Issuer", "metadata": meta(selfsigned, "rpc-tls"),
         "spec": {"selfSigned": {}}},
        {"apiVersion": CERT_MANAGER_API, "kind": "Certificate", "metadata": meta(ca, "rpc-tls"), "spec": {
            "isCA": True,
            "commonName": f"shoal {ns}/{app} RPC CA",
            "secretName": ca,
            "duration": CA_DURATION,
            "renewBefore": CA_RENEW_BEFORE,
            "privateKey": key,
            "issuerRef": issuer_ref(selfsigned),
        }},
        {"apiVersion": CERT_MANAGER_API, "kind": "Issuer", "metadata": meta(ca, "rpc-tls"),
         "spec": {"ca": {"secretName": ca}}},
        {"apiVersion": CERT_MANAGER_API, "kind": "Certificate", "metadata": meta(names.tls_secret_name(app), "rpc-tls"),
         "spec": {
             "secretName": names.tls_secret_name(app),
             "commonName": f"shoal {ns}/{app} pod",
             "dnsNames": [f"{app}.{ns}.svc"],
             "duration": POD_CERT_DURATION,
             "renewBefore": POD_CERT_RENEW_BEFORE,
             "privateKey": key,
             "usages": ["digital signature", "key agreement", "server auth", "client auth"],
             "issuerRef": issuer_ref(ca),
         }},
    ]


def credential_env(ctx: AppContext, *, http: bool) -> list[Obj]:
    """The credential variables of a replica container (API keys only where it serves HTTP)."""
    secret = names.secret_name(ctx.app)
    env: list[Obj] = [
        {"name": names.ENV_SECRET, "valueFrom": {"secretKeyRef": {"name": secret, "key": names.SECRET_KEY}}},
        # Set during a rotation only (docs/kubernetes.md): absent, the variable is simply not set.
        {"name": names.ENV_SECRET_PREVIOUS,
         "valueFrom": {"secretKeyRef": {"name": secret, "key": names.SECRET_KEY_PREVIOUS, "optional": True}}},
    ]
    if ctx.opts.tls == "off":
        env.append({"name": names.ENV_INSECURE_NO_TLS, "value": "1"})
    else:
        env.append({"name": names.ENV_TLS_DIR, "value": names.TLS_MOUNT_DIR})
        env.append({"name": names.ENV_TLS_SECRET, "value": names.tls_secret_name(ctx.app)})
    if http and ctx.api_keys:
        env.append({"name": names.ENV_API_KEYS_FILE, "value": f"{names.API_KEYS_MOUNT_DIR}/{names.API_KEYS_KEY}"})
    return env


def credential_mounts(ctx: AppContext, *, http: bool) -> list[Obj]:
    mounts: list[Obj] = []
    if ctx.opts.tls != "off":
        mounts.append({"name": "rpc-tls", "mountPath": names.TLS_MOUNT_DIR, "readOnly": True})
    if http and ctx.api_keys:
        mounts.append({"name": "api-keys", "mountPath": names.API_KEYS_MOUNT_DIR, "readOnly": True})
    return mounts


def credential_volumes(ctx: AppContext, *, http: bool) -> list[Obj]:
    vols: list[Obj] = []
    if ctx.opts.tls != "off":
        # The keys are listed: a Secret without one of them keeps the pod from starting, saying which.
        items = [{"key": k, "path": k} for k in (names.TLS_CERT_FILE, names.TLS_KEY_FILE, names.TLS_CA_FILE)]
        vols.append({"name": "rpc-tls", "secret": {"secretName": names.tls_secret_name(ctx.app), "items": items,
                                                   "defaultMode": SECRET_FILE_MODE}})
    if http and ctx.api_keys:
        vols.append({"name": "api-keys", "secret": {
            "secretName": names.api_keys_secret_name(ctx.app),
            "items": [{"key": names.API_KEYS_KEY, "path": names.API_KEYS_KEY}],
            "defaultMode": SECRET_FILE_MODE,
        }})
    return vols


def hash_gateway_keys(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The serve-config entry with the LLM gateway's plaintext API keys (``args.gateway.api_keys``)
    replaced by their ``sha256:`` form, which the gateway accepts and compares against: the
    ConfigMap never holds a usable key."""
    out = dict(entry)
    args = out.get("args")
    if not isinstance(args, Mapping):
        return out
    gateway = args.get("gateway")
    if not isinstance(gateway, Mapping) or not isinstance(gateway.get("api_keys"), Mapping):
        return out
    from shoal.llm._config import hash_api_key

    keys = {(k if str(k).startswith("sha256:") else hash_api_key(str(k))): t for k, t in gateway["api_keys"].items()}
    out["args"] = {**args, "gateway": {**gateway, "api_keys": keys}}
    return out
