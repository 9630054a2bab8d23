"""A TCP proxy between a worker and PostgreSQL that injects faults, for the outage
tests: drop every connection, blackhole them (half-open: the client's writes are
accepted and go nowhere, nothing comes back), delay traffic, or mute them (the
server's notifications are dropped while queries still answer: a deaf LISTEN
connection that a ping cannot tell from a healthy one), or refuse new
connections (a server that is down, for as long as the test needs).

It runs its own event loop in a thread, so that sync tests drive it too. Faults
apply to the connections open when they are injected; connections opened later
are healthy unless `partition` (or `muting`) is on: then they are blackholed
(or muted) too.

Clients must not ask for TLS (`url()` adds sslmode=disable): the proxy frames the
server's messages (type byte + length) to find notifications.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.pgserver import free_port

NOTIFICATION = ord("A")  # NotificationResponse, server to client


@dataclass(eq=False)
class Link:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    blackholed: bool = False
    muted: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        for w in (self.client, self.server):
            with contextlib.suppress(Exception):
                w.transport.abort()


class FaultProxy:
    def __init__(self, target_url: str) -> None:
        params = conninfo_to_dict(target_url)
        self.target_host = str(params.get("host") or "127.0.0.1")
        self.target_port = int(params.get("port") or 5432)
        self.port = free_port()
        self.delay = 0.0  # seconds added to every chunk, both ways
        self.partition = False  # new connections are blackholed too
        self.muting = False  # new connections are muted too
        self.refusing = False  # new connections are closed at once, as by a server that is down
        self.links: set[Link] = set()
        self.accepted = 0
        self.refused = 0  # connections closed at once while `refusing`
        self._drops = 0  # drop() calls so far
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    # -- control, from the test's thread ---------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        self._server = self._call(
            asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)
        )
        return self

    def url(self, base_url: str) -> str:
        params = conninfo_to_dict(base_url)
        params.update(host="127.0.0.1", port=str(self.port), sslmode="disable")
        params["gssencmode"] = "disable"
        return make_conninfo("", **params)

    def drop(self) -> int:
        """Close every connection now; returns how many."""
        return int(self._call(self._drop()))

    def blackhole(self) -> int:
        """The connections open now go half-open; returns how many."""
        return int(self._call(self._mark("blackholed")))

    def mute(self) -> int:
        """The connections open now stop receiving notifications; returns how many."""
        return int(self._call(self._mark("muted")))

    def set_delay(self, seconds: float) -> None:
        self.delay = seconds

    def stop(self) -> None:
        if self._server is not None:
            self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    # -- the proxy, in its loop -------------------------------------------------------

    async def _drop(self) -> int:
        self._drops += 1  # and the connections being opened meanwhile (_accept)
        links = list(self.links)
        for link in links:
            link.abort()
        return len(links)

    async def _mark(self, attr: str) -> int:
        for link in self.links:
            setattr(link, attr, True)
        return len(self.links)

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._drop()
        for link in list(self.links):
            for t in link.tasks:
                t.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _accept(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            self.refused += 1
            c_writer.transport.abort()
            return
        drops = self._drops
        try:
            if self.target_host.startswith("/"):  # a Unix-socket directory (embedded server)
                path = f"{self.target_host}/.s.PGSQL.{self.target_port}"
                s_reader, s_writer = await asyncio.open_unix_connection(path)
            else:
                s_reader, s_writer = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
        except OSError:
            c_writer.transport.abort()
            return
        if self._drops != drops or self.refusing:
            # Dropped, or refused, while its server side was being opened: a
            # connection of that moment, closed as the others were.
            self.refused += 1 if self.refusing else 0
            s_writer.transport.abort()
            c_writer.transport.abort()
            return
        self.accepted += 1
        link = Link(c_writer, s_writer, blackholed=self.partition, muted=self.muting)
        self.links.add(link)
        link.tasks = [
            asyncio.create_task(self._pump(link, c_reader, s_writer, frames=False)),
            asyncio.create_task(self._pump(link, s_reader, c_writer, frames=True)),
        ]
        await asyncio.gather(*link.tasks, return_exceptions=True)
        self.links.discard(link)
        link.abort()

    async def _pump(
        self,
        link: Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        frames: bool,
    ) -> None:
        pending = b""  # server to client: an incomplete message, held until complete
        try:
            while chunk := await reader.read(65536):
                if link.blackholed:
                    continue  # accepted, never delivered, never answered
                if frames:
                    pending += chunk
                    chunk, pending = _frames(pending, drop_notifications=link.muted)
                if self.delay:
                    await asyncio.sleep(self.delay)
                if chunk and not link.blackholed:
                    writer.write(chunk)
                    await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if not link.blackholed:  # a half-open connection never says it ended
                link.abort()


def _frames(data: bytes, drop_notifications: bool) -> tuple[bytes, bytes]:
    """(whole messages to forward, the incomplete rest)."""
    out = bytearray()
    i = 0
    while len(data) - i >= 5:
        length = int.from_bytes(data[i + 1 : i + 5], "big")
        end = i + 1 + length
        if end > len(data):
            break
        if not (drop_notifications and data[i] == NOTIFICATION):
            out += data[i:end]
        i = end
    return bytes(out), data[i:]
