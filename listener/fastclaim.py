"""The fast claim on the wire: the claim of a notified job, sent with libpq's
asynchronous calls on one pool connection kept for it (the statement prepared
once per opening, under a name of its own), and its reply read by the event
loop's reader callback and decoded by psycopg's Transformer, with no task or
cursor in between. The claim goes out as one pipeline (the prepared claim, a
Flush, a Sync), so its row arrives before its commit, which its owner hears of
through a second callback. One claim at a time; any error retires the
connection; close() with a claim under way cancels it and still reads its reply.
docs/design.md, "The notified job, claimed at once", says why and what each
case does."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
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

_PROCESS = secrets.token_hex(4)  # the prepared claims' names: this process's...
_serial = itertools.count(1)  # ... and a serial number

# How long close() waits for the reply of a claim it cancelled (the cancel is
# delivered on a connection of its own; the reply follows on the claim's).
CANCEL_WAIT = 5.0

Committed = Callable[[BaseException | None], None]
# The claim's row (None: nothing claimed) or its error; returns what to call
# once the claim's commit has ended (None: nothing to tell).
Reply = Callable[[ClaimedRow | None, BaseException | None], Committed | None]


class Abandoned(Exception):
    """The claim (or the preparation) under way was given up with its
    connection: the connection is closed, or its reply never came."""


class FastClaimer:
    def __init__(self, pool: db.WorkPool, worker: str) -> None:
        self.pool = pool
        self.worker = worker.encode()
        self.conn: psycopg.AsyncConnection[Any] | None = None
        self.round_trip = 0.0  # seconds, the last claim's send -> reply
        self._pgconn: pq.abc.PGconn | None = None
        self._watch: db.SocketWatch | None = None  # the callbacks on its socket
        self._usable = False  # prepared, and no claim on it has failed since
        self._name = b""  # the prepared claim's name on this connection
        self._reply: Reply | None = None  # the claim under way's callback, until its row
        self._committed: Committed | None = None  # ... and its commit's, until the commit
        self._results: list[pq.abc.PGresult] = []
        self._sent_at = 0.0
        self._names: list[str] | None = None  # the claim's columns
        self._prepared: asyncio.Future[list[pq.abc.PGresult]] | None = None
        self._done: asyncio.Future[None] | None = None  # the claim under way's end
        self._sql, self._order = dal.CLAIM_DUE_JOB.positional()

    @property
    def busy(self) -> bool:
        """A claim is under way (its row or its commit not yet told to its owner)."""
        return self._done is not None

    async def settle(self, seconds: float) -> None:
        """Wait up to `seconds` for the claim under way, if any, to end."""
        if self._done is not None:
            await asyncio.wait({self._done}, timeout=seconds)

    @property
    def ready(self) -> bool:
        """A prepared connection is at hand and no claim is under way on it."""
        return self._usable and self._done is None and self._prepared is None

    async def open(self) -> None:
        """Take a connection from the pool and prepare the claim on it."""
        if self.conn is not None:
            return
        conn = await self.pool.getconn()
        self.conn = conn  # from now on close() gives it back
        self._attach(conn)
        # A name of its own for every preparation: a connection the pool lends
        # again, or one a session pooler passes on from another process, may
        # hold an earlier one, perhaps of other code or of a function since
        # replaced (its plan would fail, "cached plan must not change result type").
        self._name = f"ai_jobs_fast_claim_{_PROCESS}_{next(_serial)}".encode()
        try:
            results = await self._exchange(lambda pg: pg.send_prepare(self._name, self._sql))
            for res in results:
                if res.status == pq.ExecStatus.FATAL_ERROR:
                    raise e.error_from_result(res, conn.info.encoding)
        except BaseException:
            if self.conn is conn:
                await self.close()
            raise
        if self.conn is not conn:  # closed meanwhile
            raise Abandoned("the fast claimer was closed while it prepared its claim")
        self._usable = True

    async def close(self) -> None:
        """Give the connection back to the pool. A claim under way (one waiting
        on a lock, at shutdown) is cancelled first and its reply still read, so
        that its owner learns what it claimed; only a reply that does not come
        within CANCEL_WAIT (a dead connection) is abandoned."""
        conn = self.conn
        if conn is not None and self._reply is not None:  # its row still to come
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CANCEL_WAIT):
                    await conn.cancel_safe(timeout=CANCEL_WAIT)
        if conn is not None and self.busy:  # its row, or its commit (a WAL flush) to come
            await self.settle(CANCEL_WAIT)
        if self.conn is not conn:
            return  # closed meanwhile, by another caller
        self.conn = None
        self._detach()
        if conn is not None:
            if conn.pgconn.pipeline_status != pq.PipelineStatus.OFF:
                try:  # a claim abandoned half-way: psycopg must not get it so
                    conn.pgconn.exit_pipeline_mode()
                except Exception:
                    await conn.close()  # the pool replaces a closed connection
            with contextlib.suppress(Exception):  # a closed pool, at shutdown
                await self.pool.putconn(conn)

    def claim(self, table: str, job_id: UUID, reply: Reply) -> None:
        """Send the claim of that job; `reply(row or None, error)` is called from
        the event loop once its row is read, and, when a row was claimed, the
        callback it returns is called with the commit's error (None: durable)
        once the commit has ended. Raises if it could not be sent (the
        connection is broken: close the claimer)."""
        if not self.ready:
            raise RuntimeError("the fast claimer is not ready")
        values = {"table": table.encode(), "id": str(job_id).encode(), "worker": self.worker}
        params = [values[name] for name in self._order]

        def send(pg: pq.abc.PGconn) -> None:
            pg.enter_pipeline_mode()
            pg.send_query_prepared(self._name, params)
            pg.send_flush_request()  # the row, before the commit's WAL flush
            pg.pipeline_sync()  # the commit

        try:
            self._send(send)
        except BaseException:
            self._usable = False
            raise
        self._reply, self._committed = reply, None
        self._done = asyncio.get_running_loop().create_future()

    # -- libpq's asynchronous calls, driven by the event loop ---------------------

    def _attach(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._pgconn = conn.pgconn
        self._watch = db.SocketWatch(conn.pgconn.socket, self._readable, self._writable)

    def _unwatch(self) -> None:
        if self._watch is not None:
            self._watch.off()

    def _detach(self) -> None:
        self._unwatch()
        prepared = self._prepared
        self._pgconn, self._watch, self._prepared = None, None, None
        self._usable = False
        self._names = None
        closed = Abandoned("the fast claim's connection was given back")
        if prepared is not None and not prepared.done():
            prepared.set_exception(closed)
        if self.busy:  # abandoned: its owner learns that it ended
            self._end(closed)

    def _exchange(
        self, send: Callable[[pq.abc.PGconn], None]
    ) -> asyncio.Future[list[pq.abc.PGresult]]:
        """Send a statement; a future of its results (the preparation)."""
        fut: asyncio.Future[list[pq.abc.PGresult]] = asyncio.get_running_loop().create_future()
        self._send(send)
        self._prepared = fut
        return fut

    def _send(self, send: Callable[[pq.abc.PGconn], None]) -> None:
        pg, watch = self._pgconn, self._watch
        assert pg is not None and watch is not None
        send(pg)  # raises e.OperationalError on a broken connection
        self._results = []
        self._sent_at = time.perf_counter()
        watch.write(bool(pg.flush()))  # 1: the rest goes when the socket takes it
        watch.read(True)

    def _writable(self) -> None:
        assert self._pgconn is not None
        try:
            if self._pgconn.flush():
                return
        except Exception as exc:
            self._failed(exc)
            return
        if self._watch is not None:
            self._watch.write(False)

    def _readable(self) -> None:
        pg = self._pgconn
        assert pg is not None
        try:
            pg.consume_input()
            while not pg.is_busy():
                res = pg.get_result()
                if self._prepared is not None:  # the preparation: results, then None
                    if res is None:
                        self._prepared_end(None)
                        return
                    self._results.append(res)
                elif res is None:  # the end of the claim's results; the Sync's follow
                    if self._reply is not None:
                        self._answer()
                elif res.status == pq.ExecStatus.PIPELINE_SYNC:  # committed (or rolled back)
                    pg.exit_pipeline_mode()
                    self._end(self._commit_error())
                    return
                else:
                    self._results.append(res)
        except Exception as exc:
            self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        if self._prepared is not None:
            self._prepared_end(exc)
        else:
            self._end(exc)

    def _prepared_end(self, exc: BaseException | None) -> None:
        self._unwatch()
        results, self._results = self._results, []
        prepared, self._prepared = self._prepared, None
        if prepared is not None and not prepared.done():
            if exc is None:
                prepared.set_result(results)
            else:
                prepared.set_exception(exc)

    def _answer(self) -> None:
        """The claim's row (or error) is read: to its owner; the commit follows."""
        self.round_trip = time.perf_counter() - self._sent_at
        results, self._results = self._results, []
        reply, self._reply = self._reply, None
        row: ClaimedRow | None = None
        exc: BaseException | None = None
        try:
            row = self._row(results)
        except Exception as err:
            exc = err
            self._usable = False  # the owner closes it; nothing more is sent on it
        if reply is not None:
            committed = self._call(reply, row, exc)
            if row is not None:  # nothing claimed: no commit to tell of
                self._committed = committed

    def _commit_error(self) -> BaseException | None:
        """An error the server sent with the Sync (the commit failed), if any."""
        results, self._results = self._results, []
        for res in results:
            if res.status == pq.ExecStatus.FATAL_ERROR:
                assert self.conn is not None
                return e.error_from_result(res, self.conn.info.encoding)
        return None

    def _end(self, exc: BaseException | None) -> None:
        """The claim under way has ended: its commit, or a failure before it.
        Its owner hears of the claim's row first if it had not yet."""
        self._unwatch()
        reply, committed, done = self._reply, self._committed, self._done
        self._reply, self._committed, self._done, self._results = None, None, None, []
        if exc is not None:
            self._usable = False  # the owner closes it; nothing more is sent on it
        if reply is not None:  # failed before the row came: nothing to commit
            self._call(reply, None, exc or e.InterfaceError("the claim ended without a row"))
        elif committed is not None:
            self._call(committed, exc)
        if done is not None and not done.done():
            done.set_result(None)

    def _call(self, fn: Callable[..., Committed | None], *args: Any) -> Committed | None:
        """A callback of the owner's, from the event loop: its bug is not the loop's."""
        try:
            return fn(*args)
        except Exception as err:
            logger.bind(action="fast_claim_failed").opt(exception=err).error(
                f"the fast claim's reply could not be handled: {type(err).__name__}"
            )
            return None

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
