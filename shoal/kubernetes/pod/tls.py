"""Mutual TLS between pods: the contexts a pod's RPC port and its outgoing connections use.

Every pod mounts its application's ``kubernetes.io/tls`` Secret (``tls.crt``, ``tls.key``,
``ca.crt``; what ``shoal k8s build --create-secret`` or cert-manager writes). Both sides of a
connection present that pod certificate and require the peer's to be signed by a CA in
``ca.crt`` (which may hold two CAs during a CA rotation). Host names are not checked: pod IPs
come and go, and the identity that matters is "holds a certificate of this application's CA"
(plus the RPC secret of the HMAC handshake that runs inside TLS). TLS 1.2 at least.

The files are read at startup and again whenever they change (cert-manager renews the pod
certificate in place; the kubelet updates the mounted Secret): new connections use the new
certificate, established ones keep theirs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from pathlib import Path

from shoal.exceptions import PodConfigError
from shoal.kubernetes import names

__all__ = ["RELOAD_INTERVAL_S", "PodTls"]

logger = logging.getLogger("shoal.pod")

RELOAD_INTERVAL_S = 60.0


class PodTls:
    """The client and server TLS contexts of a pod, from the files in ``directory``."""

    def __init__(self, directory: str, secret_name: str = "") -> None:
        self.dir = Path(directory)
        self.secret_name = secret_name
        self.cert = self.dir / names.TLS_CERT_FILE
        self.key = self.dir / names.TLS_KEY_FILE
        self.ca = self.dir / names.TLS_CA_FILE
        self.server = self._context(ssl.PROTOCOL_TLS_SERVER)
        self.client = self._context(ssl.PROTOCOL_TLS_CLIENT)
        self._stamp = self._files_stamp()
        self._load(self.server)
        self._load(self.client)

    def _where(self) -> str:
        secret = f"Secret {self.secret_name!r}" if self.secret_name else "the application's TLS Secret"
        return (f"{secret} (type kubernetes.io/tls, keys {names.TLS_CERT_FILE}, {names.TLS_KEY_FILE}, "
                f"{names.TLS_CA_FILE}) mounted at {self.dir}")

    @staticmethod
    def _context(protocol: int) -> ssl.SSLContext:
        ctx = ssl.SSLContext(protocol)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # Identity is the application's CA, not a name: pod IPs are dynamic.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def _files_stamp(self) -> tuple[tuple[int, int], ...]:
        out = []
        for path in (self.cert, self.key, self.ca):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                raise PodConfigError(
                    f"no {path.name} in {self.dir}: TLS between pods needs {self._where()}; create it (shoal k8s "
                    f"build --create-secret, or --tls cert-manager) — see docs/kubernetes.md"
                ) from None
            except OSError as e:
                raise PodConfigError(f"cannot read {path}: {e} (from {self._where()})") from None
            out.append((st.st_mtime_ns, st.st_size))
        return tuple(out)

    def _load(self, ctx: ssl.SSLContext) -> None:
        try:
            ctx.load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, OSError) as e:
            raise PodConfigError(f"{self.cert} / {self.key}: not a usable certificate and key ({e}); "
                                 f"check {self._where()}") from None
        try:
            ctx.load_verify_locations(cafile=self.ca)
        except (ssl.SSLError, OSError) as e:
            raise PodConfigError(f"{self.ca}: not a usable CA bundle ({e}); check {self._where()}") from None

    def reload_if_changed(self) -> bool:
        """Load the files again if they changed since the last load; whether they did. A failed
        reload keeps the certificate already loaded (and is logged)."""
        try:
            stamp = self._files_stamp()
            if stamp == self._stamp:
                return False
            self._load(self._context(ssl.PROTOCOL_TLS_SERVER))  # a trial first: a bad file changes nothing
            # Into the same contexts: the server already listening picks the new certificate up.
            # (A CA added to ca.crt is trusted from now on; one removed stays trusted until the pod restarts.)
            self._load(self.server)
            self._load(self.client)
        except PodConfigError as e:
            logger.error("TLS files changed but cannot be loaded; keeping the previous certificate: %s", e)
            return False
        self._stamp = stamp
        logger.info("reloaded the TLS certificate and CA bundle from %s", self.dir)
        return True

    async def watch(self, interval_s: float = RELOAD_INTERVAL_S) -> None:
        """Reload the files when they change, until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            self.reload_if_changed()
