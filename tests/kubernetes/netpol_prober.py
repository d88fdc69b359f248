"""A probe pod for the NetworkPolicy tests of the pod simulation (``python -m netpol_prober``).

It serves HTTP on ``$PROBER_HOST:$PROBER_PORT`` (its pod address as the downward API gives it).
``GET /probe?host=H&port=P&kind=http|tls[&timeout=S]`` opens a connection from this pod to H:P
and says whether the server there answered: ``http`` sends a GET and wants a status line, ``tls``
wants the server's side of a TLS handshake (any answer counts, even an alert refusing a client
without a certificate). A reset, refusal, timeout or silent close means the connection never
reached a server. ``GET /ready`` answers 503 unless ``$PROBER_READY`` is 1 (a prober wearing an
app deployment's labels must stay out of its Services).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def probe(host: str, port: int, kind: str, timeout: float) -> dict[str, object]:
    try:
        if kind == "http":
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
            try:
                conn.request("GET", "/-/healthz", headers={"connection": "close"})
                status = conn.getresponse().status
            finally:
                conn.close()
            return {"reached": True, "detail": f"HTTP {status}"}
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with socket.create_connection((host, port), timeout=timeout) as raw:
            try:
                with ctx.wrap_socket(raw) as tls:
                    return {"reached": True, "detail": f"handshake {tls.version()}"}
            except (ssl.SSLEOFError, ssl.SSLZeroReturnError) as e:
                return {"reached": False, "detail": f"closed: {e}"}
            except ssl.SSLError as e:  # the server answered (an alert)
                return {"reached": True, "detail": f"alert: {e}"}
    except TimeoutError as e:
        return {"reached": False, "detail": f"timeout: {e}"}
    except (ConnectionError, OSError, http.client.HTTPException) as e:
        return {"reached": False, "detail": f"{type(e).__name__}: {e}"}


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/ready":
            self._send(200 if os.environ.get("PROBER_READY") == "1" else 503, {"ready": False})
        elif url.path == "/-/healthz":
            self._send(200, {"pod": os.environ.get("PROBER_POD", "")})
        elif url.path == "/probe":
            q = dict(urllib.parse.parse_qsl(url.query))
            self._send(200, probe(q["host"], int(q["port"]), q.get("kind", "http"), float(q.get("timeout", "5"))))
        else:
            self._send(404, {})

    def _send(self, status: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    server = ThreadingHTTPServer((os.environ["PROBER_HOST"], int(os.environ.get("PROBER_PORT", "8080"))), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
