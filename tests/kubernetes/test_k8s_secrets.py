"""Credentials in the compiled objects: only ever in Secrets, generated once and reused
(``--create-secret``), TLS Secrets or cert-manager objects, API keys only where HTTP is served;
and in simulated pods: API keys from the Secret, the previous RPC secret during a rotation,
and a pod without its certificate failing with a message naming the Secret."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from k8s_sim_support import RpcClient, build_objects, get, running

from shoal.exceptions import CompileError
from shoal.kubernetes import names
from shoal.kubernetes.cli import k8s
from shoal.kubernetes.compiler import CompileOptions, compile_apps
from shoal.kubernetes.secretstore import load_or_create
from shoal.kubernetes.targets import load_apps
from shoal.kubernetes.validate import validate_objects
from shoal.runtime.wire import OK, AuthError

HERE = Path(__file__).resolve().parent
HTTP_KEY = "sk-http-key-0123456789abcdef"
GATEWAY_KEY = "sk-gateway-key-0123456789abcdef"


def _config(tmp_path: Path) -> Path:
    """Two apps: a pipeline with inline HTTP API keys, and an LLM app whose gateway has a key."""
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({
        "http_options": {"api_keys": [HTTP_KEY]},
        "applications": [
            {"name": "pipe", "route_prefix": "/", "import_path": "k8s_pipeline_app:app"},
            {"name": "llm", "route_prefix": "/llm", "import_path": "shoal.llm:build_openai_app", "args": {
                "llm_configs": [{"model_loading_config": {"model_id": "tiny", "model_source": "tiny"}}],
                "gateway": {"api_keys": {GATEWAY_KEY: "team-a"}},
            }},
        ],
    }))
    return path


def _build(tmp_path: Path, *args: str) -> tuple[str, str]:
    res = CliRunner().invoke(k8s, ["build", str(_config(tmp_path)), "--image", "shoal:test", "-n", "ml", *args],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.stdout, res.stderr


@pytest.fixture(autouse=True)
def _importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(HERE))


def _objects(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def _every_form(key: str) -> list[str]:
    return [key, base64.b64encode(key.encode()).decode(), base64.b64encode((key + "\n").encode()).decode()]


def test_create_secret_is_generated_once_kept_private_and_reused(tmp_path: Path) -> None:
    store = tmp_path / "secrets"
    first, err = _build(tmp_path, "--create-secret", "--secrets-dir", str(store), "--validate")
    second, err2 = _build(tmp_path, "--create-secret", "--secrets-dir", str(store))
    assert first == second  # a GitOps sync of a rebuild changes nothing
    for app in ("pipe", "llm"):
        path = store / f"ml-{app}.json"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert f"{path} (created)" in err and f"{path} (reused)" in err2
        assert "out of version control" in err
    assert stat.S_IMODE(store.stat().st_mode) == 0o700
    assert (store / ".gitignore").read_text().splitlines()[-1] == "*"
    objs = _objects(first)
    tls = next(o for o in objs if o["kind"] == "Secret" and o["metadata"]["name"] == "pipe-rpc-tls")
    assert tls["type"] == "kubernetes.io/tls" and set(tls["data"]) == {"tls.crt", "tls.key", "ca.crt"}
    stored = json.loads((store / "ml-pipe.json").read_text())
    assert base64.b64decode(tls["data"]["tls.crt"]).decode() == stored["tls"]["tls_crt"]
    assert "ca_key" not in json.dumps(objs) and stored["tls"]["ca_key"] not in first  # the CA key stays here
    # Another directory: other material, so the stored file is what made the builds equal.
    third, _ = _build(tmp_path, "--create-secret", "--secrets-dir", str(tmp_path / "elsewhere"))
    assert third != first
    # A store others can read is refused, not used.
    (store / "ml-pipe.json").chmod(0o644)
    res = CliRunner().invoke(k8s, ["build", str(_config(tmp_path)), "--image", "shoal:test", "-n", "ml",
                                   "--create-secret", "--secrets-dir", str(store)])
    assert res.exit_code == 2 and "readable by other users" in res.output


def test_a_pod_certificate_about_to_expire_is_renewed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from shoal.kubernetes import certs, secretstore

    first, _, _ = load_or_create(tmp_path, "ml", "pipe", with_tls=True)
    monkeypatch.setattr(secretstore, "needs_renewal", lambda pem: pem == first.tls.tls_crt)  # type: ignore[union-attr]
    renewed, _, changes = load_or_create(tmp_path, "ml", "pipe", with_tls=True)
    assert changes == ["renewed the pod certificate (it was about to expire)"]
    assert renewed.tls is not None and first.tls is not None
    assert renewed.tls.ca_crt == first.tls.ca_crt and renewed.tls.tls_crt != first.tls.tls_crt
    assert renewed.rpc_secret == first.rpc_secret
    assert certs.expires(renewed.tls.tls_crt) <= certs.expires(renewed.tls.ca_crt)


@pytest.mark.parametrize("create", [False, True])
def test_no_key_outside_a_secret(tmp_path: Path, create: bool) -> None:
    text, err = _build(tmp_path, *(["--create-secret", "--secrets-dir", str(tmp_path / "s")] if create else []))
    objs = _objects(text)
    for obj in objs:
        if obj["kind"] == "Secret":
            continue
        dumped = json.dumps(obj)
        for key in (HTTP_KEY, GATEWAY_KEY):
            for form in _every_form(key):
                assert form not in dumped, f"{obj['kind']}/{obj['metadata']['name']} holds an API key"
    config = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "pipe-config")
    serve = yaml.safe_load(config["data"][names.CONFIG_FILE_NAME])
    assert "api_keys" not in serve["http_options"]
    llm = yaml.safe_load(next(o for o in objs if o["metadata"]["name"] == "llm-config")["data"]["serve.yaml"])
    assert list(llm["applications"][0]["args"]["gateway"]["api_keys"]) == [
        "sha256:" + __import__("hashlib").sha256(GATEWAY_KEY.encode()).hexdigest()]
    secrets = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Secret"}
    if create:
        assert base64.b64decode(secrets["pipe-api-keys"]["data"][names.API_KEYS_KEY]).decode() == HTTP_KEY + "\n"
    else:
        assert secrets == {}
        assert f"kubectl -n ml create secret generic pipe-api-keys --from-file={names.API_KEYS_KEY}=" in err
        assert "kubectl -n ml create secret generic pipe-rpc-tls --type=kubernetes.io/tls" in err


def test_only_http_pods_get_the_api_keys(tmp_path: Path) -> None:
    objs = _objects(_build(tmp_path)[0])
    seen = {}
    for dep in (o for o in objs if o["kind"] == "Deployment"):
        spec = dep["spec"]["template"]["spec"]
        env = {e["name"] for e in spec["containers"][0]["env"]}
        vols = {v["name"] for v in spec["volumes"]}
        http = any(p["name"] == "http" for p in spec["containers"][0]["ports"])
        seen[dep["metadata"]["name"]] = http
        # http_options (and so the API keys) apply to every app of the config: each ingress pod gets them.
        assert (names.ENV_API_KEYS_FILE in env) == ("api-keys" in vols) == http
        assert {names.ENV_SECRET, names.ENV_SECRET_PREVIOUS, names.ENV_TLS_DIR} <= env and "rpc-tls" in vols
        tls_vol = next(v for v in spec["volumes"] if v["name"] == "rpc-tls")["secret"]
        assert tls_vol["secretName"].endswith("-rpc-tls") and tls_vol["defaultMode"] == 0o440
    assert [name for name, http in seen.items() if http] == ["pipe-ingress", "llm-openaiingress"]


def test_cert_manager_objects(tmp_path: Path) -> None:
    objs = _objects(_build(tmp_path, "--tls", "cert-manager", "--validate")[0])
    validate_objects(objs)
    cm = {(o["kind"], o["metadata"]["name"]): o["spec"] for o in objs if o["apiVersion"] == "cert-manager.io/v1"}
    assert cm[("Issuer", "pipe-rpc-selfsigned")] == {"selfSigned": {}}
    ca = cm[("Certificate", "pipe-rpc-ca")]
    assert ca["isCA"] is True and ca["issuerRef"]["name"] == "pipe-rpc-selfsigned"
    assert cm[("Issuer", "pipe-rpc-ca")] == {"ca": {"secretName": ca["secretName"]}}
    pod = cm[("Certificate", "pipe-rpc-tls")]
    assert pod["secretName"] == names.tls_secret_name("pipe") and pod["issuerRef"]["name"] == "pipe-rpc-ca"
    assert {"server auth", "client auth"} <= set(pod["usages"])
    from shoal.exceptions import ObjectInvalid

    bad = json.loads(json.dumps(next(o for o in objs if o["kind"] == "Certificate")))
    bad["spec"]["privateKey"]["algorithm"] = "DSA"
    with pytest.raises(ObjectInvalid, match="algorithm"):
        validate_objects([bad])


def test_tls_off_is_loud(tmp_path: Path) -> None:
    text, err = _build(tmp_path, "--tls", "off")
    assert "--tls off" in err and "inject code" in err
    dep = next(o for o in _objects(text) if o["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env[names.ENV_INSECURE_NO_TLS] == "1" and names.ENV_TLS_DIR not in env
    with pytest.raises(CompileError, match="--tls"):
        apps, _ = load_apps(str(_config(tmp_path)))
        compile_apps([(a.spec, a.entry) for a in apps], CompileOptions(image="x", tls="maybe"))  # type: ignore[arg-type]


# ---- in simulated pods -------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform != "linux", reason="pods on 127.x.y.z addresses need Linux")
def test_pods_serve_http_keys_from_the_secret_and_accept_the_previous_rpc_secret(tmp_path: Path) -> None:
    old, new = "old-" + os.urandom(16).hex(), "new-" + os.urandom(16).hex()
    objects = build_objects(tmp_path, http_options={"api_keys": [HTTP_KEY]})
    secrets = {"pipe-api-keys": {names.API_KEYS_KEY: HTTP_KEY + "\n"},
               names.secret_name("pipe"): {names.SECRET_KEY: new, names.SECRET_KEY_PREVIOUS: old}}
    with running(objects, secrets=secrets) as sim:
        ingress = sim.pods_of("pipe-ingress")[0]
        port = ingress.port("http")
        assert get(ingress.ip, port, "/")[0] == 401
        import http.client

        conn = http.client.HTTPConnection(ingress.ip, port, timeout=20)
        conn.request("GET", "/?x=1", headers={"authorization": f"Bearer {HTTP_KEY}"})
        assert conn.getresponse().status == 200  # through A and B, over TLS
        conn.close()
        b = sim.pods_of("pipe-b")[0]  # every pod accepts both RPC secrets

        async def go() -> None:
            for secret in (old, new):
                c = await RpcClient().connect(b.ip, names.RPC_PORT, secret.encode())
                assert (await c.reply(c.send("__call__", secret)))[0] == OK
                c.close()
            with pytest.raises((AuthError, ConnectionError)):
                await connect_with(b.ip, "neither-" + os.urandom(8).hex())

        asyncio.run(go())


async def connect_with(ip: str, secret: str) -> None:
    from shoal.runtime.wire import connect_tcp

    proto = await connect_tcp(ip, names.RPC_PORT, secret.encode(), timeout=5)
    proto.close()


def test_a_pod_without_its_certificate_fails_naming_the_secret(tmp_path: Path) -> None:
    objects = build_objects(tmp_path)
    config = next(o for o in objects if o["kind"] == "ConfigMap")["data"][names.CONFIG_FILE_NAME]
    (tmp_path / "serve.yaml").write_text(config)
    empty = tmp_path / "tls"
    empty.mkdir()
    shoal = str(Path(sys.executable).parent / "shoal")
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(HERE), names.ENV_CONFIG: str(tmp_path / "serve.yaml"),
           names.ENV_APP: "pipe", names.ENV_SECRET: "s3cret", names.ENV_TLS_DIR: str(empty),
           names.ENV_TLS_SECRET: "pipe-rpc-tls",
           names.ENV_POD_IP: f"127.{random.randint(16, 250)}.{random.randint(1, 250)}.9"}
    run = subprocess.run([shoal, "replica", "--deployment", "B"], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert "no tls.crt in" in run.stderr and "Secret 'pipe-rpc-tls'" in run.stderr
    assert "kubernetes.io/tls" in run.stderr
    # The development opt-out starts, and says loudly what it gives up.
    env[names.ENV_INSECURE_NO_TLS] = "1"
    proc = subprocess.Popen([shoal, "replica", "--deployment", "Nope"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "INSECURE: TLS between pods is off" in stderr
