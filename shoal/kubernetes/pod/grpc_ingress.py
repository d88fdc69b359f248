"""gRPC on the pods that serve an application's HTTP ingress (and on its holding front).

When the serve config file has ``grpc_options`` with servicer functions, the ingress deployment's
pods (rank 0 of a gang) and the holding front of an ingress that scales to zero run the gRPC
ingress every shoal process shares (:class:`~shoal.runtime.grpc_front.GRPCFront`) next to their
HTTP front, on ``grpc_options.port`` of the file (``shoal k8s build`` writes
:data:`~shoal.kubernetes.names.GRPC_PORT` there). Calls go to the ingress deployment through the
pod's router (:class:`~shoal.kubernetes.pod.discovery.PodBackend`), exactly as the local proxy
sends them: the ``application`` metadata names the app (``$SHOAL_GRPC_APP``, the app's own name
also for a canary's pods; another name is ``NOT_FOUND``), ``request_id`` and
``multiplexed_model_id`` metadata, API keys from ``authorization`` or ``x-api-key`` metadata,
``request_timeout_s``, the same status codes, and TLS when ``http_options`` gives the HTTP port
certificates. The standard health service (:mod:`shoal.runtime.grpc_health`) says ``SERVING``
while the pod is ready (``/-/ready``), ``NOT_SERVING`` before and while it drains: the
kubelet's ``grpc:`` probe reads it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shoal.exceptions import PodConfigError
from shoal.kubernetes import names
from shoal.kubernetes.pod.admin import needs_loopback
from shoal.kubernetes.pod.config import PodSettings

if TYPE_CHECKING:
    from shoal.config import HTTPOptions, gRPCOptions
    from shoal.runtime.grpc_front import GRPCFront
    from shoal.runtime.router import Router

__all__ = ["grpc_options_of", "start_grpc"]

logger = logging.getLogger("shoal.pod")


def grpc_options_of(settings: PodSettings) -> gRPCOptions | None:
    """The serve config file's ``grpc_options`` when they start a gRPC server (servicer functions
    listed), else None; PodConfigError when the file cannot be read."""
    from shoal.schema import ConfigError, load_config_file

    try:
        config = load_config_file(settings.config_path)
    except ConfigError as e:
        raise PodConfigError(str(e)) from None
    return config.grpc_options if config.grpc_options.enabled else None


class _Named:
    """The pod's routers, with the application under the name gRPC clients use for it."""

    def __init__(self, source: Any, public: str, app: str) -> None:
        self.source = source
        self.public = public
        self.app = app

    def router(self, app: str, deployment: str) -> Router:
        return self.source.router(self.app if app == self.public else app, deployment)  # type: ignore[no-any-return]


async def start_grpc(source: Any, settings: PodSettings, http: HTTPOptions, app: str, ingress: str, prefix: str,
                     ready: Callable[[], bool]) -> GRPCFront | None:
    """Serve gRPC for ``app`` (its ingress deployment ``ingress`` behind route ``prefix``) when the
    config file asks for it; None when it does not. ``source`` gives the routers (the pod's
    backend); ``ready`` is the pod's readiness, which the health service reports. Raises
    PodConfigError when a servicer function cannot be used or the port cannot be opened."""
    options = grpc_options_of(settings)
    if options is None:
        return None
    from shoal.runtime.grpc_front import load_front, server_credentials
    from shoal.runtime.grpc_methods import GRPCFrontOptions
    from shoal.runtime.http.options import FrontOptions
    from shoal.runtime.wire import Routes

    public = os.environ.get(names.ENV_GRPC_APP) or app
    front_options = FrontOptions.of(http)
    host = settings.host
    try:
        front = load_front(_Named(source, public, app),
                           GRPCFrontOptions(host, options.port, tuple(options.grpc_servicer_functions),
                                            options.request_timeout_s),
                           front_options.api_keys, front_options.auth, front_options.max_request_body_bytes,
                           credentials=server_credentials(front_options))
    except (ValueError, OSError) as e:
        raise PodConfigError(str(e)) from None
    front.ready = ready
    if needs_loopback(host):  # kubectl port-forward connects to 127.0.0.1
        front.also_listen = (f"127.0.0.1:{options.port}",)
    front.set_routes(Routes({prefix: (public, ingress)}))
    try:
        await front.start()
    except RuntimeError as e:
        raise PodConfigError(str(e)) from None
    logger.info("gRPC for application %r on %s:%d (%d methods)", public, host, front.port, len(front.methods))
    return front
