"""The pod simulation's network policy enforcement: every connection to a pod passes a check.

What a CNI plugin does with the generated NetworkPolicies, done on loopback addresses without
privileges:

* **Interposition.** A pod that declares TCP container ports has its address (``pod.ip``, what
  the resolver file, Services and tests hand out) held by the simulation: for each declared
  port a listener there accepts the connection, decides, and relays the bytes to the container,
  which listens on a second, private loopback address (``pod.listen_ip``: its ``status.podIP``
  as the downward API tells it, so ``$SHOAL_POD_IP`` binds there). The ClusterIP front
  (:mod:`~shoal.kubernetes.sim.network`) decides for the endpoint it picked and connects to the
  private address directly. Kubelet probes come from the node and go straight to the private
  address too.
* **Who is calling.** Every simulated pod's connection leaves from 127.0.0.1 (Linux picks that
  source for all of 127/8), so the source is found the way ``ss -p`` finds it: the client
  socket's inode in ``/proc/net/tcp``, and which pod's process (or a process it started) holds
  it in ``/proc/<pid>/fd``. A connection no pod holds comes from the node: this process (the
  test), the tools it runs; traffic between a pod and its node is always allowed.
* **The decision** is :class:`~shoal.kubernetes.sim.policy.PolicySet`'s over the NetworkPolicy
  objects given to the simulation (source's egress and destination's ingress), with namespaces
  labelled ``kubernetes.io/metadata.name`` plus ``PodSim(namespace_labels=...)``. A pod may
  always reach its own address (like localhost).
* **A denied connection** is reset (``denied="reset"``, the default: the caller's first read or
  TLS handshake fails with ECONNRESET, as with plugins that reject) or held open without a byte
  until the caller gives up (``denied="drop"``: the caller's timeout fires, as with plugins that
  drop). The TCP handshake itself completes in both cases (the listener is a socket), so a
  caller's ``connect()`` succeeds where a real cluster's would time out; anything after it
  fails. Every decision is counted per ``(source, destination pod, port)``
  (:attr:`Firewall.allowed`, :attr:`Firewall.denied`; the source is a pod name or ``"node"``)
  and denials are logged (``shoal.sim``), the first per key as a warning.

Not enforced: ports a pod does not declare (e.g. the collectives' ephemeral ports between gang
ranks, bound on every address), UDP, and connections to addresses that are not pods.
``PodSim(network_policies=False)`` turns interposition off altogether.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import ipaddress
import logging
import os
import socket
import struct
import sys
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from shoal.exceptions import SimError
from shoal.kubernetes.sim.objects import Obj, Pod, SimHost
from shoal.kubernetes.sim.policy import Decision, Endpoint, PolicyError, PolicySet, named_ports

__all__ = ["NODE", "Firewall", "socket_owner_inode"]

logger = logging.getLogger("shoal.sim")

NODE = "node"  # the source name of connections no pod holds
Key = tuple[str, str, int]


# --- who holds a socket -------------------------------------------------------------------------


def _proc_hex(ip: str, v6: bool) -> str:
    """An address as /proc/net/tcp{,6} prints it (32-bit words in host byte order)."""
    addr = ipaddress.ip_address(ip)
    if v6 and isinstance(addr, ipaddress.IPv4Address):
        addr = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + addr.packed)
    packed = addr.packed
    return "".join(f"{int.from_bytes(packed[i:i + 4], sys.byteorder):08X}" for i in range(0, len(packed), 4))


_NETLINK_SOCK_DIAG = 4  # linux/netlink.h
_SOCK_DIAG_BY_FAMILY = 20  # linux/sock_diag.h
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_NO_COOKIE = 0xFFFFFFFF  # INET_DIAG_NOCOOKIE: look the socket up by its addresses alone


def _diag_inode(local: tuple[str, int], remote: tuple[str, int], v6: bool) -> int | None:
    """One exact sock_diag lookup (what ``ss`` asks the kernel): the inode of the TCP socket with
    these local and remote addresses, None when there is none. Raises OSError without netlink."""
    def addr(ip: str) -> bytes:
        a = ipaddress.ip_address(ip)
        if v6 and isinstance(a, ipaddress.IPv4Address):
            a = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + a.packed)
        return a.packed.ljust(16, b"\0")

    sockid = (struct.pack("!HH", local[1], remote[1]) + addr(local[0]) + addr(remote[0])
              + struct.pack("=III", 0, _NO_COOKIE, _NO_COOKIE))
    family = socket.AF_INET6 if v6 else socket.AF_INET
    req = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + sockid
    msg = struct.pack("=IHHII", 16 + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0) + req
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(2.0)
        nl.send(msg)
        data = nl.recv(65536)
    if len(data) < 16 + 72:
        return None
    _, kind = struct.unpack_from("=IH", data)
    if kind != _SOCK_DIAG_BY_FAMILY:
        return None  # NLMSG_ERROR: no such socket
    body = data[16:]
    if body[4:40] != sockid[:36]:  # the kernel may answer with a listener: only the exact socket will do
        return None
    inode: int = struct.unpack_from("=I", body, 68)[0]
    return inode or None


def socket_owner_inode(local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """The inode of the TCP socket bound to ``local`` and connected to ``remote`` (None if none):
    sock_diag over netlink, else /proc/net/tcp{,6} (slow where thousands of sockets linger)."""
    try:
        return _diag_inode(local, remote, False) or _diag_inode(local, remote, True)
    except OSError:
        pass
    for path, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        want_local = f"{_proc_hex(local[0], v6)}:{local[1]:04X}"
        want_remote = f"{_proc_hex(remote[0], v6)}:{remote[1]:04X}"
        try:
            with open(path) as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) > 9 and parts[1] == want_local and parts[2] == want_remote:
                        inode = int(parts[9])
                        if inode:
                            return inode
        except OSError:
            continue
    return None


def _process_tree(pid: int) -> list[int]:
    """``pid`` and every process it started, still running."""
    out = [pid]
    i = 0
    while i < len(out):
        p = out[i]
        i += 1
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    out.extend(int(c) for c in f.read().split())
            except OSError:
                continue
    return out


def _holds(pid: int, target: str) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                return True
        except OSError:
            continue
    return False


def reset(transport: asyncio.BaseTransport) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a refused or broken connection does."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    if isinstance(transport, asyncio.Transport):
        transport.abort()
    else:
        transport.close()


# --- relaying -------------------------------------------------------------------------------------


class _Side(asyncio.Protocol):
    """One end of a relayed connection: what it reads goes to the other end's transport."""

    def __init__(self, live: set[asyncio.Transport]) -> None:
        self.live = live
        self.transport: asyncio.Transport | None = None
        self.other: _Side | None = None
        self.pending: list[bytes] = []
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.live.add(transport)

    def link(self, other: _Side) -> None:
        self.other, other.other = other, self
        for side in (self, other):
            if side.pending and side.other is not None and side.other.transport is not None:
                side.other.transport.write(b"".join(side.pending))
            side.pending.clear()
            if side.eof:
                side.eof_received()

    def data_received(self, data: bytes) -> None:
        if self.other is None or self.other.transport is None:
            self.pending.append(data)
        else:
            self.other.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        other = self.other
        if other is None or other.transport is None:
            return True
        if other.transport.can_write_eof() and not other.transport.is_closing():
            other.transport.write_eof()
        if other.eof:
            self.close()
            other.close()
        return True

    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.live.discard(self.transport)
        other = self.other
        if other is not None and other.transport is not None and not other.transport.is_closing():
            if isinstance(exc, ConnectionResetError):
                reset(other.transport)
            else:
                other.close()


class _Held(asyncio.Protocol):
    """A denied connection under ``denied="drop"``: read and discard, never answer."""

    def __init__(self, live: set[asyncio.Transport]) -> None:
        self.live = live
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.live.add(transport)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the caller gave up: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.live.discard(self.transport)


class _Inbound(_Side):
    """A connection accepted on a pod's address and port."""

    def __init__(self, fw: Firewall, ports: _PodPorts, port: int) -> None:
        super().__init__(ports.live)
        self.fw = fw
        self.ports = ports
        self.port = port
        self.connecting: asyncio.Task[None] | None = None  # (held: a task nobody references may vanish)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        pod = self.ports.pod
        if self.ports.closed or not self.fw.admit(peer[:2], local[:2], pod, self.port):
            if self.ports.closed or self.fw.mode == "reset":
                reset(self.transport)
            else:  # dropped: held open, silent, until the caller gives up
                held = _Held(self.live)
                held.transport = self.transport
                self.transport.set_protocol(held)
            return
        self.transport.pause_reading()
        self.connecting = asyncio.get_running_loop().create_task(self._connect(pod.backend_ip))

    async def _connect(self, host: str) -> None:
        loop = asyncio.get_running_loop()
        up = _Side(self.live)
        try:
            await loop.create_connection(lambda: up, host, self.port)
        except OSError:
            if self.transport is not None:
                reset(self.transport)  # nothing listens in the container: refused
            return
        if self.transport is None or self.transport.is_closing():
            up.close()
            return
        self.link(up)
        self.transport.resume_reading()


@dataclass(eq=False)
class _PodPorts:
    """A pod's listeners and the connections through them (touched on the loop's thread only)."""

    pod: Pod
    sockets: list[tuple[socket.socket, int]]
    servers: list[asyncio.Server] = field(default_factory=list)
    live: set[asyncio.Transport] = field(default_factory=set)
    closed: bool = False


# --- the firewall -------------------------------------------------------------------------------


class Firewall:
    """NetworkPolicy enforcement for one simulation (see the module docstring)."""

    def __init__(self, sim: SimHost, *, enabled: bool = True, denied: Literal["reset", "drop"] = "reset",
                 namespace_labels: Mapping[str, Mapping[str, str]] | None = None) -> None:
        if denied not in ("reset", "drop"):
            raise SimError(f"denied_connections: 'reset' or 'drop', not {denied!r}")
        self.sim = sim
        self.enabled = enabled
        self.mode: Literal["reset", "drop"] = denied
        self.namespace_labels = {ns: dict(labels) for ns, labels in (namespace_labels or {}).items()}
        self.policies = PolicySet()
        # (source pod name or "node", destination pod name, port) -> connections.
        self.allowed: collections.Counter[Key] = collections.Counter()
        self.denied: collections.Counter[Key] = collections.Counter()
        self.reasons: dict[Key, str] = {}  # why the last connection of a denied key was denied
        self._lock = threading.Lock()
        self._pods: dict[Pod, _PodPorts | None] = {}
        self._deployments: dict[str, str] = {}  # pod name -> its workload's name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- policies and pods ------------------------------------------------------------------------

    def set_policies(self, objects: Iterable[Obj]) -> None:
        """The NetworkPolicies in force (checked now; new connections see them)."""
        try:
            self.policies = PolicySet(objects, default_namespace=self.sim.namespace)
        except PolicyError as e:
            raise SimError(f"cannot enforce the NetworkPolicies: {e}") from None

    def endpoint(self, pod: Pod) -> Endpoint:
        namespace = pod.namespace or self.sim.namespace
        return Endpoint(labels=pod.labels, namespace=namespace, namespace_labels=self.namespace_labels.get(namespace),
                        ip=pod.ip, ports=named_ports(pod.template["spec"]["containers"]), name=pod.name)

    def attach(self, pod: Pod) -> None:
        """A new pod: know it as a source, and hold its address's declared TCP ports."""
        with self._lock:
            self._pods[pod] = None
            self._deployments[pod.name] = pod.deployment
        if not self.enabled:
            return
        ports = sorted({int(p["containerPort"]) for c in pod.template["spec"]["containers"]
                        for p in c.get("ports") or () if p.get("protocol", "TCP") == "TCP"})
        if not ports:
            return
        pod.listen_ip = self.sim.allocate_ip()
        socks: list[tuple[socket.socket, int]] = []
        try:
            for port in ports:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append((s, port))
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((pod.ip, port))
                s.listen(512)
                s.setblocking(False)
        except OSError as e:
            for s, _ in socks:
                s.close()
            raise SimError(f"pod {pod.name}: cannot hold {pod.ip}:{socks[-1][1]} for its NetworkPolicies: {e}") from e
        entry = _PodPorts(pod, socks)
        with self._lock:
            self._pods[pod] = entry
        asyncio.run_coroutine_threadsafe(self._serve(entry), self._ensure_loop())

    def detach(self, pod: Pod) -> None:
        """The pod is gone: its address stops answering (its container's sockets are closed already:
        what they sent last is still delivered, then the relayed connections close)."""
        with self._lock:
            entry = self._pods.pop(pod, None)
        if entry is not None and self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._close_ports, entry, False)
            except RuntimeError:  # the loop just closed
                pass

    async def _serve(self, entry: _PodPorts) -> None:
        loop = asyncio.get_running_loop()
        for sock, port in entry.sockets:
            if entry.closed:
                sock.close()
                continue
            try:
                server = await loop.create_server(functools.partial(_Inbound, self, entry, port), sock=sock)
            except OSError as e:
                logger.error("pod %s: cannot serve %s:%d: %s", entry.pod.name, entry.pod.ip, port, e)
                sock.close()
                continue
            entry.servers.append(server)
            if entry.closed:
                server.close()

    @staticmethod
    def _close_ports(entry: _PodPorts, abort: bool) -> None:
        entry.closed = True
        for server in entry.servers:
            server.close()
        for transport in list(entry.live):
            if abort:
                reset(transport)
            elif not transport.is_closing():
                transport.close()
        if abort:
            entry.live.clear()

    # -- deciding -----------------------------------------------------------------------------------

    def identify(self, peer: tuple[str, int], local: tuple[str, int]) -> Pod | None:
        """The pod whose process holds the client end of the connection from ``peer`` to ``local``."""
        inode = socket_owner_inode(peer, local)
        if inode is None:
            return None
        target = f"socket:[{inode}]"
        with self._lock:
            pods = [p for p in self._pods if not p.gone and p.proc is not None and p.proc.returncode is None]
        for pod in pods:
            assert pod.proc is not None
            if any(_holds(pid, target) for pid in _process_tree(pod.proc.pid)):
                return pod
        return None

    def decide(self, src: Pod | None, dst: Pod, port: int) -> Decision:
        if src is dst:
            return Decision(True, "a pod's own address")
        source = self.endpoint(src) if src is not None else Endpoint(node=True, name=NODE)
        return self.policies.decide(source, self.endpoint(dst), port)

    def admit(self, peer: tuple[str, int], local: tuple[str, int], dst: Pod, port: int) -> bool:
        """Whether the connection from ``peer`` (accepted at ``local``) may reach ``dst``'s ``port``;
        counted, and logged when denied."""
        if not self.enabled:
            return True
        src = self.identify(peer, local)
        decision = self.decide(src, dst, port)
        key = (src.name if src is not None else NODE, dst.name, port)
        with self._lock:
            counter = self.allowed if decision.allowed else self.denied
            counter[key] += 1
            first = counter[key] == 1
            if not decision.allowed:
                self.reasons[key] = decision.reason
        if not decision.allowed:
            (logger.warning if first else logger.debug)(
                "NetworkPolicy denied %s -> %s %s:%d (%s)", key[0], dst.name, dst.ip, port, decision.reason)
        return decision.allowed

    async def refused(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """What the ClusterIP front does with a connection :meth:`admit` denied."""
        if self.mode == "reset":
            reset(writer.transport)
            return
        try:
            while await reader.read(65536):
                pass
        except OSError:
            pass
        writer.close()

    def count(self, verdict: Literal["allowed", "denied"] = "denied", *, src: str | None = None,
              dst: str | None = None, port: int | None = None) -> int:
        """Connections with that verdict; ``src``/``dst`` name a pod, its workload (Deployment or
        LeaderWorkerSet), or ``"node"``."""
        def match(name: str, want: str | None) -> bool:
            return want is None or name == want or self._deployments.get(name) == want

        with self._lock:
            counter = self.allowed if verdict == "allowed" else self.denied
            return sum(n for (s, d, p), n in counter.items()
                       if match(s, src) and match(d, dst) and (port is None or p == port))

    # -- the loop -----------------------------------------------------------------------------------

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is not None:
                return self._loop
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._thread = threading.Thread(target=self._run, args=(loop,), daemon=True, name="sim-firewall")
            self._thread.start()
            return loop

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        loop.run_forever()
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()

    def close(self) -> None:
        """Stop holding every pod's address and end every relayed connection."""
        with self._lock:
            entries = [e for e in self._pods.values() if e is not None]
            self._pods.clear()
            loop, thread = self._loop, self._thread
        if loop is None:
            for entry in entries:
                for sock, _ in entry.sockets:
                    sock.close()
            return

        def stop() -> None:
            for entry in entries:
                self._close_ports(entry, True)
            loop.stop()

        try:
            loop.call_soon_threadsafe(stop)
        except RuntimeError:
            pass
        if thread is not None:
            thread.join(5)
        for entry in entries:
            for sock, _ in entry.sockets:
                sock.close()
