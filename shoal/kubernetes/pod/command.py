"""``shoal replica``: the container command of a pod (see :mod:`shoal.kubernetes.pod`)."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import socket
import sys
import time
from typing import Any

import click

from shoal.exceptions import PodConfigError
from shoal.kubernetes import names
from shoal.kubernetes.gang_pod import ranks_from_env
from shoal.kubernetes.pod.admin import (
    HEAD_TIMEOUT_S,
    LOOP_STALL_S,
    MAX_CONNECTIONS,
    AdminLimits,
    AdminServer,
    starting,
)
from shoal.kubernetes.pod.config import PodSettings, load_deployment, secret_from_env
from shoal.kubernetes.pod.replica import PodReplica
from shoal.kubernetes.pod.tls import PodTls
from shoal.observability import tracing
from shoal.runtime import handshake_gate
from shoal.runtime.backend import new_event_loop
from shoal.runtime.wire import TcpSecurity, set_tcp_security

__all__ = ["replica", "run_pod", "serve_pod", "setup_logging"]

logger = logging.getLogger("shoal.pod")

# Pods drop peers that have not authenticated within this long (the default of serve_tcp is
# longer: a pod's callers are in the same cluster).
RPC_HANDSHAKE_TIMEOUT_S = 3.0
# raise_fd_limit raises the soft limit on open files to the hard one, at most this.
FD_LIMIT_CAP = 1 << 20


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



def raise_fd_limit() -> None:
    """Raise the soft limit on open files to the hard one (as Go programs do): containers often
    start with a soft limit of 1024, which a burst of connections exhausts, and then no port of
    the process accepts, the probes' included."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = FD_LIMIT_CAP if hard == resource.RLIM_INFINITY else min(hard, FD_LIMIT_CAP)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as e:
        logger.warning("cannot raise the limit on open files: %s", e)


def run_pod(settings: PodSettings, limits: AdminLimits | None = None) -> int:
    """Serve until SIGTERM; the process's exit code (0 after a drain, 1 if the replica failed)."""
    from shoal.context import _mark_worker_process

    _mark_worker_process("pod")
    raise_fd_limit()
    logger.info("starting replica of %s/%s (config %s, namespace %s)", settings.app or "(the only app)",
                settings.deployment, settings.config_path, settings.namespace)
    tracing.setup_from_env("shoal-replica")
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        code = loop.run_until_complete(serve_pod(settings, limits))
    except OSError as e:
        logger.error("replica failed: %s", e)
        code = 1
    tracing.shutdown()  # export the spans still pending
    sys.stdout.flush()
    sys.stderr.flush()
    return code


async def open_admin(settings: PodSettings, limits: AdminLimits | None) -> tuple[AdminServer, asyncio.Event] | None:
    """A pod's first step: SIGTERM/SIGINT set the returned event (until the pod installs its own
    handlers), and the admin port answers from the start, 503 on both probes while the pod
    starts. None (logged) when the port cannot be opened."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    admin = AdminServer(starting, limits)
    try:
        await admin.start(settings.host, settings.admin_port)
    except OSError as e:
        logger.error("cannot listen on the admin port %s:%d: %s", settings.host, settings.admin_port, e)
        return None
    return admin, stopping


async def run_started(pod: Any, tls: PodTls | None) -> int:
    """Run a started pod (its own signal handlers on) while its TLS certificates are watched."""
    pod.install_signals()
    watch = asyncio.get_running_loop().create_task(tls.watch()) if tls is not None else None
    try:
        return int(await pod.run())
    finally:
        if watch is not None:
            watch.cancel()


async def serve_pod(settings: PodSettings, limits: AdminLimits | None = None) -> int:
    """Open the admin port, load the deployment, then run its :class:`PodReplica`; the exit code."""
    t0 = time.monotonic()
    opened = await open_admin(settings, limits)
    if opened is None:
        return 1
    admin, stopping = opened
    try:
        tls = _tcp_security(settings)
    except PodConfigError as e:
        logger.error("%s", e)
        admin.close()
        return 2
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
    return await run_started(PodReplica(settings, spec, dspec, http, callees, admin), tls)


def _tcp_security(settings: PodSettings) -> PodTls | None:
    """Set up what protects the pod's RPC: mutual TLS from the mounted Secret (PodConfigError
    naming it when the files are missing or bad) and the RPC secrets the handshake accepts."""
    tls: PodTls | None = None
    if settings.tls_dir is None:
        logger.warning("INSECURE: TLS between pods is off (%s / `shoal k8s build --tls off`): RPC traffic, "
                       "pickles included, is readable and can be altered by anyone on the network path; "
                       "for development only", names.ENV_INSECURE_NO_TLS)
    else:
        tls = PodTls(settings.tls_dir, settings.tls_secret)
    if settings.previous_secret:
        logger.info("accepting the previous RPC secret too (%s is set: a rotation is under way)",
                    names.ENV_SECRET_PREVIOUS)
    set_tcp_security(TcpSecurity(client_tls=tls.client if tls else None, server_tls=tls.server if tls else None,
                                 also_accepted=settings.secrets()[1:]))
    return tls


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
@click.option("--tls-dir", envvar=names.ENV_TLS_DIR, default=names.TLS_MOUNT_DIR, show_envvar=True,
              show_default=True, help="Directory of tls.crt, tls.key and ca.crt (the app's kubernetes.io/tls Secret): "
                                      "mutual TLS between pods.")
@click.option("--insecure-no-tls", is_flag=True, envvar=names.ENV_INSECURE_NO_TLS, show_envvar=True,
              help="Development only: plain TCP between pods (RPC traffic readable and alterable on the network).")
@click.option("--rpc-max-handshakes", type=int, default=handshake_gate.DEFAULT_MAX_PENDING, show_default=True,
              help="RPC connections in their (TLS and HMAC) handshake at once; more are closed at once.")
@click.option("--rpc-handshake-timeout", type=float, default=RPC_HANDSHAKE_TIMEOUT_S, show_default=True,
              help="Seconds an RPC connection may take to authenticate before it is dropped.")
@click.option("--admin-head-timeout", type=float, default=HEAD_TIMEOUT_S, show_default=True,
              help="Seconds a client of the admin port has to send its whole request head (then 408).")
@click.option("--admin-max-connections", type=int, default=MAX_CONNECTIONS, show_default=True,
              help="Admin port connections served at once; more are answered 503 at once.")
@click.option("--loop-stall-timeout", type=float, default=LOOP_STALL_S, show_default=True,
              help="The probes fail once the replica's event loop has not turned for this many seconds.")
@click.option("--rank-from-env", is_flag=True,
              help="This pod is one rank of a gang replica (a LeaderWorkerSet pod): the rank and the gang's "
                   "size come from RANK and WORLD_SIZE, the LeaderWorkerSet's name from SHOAL_GANG.")
def replica(deployment: str, app: str | None, config_path: str, host: str, rpc_port: int, http_port: int,
            admin_port: int, log_level: str, rank_from_env: bool = False, tls_dir: str = names.TLS_MOUNT_DIR,
            insecure_no_tls: bool = False, rpc_max_handshakes: int = handshake_gate.DEFAULT_MAX_PENDING,
            rpc_handshake_timeout: float = RPC_HANDSHAKE_TIMEOUT_S, admin_head_timeout: float = HEAD_TIMEOUT_S,
            admin_max_connections: int = MAX_CONNECTIONS, loop_stall_timeout: float = LOOP_STALL_S) -> None:
    """Serve one replica of one deployment in a Kubernetes pod (the container's command).

    There is no controller: the pod builds the application from the serve config file, serves
    its deployment on the internal RPC port (and HTTP when it is the ingress), and finds the
    pods of the deployments it calls through their headless Services in cluster DNS.

    \b
    Environment (set by `shoal k8s build`):
      SHOAL_RPC_SECRET      the internal RPC secret (required; from the app's Secret)
      SHOAL_RPC_SECRET_PREVIOUS  the previous RPC secret, also accepted during a rotation (optional)
      SHOAL_TLS_SECRET      the name of the TLS Secret mounted at --tls-dir (for error messages)
      SHOAL_API_KEYS_FILE   ingress pods: the HTTP API keys, one per line (from the app's API-keys Secret)
      SHOAL_NAMESPACE       the pod's namespace, used in callee DNS names (default: default)
      SHOAL_POD_NAME        the pod's name, the replica's id in logs (default: the hostname)
      SHOAL_CLUSTER_DOMAIN  the cluster's DNS domain (default: cluster.local)
      SHOAL_RESOLVER_FILE   test hook: a JSON file {"dns name": [ip, ...]} used instead of DNS
      RANK, WORLD_SIZE      with --rank-from-env: this rank of a gang replica, and the gang's size
      SHOAL_GANG            with --rank-from-env: the LeaderWorkerSet's name (rank 0 finds its ranks by it)

    \b
    Admin port endpoints:
      /-/healthz   200 once constructed, while the process answers and check_health has not
                   failed 3 times in a row (startup, liveness probes)
      /-/ready     200 once constructed and check_health passes; 503 otherwise and while draining
      /metrics     Prometheus metrics: shoal_replica_ongoing_requests,
                   shoal_handle_queued_requests (per callee), request counters

    SIGTERM drains: the pod turns unready, refuses new requests, finishes the ones in flight
    within graceful_shutdown_timeout_s and exits 0. Exit codes: 1 when the replica failed
    (e.g. its constructor raised), 2 for a bad config, application or deployment name,
    or TLS files that are missing or unusable (the message names the Secret).
    """
    settings = _settings(deployment=deployment, app=app or None, config_path=config_path, host=host,
                         rpc_port=rpc_port, http_port=http_port, admin_port=admin_port,
                         log_level=log_level.upper(), rank_from_env=rank_from_env,
                         tls_dir=None if insecure_no_tls else tls_dir)
    try:
        limits = AdminLimits(head_timeout_s=admin_head_timeout, max_connections=admin_max_connections,
                             loop_stall_s=loop_stall_timeout)
        handshake_gate.configure(rpc_max_handshakes, rpc_handshake_timeout)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    setup_logging(settings)
    code = run_pod(settings, limits)
    # User code may have left non-daemon threads behind: do not wait for them.
    os._exit(code)


def _settings(*, deployment: str, app: str | None, config_path: str, host: str, rpc_port: int, http_port: int,
              admin_port: int, log_level: str, rank_from_env: bool,
              tls_dir: str | None = names.TLS_MOUNT_DIR) -> PodSettings:
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
        previous_secret=secret_from_env(names.ENV_SECRET_PREVIOUS),
        tls_dir=tls_dir,
        tls_secret=os.environ.get(names.ENV_TLS_SECRET, ""),
        api_keys_file=os.environ.get(names.ENV_API_KEYS_FILE) or None,
    )
