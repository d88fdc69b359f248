"""``shoal replica``: the container command of a pod (see :mod:`shoal.kubernetes.pod`)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time

import click

from shoal.exceptions import PodConfigError
from shoal.kubernetes import names
from shoal.kubernetes.gang_pod import ranks_from_env
from shoal.kubernetes.pod.admin import AdminServer, starting
from shoal.kubernetes.pod.config import PodSettings, load_deployment, secret_from_env
from shoal.kubernetes.pod.replica import PodReplica
from shoal.observability import tracing
from shoal.runtime.backend import new_event_loop

__all__ = ["replica", "run_pod", "serve_pod", "setup_logging"]

logger = logging.getLogger("shoal.pod")


class OneLineFormatter(logging.Formatter):
    """Text log lines with multi-line parts (tracebacks) folded into the same line."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", "\\n")


def setup_logging(settings: PodSettings) -> None:
    """One line per record on stderr, for ``kubectl logs``."""
    handler = logging.StreamHandler(sys.stderr)
    who = f"pod={settings.pod_name} deployment={settings.deployment}"
    handler.setFormatter(OneLineFormatter(f"%(asctime)s %(levelname)s {who} %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)  # third-party libraries at WARNING, shoal at the chosen level
    logging.getLogger("shoal").setLevel(settings.log_level.upper())
    try:
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    except (AttributeError, ValueError):
        pass



def run_pod(settings: PodSettings) -> int:
    """Serve until SIGTERM; the process's exit code (0 after a drain, 1 if the replica failed)."""
    logger.info("starting replica of %s/%s (config %s, namespace %s)", settings.app or "(the only app)",
                settings.deployment, settings.config_path, settings.namespace)
    tracing.setup_from_env("shoal-replica")
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        code = loop.run_until_complete(serve_pod(settings))
    except OSError as e:
        logger.error("replica failed: %s", e)
        code = 1
    tracing.shutdown()  # export the spans still pending
    sys.stdout.flush()
    sys.stderr.flush()
    return code


async def serve_pod(settings: PodSettings) -> int:
    """Open the admin port, load the deployment, then run its :class:`PodReplica`; the exit code."""
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    # The admin port answers from the start: 503 on both probes until the replica is constructed.
    admin = AdminServer(starting)
    try:
        await admin.start(settings.host, settings.admin_port)
    except OSError as e:
        logger.error("cannot listen on the admin port %s:%d: %s", settings.host, settings.admin_port, e)
        return 1
    try:
        # In the main thread, on purpose: importing user code elsewhere breaks modules that
        # install signal handlers; the loop is blocked meanwhile (the startupProbe allows for it).
        spec, dspec, http, callees = load_deployment(settings)
    except PodConfigError as e:
        logger.error("%s", e)
        admin.close()
        return 2
    logger.info("application loaded in %.2fs", time.monotonic() - t0)
    if stopping.is_set():
        admin.close()
        return 0
    pod = PodReplica(settings, spec, dspec, http, callees, admin)
    pod.install_signals()
    return await pod.run()


@click.command("replica", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--deployment", envvar=names.ENV_DEPLOYMENT, required=True, show_envvar=True,
              help="The deployment this pod serves (its name in the application).")
@click.option("--app", "app", envvar=names.ENV_APP, default=None, show_envvar=True,
              help="The application (default: the config file's only one).")
@click.option("--config", "config_path", envvar=names.ENV_CONFIG, show_envvar=True, show_default=True,
              default=f"{names.CONFIG_MOUNT_DIR}/{names.CONFIG_FILE_NAME}",
              help="The serve config file (mounted from the application's ConfigMap).")
@click.option("--host", envvar=names.ENV_POD_IP, default="0.0.0.0", show_envvar=True, show_default=True,
              help="Address to listen on: the pod's IP (from the downward API).")
@click.option("--rpc-port", type=int, default=names.RPC_PORT, show_default=True,
              help="Port of the internal RPC (calls from other deployments' pods).")
@click.option("--http-port", type=int, default=names.HTTP_PORT, show_default=True,
              help="HTTP port, used only by the application's ingress deployment.")
@click.option("--admin-port", type=int, default=names.ADMIN_PORT, show_default=True,
              help="Port of /-/healthz, /-/ready and /metrics.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              help="Level of shoal's own log lines (third-party libraries log at WARNING).")
@click.option("--rank-from-env", is_flag=True,
              help="This pod is one rank of a gang replica (a LeaderWorkerSet pod): the rank and the gang's "
                   "size come from RANK and WORLD_SIZE, the LeaderWorkerSet's name from SHOAL_GANG.")
def replica(deployment: str, app: str | None, config_path: str, host: str, rpc_port: int, http_port: int,
            admin_port: int, log_level: str, rank_from_env: bool = False) -> None:
    """Serve one replica of one deployment in a Kubernetes pod (the container's command).

    There is no controller: the pod builds the application from the serve config file, serves
    its deployment on the internal RPC port (and HTTP when it is the ingress), and finds the
    pods of the deployments it calls through their headless Services in cluster DNS.

    \b
    Environment (set by `shoal k8s build`):
      SHOAL_RPC_SECRET      the internal RPC secret (required; from the app's Secret)
      SHOAL_NAMESPACE       the pod's namespace, used in callee DNS names (default: default)
      SHOAL_POD_NAME        the pod's name, the replica's id in logs (default: the hostname)
      SHOAL_CLUSTER_DOMAIN  the cluster's DNS domain (default: cluster.local)
      SHOAL_RESOLVER_FILE   test hook: a JSON file {"dns name": [ip, ...]} used instead of DNS
      RANK, WORLD_SIZE      with --rank-from-env: this rank of a gang replica, and the gang's size
      SHOAL_GANG            with --rank-from-env: the LeaderWorkerSet's name (rank 0 finds its ranks by it)

    \b
    Admin port endpoints:
      /-/healthz   200 once constructed, while the process answers (startup, liveness probes)
      /-/ready     200 once constructed and check_health passes; 503 otherwise and while draining
      /metrics     Prometheus metrics: shoal_replica_ongoing_requests,
                   shoal_handle_queued_requests (per callee), request counters

    SIGTERM drains: the pod turns unready, refuses new requests, finishes the ones in flight
    within graceful_shutdown_timeout_s and exits 0. Exit codes: 1 when the replica failed
    (e.g. its constructor raised), 2 for a bad config, application or deployment name.
    """
    settings = _settings(deployment=deployment, app=app or None, config_path=config_path, host=host,
                         rpc_port=rpc_port, http_port=http_port, admin_port=admin_port,
                         log_level=log_level.upper(), rank_from_env=rank_from_env)
    setup_logging(settings)
    code = run_pod(settings)
    # User code may have left non-daemon threads behind: do not wait for them.
    os._exit(code)


def _settings(*, deployment: str, app: str | None, config_path: str, host: str, rpc_port: int, http_port: int,
              admin_port: int, log_level: str, rank_from_env: bool) -> PodSettings:
    """The command line completed by the environment (UsageError when the environment falls short)."""
    secret = secret_from_env()
    if not secret:
        raise click.UsageError(f"{names.ENV_SECRET} is not set: the internal RPC needs the application's secret")
    rank, world_size, gang = 0, 1, ""
    if rank_from_env:
        try:
            rank, world_size, gang = ranks_from_env(os.environ)
        except ValueError as e:
            raise click.UsageError(str(e)) from None
    return PodSettings(
        deployment=deployment,
        app=app,
        config_path=config_path,
        secret=secret,
        host=host,
        rpc_port=rpc_port,
        http_port=http_port,
        admin_port=admin_port,
        namespace=os.environ.get(names.ENV_NAMESPACE) or "default",
        pod_name=os.environ.get(names.ENV_POD_NAME) or socket.gethostname(),
        cluster_domain=os.environ.get(names.ENV_CLUSTER_DOMAIN) or "cluster.local",
        resolver_file=os.environ.get(names.ENV_RESOLVER_FILE) or None,
        log_level=log_level,
        rank=rank,
        world_size=world_size,
        gang=gang,
    )
