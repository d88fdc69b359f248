"""The simulation's kubelet: runs a pod's container as a local process, probes it, restarts it,
stops it gracefully."""

from __future__ import annotations

import base64
import hashlib
import http.client
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from shoal.exceptions import SimError
from shoal.kubernetes import names
from shoal.kubernetes.sim.objects import Obj, Pod, SimHost, expand

logger = logging.getLogger("shoal.sim")


class Kubelet:
    """The kubelet of every pod of one simulation (one thread per pod runs :meth:`run`)."""

    def __init__(self, sim: SimHost) -> None:
        self.sim = sim

    def run(self, pod: Pod) -> None:
        try:
            with self.sim.lock:
                if not (pod.deleted or pod.terminating or self.sim.closed):
                    self._spawn(pod)
        except Exception as e:
            logger.error("pod %s could not start: %s", pod.name, e)
            with open(pod.log_path, "a") as f:
                f.write(f"[sim] could not start: {e}\n")
            with self.sim.lock:
                pod.gone = True
            return
        spec = pod.template["spec"]
        container = pod.container()
        backoff = 0.5
        while True:
            if pod.deleted or pod.proc is None:
                self._wait_exit(pod)
                break
            if pod.terminating:
                self._graceful_stop(pod, spec, container)
                break
            proc = pod.proc
            code = proc.poll()
            if code is not None:
                with self.sim.lock:
                    self._record_exit(pod)
                    pod.ready = pod.started = False
                    self.sim.update_endpoints()
                    if self.sim.lws.container_exited(pod):
                        continue  # its LeaderWorkerSet group is recreated instead
                if pod._terminate.wait(backoff):
                    continue
                backoff = min(backoff * 2, 5.0)
                with self.sim.lock:
                    if pod.deleted or pod.terminating or self.sim.closed:
                        continue
                    pod.restarts += 1
                    self._spawn(pod)
                continue
            self._probe(pod, container)
            pod._terminate.wait(self.sim.probe_period_s)
        with self.sim.lock:
            pod.gone = True
            pod.ready = False
            self.sim.update_endpoints()
            self.sim.firewall.detach(pod)  # its address stops answering
            if pod.group >= 0 and not self.sim.closed:
                self.sim.lws.reconcile()  # the last pod of a group going away brings the fresh group

    def _wait_exit(self, pod: Pod) -> None:
        if pod.proc is not None:
            try:
                pod.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill_proc(pod)
            self._record_exit(pod)

    def _record_exit(self, pod: Pod) -> None:
        proc = pod.proc
        if proc is not None and proc.returncode is not None and len(pod.exit_codes) < len(pod.pids):
            pod.exit_codes.append(proc.returncode)

    def _graceful_stop(self, pod: Pod, spec: Obj, container: Obj) -> None:
        grace = float(spec.get("terminationGracePeriodSeconds", 30))
        deadline = time.monotonic() + grace
        pre_stop = container.get("lifecycle", {}).get("preStop")
        proc = pod.proc
        if pre_stop and proc is not None and proc.poll() is None:
            self._handler(pod, pre_stop, min(grace, self.sim.prestop_max_s))
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
            except OSError:
                pass
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("pod %s did not stop within %ss: SIGKILL", pod.name, grace)
                self.kill_proc(pod)
        self._wait_exit(pod)

    def _handler(self, pod: Pod, handler: Obj, limit: float) -> bool:
        """Run a probe or lifecycle handler; True when it succeeded. (From the node: always allowed by
        NetworkPolicies, so straight to the container's own address.)"""
        if "httpGet" in handler:
            hg = handler["httpGet"]
            conn = http.client.HTTPConnection(hg.get("host") or pod.backend_ip, pod.port(hg["port"]), timeout=limit)
            try:
                conn.request("GET", hg.get("path", "/"))
                return 200 <= conn.getresponse().status < 400
            except (OSError, http.client.HTTPException):
                return False
            finally:
                conn.close()
        if "tcpSocket" in handler:
            ts = handler["tcpSocket"]
            try:
                with socket.create_connection((ts.get("host") or pod.backend_ip, pod.port(ts["port"])), timeout=limit):
                    return True
            except OSError:
                return False
        if "exec" in handler:
            cmd = [self.sim.executables.get(c, c) if i == 0 else c for i, c in enumerate(handler["exec"]["command"])]
            try:
                child = subprocess.Popen(cmd, cwd=self.sim.cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)
            except OSError:
                return False
            try:
                return child.wait(limit) == 0
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
                return False
        if "sleep" in handler:
            time.sleep(min(float(handler["sleep"].get("seconds", 0)), limit))
            return True
        if "grpc" in handler:
            return _grpc_probe(pod.backend_ip, int(handler["grpc"]["port"]), handler["grpc"].get("service", ""), limit)
        return False

    def _probe(self, pod: Pod, container: Obj) -> None:
        if not pod.started:
            startup = container.get("startupProbe")
            if startup is not None and not self._handler(pod, startup, self._timeout(startup)):
                return
            pod.started = True
        self._liveness(pod, container)
        readiness = container.get("readinessProbe")
        if readiness is None:
            ok = True
            threshold_fail = threshold_ok = 1
        else:
            ok = self._handler(pod, readiness, self._timeout(readiness))
            threshold_fail = int(readiness.get("failureThreshold", 3))
            threshold_ok = int(readiness.get("successThreshold", 1))
        with self.sim.lock:
            if pod.terminating or pod.deleted:
                return
            if ok:
                pod._passes += 1
                pod._fails = 0
                if not pod.ready and pod._passes >= threshold_ok:
                    pod.ready = True
                    self.sim.update_endpoints()
            else:
                pod._fails += 1
                pod._passes = 0
                if pod.ready and pod._fails >= threshold_fail:
                    pod.ready = False
                    self.sim.update_endpoints()

    def _liveness(self, pod: Pod, container: Obj) -> None:
        """The livenessProbe, every ``liveness_period_s`` once started: ``failureThreshold`` failures
        in a row kill the container, which the loop in :meth:`run` restarts in place."""
        probe = container.get("livenessProbe")
        period = self.sim.liveness_period_s
        if probe is None or period is None or time.monotonic() < pod._live_next:
            return
        pod._live_next = time.monotonic() + period
        # Its own timeout (a liveness failure costs a restart): the probe's, at most 5 s.
        if self._handler(pod, probe, min(float(probe.get("timeoutSeconds", 1)), 5.0)):
            pod._live_fails = 0
            return
        pod._live_fails += 1
        threshold = int(probe.get("failureThreshold", 3))
        if pod._live_fails < threshold or pod.terminating or pod.deleted:
            return
        logger.warning("pod %s failed its livenessProbe %d times in a row: restarting its container", pod.name,
                       pod._live_fails)
        with open(pod.log_path, "a") as f:
            f.write(f"[sim] livenessProbe failed {pod._live_fails} times in a row: restarting the container\n")
        pod._live_fails = 0
        self.kill_proc(pod)

    def _timeout(self, probe: Obj) -> float:
        return min(float(probe.get("timeoutSeconds", 1)), self.sim.probe_timeout_s)

    def _spawn(self, pod: Pod) -> None:
        pod._live_fails = 0
        pod._live_next = time.monotonic() + (self.sim.liveness_period_s or 0.0)
        container = pod.container()
        spec = pod.template["spec"]
        mounts = self._volumes(pod, spec, container)
        env = self._env(pod, container, mounts)
        command = list(container.get("command") or [])
        if not command:
            raise SimError(f"pod {pod.name}: the container has no command (the image's entrypoint is unknown here)")
        args = [expand(a, env) for a in container.get("args", [])]
        command = [expand(c, env) for c in command]
        argv = [remap(a, mounts) for a in command + args]
        # The executable is this machine's (e.g. the venv's `shoal`), never a path inside a
        # volume: map it after remapping, so a checkout under /tmp (an emptyDir mount) works.
        argv[0] = self.sim.executables.get(command[0], argv[0])
        cwd = remap(container["workingDir"], mounts) if container.get("workingDir") else self.sim.cwd
        log = open(pod.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            log.write(f"[sim] starting {' '.join(argv)} (restart {pod.restarts})\n".encode())
            log.flush()
            pod.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        finally:
            log.close()
        pod.pids.append(pod.proc.pid)
        pod.started = False
        pod._fails = pod._passes = 0

    def _volumes(self, pod: Pod, spec: Obj, container: Obj) -> list[tuple[str, str]]:
        """Create the pod's volumes; (mountPath, local directory) pairs, longest path first."""
        local: dict[str, Path] = {}
        for vol in spec.get("volumes", []):
            d = pod.dir / "volumes" / vol["name"]
            if d.exists():
                local[vol["name"]] = d  # a restarted container keeps its pod's volumes
                continue
            d.mkdir(parents=True)
            local[vol["name"]] = d
            if "configMap" in vol:
                cm = self.sim.config_maps.get(vol["configMap"]["name"])
                if cm is None:
                    raise SimError(f"pod {pod.name}: no ConfigMap {vol['configMap']['name']!r}")
                data = {k: v.encode() for k, v in cm.get("data", {}).items()}
                data.update({k: base64.b64decode(v) for k, v in cm.get("binaryData", {}).items()})
                write_items(d, data, vol["configMap"].get("items"))
            elif "secret" in vol:
                sname = vol["secret"]["secretName"]
                obj = self.sim.secret_objs.get(sname, {})
                keys = {*obj.get("data", {}), *obj.get("stringData", {}), *self.sim.given_secrets.get(sname, {})}
                if not obj and sname not in self.sim.given_secrets:
                    keys.update(item["key"] for item in vol["secret"].get("items") or ())  # generated values
                write_items(d, {k: self.sim.secret_value(sname, k).encode() for k in keys}, vol["secret"].get("items"))
            elif "emptyDir" in vol:
                pass
            else:
                raise SimError(f"pod {pod.name}: volume {vol['name']!r} has a type the simulation does not know")
        mounts = []
        for vm in container.get("volumeMounts", []):
            path = local[vm["name"]]
            if vm.get("subPath"):
                path = path / vm["subPath"]
            mounts.append((vm["mountPath"].rstrip("/") or "/", str(path)))
        mounts.sort(key=lambda m: -len(m[0]))
        return mounts

    def _env(self, pod: Pod, container: Obj, mounts: list[tuple[str, str]]) -> dict[str, str]:
        env: dict[str, str] = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "HOSTNAME": pod.name,
        }
        pythonpath = [*self.sim.python_path, *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])]
        if pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(pythonpath)
        env.update(self.sim.extra_env)
        env[names.ENV_RESOLVER_FILE] = str(self.sim.resolver_file)
        env[names.ENV_POD_ADDRESS] = pod.ip  # its DNS records' address (it may listen on another)
        # What a mutating webhook prepends (LeaderWorkerSet's variables): the container's own may refer to it.
        declared: dict[str, str] = dict(pod.injected_env)
        for item in container.get("env", []):
            name = item["name"]
            if "value" in item:
                value = expand(str(item["value"]), declared)
            else:
                found = self._value_from(pod, container, item.get("valueFrom", {}))
                if found is None:
                    continue
                value = found
            declared[name] = remap(value, mounts)
        env.update(declared)
        env.update(pod.env_overrides)
        return env

    def _value_from(self, pod: Pod, container: Obj, source: Obj) -> str | None:
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            fields = {
                "metadata.name": pod.name,
                "metadata.namespace": pod.namespace or self.sim.namespace,
                "metadata.uid": hashlib.sha256(pod.name.encode()).hexdigest()[:32],
                # Where the container listens: a private address when the simulation holds pod.ip (sim.firewall).
                "status.podIP": pod.backend_ip,
                "status.podIPs": pod.backend_ip,
                "status.hostIP": "127.0.0.1",
                "status.hostIPs": "127.0.0.1",
                "spec.nodeName": "sim-node",
                "spec.serviceAccountName": str(pod.template["spec"].get("serviceAccountName", "default")),
            }
            if path in fields:
                return fields[path]
            m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
            if m:
                annotations = pod.template.get("metadata", {}).get("annotations", {})
                return str((pod.labels if m.group(1) == "labels" else annotations).get(m.group(2), ""))
            raise SimError(f"pod {pod.name}: fieldRef {path!r} is not simulated")
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            if ref.get("optional") and not self.sim.has_secret_key(ref["name"], ref["key"]):
                return None  # the kubelet leaves the variable out
            return self.sim.secret_value(ref["name"], ref["key"])
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            return str(self.sim.config_maps.get(ref["name"], {}).get("data", {}).get(ref["key"], ""))
        if "resourceFieldRef" in source:
            ref = source["resourceFieldRef"]
            kind, _, what = ref["resource"].partition(".")
            return str(container.get("resources", {}).get(kind, {}).get(what, "0"))
        raise SimError(f"pod {pod.name}: env source {source!r} is not simulated")

    # -- endpoints, DNS and the Service front ------------------------------------------------

    def kill_proc(self, pod: Pod) -> None:
        proc = pod.proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                proc.kill()
            except OSError:
                pass
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            logger.error("pod %s (pid %d) did not die", pod.name, proc.pid)



def _grpc_probe(host: str, port: int, service: str, limit: float) -> bool:
    """A ``grpc:`` probe as the kubelet runs it: ``grpc.health.v1.Health/Check`` over plaintext,
    success when the answer is SERVING."""
    import grpc

    from shoal.runtime.grpc_health import check

    with grpc.insecure_channel(f"{host}:{port}") as channel:
        try:
            return check(channel, service, timeout=limit) == "SERVING"
        except grpc.RpcError:
            return False


def write_items(directory: Path, data: Mapping[str, bytes], items: Iterable[Obj] | None) -> None:
    if items:
        for item in items:
            if item["key"] in data:
                path = directory / item["path"]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data[item["key"]])
        return
    for key, value in data.items():
        (directory / key).write_bytes(value)


def remap(value: str, mounts: Sequence[tuple[str, str]]) -> str:
    """A path under a volume mount, rewritten to the pod's local directory for that volume."""
    for mount, local in mounts:
        if value == mount:
            return local
        if value.startswith(mount + "/"):
            return local + value[len(mount):]
    return value


_prctl: Any = None
if sys.platform == "linux":
    try:
        import ctypes

        _prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except OSError:  # pragma: no cover
        _prctl = None


def _die_with_parent() -> None:
    """In the child before exec: be killed if the simulating process dies (Linux)."""
    if _prctl is not None:
        _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

