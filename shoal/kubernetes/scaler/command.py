"""``shoal k8s scaler``: the container command of an application's scaler pod.

It reads the serve config the replica pods read (the application's ConfigMap), builds the
application to learn each deployment's autoscaling config (custom policies are imported here,
as in local mode's controller), then scrapes the pods and serves KEDA
(:mod:`shoal.kubernetes.scaler.service`) until SIGTERM. With ``--ingress-at-zero front`` the HTTP
ingress may scale to zero, and the app's holding front (``shoal front``) is scraped too: the
requests it holds for the ingress count as the ingress's load.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

import click

from shoal.kubernetes import names

if TYPE_CHECKING:
    from shoal.config import AutoscalingConfig, AutoscalingPolicy

__all__ = ["load_autoscaling", "scaler"]

logger = logging.getLogger("shoal.scaler")

# The scrape target of the holding front's pods (not a deployment: only the requests they hold count).
FRONT_TARGET = "(front)"


def load_autoscaling(config_path: str, app: str | None, ingress_at_zero: str = "keep-one",
                     ) -> tuple[str, list[str], dict[str, AutoscalingConfig], AutoscalingPolicy | None]:
    """(application name, every deployment, the autoscaling config of those that autoscale, the
    application-level policy) from the serve config file; :class:`~shoal.exceptions.PodConfigError`
    naming what is wrong. ``ingress_at_zero``: as compiled (``shoal k8s build --ingress-at-zero``):
    ``front`` keeps an HTTP ingress's ``min_replicas: 0``, ``keep-one`` raises it to 1."""
    from shoal.deployment import build_app_spec
    from shoal.exceptions import PodConfigError
    from shoal.loader import build_application
    from shoal.schema import ConfigError, load_config_file

    try:
        config = load_config_file(config_path)
    except ConfigError as e:
        raise PodConfigError(str(e)) from None
    apps = {a.name: (i, a) for i, a in enumerate(config.applications)}
    if app is None and len(apps) != 1:
        raise PodConfigError(f"{config_path} has {len(apps)} applications ({', '.join(apps)}); say which with --app")
    if app is not None and app not in apps:
        raise PodConfigError(f"{config_path} has no application {app!r} (it has: {', '.join(apps)})")
    index, schema = apps[app] if app is not None else next(iter(apps.values()))
    try:
        application = build_application(schema, source=config_path, index=index)
        spec = build_app_spec(application, name=schema.name, route_prefix=schema.route_prefix)
    except (ConfigError, ImportError, AttributeError, ValueError, TypeError) as e:
        raise PodConfigError(str(e)) from None
    configs: dict[str, AutoscalingConfig] = {}
    for name, dep in spec.deployments.items():
        auto = dep.config.resolved_autoscaling()
        if auto is not None:
            if dep.ingress and spec.route_prefix is not None and auto.min_replicas == 0 and ingress_at_zero != "front":
                # As compiled (compiler/autoscaling.py): without the holding front nothing holds HTTP
                # requests for an ingress at zero.
                auto = auto.model_copy(update={"min_replicas": 1})
            configs[name] = auto
    return schema.name, list(spec.deployments), configs, spec.autoscaling_policy


async def _serve(config_path: str, app: str | None, host: str, port: int, interval: float | None,
                 scrape_timeout: float, demand_hold: float, auth: str = "none", ingress_at_zero: str = "keep-one",
                 ) -> int:
    from shoal.exceptions import PodConfigError, PolicyLoadError
    from shoal.kubernetes.pod.discovery import DNSResolver, FileResolver, Resolver
    from shoal.kubernetes.scaler.core import ScalerCore
    from shoal.kubernetes.scaler.scrape import dns_targets
    from shoal.kubernetes.scaler.server import ScalerServer
    from shoal.kubernetes.scaler.service import ScalerService
    from shoal.serving.app_policy import AppPolicy

    try:
        app_name, deployments, configs, app_policy = load_autoscaling(config_path, app, ingress_at_zero)
        policy = None if app_policy is None else AppPolicy(app_name, app_policy)
        core = ScalerCore(app_name, configs, demand_hold_s=demand_hold, policy=policy)
    except (PodConfigError, PolicyLoadError, ValueError) as e:
        logger.error("%s", e)
        return 2
    if interval is None:
        interval = min([c.metrics_interval_s for c in configs.values()] or [10.0])
        interval = max(0.5, min(10.0, interval))
    namespace = os.environ.get(names.ENV_NAMESPACE) or "default"
    domain = os.environ.get(names.ENV_CLUSTER_DOMAIN) or "cluster.local"
    resolver_file = os.environ.get(names.ENV_RESOLVER_FILE)
    resolver: Resolver = FileResolver(resolver_file) if resolver_file else DNSResolver()
    targets = dns_targets(app_name, deployments, namespace, domain, timeout_s=scrape_timeout)
    if ingress_at_zero == "front" and FRONT_TARGET not in targets.dns_names:
        # The holding front's pods: the requests they hold for the ingress count as its load.
        targets.dns_names[FRONT_TARGET] = f"{names.front_name(app_name)}.{namespace}.svc.{domain}"
    try:
        service = ScalerService(core, targets, resolver, interval_s=interval)
    except ValueError as e:
        logger.error("%s", e)
        return 2
    token: str | None = None
    if auth == "bearer":
        token = (os.environ.get(names.ENV_SCALER_TOKEN) or "").strip()
        if not token:
            logger.error("--auth bearer: $%s is not set or empty (the Secret %s, key %r); refusing to serve "
                         "without it", names.ENV_SCALER_TOKEN, names.scaler_token_secret_name(app_name),
                         names.SCALER_TOKEN_KEY)
            return 2
    server = ScalerServer(service.handle, token=token)
    try:
        await server.start(host, port)
    except OSError as e:
        logger.error("cannot listen on %s:%d: %s", host, port, e)
        return 1
    logger.info("scaler of %s listening on %s:%d: %d autoscaling deployment(s) (%s), scraping every %gs",
                app_name, host, port, len(configs), ", ".join(configs) or "none", interval)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await service.run(stopping)
    finally:
        server.close()
    return 0


@click.command("scaler", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_path", envvar=names.ENV_CONFIG, show_envvar=True, show_default=True,
              default=f"{names.CONFIG_MOUNT_DIR}/{names.CONFIG_FILE_NAME}",
              help="The serve config file (mounted from the application's ConfigMap).")
@click.option("--app", "app", envvar=names.ENV_APP, default=None, show_envvar=True,
              help="The application (default: the config file's only one).")
@click.option("--host", envvar=names.ENV_POD_IP, default="0.0.0.0", show_envvar=True, show_default=True,
              help="Address to listen on.")
@click.option("--port", type=int, default=names.SCALER_PORT, show_default=True,
              help="Port of /scale/<deployment>, /demand/<deployment>, /status and the probes.")
@click.option("--interval", type=float, default=None,
              help="Seconds between scrapes (default: the smallest metrics_interval_s, within [0.5, 10]).")
@click.option("--scrape-timeout", type=float, default=2.0, show_default=True,
              help="Seconds one pod's /metrics may take before it counts as not answering.")
@click.option("--demand-hold", type=float, default=10.0, show_default=True,
              help="Seconds one demand signal counts as a held request without a scrape confirming it.")
@click.option("--auth", type=click.Choice(["none", "bearer"]), default="none", show_default=True,
              help=f"bearer: every route but the probes needs Authorization: Bearer ${names.ENV_SCALER_TOKEN} "
                   "(shoal k8s build --scaler-auth bearer sets it from a Secret).")
@click.option("--ingress-at-zero", type=click.Choice(["front", "keep-one"]), default="keep-one", show_default=True,
              help="front: the HTTP ingress may scale to zero (its holding front is scraped too); keep-one: an "
                   "ingress's min_replicas 0 counts as 1 (as `shoal k8s build --ingress-at-zero` compiled it).")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def scaler(config_path: str, app: str | None, host: str, port: int, interval: float | None, scrape_timeout: float,
           demand_hold: float, auth: str, log_level: str, ingress_at_zero: str = "keep-one") -> None:
    """Autoscale one application's deployments on Kubernetes (the scaler pod's command).

    Scrapes every pod's /metrics (requests in replicas, requests callers hold), runs shoal's
    autoscaler (the default or a custom policy, delays, bounds, scale to and from zero) and
    answers KEDA's metrics-api trigger with each deployment's desired replica count. Exit codes:
    2 for a bad config or policy (or --auth bearer without a token), 1 when the port cannot be bound.
    """
    if scrape_timeout <= 0 or demand_hold <= 0 or (interval is not None and interval <= 0):
        raise click.UsageError("--interval, --scrape-timeout and --demand-hold must be positive")
    from shoal.context import _mark_worker_process

    _mark_worker_process("scaler")  # it imports the app: a module-level serve.run() must not start here
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s scaler %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("shoal").setLevel(log_level.upper())
    code = asyncio.run(_serve(config_path, app, host, port, interval, scrape_timeout, demand_hold, auth,
                              ingress_at_zero))
    sys.exit(code)
