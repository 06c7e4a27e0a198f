"""A tenant's SMTP relay that hangs, then recovers: for `noisy_neighbour` and its tests.

`SwitchRelay` listens on 127.0.0.1. While hung it accepts every TCP connection and never
says a word (no greeting): the worst relay a tenant can configure, since each connection
holds its sender until a timeout. After `recover()` it forwards each new connection to a
real SMTP server (`upstream_port`), byte for byte, so mail sent through it arrives there.
It counts the connections open at once (`peak`), which is how a test sees a per-tenant cap;
with `delay` every command it forwards waits that long first: a slow relay that answers.
"""

from __future__ import annotations

import asyncio
import contextlib

CHUNK = 65_536


class SwitchRelay:
    def __init__(self, upstream_port: int, *, delay: float = 0.0) -> None:
        self._upstream_port = upstream_port
        self._delay = delay  # when up: each chunk from the client waits this long (a slow relay)
        self._server: asyncio.Server | None = None
        self._held: set[asyncio.StreamWriter] = set()
        self._writers: set[asyncio.StreamWriter] = set()  # every open connection, both ends
        self._tasks: set[asyncio.Task[None]] = set()
        self.up = False
        self.open = 0  # connections open right now
        self.peak = 0  # the most open at once
        self.accepted = 0
        self.port = 0

    async def start(self, port: int = 0) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    def recover(self) -> None:
        """From now on, a real SMTP server; connections held while hung are dropped."""
        self.up = True
        for writer in list(self._held):
            writer.close()

    def reset_peak(self) -> None:
        self.peak = self.open

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:  # kept, so close() can end it before the loop does
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self.accepted += 1
        self._writers.add(writer)
        self.open += 1
        self.peak = max(self.peak, self.open)
        try:
            if self.up:
                await self._forward(reader, writer)
            else:
                self._held.add(writer)
                while await reader.read(CHUNK):  # never answer; until the client gives up
                    pass
        except (ConnectionError, OSError):
            pass
        finally:
            self._held.discard(writer)
            self._writers.discard(writer)
            self.open -= 1
            writer.close()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream_port)
        self._writers.add(up_writer)

        async def pump(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay: float = 0.0
        ) -> None:
            try:
                while data := await src.read(CHUNK):
                    if delay:
                        await asyncio.sleep(delay)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                with contextlib.suppress(OSError, RuntimeError):
                    dst.close()

        task = asyncio.create_task(pump(up_reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            await pump(reader, up_writer, self._delay)
            await task
        finally:
            self._writers.discard(up_writer)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._held):
            writer.close()
        for writer in list(self._writers):
            writer.close()  # every handler then ends on its own (cancelling one makes
            # asyncio's stream protocol log the cancellation as an error)
        tasks = list(self._tasks)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=5.0)
            for task in late:
                task.cancel()
        await self._server.wait_closed()
        self._server = None
