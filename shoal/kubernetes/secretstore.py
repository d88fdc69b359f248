"""The local file that keeps what ``shoal k8s build --create-secret`` generated for one
application: the RPC secret, the application's CA (key and certificate), the pod certificate and
the scaler's bearer token (``--scaler-auth bearer``).

Generated once, then reused, so that building the same application twice writes the same
Secrets (a GitOps sync must not rotate the RPC secret or the certificates on every build).
The file is ``<dir>/<namespace>-<app>.json`` (default dir ``.shoal/secrets`` under the working
directory), mode 0600 in a 0700 directory. It holds the CA's private key: it must never be
committed; back it up like any other credential.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from dataclasses import dataclass, replace
from pathlib import Path

from shoal.exceptions import CompileError
from shoal.kubernetes.certs import TlsMaterial, issue_pod_cert, needs_renewal, new_material

__all__ = ["DEFAULT_DIR", "AppSecrets", "fresh_secrets", "load_or_create", "store_path"]

DEFAULT_DIR = ".shoal/secrets"
_FORMAT = 1


@dataclass(frozen=True)
class AppSecrets:
    """What ``--create-secret`` puts in an application's Secrets (``tls`` None: no certificates,
    e.g. with ``--tls cert-manager``)."""

    rpc_secret: str
    tls: TlsMaterial | None = None
    scaler_token: str = ""  # "" until a build needs one


def fresh_secrets(app: str, namespace: str, *, with_tls: bool, with_scaler_token: bool = False) -> AppSecrets:
    """New random material (nothing stored)."""
    return AppSecrets(rpc_secret=secrets.token_hex(32), tls=new_material(app, namespace) if with_tls else None,
                      scaler_token=secrets.token_hex(32) if with_scaler_token else "")


def store_path(directory: str | os.PathLike[str], namespace: str, app: str) -> Path:
    return Path(directory) / f"{namespace}-{app}.json"


def load_or_create(directory: str | os.PathLike[str], namespace: str, app: str, *,
                   with_tls: bool, with_scaler_token: bool = False) -> tuple[AppSecrets, Path, list[str]]:
    """The stored material of ``app`` (created, or completed with what is missing), its file,
    and what changed (for the user: "created", "added certificates", "renewed the pod certificate")."""
    path = store_path(directory, namespace, app)
    changes: list[str] = []
    stored = _read(path)
    if stored is None:
        current = fresh_secrets(app, namespace, with_tls=with_tls, with_scaler_token=with_scaler_token)
        changes.append("created")
    else:
        current = stored
        if with_tls and current.tls is None:
            current = replace(current, tls=new_material(app, namespace))
            changes.append("added the CA and pod certificate")
        elif with_tls and current.tls is not None and needs_renewal(current.tls.tls_crt):
            if needs_renewal(current.tls.ca_crt):
                raise CompileError(f"{path}: the application's CA expires soon; rotate it (see docs/kubernetes.md, "
                                   "'Rotating the CA') or delete the file to start over")
            key, crt = issue_pod_cert(current.tls.ca_key, current.tls.ca_crt, app, namespace)
            current = replace(current, tls=replace(current.tls, tls_key=key, tls_crt=crt))
            changes.append("renewed the pod certificate (it was about to expire)")
        if with_scaler_token and not current.scaler_token:
            current = replace(current, scaler_token=secrets.token_hex(32))
            changes.append("added the scaler's bearer token")
    if changes:
        _write(path, current, namespace, app)
    return current, path, changes


def _read(path: Path) -> AppSecrets | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise CompileError(f"{path} is readable by other users (mode {stat.S_IMODE(st.st_mode):o}); it holds "
                           f"private keys: chmod 600 {path}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("format") != _FORMAT:
            raise ValueError(f"unknown format {doc.get('format')!r}")
        tls = doc.get("tls")
        return AppSecrets(
            rpc_secret=str(doc["rpc_secret"]),
            tls=TlsMaterial(ca_key=tls["ca_key"], ca_crt=tls["ca_crt"], tls_key=tls["tls_key"],
                            tls_crt=tls["tls_crt"]) if tls else None,
            scaler_token=str(doc.get("scaler_token") or ""),
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CompileError(f"{path}: cannot read the stored secrets: {e}") from None


def _write(path: Path, current: AppSecrets, namespace: str, app: str) -> None:
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True)
        # A guard against `git add -A`: nothing in this directory is ever meant to be committed.
        (path.parent / ".gitignore").write_text("# secrets of `shoal k8s build --create-secret`: never commit\n*\n",
                                                encoding="utf-8")
    doc = {
        "format": _FORMAT,
        "comment": "Generated by `shoal k8s build --create-secret`. Holds private keys: never commit it.",
        "namespace": namespace,
        "app": app,
        "rpc_secret": current.rpc_secret,
        "scaler_token": current.scaler_token,
        "tls": None if current.tls is None else {
            "ca_key": current.tls.ca_key, "ca_crt": current.tls.ca_crt,
            "tls_key": current.tls.tls_key, "tls_crt": current.tls.tls_crt,
        },
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
