"""One LISTEN service for every process that listens: the worker on `ai_jobs`, the
dashboard's live feed on `ai_jobs_events` (River's single notifier).

A dedicated autocommit connection holds the LISTEN. After PING_INTERVAL of
silence it pings; a ping that does not answer within PING_TIMEOUT means a dead
(half-open) connection. One that has not answered within PING_SUSPECT has a
fresh connection tried beside it: if that one listens first, the service moves
to it (a link that was down and is back: the old connection would wait for
TCP's retransmission backoff, seconds more). A ping proves that the connection answers, not that it
hears: so, after `probe_every` seconds without a notification, the service sends
itself a probe through its owner's pool (`notify`) on its own channel and
expects it back on the LISTEN connection within PROBE_TIMEOUT. A probe that does
not come back means deaf: reconnect, and the owner catches up (`on_connect`).

Whatever ends a session (a lost connection, a missed probe, a bug in a callback)
is logged once as a transition, the service reconnects with capped jittered
backoff, and `on_connect(recovered=True)` tells the owner that notifications may
have been missed. The task itself never ends but by cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from loguru import logger

from listener import dal, db
from listener.dal import Statement
from listener.errors import ConfigError, DatabaseUnavailable, redact
from listener.outage import Backoff, Health, diagnose

PING_INTERVAL = 5.0  # seconds of silence before a keepalive query (River pings every 5 s)
PING_TIMEOUT = 10.0  # a ping that does not answer in this time means a dead connection
PING_SUSPECT = 2.0  # a ping not answered by then: fresh connections are tried beside it
# After the owner found the database back from an outage (`suspect`): the LISTEN
# connection is pinged at once, and fresh connections are tried beside a ping
# not answered by then.
SUSPECT_PING = 0.25
FRESH_TIMEOUT = 1.0  # each of those tries, at most (a SYN lost while a link was down)
PROBE_TIMEOUT = 5.0  # a probe not back on the LISTEN connection by then: deaf
RESEND_PAUSE = 0.1  # a probe the pool could not send is sent again this much later,
RESEND_BEFORE = 1.0  # while this much of PROBE_TIMEOUT is left for its echo
VERIFY_TIMEOUT = 3.0  # at start: how long the first probe may take
VERIFY_ATTEMPTS = 2  # fresh connections tried before LISTEN is declared not to work
# Reconnect quickly: a job inserted while nobody listens waits for the catch-up
# sweep that follows the reconnect. A refused connection costs the server nothing.
RECONNECT_BASE = 0.05
RECONNECT_CAP = 1.0
STABLE_SESSION = 5.0  # a session that lived this long resets the reconnect backoff

CONNECTING, LISTENING, RECONNECTING, DEAF = "connecting", "listening", "reconnecting", "deaf"
MAX_PROBE = 200  # a probe's payload is about 60 characters

Notify = Callable[[str, str], Awaitable[None]]  # (channel, payload), sent through a pool
Conn = psycopg.AsyncConnection[dict[str, Any]]


class ListenUnavailable(ConfigError):
    """LISTEN does not work through DATABASE_URL."""


class Deaf(Exception):
    """A probe did not come back on the LISTEN connection in time."""


class Replaced(Exception):
    """A ping went unanswered while a fresh connection listened: moved to it."""


def probe_payload(sender: str, n: int) -> str:
    return json.dumps({"probe": sender, "n": n})


def probe_of(payload: str) -> tuple[str, int] | None:
    """(sender, n) when the payload is a probe, else None. Cheap for the
    notifications of jobs, which never start this way; safe on any text (every
    role may NOTIFY a channel)."""
    if len(payload) > MAX_PROBE or not payload.startswith('{"probe"'):
        return None
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    sender, n = data.get("probe"), data.get("n")
    if isinstance(sender, str) and isinstance(n, int) and not isinstance(n, bool):
        return sender, n
    return None


class ListenService:
    def __init__(
        self,
        dsn: str,
        *,
        name: str,
        channel: str,
        listen_query: Statement | str,
        on_payload: Callable[[str], None],
        on_connect: Callable[[bool], None],
        notify: Notify | None = None,
        probe_every: float = 30.0,
        sender: str = "",
        on_state: Callable[[str], None] | None = None,
        app: str = "ai-jobs listener",
    ) -> None:
        self.dsn = dsn
        self.name = name  # in log actions: <name>_unhealthy, <name>_healthy, <name>_deaf
        self.channel = channel
        # LISTEN on the channel: the statement, or its name in listener/queries.
        self.listen = dal.named(listen_query) if isinstance(listen_query, str) else listen_query
        self.on_payload = on_payload  # a payload's owner (not a probe of this service)
        self.on_connect = on_connect
        self.notify = notify
        self.probe_every = probe_every
        self.sender = sender
        self.on_state = on_state
        self.app = app
        self.state = CONNECTING
        self.connected = asyncio.Event()  # set while a LISTEN connection is up
        self.backend_pid: int | None = None
        self.reconnects = 0  # sessions after the first
        self.deaf_count = 0  # probes that did not come back
        self.probe_seconds: float | None = None  # the last probe's round trip
        self.probes = 0  # probes sent
        self._sessions = 0
        self._verified: Conn | None = None  # the connection verify() proved, for run()
        self._replacement: Conn | None = None  # a fresh one that answered a slow ping
        self.replacements = 0  # sessions moved to a fresh connection (slow pings)
        self._probe_n = 0
        self._probe_sent: float | None = None  # an outstanding probe's send time
        self._probe_deadline: float | None = None
        self._heard_at = 0.0
        self._pinged_at = 0.0
        self._next_probe = 0.0
        self._sends: set[asyncio.Task[None]] = set()
        self._answered: asyncio.Future[None] | None = None  # set by a probe's answer
        self._suspect = False  # ping now, quick to try fresh connections (`suspect`)
        self._early: list[str] = []  # payloads that came with the LISTEN's reply
        self._log = logger.bind(listener=name, channel=channel)
        # Transitions logged once: <name>_unhealthy, _busy, _deaf, _healthy.
        self.health = Health(name, log=self._log)

    # -- start-up ---------------------------------------------------------------

    async def verify(self, stop: asyncio.Event) -> bool:
        """Connect, LISTEN, and prove with a probe that notifications arrive.

        Connection errors are retried (the database may be starting) until `stop`;
        a probe that does not come back on VERIFY_ATTEMPTS fresh connections
        raises ListenUnavailable (a transaction-mode pooler cannot deliver
        notifications). True when verified; False when stopped first."""
        backoff = Backoff(0.2, 5.0)
        misses = 0
        while not stop.is_set():
            conn: Conn | None = None
            try:
                conn = await self._open()
                if await self._prove(conn, VERIFY_TIMEOUT):
                    self._verified, conn = conn, None
                    self.health.up()
                    self._set_state(LISTENING)
                    return True
                misses += 1
                if misses >= VERIFY_ATTEMPTS:
                    raise ListenUnavailable(self._unavailable())
                continue
            except ListenUnavailable:
                raise
            except Exception as exc:
                if not diagnose(exc).transient:
                    raise  # retrying cannot help: say so at start
                self._lost(exc)
            finally:
                if conn is not None:
                    await _close(conn)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff.next()):
                    await stop.wait()
        return False

    def _unavailable(self) -> str:
        where = db.host_port(self.dsn)
        return (
            f"LISTEN does not work through DATABASE_URL ({where}): a notification on "
            f"{self.channel} never arrived, as behind a transaction-mode pooler "
            "(PgBouncer pool_mode=transaction, Supabase port 6543). Use a direct or "
            "session-mode connection (Supabase: port 5432), or set LISTEN_MODE=poll"
        )

    async def _prove(self, conn: Conn, limit: float) -> bool:
        if self.notify is None:
            return True
        self._start_probe(limit)
        async with asyncio.timeout(limit):
            await self.notify(self.channel, probe_payload(self.sender, self._probe_n))
        deadline = time.monotonic() + limit
        while self._probe_deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                self._probe_sent = self._probe_deadline = None
                return False
            # One packet at a time (stop_after), never a break: breaking out of
            # notifies() drops the rest of the packet, whatever came with the probe.
            async for n in conn.notifies(timeout=left, stop_after=1):
                self._heard(n.payload)
        return True

    # -- the supervised loop --------------------------------------------------------

    async def run(self) -> None:
        """Listen until cancelled; never returns, whatever ends a session."""
        backoff = Backoff(RECONNECT_BASE, RECONNECT_CAP)
        while True:
            started = time.monotonic()
            conn, self._verified = self._verified, None
            if conn is None:
                conn, self._replacement = self._replacement, None
            try:
                if conn is None:
                    conn = await self._open(early=True)
                self._session_started(conn)
                await self._listen(conn)
                raise RuntimeError("the LISTEN loop returned")
            except asyncio.CancelledError:
                raise
            except Deaf as exc:
                self._deaf(exc)
            except Replaced as exc:
                self._probe_sent = self._probe_deadline = None
                self._log.bind(action=f"{self.name}_replaced").warning(
                    f"{self.name}: {exc}; moved to it"
                )
            except Exception as exc:
                if diagnose(exc).transient:
                    self._lost(exc)
                else:  # a bug, or a callback that raised: restart
                    self._crashed(exc)
            finally:
                self.connected.clear()
                if conn is not None:
                    await _close(conn)
            if time.monotonic() - started >= STABLE_SESSION:
                backoff.reset()
            if self._replacement is None:
                await asyncio.sleep(backoff.next())

    async def _open(self, early: bool = False) -> Conn:
        """Connect and LISTEN. `early`: notifications that arrive with the
        LISTEN's own reply are kept for _listen (psycopg reads them; without a
        handler it would queue them for a notifies() that this service, reading
        the socket itself, never calls). Not for verify(), which reads them with
        notifies() (and psycopg warns against a handler beside it)."""
        conn = await db.connect(self.dsn, app=self.app)
        if early:
            self._early = []
            conn.add_notify_handler(self._keep_early)
        try:
            await conn.execute(self.listen.sql)
        except BaseException:
            await _close(conn)
            raise
        return conn

    def _session_started(self, conn: Conn) -> None:
        self.backend_pid = conn.info.backend_pid
        recovered = self._sessions > 0
        self._sessions += 1
        if recovered:
            self.reconnects += 1
        if self.state in (CONNECTING, RECONNECTING):
            self.health.up()
            self._set_state(LISTENING)
        now = time.monotonic()
        self._heard_at = self._pinged_at = now
        self._suspect = False  # a new connection: nothing to suspect
        # Prove every new connection at once (but the one verify() just proved).
        self._next_probe = now if recovered else now + self.probe_every
        self.connected.set()
        try:
            self.on_connect(recovered)
        except Exception as exc:
            self._log.bind(action=f"{self.name}_callback_failed").error(
                f"{self.name}: on_connect failed: {type(exc).__name__}: {exc}"
            )

    def suspect(self) -> None:
        """The owner found the database back after an outage (a link that was
        down, say): the LISTEN connection may still wait for TCP's retransmission,
        deaf for seconds. Ping it now; if it does not answer within SUSPECT_PING,
        move to a fresh connection that listens first (`_ping`)."""
        self._suspect = True
        if self._answered is not None and not self._answered.done():
            self._answered.set_result(None)  # ends the session's wait

    def _keep_early(self, n: psycopg.Notify) -> None:
        self._early.append(n.payload)

    async def _listen(self, conn: Conn) -> None:
        """Notifications are read by the event loop's reader callback: nothing
        between the socket and the owner's callback (an awaited notifies() costs
        each one a loop iteration and a future, and the path is idle, cold code).
        This task keeps the time: probes, pings, the end of the session."""
        loop = asyncio.get_running_loop()
        pgconn, fd, enc = conn.pgconn, conn.pgconn.socket, conn.info.encoding
        ended: asyncio.Future[None] = loop.create_future()  # the connection failed

        def drain() -> None:  # every notification libpq has read, in order
            while (n := pgconn.notifies()) is not None:
                self._heard(n.extra.decode(enc, "replace"))

        def readable() -> None:
            try:
                pgconn.consume_input()
            except Exception as exc:  # the connection is gone
                with contextlib.suppress(Exception):
                    drain()  # what libpq had read before
                end(exc)
                return
            try:
                drain()
            except Exception as exc:  # a bug in a callback
                end(exc)

        def end(exc: BaseException) -> None:
            sock.off()
            if not ended.done():
                ended.set_exception(exc)

        # Those that arrive while a ping's reply is read come through psycopg.
        def during_ping(n: psycopg.Notify) -> None:
            self._heard(n.payload)

        sock = db.SocketWatch(fd, readable)
        with contextlib.suppress(ValueError):  # kept by _open(early=True)
            conn.remove_notify_handler(self._keep_early)
        conn.add_notify_handler(during_ping)
        try:
            early, self._early = self._early, []
            for payload in early:  # those that came with the LISTEN's reply
                self._heard(payload)
            drain()  # and those libpq has read since
            sock.read(True)
            while True:
                now = time.monotonic()
                if self._probe_deadline is not None:
                    if now >= self._probe_deadline:
                        raise Deaf(f"no probe back within {PROBE_TIMEOUT:g}s")
                    wait = self._probe_deadline - now
                elif self.notify is not None:
                    due = max(self._next_probe, self._heard_at + self.probe_every)
                    if now >= due:
                        self._send_probe()
                        continue
                    wait = due - now
                else:
                    wait = PING_INTERVAL
                # A probe's answer ends the wait: the next is due a full interval from then.
                self._answered = loop.create_future()
                await asyncio.wait(
                    {ended, self._answered},
                    timeout=max(0.001, min(wait, PING_INTERVAL)),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if ended.done():
                    ended.result()  # raises what ended the session
                quiet = time.monotonic() - max(self._heard_at, self._pinged_at)
                suspect, self._suspect = self._suspect, False
                if suspect or (self._probe_deadline is None and quiet >= PING_INTERVAL):
                    # A probe under way answers the same question (but slowly,
                    # for a suspect). The ping's reply is read by psycopg, not by
                    # the reader callback.
                    sock.read(False)
                    await self._ping(conn, SUSPECT_PING if suspect else PING_SUSPECT)
                    drain()
                    sock.read(True)
        finally:
            sock.off()
            conn.remove_notify_handler(during_ping)
            if ended.done():
                ended.exception()  # retrieved (raised above, or the session ended otherwise)

    async def _ping(self, conn: Conn, suspect_after: float = PING_SUSPECT) -> None:
        """Prove that the connection is still there. A half-open TCP connection
        does not answer: after PING_TIMEOUT the connection is closed, then the
        query abandoned (cancelled first, psycopg would send a cancel request
        and wait for its answer, up to 10 s more), and the session ends. After
        `suspect_after` (PING_SUSPECT), fresh connections are tried beside it
        (`_fresh`): one that listens first ends the session, and the next one
        starts on it."""
        ping = asyncio.ensure_future(conn.execute(dal.KEEPALIVE.sql))
        fresh: asyncio.Task[Conn | None] | None = None
        try:
            done, _ = await asyncio.wait({ping}, timeout=suspect_after)
            if not done:
                fresh = asyncio.ensure_future(self._fresh(PING_TIMEOUT - suspect_after))
                await asyncio.wait({ping, fresh}, return_when=asyncio.FIRST_COMPLETED)
                if not ping.done():
                    replacement = await fresh
                    if replacement is None:  # none answered either: a dead connection
                        raise DatabaseUnavailable(f"no answer to a ping within {PING_TIMEOUT:g}s")
                    self._replacement = replacement
                    self.replacements += 1
                    raise Replaced(
                        f"no answer to a ping within {suspect_after:g}s, while a fresh"
                        " connection listened at once"
                    )
            ping.result()
            self._pinged_at = time.monotonic()
        except BaseException:
            if not ping.done():
                await _close(conn)
                ping.cancel()
                await asyncio.wait({ping}, timeout=1.0)
            raise
        finally:
            if fresh is not None and not fresh.done():
                fresh.cancel()
                await asyncio.wait({fresh}, timeout=1.0)
            if fresh is not None and fresh.done() and not fresh.cancelled():
                made = fresh.result() if fresh.exception() is None else None
                if made is not None and made is not self._replacement:
                    await _close(made)  # the ping answered after all

    async def _fresh(self, within: float) -> Conn | None:
        """A fresh LISTEN connection, tried every FRESH_TIMEOUT at most (a try
        made while a link was down waits for TCP's SYN retries) for `within`
        seconds; None if none answered."""
        deadline = time.monotonic() + within
        while (left := deadline - time.monotonic()) > 0:
            try:
                async with asyncio.timeout(min(FRESH_TIMEOUT, left)):
                    return await self._open(early=True)
            except Exception:
                pass
            await asyncio.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
        return None

    def _heard(self, payload: str) -> None:
        self._heard_at = time.monotonic()
        probe = probe_of(payload)
        if probe is None or probe[0] != self.sender:
            self.on_payload(payload)
            return
        if probe[1] == self._probe_n and self._probe_sent is not None:
            self.probe_seconds = self._heard_at - self._probe_sent
            self._probe_sent = self._probe_deadline = None
            if self._answered is not None and not self._answered.done():
                self._answered.set_result(None)
            self._log.bind(action=f"{self.name}_probe").debug(
                f"{self.name}: probe {probe[1]} back in {self.probe_seconds * 1000:.1f} ms"
            )
            if self.state == DEAF:
                self.health.up(
                    f"hears the channel again (probe back in {self.probe_seconds * 1000:.0f} ms)"
                )
                self._set_state(LISTENING)

    # -- probes -----------------------------------------------------------------

    def _start_probe(self, timeout: float) -> None:
        # A nonce, not a counter: any role may NOTIFY the channel, and a forged
        # echo must not pass for the real one and hide a deaf connection.
        self._probe_n = random.getrandbits(53)
        self.probes += 1
        self._probe_sent = time.monotonic()
        self._probe_deadline = self._probe_sent + timeout

    def _send_probe(self) -> None:
        assert self.notify is not None
        self._start_probe(PROBE_TIMEOUT)
        task = asyncio.create_task(self._deliver(self._probe_n), name=f"{self.name} probe")
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _deliver(self, n: int) -> None:
        assert self.notify is not None
        deadline = time.monotonic() + PROBE_TIMEOUT
        while True:
            try:
                # A pool connection gone half-open would hold the probe forever: the
                # deadline makes that a missed probe (deaf), which replaces connections.
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self.notify(self.channel, probe_payload(self.sender, n))
                return
            except TimeoutError:
                return
            except Exception as exc:
                # The pool could not send it (its owner reports that). Sent again
                # while its echo still has time to come back (the pool's next
                # connection may work: the one that failed was cut by the pool
                # medic, say); else no verdict on the LISTEN connection: try again
                # after the next quiet period.
                again = n == self._probe_n and deadline - time.monotonic() > RESEND_BEFORE
                self._log.bind(action=f"{self.name}_probe_unsent").debug(
                    f"{self.name}: probe {n} not sent: {diagnose(exc)}"
                    + ("; sending it again" if again else "")
                )
                if again:
                    await asyncio.sleep(RESEND_PAUSE)
                    continue
                if n == self._probe_n:
                    self._probe_sent = self._probe_deadline = None
                    self._heard_at = time.monotonic()
                return

    # -- transitions, logged once ------------------------------------------------

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            if self.on_state is not None:
                with contextlib.suppress(Exception):
                    self.on_state(state)

    def _lost(self, exc: BaseException) -> None:
        self._probe_sent = self._probe_deadline = None
        self.health.down(exc, then="reconnecting")  # logged once, and not while deaf
        if self.state != DEAF:
            self._set_state(RECONNECTING)

    def _deaf(self, exc: Deaf) -> None:
        self._probe_sent = self._probe_deadline = None
        self.deaf_count += 1
        self.health.enter(
            DEAF,
            f"deaf: a probe sent on {self.channel} did not come back within "
            f"{PROBE_TIMEOUT:g}s; reconnecting",
            deaf_count=self.deaf_count,
        )
        self._set_state(DEAF)

    def _crashed(self, exc: BaseException) -> None:
        self._probe_sent = self._probe_deadline = None
        text = redact(f"{type(exc).__name__}: {exc}")[:500]
        self._log.bind(action=f"{self.name}_restarted").error(
            f"{self.name}: the LISTEN loop ended ({text}); restarting"
        )
        if self.state != DEAF:
            self._set_state(RECONNECTING)


async def _close(conn: Conn) -> None:
    with contextlib.suppress(Exception):
        await conn.close()
