"""Endpoint addresses: a Unix socket path locally, ``host:port`` (``[v6]:port``) between pods."""

from __future__ import annotations

__all__ = ["join_host_port", "split_host_port"]


def split_host_port(address: str) -> tuple[str, int] | None:
    """``("host", port)`` for a ``host:port`` (or ``[v6]:port``) address; None for a Unix socket path."""
    if address.startswith("/") or ":" not in address:
        return None
    host, _, port = address.rpartition(":")
    if not port.isdigit() or not host:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def join_host_port(host: str, port: int) -> str:
    """The ``host:port`` form of an address (IPv6 hosts in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
