"""What ``LLMServer.generate`` does between an engine's outputs and the chunks it streams.

:class:`EngineOutputs` merges the engine streams of a request's choices (one stream when the
engine generates ``n`` choices itself, else one per choice, read concurrently) into ``(index,
output)`` pairs, and stops one choice's stream or all of them. :class:`ChoiceText` turns one
choice's outputs into :class:`GenerationChunk`\\ s: stop sequences cut the text (holding back
what could start one), log probabilities travel with the text their tokens made, and with
``hold`` (tool calls) the whole text is sent once, at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from shoal.llm.engines import EngineOutput, GenerationChunk, SamplingParams, StopMatcher
from shoal.llm.engines._base import TokenLogprob

__all__ = ["ChoiceText", "EngineOutputs"]

_END = object()


class ChoiceText:
    """One choice's text; see the module docstring."""

    def __init__(self, index: int, sampling: SamplingParams, *, hold: bool = False) -> None:
        self.index = index
        self.matcher = StopMatcher(sampling.stop, include=sampling.include_stop_str_in_output)
        self.hold = hold
        self.done = False
        self.reason: str | None = None
        self.tokens = 0
        self._logprobs: list[TokenLogprob] = []
        self._held: list[str] = []

    def feed(self, out: EngineOutput) -> GenerationChunk | None:
        """The chunk to send for an engine output (None: nothing yet)."""
        self.tokens = out.completion_tokens
        self._logprobs.extend(out.logprobs)
        text, stopped = self.matcher.feed(out.text)
        reason = "stop" if stopped else out.finish_reason
        if reason is not None:
            if not stopped:
                text += self.matcher.flush()
            self.done, self.reason = True, reason
        if self.hold:
            self._held.append(text)
            if reason is None:
                return None
            text = "".join(self._held)
        if not text and reason is None:
            return None  # its tokens' log probabilities go with the text they make
        logprobs, self._logprobs = tuple(self._logprobs), []
        return GenerationChunk(text, out.prompt_tokens, out.completion_tokens, reason, self.index, logprobs)


class EngineOutputs:
    """``(choice index, output)`` pairs from one or more engine streams; see the module docstring.

    ``relabel``: stream ``i`` is choice ``i`` (else each output's own ``index`` says whose it is).
    """

    def __init__(self, streams: list[AsyncGenerator[EngineOutput, None]], *, relabel: bool) -> None:
        self._streams = streams
        self._relabel = relabel
        self._queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._open = len(streams)
        self._reader: AsyncGenerator[tuple[int, EngineOutput], None] | None = None

    def __aiter__(self) -> AsyncIterator[tuple[int, EngineOutput]]:
        self._reader = self._iterate()
        return self._reader

    async def _iterate(self) -> AsyncGenerator[tuple[int, EngineOutput], None]:
        if len(self._streams) == 1:  # the common case: read it here, no task
            async for out in self._streams[0]:
                yield (0 if self._relabel else out.index), out
            return
        for i, stream in enumerate(self._streams):
            self._tasks[i] = asyncio.ensure_future(self._pump(i, stream))
        while self._open:
            i, item = await self._queue.get()
            if item is _END:
                self._open -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item

    async def _pump(self, i: int, stream: AsyncGenerator[EngineOutput, None]) -> None:
        try:
            async for out in stream:
                self._queue.put_nowait((i, out))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the request fails with it (the consumer raises it)
            self._queue.put_nowait((i, e))
        finally:
            await stream.aclose()
            self._queue.put_nowait((i, _END))

    async def stop(self, index: int) -> None:
        """Stop choice ``index``'s stream (when it has its own)."""
        task = self._tasks.get(index) if self._relabel else None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def aclose(self) -> None:
        """Stop every stream (a closed engine stream stops its generation)."""
        if self._reader is not None:
            await self._reader.aclose()
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if not self._tasks:
            for stream in self._streams:
                await stream.aclose()
