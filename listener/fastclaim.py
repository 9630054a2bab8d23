"""The worker's fast claim on the wire: the claim of a notified job, sent the
moment its notification is read, and its reply read by the event loop's reader
callback, on one connection of the pool kept for it.

Through psycopg's awaitable `execute` the same claim costs the path a task to
run it, a loop iteration before that task runs, the cursor's machinery, and a
loop iteration between the reply's arrival and the task that reads it: on an
idle worker, whose code is cold after the quiet between two jobs, about a tenth
of a millisecond (docs/benchmarks.md). Here the claim is libpq's asynchronous
calls on the pool connection's own `PGconn`: `send_query_prepared` from the
caller (the listener's callback), `consume_input` / `get_result` from the reader
callback, and the reply's row decoded by psycopg's `Transformer`, as `execute`
would decode it.

One claim at a time, on a connection no one else uses while it is kept here: it
is checked out of the pool by `open()` and given back by `close()`, and psycopg
never sees a query under way on it (the pool's checks still do: a connection
given back mid-claim is discarded). A connection error fails the claim; the
owner closes the claimer, and opens it again when it wants the fast path back.
A reply that never comes (a half-open connection) is found by the pool medic
like any other: the connection waits on a reply (libpq says ACTIVE) while its
backend sits idle; the medic shuts its socket down and the claim fails here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any, cast
from uuid import UUID

import psycopg
from loguru import logger
from psycopg import errors as e
from psycopg import pq
from psycopg.adapt import Transformer

from listener import dal, db
from listener.rows import ClaimedRow

# The name of the claim prepared on the kept connection (its backend keeps it
# for the connection's life; psycopg's own prepared statements are named _pg3_*).
PREPARED = b"ai_jobs_claim_due_job"

Reply = Callable[[ClaimedRow | None, BaseException | None], None]


class Abandoned(Exception):
    """The claim under way was given up with its connection (at shutdown)."""


class FastClaimer:
    def __init__(self, pool: db.WorkPool, worker: str) -> None:
        self.pool = pool
        self.worker = worker.encode()
        self.conn: psycopg.AsyncConnection[Any] | None = None
        self.round_trip = 0.0  # seconds, the last claim's send -> reply
        self._pgconn: pq.abc.PGconn | None = None
        self._fd = -1
        self._reply: Reply | None = None  # the claim under way's callback
        self._results: list[pq.abc.PGresult] = []
        self._sent_at = 0.0
        self._names: list[str] | None = None  # the claim's columns
        self._prepared: asyncio.Future[list[pq.abc.PGresult]] | None = None
        self._sql, self._order = dal.CLAIM_DUE_JOB.positional()

    @property
    def ready(self) -> bool:
        """A connection is at hand and no claim is under way on it."""
        return self._pgconn is not None and self._reply is None and self._prepared is None

    async def open(self) -> None:
        """Take a connection from the pool and prepare the claim on it."""
        if self.conn is not None:
            return
        conn = await self.pool.getconn()
        try:
            self._attach(conn)
            results = await self._exchange(lambda pg: pg.send_prepare(PREPARED, self._sql))
            for res in results:
                # A connection that was kept here before has it already.
                if res.status == pq.ExecStatus.FATAL_ERROR and (
                    res.error_field(pq.DiagnosticField.SQLSTATE) != b"42P05"
                ):
                    raise e.error_from_result(res, conn.info.encoding)
        except BaseException:
            self._detach()
            with contextlib.suppress(Exception):
                await self.pool.putconn(conn)
            raise
        self.conn = conn

    async def close(self) -> None:
        """Give the connection back to the pool (a claim under way is abandoned:
        the pool discards a connection given back in the middle of a query)."""
        conn = self.conn
        self.conn = None
        self._detach()
        if conn is not None:
            with contextlib.suppress(Exception):  # a closed pool, at shutdown
                await self.pool.putconn(conn)

    def claim(self, table: str, job_id: UUID, reply: Reply) -> None:
        """Send the claim of that job; `reply(row or None, error)` is called from
        the event loop once it is answered. Raises if it could not be sent (the
        connection is broken: close the claimer)."""
        if not self.ready:
            raise RuntimeError("the fast claimer is not ready")
        values = {"table": table.encode(), "id": str(job_id).encode(), "worker": self.worker}
        params = [values[name] for name in self._order]
        self._send(lambda pg: pg.send_query_prepared(PREPARED, params), reply)

    # -- libpq's asynchronous calls, driven by the event loop ---------------------

    def _attach(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._pgconn = conn.pgconn
        self._fd = conn.pgconn.socket
        self._results = []

    def _detach(self) -> None:
        reply, prepared = self._reply, self._prepared
        if self._fd >= 0 and (reply is not None or prepared is not None):
            loop = asyncio.get_running_loop()
            loop.remove_reader(self._fd)
            loop.remove_writer(self._fd)
        self._pgconn, self._fd, self._reply, self._prepared = None, -1, None, None
        self._names = None
        closed = Abandoned("the fast claim's connection was given back")
        if prepared is not None and not prepared.done():
            prepared.set_exception(closed)
        if reply is not None:  # abandoned: its owner learns that it ended
            reply(None, closed)

    def _exchange(
        self, send: Callable[[pq.abc.PGconn], None]
    ) -> asyncio.Future[list[pq.abc.PGresult]]:
        """Send a statement; a future of its results (the preparation)."""
        fut: asyncio.Future[list[pq.abc.PGresult]] = asyncio.get_running_loop().create_future()
        self._prepared = fut
        self._send(send, None)
        return fut

    def _send(self, send: Callable[[pq.abc.PGconn], None], reply: Reply | None) -> None:
        pg = self._pgconn
        assert pg is not None
        send(pg)  # raises e.OperationalError on a broken connection
        loop = asyncio.get_running_loop()
        self._reply = reply
        self._results = []
        self._sent_at = time.perf_counter()
        if pg.flush():  # the rest of the message goes when the socket takes it
            loop.add_writer(self._fd, self._writable)
        loop.add_reader(self._fd, self._readable)

    def _writable(self) -> None:
        assert self._pgconn is not None
        try:
            if self._pgconn.flush():
                return
        except Exception as exc:
            self._finish(exc)
            return
        asyncio.get_running_loop().remove_writer(self._fd)

    def _readable(self) -> None:
        pg = self._pgconn
        assert pg is not None
        try:
            pg.consume_input()
            while not pg.is_busy():
                if (res := pg.get_result()) is None:  # the statement's end
                    break
                self._results.append(res)
            else:
                return  # the rest of the reply is still on its way
        except Exception as exc:
            self._finish(exc)
            return
        self._finish(None)

    def _finish(self, exc: BaseException | None) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._fd)
        loop.remove_writer(self._fd)
        results, self._results = self._results, []
        self.round_trip = time.perf_counter() - self._sent_at
        if (prepared := self._prepared) is not None:
            self._prepared = None
            if not prepared.done():
                if exc is None:
                    prepared.set_result(results)
                else:
                    prepared.set_exception(exc)
            return
        reply, self._reply = self._reply, None
        assert reply is not None
        row: ClaimedRow | None = None
        if exc is None:
            try:
                row = self._row(results)
            except Exception as err:
                exc = err
        try:
            reply(row, exc)
        except Exception as err:  # a bug in the owner's callback: not the event loop's
            logger.bind(action="fast_claim_failed").opt(exception=err).error(
                f"the fast claim's reply could not be handled: {type(err).__name__}"
            )

    def _row(self, results: list[pq.abc.PGresult]) -> ClaimedRow | None:
        """The claimed row (None: nothing claimed), as psycopg would decode it."""
        assert self.conn is not None and self._pgconn is not None
        if len(results) != 1:
            raise e.InterfaceError(f"the claim returned {len(results)} results")
        res = results[0]
        if res.status != pq.ExecStatus.TUPLES_OK:
            raise e.error_from_result(res, self.conn.info.encoding)
        if not res.ntuples:
            return None
        tx = Transformer(self.conn)
        tx.set_pgresult(res)
        if self._names is None:
            self._names = [(res.fname(i) or b"").decode() for i in range(res.nfields)]
        return cast(ClaimedRow, tx.load_row(0, self._dict))

    def _dict(self, values: Sequence[Any]) -> dict[str, Any]:
        assert self._names is not None
        return dict(zip(self._names, values, strict=True))
