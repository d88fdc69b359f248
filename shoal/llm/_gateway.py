"""``OpenAiIngress``: the OpenAI-compatible HTTP front of one or more models.

Endpoints (under the application's route prefix):

========================  ===================================================================
``GET  /v1/models``       the models the caller's tenant may use (adapters as ``base:adapter``)
``GET  /v1/models/{id}``  one of them
``POST /v1/chat/completions``, ``POST /v1/completions``
                          generation, streamed as Server-Sent Events with ``"stream": true``
``POST /v1/embeddings``   vectors from an embedding deployment (``float`` or ``base64``)
``GET  /v1/usage``        per-tenant, per-model counters and engine counters (admin tenants;
                          everyone when the gateway is open)
``GET  /metrics``         the same as Prometheus counters, plus time to first token (admin
``GET  /v1/metrics``      tenants; everyone when the gateway is open); ``/v1/metrics`` is the
                          path to use with ``route_prefix: /``, where ``/metrics`` is shoal's
========================  ===================================================================

Requests route by ``model`` to the deployment serving it; ``base:adapter`` goes to ``base``'s
deployment with the multiplexed model id ``base:adapter`` (a LoRA adapter). API keys map to
tenants; each tenant may have request and token rate limits (429 with ``Retry-After``), shared
by the deployment's replicas (:mod:`shoal.llm._shared_limits`).

The counters name tenants, so they stay in the gateway replica's memory: never in shoal's
multiprocess files, hence never on the instance-wide ``/metrics`` page, which answers whoever
the front lets in. Their ``model`` label is a configured model id, an adapter ``/v1/models``
lists, or ``"other"``: whatever clients send, the series stay bounded (the usage ledger too).
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import json
import logging
import math
import re
import struct
import time
import traceback
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from shoal import serve
from shoal.context import _get_internal_replica_context
from shoal.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError
from shoal.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator
from shoal.llm._choices import Choices
from shoal.llm._config import ANONYMOUS_TENANT, GatewayConfig, hash_api_key
from shoal.llm._fairness import FairGate, QueueTimeout
from shoal.llm._protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    OpenAIError,
    new_id,
    parse_request,
    sse,
)
from shoal.llm._ratelimit import Decision, UsageLedger, estimate_tokens
from shoal.llm._shared_limits import GatewayLimits
from shoal.llm.engines import (
    AdapterNotFoundError,
    ContextLengthError,
    GenerationChunk,
    GenerationRequest,
    InvalidParameterError,
)

__all__ = ["OpenAiIngress"]

logger = logging.getLogger("shoal.llm.gateway")

_ROUTE = re.compile(r"/v1/(chat/completions|completions|embeddings|models|usage)(?:/(.+))?$")
_MODEL_INFO_TIMEOUT_S = 3.0
_METRICS_PATHS = ("/metrics", "/v1/metrics")  # under the route prefix
# vLLM's server has these next to /v1 (see shoal.llm._tokenize): (method, handler name).
_SIDE_ROUTES = {"/tokenize": "POST", "/detokenize": "POST", "/health": "GET"}
#: The ``model`` label (and usage ledger key) of a model that is neither configured nor a known adapter.
OTHER_MODEL = "other"
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _Metrics:
    """The gateway's Prometheus metrics, as plain numbers in this replica's memory, rendered on
    request. Not prometheus-client metric objects: in a shoal process those write to the
    instance's multiprocess files, and every file lands on the instance-wide ``/metrics`` page,
    which must not name tenants. Several gateways in one process (tests) never collide."""

    _COUNTERS = (
        ("requests", "shoal_llm_requests", "Requests by tenant, model, endpoint and HTTP status.",
         ("tenant", "model", "endpoint", "status")),
        ("prompt_tokens", "shoal_llm_prompt_tokens", "Prompt tokens by tenant and model.", ("tenant", "model")),
        ("completion_tokens", "shoal_llm_completion_tokens", "Completion tokens by tenant and model.",
         ("tenant", "model")),
        ("rate_limited", "shoal_llm_rate_limited", "Requests refused by a rate limit.", ("tenant", "limit")),
    )

    def __init__(self) -> None:
        self.requests: dict[tuple[str, ...], float] = {}
        self.prompt_tokens: dict[tuple[str, ...], float] = {}
        self.completion_tokens: dict[tuple[str, ...], float] = {}
        self.rate_limited: dict[tuple[str, ...], float] = {}
        # model -> (per-bucket counts, the last one open; sum)
        self.ttft: dict[str, tuple[list[int], list[float]]] = {}

    @staticmethod
    def inc(counter: dict[tuple[str, ...], float], labels: tuple[str, ...], amount: float = 1.0) -> None:
        counter[labels] = counter.get(labels, 0.0) + amount

    def observe_ttft(self, model: str, seconds: float) -> None:
        counts, total = self.ttft.setdefault(model, ([0] * (len(_TTFT_BUCKETS) + 1), [0.0]))
        counts[bisect.bisect_left(_TTFT_BUCKETS, seconds)] += 1
        total[0] += seconds

    def render(self) -> bytes:
        """The Prometheus text format of every metric."""
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

        metrics = self

        class _Collector:
            def collect(self) -> list[Metric]:
                out: list[Metric] = []
                for attr, name, doc, labels in metrics._COUNTERS:
                    family = CounterMetricFamily(name, doc, labels=list(labels))
                    for values, value in sorted(getattr(metrics, attr).items()):
                        family.add_metric(list(values), value)
                    out.append(family)
                hist = HistogramMetricFamily("shoal_llm_time_to_first_token_seconds",
                                             "Time from request to first generated text.", labels=["model"])
                for model, (counts, total) in sorted(metrics.ttft.items()):
                    running, buckets = 0, []
                    for bound, n in zip([*map(str, _TTFT_BUCKETS), "+Inf"], counts, strict=True):
                        running += n
                        buckets.append((bound, float(running)))
                    hist.add_metric([model], buckets, total[0])
                out.append(hist)
                return out

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector())
        return bytes(generate_latest(registry))


class _Account:
    """Usage of one request, recorded exactly once (at the end, however it ends)."""

    def __init__(self, gateway: OpenAiIngress, tenant: str, model: str, endpoint: str, admitted: Decision) -> None:
        self.gateway = gateway
        self.gate: FairGate | None = None  # held while the generation runs; released at close
        self.admitted = admitted  # what the limits reserved at admission, settled at close
        self.tenant = tenant
        self.model = gateway.model_label(model)
        self.endpoint = endpoint
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.closed = False

    def update(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens, self.completion_tokens = prompt_tokens, completion_tokens

    def close(self, status: int) -> None:
        if self.closed:
            return
        self.closed = True
        if self.gate is not None:
            self.gate.release()
        g = self.gateway
        g.ledger.record(self.tenant, self.model, prompt_tokens=self.prompt_tokens,
                        completion_tokens=self.completion_tokens, error=status >= 400)
        g.limits.settle(self.tenant, self.admitted, self.prompt_tokens + self.completion_tokens)
        m = g.metrics
        m.inc(m.requests, (self.tenant, self.model, self.endpoint, str(status)))
        if self.prompt_tokens:
            m.inc(m.prompt_tokens, (self.tenant, self.model), self.prompt_tokens)
        if self.completion_tokens:
            m.inc(m.completion_tokens, (self.tenant, self.model), self.completion_tokens)


async def _result(response: DeploymentResponse | DeploymentResponseGenerator) -> Any:
    assert isinstance(response, DeploymentResponse)
    return await response


def _mask(key: str) -> str:
    return f"{key[:3]}****{key[-4:]}" if len(key) > 10 else "****"


# The name is in shoal.runtime.http.errors.OPENAI_INGRESSES: the front's own refusals on the
# gateway's routes (413) carry OpenAI's error object too.
@serve.deployment(name="OpenAiIngress", max_ongoing_requests=256)
class OpenAiIngress:
    """The OpenAI-compatible gateway; see the module docstring. Usually built by
    :func:`~shoal.llm.build_openai_app`.

    ``llm_deployments`` and ``embedding_deployments`` map model ids to handles of
    :class:`LLMServer` / :class:`EmbeddingServer` deployments (bound applications when
    binding). ``clock`` (seconds, monotonic) drives the rate limits; tests pass a fake one.
    """

    def __init__(self, llm_deployments: Mapping[str, DeploymentHandle] | None = None,
                 embedding_deployments: Mapping[str, DeploymentHandle] | None = None,
                 gateway: GatewayConfig | dict[str, Any] | None = None, *,
                 clock: Callable[[], float] | None = None) -> None:
        self.llms: dict[str, DeploymentHandle] = dict(llm_deployments or {})
        self.embedders: dict[str, DeploymentHandle] = dict(embedding_deployments or {})
        overlap = set(self.llms) & set(self.embedders)
        if overlap:
            raise ValueError(f"model ids used for both an LLM and an embedding model: {sorted(overlap)}")
        self.config = GatewayConfig.model_validate(gateway or {})
        self.clock: Callable[[], float] = clock or time.monotonic
        self.created = int(time.time())
        self._keys = self.config.key_hashes()
        # Shared by the deployment's replicas through the controller, or a pod's share (_shared_limits).
        self.limits = GatewayLimits.for_process(self.config, self.clock)
        self.ledger = UsageLedger()  # this replica's (its id is in /v1/usage)
        ctx = _get_internal_replica_context()
        self._replica = ctx.replica_tag if ctx is not None else ""
        self.metrics = _Metrics()
        self._infos: dict[str, dict[str, Any]] = {}
        self._refresh: asyncio.Future[Any] | None = None
        self._gates: dict[str, FairGate] = {}  # per base model: weighted fair queuing between tenants

    # -- HTTP entry point
    async def __call__(self, request: Request) -> Response:
        path = request.scope.get("path", "")
        root = request.scope.get("root_path", "")
        try:
            local = path[len(root):] if path.startswith(root) else path
            if local in _SIDE_ROUTES:
                return await self._side_route(request, local)
            if request.method == "GET" and local in _METRICS_PATHS:
                self._require_admin(self._authenticate(request))
                from prometheus_client import CONTENT_TYPE_LATEST

                return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)
            match = _ROUTE.search(path)
            if match is None:
                raise OpenAIError(404, f"Invalid URL ({request.method} {path})")
            endpoint, rest = match.group(1), match.group(2)
            expected = "GET" if endpoint in ("models", "usage") else "POST"
            if request.method != expected or (rest is not None and endpoint != "models"):
                raise OpenAIError(404 if rest is not None else 405, f"Invalid URL ({request.method} {path})")
            tenant = self._authenticate(request)
            if endpoint == "models":
                return JSONResponse(await self._models(tenant, rest))
            if endpoint == "usage":
                self._require_admin(tenant)
                return JSONResponse({"object": "usage", "replica": self._replica, "tenants": self.ledger.snapshot(),
                                     "engines": await self._engine_stats()})
            body = await self._json(request)
            request_id = request.headers.get("x-request-id") or new_id("req")
            if endpoint == "embeddings":
                return await self._embeddings(body, tenant)
            return await self._generate(body, tenant, endpoint, request_id)
        except OpenAIError as e:
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
        except Exception as e:  # a bug here: still answer in OpenAI's shape, the traceback goes to the log
            error = self._downstream_error(e, "")
            return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    async def _side_route(self, request: Request, local: str) -> Response:
        from shoal.llm import _tokenize

        if request.method != _SIDE_ROUTES[local]:
            raise OpenAIError(405, f"Invalid URL ({request.method} {request.scope.get('path', '')})")
        if local == "/health":
            return await _tokenize.health(self)
        tenant = self._authenticate(request)
        body = await self._json(request)
        if local == "/tokenize":
            return await _tokenize.tokenize(self, body, tenant)
        return await _tokenize.detokenize(self, body, tenant)

    # -- auth, limits, routing
    def _authenticate(self, request: Request) -> str:
        if self.config.open:
            return ANONYMOUS_TENANT
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise OpenAIError(401, "You didn't provide an API key. You need to provide your API key in an "
                                   "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
        tenant = self._keys.get(hash_api_key(key))
        if tenant is None:
            raise OpenAIError(401, f"Incorrect API key provided: {_mask(key)}.", code="invalid_api_key")
        return tenant

    def _require_admin(self, tenant: str) -> None:
        if not self.config.open and not self.config.tenant(tenant).admin:
            raise OpenAIError(403, "This endpoint needs an API key of an admin tenant.",
                              code="insufficient_permissions")

    def _allowed(self, tenant: str, model: str) -> bool:
        allowed = self.config.tenant(tenant).allowed_models
        return allowed is None or model in allowed or model.partition(":")[0] in allowed

    def model_label(self, model: str) -> str:
        """``model`` as a metrics label and usage ledger key: a configured model id, an adapter
        that ``/v1/models`` lists, or :data:`OTHER_MODEL` (so that what clients send can never
        grow the series or the ledger)."""
        if model in self.llms or model in self.embedders:
            return model
        base, sep, adapter = model.partition(":")
        if sep and adapter in self._infos.get(base, {}).get("adapters", ()):
            return model
        return OTHER_MODEL

    def _not_found(self, model: str) -> OpenAIError:
        return OpenAIError(404, f"The model `{model}` does not exist or you do not have access to it.",
                           code="model_not_found", param="model")

    def _route_llm(self, model: str, tenant: str) -> tuple[DeploymentHandle, str]:
        """The deployment for ``model`` and the multiplexed model id to send (an adapter's)."""
        if self._allowed(tenant, model):
            if model in self.llms:
                return self.llms[model], ""
            base, sep, adapter = model.partition(":")
            if sep and adapter and base in self.llms:
                return self.llms[base], model
        if model in self.embedders and self._allowed(tenant, model):
            raise OpenAIError(400, f"The model `{model}` is an embedding model; use /v1/embeddings.", param="model")
        raise self._not_found(model)

    async def _take_turn(self, base: str, tenant: str, account: _Account) -> None:
        """Wait for this tenant's turn at a busy model (weighted fair queuing; a 503 past the deadline)."""
        limit = self.config.max_in_flight_per_model
        if limit is None:
            return
        gate = self._gates.get(base)
        if gate is None:
            gate = self._gates[base] = FairGate(limit, self.config.queue_timeout_s)
        try:
            await gate.acquire(tenant, self.config.tenant(tenant).weight)
        except QueueTimeout as e:
            account.close(503)  # settles the reservation: nothing was used
            raise OpenAIError(503, f"The model `{base}` is busy: {e}. Please try again.", type="server_error",
                              code="model_overloaded", headers={"retry-after": "1"}) from None
        except BaseException:
            account.close(499)
            raise
        account.gate = gate

    async def _admit(self, tenant: str, model: str, reserve: int = 1) -> Decision:
        """Admit a request reserving ``reserve`` tokens (its prompt estimate plus ``max_tokens``):
        the decision (its ``x-ratelimit-*`` headers, what was reserved), or a 429."""
        decision = await self.limits.admit(tenant, reserve)
        if decision.allowed:
            return decision
        self.ledger.rate_limited(tenant, self.model_label(model))
        self.metrics.inc(self.metrics.rate_limited, (tenant, decision.limit))
        wait = max(1, math.ceil(decision.retry_after_s))
        per = "requests per minute (RPM)" if decision.limit == "requests" else "tokens per minute (TPM)"
        raise OpenAIError(
            429,
            f"Rate limit reached for tenant '{tenant}' on {per}: Limit {math.floor(decision.limit_value)}. "
            f"Please try again in {wait}s.",
            type=decision.limit, code="rate_limit_exceeded",
            headers={"retry-after": str(wait), **decision.headers},
        )

    @staticmethod
    async def _json(request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw)
        except ValueError:
            raise OpenAIError(400, "We could not parse the JSON body of your request. The body must be a JSON "
                                   "object sent with Content-Type: application/json.") from None

    def _downstream_error(self, e: BaseException, param: str) -> OpenAIError:
        """The OpenAI error for an exception from a model deployment."""
        if isinstance(e, OpenAIError):
            return e
        if isinstance(e, ContextLengthError):
            return OpenAIError(400, e.message, code="context_length_exceeded", param=param)
        if isinstance(e, InvalidParameterError):
            return OpenAIError(400, e.message, code="invalid_value", param=e.param)
        if isinstance(e, AdapterNotFoundError):
            return OpenAIError(404, e.message, code="model_not_found", param="model")
        if isinstance(e, (BackPressureError, DeploymentUnavailableError)):
            return OpenAIError(503, "The model is overloaded or unavailable. Please try again later.",
                               type="server_error", code="overloaded", headers={"retry-after": "1"})
        logger.error("request failed:\n%s", "".join(traceback.format_exception(e)))
        return OpenAIError(500, "The server had an error while processing your request. Sorry about that!",
                           type="server_error")

    # -- /v1/models
    async def _fetch_info(self, model_id: str, handle: DeploymentHandle) -> dict[str, Any]:
        try:
            info = dict(await asyncio.wait_for(_result(handle.model_info.remote()), _MODEL_INFO_TIMEOUT_S))
        except Exception as e:  # a model that is starting or scaled to zero: list it without details
            logger.debug("model_info of %s: %r", model_id, e)
            return self._infos.get(model_id, {})
        self._infos[model_id] = info
        return info

    async def _model_infos(self) -> dict[str, dict[str, Any]]:
        """Each model's ``model_info`` (its adapters, when it was loaded). Answers from the last
        known value and refreshes it in the background, so that listing models never waits for a
        model that is busy or starting (except the first time)."""
        handles = {**self.llms, **self.embedders}
        missing = [m for m in handles if m not in self._infos]
        if missing:
            await asyncio.gather(*(self._fetch_info(m, handles[m]) for m in missing))
        if self._refresh is None or self._refresh.done():
            stale = [m for m in handles if m not in missing]
            if stale:
                self._refresh = asyncio.ensure_future(
                    asyncio.gather(*(self._fetch_info(m, handles[m]) for m in stale)))
        return {m: self._infos.get(m, {}) for m in handles}

    async def _engine_stats(self) -> dict[str, Any]:
        """Each LLM deployment's engine counters (of the replica that answers): what was generated,
        next to what was billed above (a cancelled request's tokens after the disconnect show here)."""
        async def one(model_id: str, handle: DeploymentHandle) -> tuple[str, Any]:
            try:
                return model_id, await asyncio.wait_for(_result(handle.stats.remote()), _MODEL_INFO_TIMEOUT_S)
            except Exception as e:
                return model_id, {"error": type(e).__name__}

        return dict(await asyncio.gather(*(one(m, h) for m, h in self.llms.items())))

    def _card(self, model_id: str, info: dict[str, Any], parent: str | None = None) -> dict[str, Any]:
        card: dict[str, Any] = {"id": model_id, "object": "model", "created": int(info.get("created") or self.created),
                                "owned_by": str(info.get("owned_by", "shoal"))}
        if parent is not None:
            card["parent"] = parent
        if info.get("max_model_len"):
            card["max_model_len"] = int(info["max_model_len"])  # as vLLM's server lists it
        return card

    async def _models(self, tenant: str, one: str | None) -> dict[str, Any]:
        infos = await self._model_infos()
        cards: list[dict[str, Any]] = []
        for model_id, info in infos.items():
            if self._allowed(tenant, model_id):
                cards.append(self._card(model_id, info))
            for adapter in info.get("adapters", ()):
                full = f"{model_id}:{adapter}"
                if self._allowed(tenant, full):
                    cards.append(self._card(full, info, parent=model_id))
        if one is None:
            return {"object": "list", "data": cards}
        for card in cards:
            if card["id"] == one:
                return card
        raise self._not_found(one)

    # -- /v1/embeddings
    async def _embeddings(self, body: Any, tenant: str) -> Response:
        req: EmbeddingRequest = parse_request(EmbeddingRequest, body)
        if req.model not in self.embedders or not self._allowed(tenant, req.model):
            if req.model in self.llms and self._allowed(tenant, req.model):
                raise OpenAIError(400, f"The model `{req.model}` does not support embeddings.", param="model")
            raise self._not_found(req.model)
        admitted = await self._admit(tenant, req.model, sum(estimate_tokens(t) for t in req.texts()))
        headers = admitted.headers
        account = _Account(self, tenant, req.model, "embeddings", admitted)
        status = 500
        try:
            try:
                result = await _result(self.embedders[req.model].embed.remote(req.texts()))
            except Exception as e:
                raise self._downstream_error(e, "input") from None
            dims = len(result.vectors[0]) if result.vectors else 0
            if req.dimensions is not None and req.dimensions != dims:
                raise OpenAIError(400, f"The model `{req.model}` only supports dimensions={dims}.", param="dimensions")
            account.update(result.prompt_tokens, 0)
            data = []
            for i, vector in enumerate(result.vectors):
                value: Any = vector
                if req.encoding_format == "base64":
                    value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
                data.append({"object": "embedding", "index": i, "embedding": value})
            status = 200
            body_out = {"object": "list", "data": data, "model": req.model,
                        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}}
            return JSONResponse(body_out, headers=headers)
        except OpenAIError as e:
            status = e.status
            raise
        finally:
            account.close(status)

    # -- /v1/chat/completions and /v1/completions
    async def _generate(self, body: Any, tenant: str, endpoint: str, request_id: str) -> Response:
        chat = endpoint == "chat/completions"
        req: ChatCompletionRequest | CompletionRequest
        if chat:
            chat_req: ChatCompletionRequest = parse_request(ChatCompletionRequest, body)
            try:
                messages = chat_req.chat_messages()
            except ValueError as e:
                raise OpenAIError(400, f"Invalid value for 'messages': {e}", param="messages") from None
            sampling = chat_req.sampling(chat_req.max_new_tokens())
            gen = GenerationRequest(request_id, messages=messages, sampling=sampling, tools=chat_req.tool_list(),
                                    tool_choice=chat_req.tool_choice)
            req = chat_req
        else:
            text_req: CompletionRequest = parse_request(CompletionRequest, body)
            gen = GenerationRequest(request_id, prompt=text_req.text(), sampling=text_req.sampling(text_req.max_tokens))
            req = text_req
        handle, multiplexed_id = self._route_llm(req.model, tenant)
        base = req.model.partition(":")[0]
        if base not in self._infos:
            await self._fetch_info(base, handle)  # once: its adapters (label values), its context length
        prompt_text = "".join(m.get("content") or "" for m in gen.messages) if gen.messages else (gen.prompt or "")
        reserve = estimate_tokens(prompt_text) + (gen.sampling.max_tokens or 0) * gen.sampling.n
        context = self._infos.get(base, {}).get("max_model_len")
        if context:  # a choice cannot use more than the context (beyond it the engine answers 400)
            reserve = min(reserve, int(context) * gen.sampling.n)
        admitted = await self._admit(tenant, req.model, reserve)
        headers = admitted.headers
        account = _Account(self, tenant, req.model, endpoint, admitted)
        await self._take_turn(base, tenant, account)
        param = "messages" if chat else "prompt"
        started = time.monotonic()
        stream = handle.options(stream=True, multiplexed_model_id=multiplexed_id).generate.remote(gen)
        assert isinstance(stream, DeploymentResponseGenerator)
        # The first chunk is awaited before answering, so that errors (context too long, unknown
        # adapter) still get their own status code instead of a 200 with an error event.
        try:
            first: GenerationChunk | None = await stream.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException as e:
            stream.cancel()
            if isinstance(e, (asyncio.CancelledError, RequestCancelledError)):
                account.close(499)
                raise
            error = self._downstream_error(e, param) if isinstance(e, Exception) else None
            account.close(error.status if error else 500)
            if error is None:
                raise
            raise error from None
        self.metrics.observe_ttft(account.model, time.monotonic() - started)
        choices = Choices(new_id("chatcmpl" if chat else "cmpl"), req.model, chat=chat, n=gen.sampling.n,
                          logprobs=gen.sampling.logprobs is not None, include_usage=req.include_usage())
        if req.stream:
            events = self._events(stream, first, account, choices, param)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"cache-control": "no-cache", "x-accel-buffering": "no", **headers})
        return await self._collect(stream, first, account, choices, param, headers)

    async def _collect(self, stream: DeploymentResponseGenerator, first: GenerationChunk | None, account: _Account,
                       choices: Choices, param: str, headers: dict[str, str]) -> Response:
        status = 499
        try:
            chunk = first
            while chunk is not None:
                choices.add(chunk)
                account.update(choices.prompt_tokens, choices.completion_tokens)
                chunk = await anext(stream, None)  # to the end of the stream, so that the call completes
            status = 200
        except Exception as e:
            error = self._downstream_error(e, param)
            status = error.status
            raise error from None
        finally:
            account.close(status)
            if status != 200:
                stream.cancel()
        return JSONResponse(choices.body(), headers=headers)

    async def _events(self, stream: DeploymentResponseGenerator, first: GenerationChunk | None, account: _Account,
                      choices: Choices, param: str) -> AsyncIterator[str]:
        status = 499  # unless it ends: a client that disconnects cancels this generator
        try:
            for piece in choices.first_chunks():
                yield sse(piece)
            chunk = first
            while chunk is not None:
                pieces = choices.stream_chunks(chunk)
                account.update(choices.prompt_tokens, choices.completion_tokens)
                for piece in pieces:
                    yield sse(piece)
                chunk = await anext(stream, None)  # to the end of the stream, so that the call completes
            if choices.include_usage:
                yield sse(choices.usage_chunk())
            status = 200
            yield sse("[DONE]")
        except Exception as e:
            # The response has started (status 200): report the error in the stream, as OpenAI does.
            error = self._downstream_error(e, param)
            status = error.status
            yield sse(error.body())
            yield sse("[DONE]")
        finally:
            account.close(status)
            if status != 200:
                stream.cancel()
