"""Weighted fair queuing at the gateway, end to end (issue 20 item 8): a tenant's burst does not
queue another tenant's request behind all of it. A real `shoal run` of a config file, the mock
engine (a fixed delay per token), and concurrent clients; the order of completions is asserted,
never a duration."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import yaml
from conftest import wait_until

REPO = Path(__file__).resolve().parents[2]
KEYS = {"sk-burst-0123456789": "burst", "sk-quiet-0123456789": "quiet"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_burst_does_not_starve_another_tenant(tmp_path: Path, run_dir: str) -> None:
    port = free_port()
    config = {"http_options": {"port": port}, "applications": [{
        "name": "llm", "route_prefix": "/", "import_path": "shoal.llm:build_openai_app",
        "args": {"llm_configs": [{"model_loading_config": {"model_id": "echo"}, "llm_engine": "mock",
                                  "engine_kwargs": {"token_delay_s": 0.05}}],
                 "gateway": {"api_keys": KEYS, "max_in_flight_per_model": 1, "queue_timeout_s": 120}}}]}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "SHOAL_RUN_DIR": run_dir, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "shoal.cli", "run", "serve.yaml"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1/completions"

    def ask(key: str, words: int) -> httpx.Response:
        return httpx.post(url, json={"model": "echo", "prompt": " ".join(["w"] * words), "max_tokens": words,
                                     "temperature": 0}, headers={"authorization": f"Bearer {key}"}, timeout=120)

    try:
        assert wait_until(lambda: _ok(lambda: ask("sk-quiet-0123456789", 1)), 90), "the gateway did not start"
        finished: list[str] = []
        lock = threading.Lock()

        def client(tenant: str, key: str) -> None:
            r = ask(key, 10)  # 10 tokens at 0.05 s: about half a second each, one at a time
            assert r.status_code == 200, r.text
            with lock:
                finished.append(tenant)

        burst = [threading.Thread(target=client, args=("burst", "sk-burst-0123456789")) for _ in range(6)]
        for t in burst:
            t.start()
        # Once the first has finished, the other five wait at the gateway's gate.
        assert wait_until(lambda: len(finished) >= 1, 60)
        quiet = threading.Thread(target=client, args=("quiet", "sk-quiet-0123456789"))
        quiet.start()
        for t in [*burst, quiet]:
            t.join(120)
        assert len(finished) == 7, finished
        # The quiet tenant arrived behind five queued burst requests. First come, first served it
        # would finish last (index 6); with fair queuing it gets the next free turn after the one
        # running and, at equal weights, one more of the burst's whose virtual tag ties with its own.
        assert finished.index("quiet") <= 3, finished
        assert finished[-1] == "burst"
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _ok(call: object) -> bool:
    try:
        return call().status_code == 200  # type: ignore[operator,no-any-return]
    except httpx.HTTPError:
        return False

