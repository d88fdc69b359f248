"""What a pod replica is told: its settings (command line and environment) and its deployment,
loaded from the serve config file mounted from the application's ConfigMap."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shoal.config import DEFAULT_MAX_QUEUE_WAIT_S, DeploymentConfig
from shoal.exceptions import PodConfigError
from shoal.kubernetes import names
from shoal.kubernetes.pod.discovery import CalleeConfig
from shoal.runtime.custom_routing import request_router_blob

if TYPE_CHECKING:
    from shoal.config import HTTPOptions
    from shoal.deployment import AppSpec, DeploymentSpec

__all__ = ["PodConfigError", "PodSettings", "http_options_for", "load_deployment", "pick_app", "secret_from_env"]


@dataclass(frozen=True)
class PodSettings:
    """Everything a pod replica is told by its command line and environment."""

    deployment: str
    app: str | None  # None: the config file's only application
    config_path: str
    secret: bytes
    host: str = "0.0.0.0"
    rpc_port: int = names.RPC_PORT
    http_port: int = names.HTTP_PORT
    admin_port: int = names.ADMIN_PORT
    namespace: str = "default"
    pod_name: str = ""
    cluster_domain: str = "cluster.local"
    resolver_file: str | None = None
    log_level: str = "INFO"
    # Gang replicas (--rank-from-env): this pod's rank, the gang's size, the LeaderWorkerSet's name.
    rank: int = 0
    world_size: int = 1
    gang: str = ""
    # During a rotation: the previous RPC secret, still accepted (b"": none).
    previous_secret: bytes = b""
    # Where the pod certificate, its key and the CA bundle are (None: plain TCP, development only).
    tls_dir: str | None = names.TLS_MOUNT_DIR
    tls_secret: str = ""  # the Secret mounted there, named in error messages
    # Ingress pods: the file of HTTP API keys, mounted from the app's API-keys Secret.
    api_keys_file: str | None = None

    def secrets(self) -> tuple[bytes, ...]:
        """The RPC secrets this pod accepts: the primary, then the previous one during a rotation."""
        if self.previous_secret and self.previous_secret != self.secret:
            return (self.secret, self.previous_secret)
        return (self.secret,)


def load_deployment(settings: PodSettings) -> tuple[AppSpec, DeploymentSpec, HTTPOptions,
                                                    dict[tuple[str, str], CalleeConfig]]:
    """Read the config file, build the application and pick this pod's deployment; the
    limits of every deployment it may call come along (``max_ongoing_requests`` and
    ``max_queued_requests``, which its routers enforce)."""
    from shoal.deployment import build_app_spec
    from shoal.loader import build_application
    from shoal.schema import ConfigError, load_config_file

    try:
        config = load_config_file(settings.config_path)
    except ConfigError as e:
        raise PodConfigError(str(e)) from None
    index, app_schema = pick_app(settings, config.applications)
    app_name = app_schema.name
    try:
        application = build_application(app_schema, source=settings.config_path, index=index)
        spec = build_app_spec(application, name=app_name, route_prefix=app_schema.route_prefix)
    except (ConfigError, ImportError, AttributeError, ValueError, TypeError) as e:
        raise PodConfigError(str(e)) from None
    if settings.deployment not in spec.deployments:
        raise PodConfigError(f"application {app_name!r} has no deployment {settings.deployment!r} "
                             f"(it has: {', '.join(spec.deployments)})")
    http_options = http_options_for(settings, config.http_options)
    world_size = spec.deployments[settings.deployment].config.world_size
    if world_size != settings.world_size:
        raise PodConfigError(
            f"deployment {settings.deployment!r} has {world_size} rank(s) per replica but this pod was started "
            f"as one of {settings.world_size}" + (" (a gang runs in a LeaderWorkerSet, with --rank-from-env)"
                                                  if world_size > 1 and settings.world_size == 1 else "")
        )
    return spec, spec.deployments[settings.deployment], http_options, _callees(spec, config.applications)


def http_options_for(settings: PodSettings, http_options: HTTPOptions) -> HTTPOptions:
    """The config file's ``http_options`` with the API keys of ``$SHOAL_API_KEYS_FILE`` (kept out
    of the ConfigMap: they come from a Secret mounted into the pod); PodConfigError if unreadable."""
    if not settings.api_keys_file:
        return http_options
    http_options = http_options.model_copy(update={"api_keys_file": settings.api_keys_file})
    try:
        http_options.resolved_api_keys()
    except ValueError as e:
        raise PodConfigError(f"{e} (${names.ENV_API_KEYS_FILE}, from the application's API-keys Secret)") from None
    return http_options


def pick_app(settings: PodSettings, applications: Sequence[Any]) -> tuple[int, Any]:
    """(index, schema) of the application this pod serves: the one named, or the only one."""
    apps = {a.name: (i, a) for i, a in enumerate(applications)}
    if settings.app is None:
        if len(apps) != 1:
            raise PodConfigError(f"{settings.config_path} has {len(apps)} applications "
                                 f"({', '.join(apps)}); say which with {names.ENV_APP} or --app")
        return next(iter(apps.values()))
    if settings.app not in apps:
        raise PodConfigError(f"{settings.config_path} has no application {settings.app!r} "
                             f"(it has: {', '.join(apps)})")
    return apps[settings.app]


def _callees(spec: AppSpec, applications: Sequence[Any]) -> dict[tuple[str, str], CalleeConfig]:
    """The limits of every deployment a handle may reach: the app's own, and other apps' entries."""
    callees: dict[tuple[str, str], CalleeConfig] = {}
    for d in spec.deployments.values():
        callees[(spec.name, d.name)] = CalleeConfig(d.config.max_ongoing_requests, d.config.max_queued_requests,
                                                    d.config.resolved_max_queue_wait_s(),
                                                    request_router_blob(d.config, d.name))
    for other in applications:  # handles to other apps: what their config entries say
        if other.name == spec.name:
            continue
        for entry in other.deployments:
            opts = entry.options()
            wait = opts.get("max_queue_wait_s")
            router = request_router_blob(DeploymentConfig(request_router_config=opts.get("request_router_config")),
                                         entry.name) if opts.get("request_router_config") else b""
            callees[(other.name, entry.name)] = CalleeConfig(int(opts.get("max_ongoing_requests", 5)),
                                                              int(opts.get("max_queued_requests", -1)),
                                                              float(wait) if wait else DEFAULT_MAX_QUEUE_WAIT_S,
                                                              router)
    return callees


def secret_from_env(name: str = names.ENV_SECRET) -> bytes:
    """The internal RPC secret, ``$SHOAL_RPC_SECRET`` (or another variable: ``name``; b"" when unset)."""
    raw = os.environb.get(name.encode()) if hasattr(os, "environb") else None
    if raw is None:
        value = os.environ.get(name)
        raw = value.encode() if value is not None else None
    return raw or b""
