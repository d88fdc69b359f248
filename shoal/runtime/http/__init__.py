"""The HTTP request path, in steps with one job each, shared by every front.

Every HTTP front (the proxy process, an ingress replica serving HTTP itself, a Kubernetes
pod) runs :class:`~shoal.runtime.http.app.ProxyApp`, which composes these steps; the
in-process :class:`shoal.testing.LocalRuntime` uses the same route table, header step and
error mapping without a socket::

    scope ──► guard.read_head ──► Guard (auth, root path, body limit)
          ──► routes.RouteTable (longest prefix, canary split, sticky sessions)
          ──► admit (a local ingress or a router; the ledger counts and records it)
          ──► exchange.Exchange (response state, timeout, client disconnect)
          ──► errors (exception -> status and JSON body)

* :mod:`.strict` — request framing refused as the head is parsed (``Host``,
  ``Transfer-Encoding``; applied by :mod:`shoal.runtime.httpguard`'s protocol, before all this).
* :mod:`.options` — :class:`FrontOptions`, what a front needs of ``HTTPOptions``.
* :mod:`.routes` — the route table and the canary split.
* :mod:`.guard` — the request head, credentials, the root path and the body limit.
* :mod:`.admit` — where a request goes, and its accounting (ongoing gauge, metrics, span).
* :mod:`.response` — the state of a response on its way to the client.
* :mod:`.exchange` — one request's forwarding: timeout, disconnect watch, error answers.
* :mod:`.errors` — the one exception -> HTTP status mapping, and JSON answers.
* :mod:`.websocket` — a ``websocket`` scope: the same routing and credentials, then a bridge
  between the client and its application for as long as the WebSocket stays open.

Nothing here imports pydantic: proxy processes start without it.
"""
