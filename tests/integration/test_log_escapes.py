"""Escape sequences a client puts in a URL or in x-request-id never reach a log file or the
terminal of whoever reads it with `shoal logs` raw: real instance, real requests, real files."""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import urllib.parse
from pathlib import Path

from conftest import Instance, wait_until
from starlette.requests import Request

from shoal import serve

log = logging.getLogger("tests.log_escapes")

OSC = "\x1b]0;pwned\x07"  # retitles the terminal window
CLEAR = "\x1b[2J"  # clears the screen
SHOWN = "\\x1b]0;pwned\\x07"  # what a log line shows instead


@serve.deployment
class Echo:
    def __call__(self, request: Request) -> str:
        # The user's own record, carrying client data (and the request id, by context).
        log.info("agent %s asked for %s", request.headers.get("user-agent", ""), request.url.path)
        return "ok"


def raw_request(url: str, target: bytes, headers: dict[bytes, bytes]) -> bytes:
    """One HTTP/1.1 request written byte for byte (no client library cleans it up); the reply."""
    u = urllib.parse.urlsplit(url)
    assert u.hostname is not None and u.port is not None
    head = b"GET " + target + b" HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
    head += b"".join(k + b": " + v + b"\r\n" for k, v in headers.items()) + b"\r\n"
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        s.settimeout(30)
        s.sendall(head)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return reply


def all_logs(run_dir: str) -> bytes:
    return b"".join(p.read_bytes() for p in sorted((Path(run_dir) / "logs").rglob("*.log")))


def shoal_logs(*args: str, run_dir: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "shoal.cli", "logs", *args, "--address", run_dir],
                          capture_output=True, timeout=60, env={**os.environ, "PYTHONPATH": os.getcwd()})


def assert_no_raw_escapes(data: bytes, where: str) -> None:
    for byte in (b"\x1b", b"\x07", b"\xc2\x9b"):
        assert byte not in data, f"raw {byte!r} in {where}: {data[max(0, data.find(byte) - 80):][:200]!r}"


def test_escapes_in_path_and_request_id_are_logged_as_text(instance: Instance) -> None:
    serve.run(Echo.bind(), name="esc", route_prefix="/esc")
    evil = (OSC + CLEAR).encode()
    encoded = urllib.parse.quote(OSC + CLEAR, safe="").encode()
    # Header values may not hold C0 controls (the parser answers 400), but may hold bytes
    # 0x80-0xff, read as latin-1: 0x9b is the one-byte CSI. Paths arrive percent-decoded.
    replies = [
        raw_request(instance.url, b"/esc/" + encoded, {b"x-request-id": b"rid-\x9b2J", b"user-agent": b"ua-\x9b2J"}),
        raw_request(instance.url, b"/esc/%C2%9B2J", {b"x-request-id": b"rid-c1"}),
        raw_request(instance.url, b"/nowhere/" + encoded, {b"x-request-id": b"rid-404-\x9b"}),
    ]
    assert replies[0].startswith(b"HTTP/1.1 200") and replies[1].startswith(b"HTTP/1.1 200"), replies
    assert replies[2].startswith(b"HTTP/1.1 404"), replies[2][:200]
    # Raw C0 controls in a header or the request target: refused by the parser, nothing to log.
    assert raw_request(instance.url, b"/esc/a", {b"x-request-id": evil}).startswith(b"HTTP/1.1 400")
    assert raw_request(instance.url, b"/esc/" + evil, {}).startswith(b"HTTP/1.1 400")

    # A request id that is not plausible (not printable ASCII) is replaced by a new one: the
    # client's bytes never reach the log. A plausible one is kept.
    access = re.compile(rb"request_id=([0-9a-f]{16}): GET /esc/" + re.escape(SHOWN.encode()) + rb"\\x1b\[2J 200 ")
    assert wait_until(lambda: access.search(all_logs(instance.run_dir)) is not None, 15), \
        all_logs(instance.run_dir)[-2000:]
    assert wait_until(lambda: re.search(rb"request_id=[0-9a-f]{16}: GET /nowhere/" + re.escape(SHOWN.encode()),
                                        all_logs(instance.run_dir)) is not None, 15)
    assert wait_until(lambda: b"request_id=rid-c1: GET /esc/\\x9b2J 200 " in all_logs(instance.run_dir), 15)
    text = all_logs(instance.run_dir)
    assert_no_raw_escapes(text, "the log files")
    assert b"rid-\\x9b" not in text and b"rid-404" not in text
    found = access.search(text)
    assert found is not None
    # The user's own record: client data in its message, the (new) request id by context.
    assert b"request_id=" + found.group(1) + f": agent ua-\\x9b2J asked for /esc/{SHOWN}\\x1b[2J".encode() in text

    printed = shoal_logs("esc/Echo", run_dir=instance.run_dir)
    assert printed.returncode == 0, printed.stderr
    assert_no_raw_escapes(printed.stdout, "shoal logs")
    assert access.search(printed.stdout) is not None
    listing = shoal_logs(run_dir=instance.run_dir)
    assert listing.returncode == 0 and b"esc/Echo" in listing.stdout


def test_the_proxy_log_shows_escapes_as_text(proxied: Instance) -> None:
    serve.run(Echo.bind(), name="esc", route_prefix="/esc")
    encoded = urllib.parse.quote(OSC, safe="").encode()
    reply = raw_request(proxied.url, b"/nowhere/" + encoded, {b"x-request-id": b"rid-\x9b"})
    assert reply.startswith(b"HTTP/1.1 404"), reply[:200]
    proxy_log = Path(proxied.run_dir) / "logs" / "proxy.log"
    line = re.compile(rb"request_id=[0-9a-f]{16}: GET /nowhere/" + re.escape(SHOWN.encode()) + rb" 404 ")
    assert wait_until(lambda: proxy_log.exists() and line.search(proxy_log.read_bytes()) is not None, 15)
    assert_no_raw_escapes(proxy_log.read_bytes(), "proxy.log")
    printed = shoal_logs("proxy", run_dir=proxied.run_dir)
    assert printed.returncode == 0, printed.stderr
    assert_no_raw_escapes(printed.stdout, "shoal logs proxy")
    assert line.search(printed.stdout) is not None
