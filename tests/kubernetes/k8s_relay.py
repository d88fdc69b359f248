"""A TCP relay for tests that sit on the network path between two pods: it records every byte
and can alter what the client sends (flip a byte, or put in bytes of its own)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Relay:
    """Listens on ``host``; each connection is relayed to ``target``. ``tamper``, when set, is
    applied once to the next chunk the client sends (then cleared)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.captured = bytearray()  # both directions
        self.tamper: Callable[[bytes], bytes] | None = None
        self.tampered = asyncio.Event()
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str) -> Relay:
        self.server = await asyncio.start_server(self._handle, host, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in self._tasks:
            task.cancel()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*self.target), 5)
        tasks = [asyncio.ensure_future(self._pipe(reader, up_writer, upstream=True)),
                 asyncio.ensure_future(self._pipe(up_reader, writer, upstream=False))]
        self._tasks.update(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool) -> None:
        try:
            while data := await reader.read(65536):
                self.captured += data
                if upstream and self.tamper is not None:
                    data, self.tamper = self.tamper(data), None
                    self.tampered.set()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


def flip_middle_byte(data: bytes) -> bytes:
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]
