"""Services in the simulation: endpoints, the resolver file (cluster DNS) and the ClusterIP front
(a TCP forwarder per Service port, as kube-proxy does)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from shoal.exceptions import SimError
from shoal.kubernetes.sim.objects import Obj, Pod, SimHost, matches


class Services:
    """Endpoints, DNS records and virtual IPs of one simulation's Services."""

    def __init__(self, sim: SimHost, resolver_file: Path) -> None:
        self.sim = sim
        self.resolver_file = resolver_file
        self.vips: dict[str, str] = {}  # ClusterIP Service name -> virtual IP
        self.endpoints: dict[str, list[str]] = {}  # ClusterIP Service name -> ready pod IPs
        self._resolver_text = ""
        self._front_loop: asyncio.AbstractEventLoop | None = None
        self._front_thread: threading.Thread | None = None
        self._front_servers: list[asyncio.AbstractServer] = []

    def service_pods(self, svc: Obj) -> list[Pod]:
        selector = svc.get("spec", {}).get("selector") or {}
        if not selector:
            return []
        publish_unready = bool(svc["spec"].get("publishNotReadyAddresses", False))
        ns = self.sim.namespace
        return [p for p in self.sim.pods if not p.deleted and not p.terminating and not p.gone
                and p.proc is not None and (p.ready or publish_unready) and matches(selector, p.labels)
                and (p.namespace or ns) == ns]

    def update(self) -> None:
        """Called with the lock held whenever a pod's readiness or existence changes."""
        sim = self.sim
        records: dict[str, list[str]] = {}
        for name, svc in sim.services.items():
            ips = sorted(p.ip for p in self.service_pods(svc))
            if svc.get("spec", {}).get("clusterIP") == "None":
                records[f"{name}.{sim.namespace}.svc.{sim.cluster_domain}"] = ips
            elif name in self.vips:
                self.endpoints[name] = ips
                # Cluster DNS answers a ClusterIP Service's name with its virtual IP (the scaler's, for callers).
                records[f"{name}.{sim.namespace}.svc.{sim.cluster_domain}"] = [self.vips[name]]
        records.update(sim.lws.records(sim.namespace, sim.cluster_domain))
        self.write_resolver(records)

    def write_resolver(self, records: Mapping[str, list[str]]) -> None:
        text = json.dumps(dict(sorted(records.items())), indent=1)
        if text == self._resolver_text:
            return
        tmp = self.resolver_file.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.resolver_file)
        self._resolver_text = text

    def records(self) -> dict[str, list[str]]:
        records: dict[str, list[str]] = json.loads(self._resolver_text or "{}")
        return records

    # -- the front ---------------------------------------------------------------------------

    def start_front(self) -> None:
        if self._front_thread is not None or not self.vips:
            return
        loop = asyncio.new_event_loop()
        started = threading.Event()
        errors: list[BaseException] = []

        async def setup() -> None:
            for name, vip in self.vips.items():
                for port in self.sim.services[name]["spec"].get("ports", []):
                    server = await asyncio.start_server(
                        _forwarder(self, name, port.get("targetPort", port["port"])), vip, int(port["port"]),
                        reuse_address=True)
                    self._front_servers.append(server)

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(setup())
            except BaseException as e:
                errors.append(e)
                started.set()
                return
            started.set()
            loop.run_forever()
            for server in self._front_servers:
                server.close()
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

        self._front_loop = loop
        self._front_thread = threading.Thread(target=run, daemon=True, name="sim-services")
        self._front_thread.start()
        started.wait(10)
        if errors:
            raise SimError(f"cannot start the Service front: {errors[0]}")

    def close_front(self) -> None:
        if self._front_loop is None:
            return
        loop = self._front_loop

        def stop() -> None:
            for server in self._front_servers:
                server.close()
            loop.stop()

        loop.call_soon_threadsafe(stop)
        if self._front_thread is not None:
            self._front_thread.join(5)

    def pick_endpoint(self, service: str, target: int | str) -> tuple[Pod, int] | None:
        with self.sim.lock:
            svc = self.sim.services[service]
            pods = self.service_pods(svc)
            if not pods:
                return None
            p = random.choice(pods)
            return p, p.port(target)


def _forwarder(services: Services, service: str, target: int | str) -> Callable[[asyncio.StreamReader,
                                                                                 asyncio.StreamWriter], Any]:
    """kube-proxy for one Service port: each connection goes to one random ready endpoint, if the
    NetworkPolicies let the client reach that pod's port (sim.firewall; the pod sees the client's
    address, as with kube-proxy's DNAT)."""

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        endpoint = services.pick_endpoint(service, target)
        if endpoint is None:
            writer.transport.abort()  # no ready endpoint: the connection is refused
            return
        pod, port = endpoint
        gate = services.sim.firewall
        peer, local = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
        if not gate.admit(peer[:2], local[:2], pod, port):
            try:
                await gate.refused(reader, writer)
            except asyncio.CancelledError:
                writer.transport.abort()  # the simulation is closing
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(pod.backend_ip, port)
        except OSError:
            writer.transport.abort()
            return
        try:
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        except asyncio.CancelledError:
            pass  # the simulation is closing
        finally:
            up_writer.close()
            writer.close()

    return handle
