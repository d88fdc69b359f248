"""Helpers for tests/integration/test_security.py, imported by the proxy and by replicas.

No ``from __future__ import annotations`` here: the FastAPI deployment travels to its replica
by value, and its endpoint's body model must be an object in the annotations, not a name.
"""

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from starlette.requests import Request

from shoal import serve

SECRET = "sk-live-7f3a9c0e5b2d4f61"


def team_blue_only(request: Request) -> bool | int:
    """An auth hook: the blue team gets in; the red team is forbidden (403); others are not (401)."""
    team = request.headers.get("x-team")
    if team == "blue":
        return True
    return 403 if team == "red" else False


class Item(BaseModel):
    name: str
    price: float


api = FastAPI()


@serve.deployment
@serve.ingress(api)
class Shop:
    @api.post("/items")
    def create(self, item: Item) -> dict[str, Any]:
        return {"name": item.name, "price": item.price}

    @api.get("/items/{item_id}")
    def read(self, item_id: int, q: str = "") -> dict[str, Any]:
        return {"id": item_id, "q": q}

    @api.get("/fail")
    def fail(self) -> None:
        raise RuntimeError(f"database password is {SECRET}")
