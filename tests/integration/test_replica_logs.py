"""Per-replica log files, request ids on every line, access logs, and `shoal logs`, on real processes."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
from conftest import Instance, wait_until
from starlette.requests import Request

from shoal import serve
from shoal.handle import DeploymentHandle

log = logging.getLogger("tests.replica_logs")


@serve.deployment(logging_config={"encoding": "JSON"})
class Scorer:
    def score(self, text: str) -> int:
        log.info("scoring %r", text)
        return len(text)


@serve.deployment
class Api:
    def __init__(self, scorer: DeploymentHandle) -> None:
        self.scorer = scorer

    async def __call__(self, request: Request) -> dict[str, int]:
        log.info("asked for %s", request.query_params["q"])
        print("a print() from the ingress", flush=True)
        return {"score": await self.scorer.score.remote(request.query_params["q"])}


@serve.deployment(logging_config={"enable_access_log": False})
class Quiet:
    def __call__(self, request: Request) -> str:
        log.warning("quiet but warned")
        return "shh"


def files(inst: Instance, app: str, dep: str) -> list[Path]:
    return sorted((Path(inst.run_dir) / "logs" / app / dep).glob("*.log"))


def text_of(paths: list[Path]) -> str:
    return "".join(p.read_text() for p in paths)


def test_replica_files_request_ids_and_access_log(instance: Instance) -> None:
    serve.run(Api.bind(Scorer.bind()), name="shop", route_prefix="/shop")
    serve.run(Quiet.bind(), name="quiet", route_prefix="/quiet")
    rids = [f"rid-{i}" for i in range(3)]
    for rid in rids:
        r = httpx.get(f"{instance.url}/shop?q=hello", headers={"x-request-id": rid}, timeout=30)
        assert r.status_code == 200 and r.json() == {"score": 5}
    assert httpx.get(f"{instance.url}/quiet", timeout=30).text == "shh"
    missing = httpx.get(f"{instance.url}/nowhere", headers={"x-request-id": "rid-404"}, timeout=30)
    assert missing.status_code == 404

    api_files, scorer_files = files(instance, "shop", "Api"), files(instance, "shop", "Scorer")
    assert len(api_files) == 1 and len(scorer_files) == 1
    assert wait_until(lambda: text_of(scorer_files).count('"shoal.access"') >= 3, 10)
    assert wait_until(lambda: "rid-2: GET /shop 200" in text_of(api_files), 10)

    # TEXT (the default): one line per event, identity and request id on the user's own lines.
    api_tag = api_files[0].stem
    api_lines = api_files[0].read_text().splitlines()
    for rid in rids:
        asked = [x for x in api_lines if x.endswith("asked for hello") and f"request_id={rid}:" in x]
        assert len(asked) == 1 and f"replica shop/Api/{api_tag} " in asked[0], api_lines
        assert any(f"shoal.access request_id={rid}: GET /shop 200 " in x and x.endswith("ms") for x in api_lines)
    assert "a print() from the ingress" in api_lines  # stdout lands in the file

    # JSON: every line an object with application, deployment, replica and request id.
    records = [json.loads(x) for x in scorer_files[0].read_text().splitlines()]
    user = [r for r in records if r["name"] == "tests.replica_logs"]
    access = [r for r in records if r["name"] == "shoal.access"]
    assert sorted(r["request_id"] for r in user) == rids and sorted(r["request_id"] for r in access) == rids
    for r in user + access:
        assert (r["application"], r["deployment"], r["replica"]) == ("shop", "Scorer", scorer_files[0].stem)
    assert {(r["method"], r["path"], r["status"]) for r in access} == {("CALL", "score", "OK")}
    assert all(r["latency_ms"] > 0 for r in access)

    # enable_access_log: false keeps the deployment's other lines, and no access line for its
    # own requests. (Its replica is also an HTTP front: a 404 for another path that the kernel
    # happened to hand to it is the front's answer, logged as such.)
    quiet = text_of(files(instance, "quiet", "Quiet"))
    assert "quiet but warned" in quiet
    assert not [line for line in quiet.splitlines() if "shoal.access" in line and "/quiet" in line]

    # A 404 is answered (and logged) by whichever front accepted the connection.
    every = text_of(list((Path(instance.run_dir) / "logs").rglob("*.log")))
    assert "request_id=rid-404: GET /nowhere 404 " in every


def shoal_cli(*args: str, run_dir: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shoal.cli", *args, "--address", run_dir], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": os.getcwd()})


def test_shoal_logs_lists_prints_and_follows_new_replicas(instance: Instance) -> None:
    serve.run(Api.bind(Scorer.bind()), name="shop", route_prefix="/shop")
    assert httpx.get(f"{instance.url}/shop?q=abc", headers={"x-request-id": "first"}, timeout=30).status_code == 200
    first_tag = files(instance, "shop", "Scorer")[0].stem
    assert wait_until(lambda: "first" in text_of(files(instance, "shop", "Scorer")), 10)

    listing = shoal_cli("logs", run_dir=instance.run_dir)
    assert listing.returncode == 0, listing.stderr
    assert "shop/Api" in listing.stdout and f"shop/Scorer  {first_tag} (running)" in listing.stdout

    printed = shoal_cli("logs", "Scorer", "--tail", "1", run_dir=instance.run_dir)
    assert printed.returncode == 0, printed.stderr
    line = printed.stdout.strip()
    assert line.startswith(f"[{first_tag}] {{") and json.loads(line.split("] ", 1)[1])["request_id"] == "first"
    unknown = shoal_cli("logs", "Nope", run_dir=instance.run_dir)
    assert unknown.returncode == 1 and "no logs for 'Nope'" in unknown.stderr

    follow = subprocess.Popen([sys.executable, "-m", "shoal.cli", "logs", "shop/Scorer", "-f", "--tail", "0",
                               "--address", instance.run_dir], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    out: list[str] = []

    def pump() -> None:
        assert follow.stdout is not None
        out.extend(follow.stdout)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        # A second replica starts after the follower did: its lines show up too.
        serve.run(Api.bind(Scorer.options(num_replicas=2).bind()), name="shop", route_prefix="/shop")
        assert wait_until(lambda: len(files(instance, "shop", "Scorer")) == 2, 30)
        second_tag = next(p.stem for p in files(instance, "shop", "Scorer") if p.stem != first_tag)
        n = 0

        def both_seen() -> bool:
            nonlocal n
            n += 1
            httpx.get(f"{instance.url}/shop?q=x", headers={"x-request-id": f"later-{n}"}, timeout=30)
            lines = list(out)
            return all(any(x.startswith(f"[{t}] ") and '"later-' in x for x in lines) for t in (first_tag, second_tag))

        assert wait_until(both_seen, 30, 0.1), out
        assert not any('"request_id": "first"' in x for x in out)  # --tail 0: only new lines
    finally:
        follow.send_signal(signal.SIGINT)
        try:
            code = follow.wait(10)
        finally:
            if follow.poll() is None:
                follow.kill()
                follow.wait()
        reader.join(5)
    assert code == 0 and "Traceback" not in (follow.stderr.read() if follow.stderr else "")


def test_proxy_log_has_the_requests_it_answers_itself(run_dir: str) -> None:
    from conftest import child_pids

    before = child_pids()
    serve.start(http_options={"port": 0, "ingress_serves_http": False}, _run_dir=run_dir)
    try:
        serve.run(Quiet.bind(), name="quiet", route_prefix="/quiet")
        url = serve.http_address()
        r = httpx.get(f"{url}/nowhere/%0Aforged", headers={"x-request-id": "rid-proxy"}, timeout=30)
        assert r.status_code == 404
        proxy_log = Path(run_dir) / "logs" / "proxy.log"
        assert wait_until(lambda: proxy_log.exists() and "rid-proxy" in proxy_log.read_text(), 10)
        lines = [x for x in proxy_log.read_text().splitlines() if "rid-proxy" in x]
        assert len(lines) == 1 and " proxy proxy-" in lines[0]
        # One line per event: a newline in the path cannot forge a second line.
        assert "shoal.access request_id=rid-proxy: GET /nowhere/\\nforged 404 " in lines[0]
    finally:
        serve.shutdown()
    assert wait_until(lambda: not (child_pids() - before), 10)
