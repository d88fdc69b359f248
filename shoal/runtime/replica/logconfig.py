"""A replica's logging: its deployment's ``logging_config``, and the process's first set-up."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from shoal.context import ReplicaContext
from shoal.observability.logs import (
    EscapingFormatter,
    Identity,
    JSONFormatter,
    LogFile,
    RecordContext,
    replica_log_path,
    safe_name,
)
from shoal.observability.logs import setup as setup_log_file

__all__ = ["apply_logging_config", "setup_process_logging"]

logger = logging.getLogger("shoal.replica")


def apply_logging_config(lc: Any, ctx: ReplicaContext, *, log_dir: str = "", app_key: str = "",
                         shoal_level: str | None = None) -> None:
    """Apply a deployment's ``logging_config``: level, encoding, where records go.

    With ``log_dir`` (a local instance) the replica writes its own rotating file there,
    ``<app>/<deployment>/<replica id>.log`` (stdout and stderr included; in ``logging_config.logs_dir``
    instead when set, linked from there), and WARNING and above also to the terminal; see
    :mod:`shoal.observability.logs`. Without it (a Kubernetes pod) records keep going to stderr.
    Either way each record carries the application, deployment, replica and request id.
    """
    who = Identity("replica", ctx.replica_tag, ctx.app_name, ctx.deployment)
    if log_dir:
        own = replica_log_path(log_dir, app_key or ctx.app_name, ctx.deployment, ctx.replica_tag)
        path, link = own, ""
        if lc is not None and lc.logs_dir:
            name = f"replica_{safe_name(ctx.app_name)}_{safe_name(ctx.deployment)}_{safe_name(ctx.replica_tag)}.log"
            path, link = os.path.join(lc.logs_dir, name), own
        try:
            setup_log_file(who, path=path, link=link, encoding=lc.encoding if lc is not None else "TEXT",
                           level=lc.log_level if lc is not None else "INFO",
                           shoal_level=lc.log_level if lc is not None else shoal_level,
                           extra_attrs=lc.additional_log_standard_attrs if lc is not None else ())
            return
        except OSError as e:
            logger.warning("cannot write the replica's log file %s (%s); logging to stderr", path, e)
    root = logging.getLogger()
    context = RecordContext(who)
    for handler in root.handlers:
        handler.addFilter(context)
    if lc is None:
        return
    logging.getLogger("shoal").setLevel(lc.log_level)
    root.setLevel(lc.log_level)
    if lc.logs_dir:
        name = f"replica_{safe_name(ctx.app_name)}_{safe_name(ctx.deployment)}_{safe_name(ctx.replica_tag)}.log"
        try:  # never through another user's link (shoal.observability.safefiles)
            file_handler: logging.Handler = LogFile(os.path.join(lc.logs_dir, name))
        except OSError as e:
            logger.warning("cannot write the replica's log file in %s (%s); logging to stderr", lc.logs_dir, e)
        else:
            file_handler.addFilter(context)
            root.addHandler(file_handler)
    if lc.encoding == "JSON":
        for handler in root.handlers:
            handler.setFormatter(JSONFormatter(who, extra_attrs=lc.additional_log_standard_attrs))


def setup_process_logging(process_id: str, level: str) -> None:
    """Log to stderr, naming the replica in every line (until the deployment's config says more)."""
    # Third-party libraries log at WARNING (as in a plain Python program); shoal's own
    # loggers at the instance's level.
    fmt = f"%(asctime)s %(levelname)s replica {process_id} pid={os.getpid()} %(name)s: %(message)s"
    root = logging.getLogger()
    if root.handlers:  # a spare that just became a replica: name it in its log lines
        for handler in root.handlers:
            handler.setFormatter(EscapingFormatter(fmt))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(EscapingFormatter(fmt))
        logging.basicConfig(level=logging.WARNING, handlers=[handler])
    logging.getLogger("shoal").setLevel(level)
