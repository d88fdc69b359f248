"""A small three-deployment app for the Kubernetes compiler tests (imports nothing heavy).

``Api`` (the HTTP ingress) calls ``Model`` and ``Tokenizer``; ``Model`` calls ``Tokenizer``.
``Model`` autoscales from zero on half a GPU; ``Tokenizer`` asks for CPU and memory.
"""

from __future__ import annotations

from typing import Any

from shoal import serve
from shoal.handle import DeploymentHandle


@serve.deployment(ray_actor_options={"num_cpus": 0.5, "memory": 2 * 1024**3})
class Tokenizer:
    def tokens(self, text: str) -> list[str]:
        return text.split()


@serve.deployment(
    autoscaling_config={"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 2,
                        "upscale_delay_s": 5, "downscale_delay_s": 60},
    ray_actor_options={"num_gpus": 0.5},
    graceful_shutdown_timeout_s=30,
)
class Model:
    def __init__(self, tokenizer: DeploymentHandle) -> None:
        self.tokenizer = tokenizer

    async def predict(self, text: str) -> int:
        return len(await self.tokenizer.tokens.remote(text))


@serve.deployment(num_replicas=2)
class Api:
    def __init__(self, tokenizer: DeploymentHandle, model: DeploymentHandle) -> None:
        self.tokenizer = tokenizer
        self.model = model

    async def __call__(self, request: Any) -> dict[str, int]:
        text = request.query_params.get("q", "")
        return {"n": await self.model.predict.remote(text)}


_tokenizer = Tokenizer.bind()
app = Api.bind(_tokenizer, Model.bind(_tokenizer))
