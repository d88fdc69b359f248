"""A batched call's arguments: each call is bound to the function's signature, so positional and
keyword spellings of the same argument batch together; a batch becomes one call of lists."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


class CallShape:
    def __init__(self, fn: Callable[..., Any], skip_first: bool) -> None:
        sig = inspect.signature(fn)
        params = list(sig.parameters.values())[1 if skip_first else 0:]
        self.sig = sig.replace(parameters=params)
        self.params = params
        leading: list[str] = []
        for p in params:
            if p.kind not in _POSITIONAL:
                break
            leading.append(p.name)
        self.leading = tuple(leading)
        # Calls passing exactly the leading positional parameters skip Signature.bind.
        self.fast = not any(
            p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty for p in params
        )
        self.first = params[0] if params and params[0].kind in _POSITIONAL else None

    def bind(self, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        """One request's arguments by parameter name; a TypeError for a call that can't bind."""
        if self.fast and not kwargs and len(args) == len(self.leading):
            return dict(zip(self.leading, args, strict=True))
        return dict(self.sig.bind(*args, **kwargs).arguments)

    def first_value(self, arguments: dict[str, Any]) -> Any:
        """The first argument of one request: what ``batch_size_fn`` measures (as in Ray)."""
        if self.first is None:
            return None
        return arguments.get(self.first.name, self.first.default)

    def assemble(self, batch: list[dict[str, Any]]) -> tuple[list[Any], dict[str, Any]]:
        """The batch call: a list per parameter. Parameters no request passed are left out (so
        the function's default applies, as a scalar); ones only some passed get the default in
        the other slots."""
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        positional = True  # still filling positional slots in order
        for p in self.params:
            if not any(p.name in a for a in batch):
                if p.kind in _POSITIONAL:
                    positional = False
                continue
            if p.kind is inspect.Parameter.VAR_POSITIONAL:
                rows = [a.get(p.name, ()) for a in batch]
                width = len(rows[0])
                if any(len(r) != width for r in rows):
                    raise TypeError("every request of a batch must pass the same number of positional arguments")
                args.extend([r[i] for r in rows] for i in range(width))
            elif p.kind is inspect.Parameter.VAR_KEYWORD:
                dicts = [a.get(p.name, {}) for a in batch]
                keys = dicts[0].keys()
                if any(d.keys() != keys for d in dicts):
                    raise TypeError("every request of a batch must pass the same keyword arguments")
                for k in keys:
                    kwargs[k] = [d[k] for d in dicts]
            else:
                values = [a.get(p.name, p.default) for a in batch]
                if p.kind is inspect.Parameter.POSITIONAL_ONLY or (
                    p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and positional
                ):
                    args.append(values)
                else:
                    kwargs[p.name] = values
        return args, kwargs
