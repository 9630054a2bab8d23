"""The soak's moving parts: the database (a primary and a synchronous standby, each
on a host of its own), the fake providers (their own process), the worker
processes on the worker hosts, and the steady stream of inserted jobs. Each one
records what it did in the run's folder, for the checker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psycopg

from bench.soak.net import ROOT_IP, Host
from listener.migrate import migrate
from tests.fakeai import FAKE_ANTHROPIC_KEY, FAKE_OPENAI_KEY
from tests.replication import Node

PG_PORT = 5432
FAKE_PORT = 8700
ROOT = Path(__file__).resolve().parents[2]

# The workers' settings: short enough that faults heal within seconds.
HEARTBEAT = 2
STALE_AFTER = 6
SWEEP_INTERVAL = 5


def log_line(f: IO[str], **rec: Any) -> None:
    f.write(json.dumps(rec) + "\n")
    f.flush()


class Database:
    """A primary and its synchronous standby on two hosts. A failover promotes
    the standby and rebuilds a new standby on the old primary's host, so the
    two-host URL stays right for the whole run."""

    def __init__(self, hosts: tuple[Host, Host], folder: Path) -> None:
        self.hosts = {h.ip: h for h in hosts}
        self.folder = folder
        self.lock = threading.Lock()  # one operation on the servers at a time
        self.primary = Node(hosts[0].ip, PG_PORT, hosts[0].ns)
        self.standby: Node | None = None
        self.rebuilding: threading.Thread | None = None
        self.dirs = [self.primary.dir]

    @property
    def url(self) -> str:
        hosts = ",".join(f"{h}:{PG_PORT}" for h in self.hosts)
        return f"postgresql://postgres@{hosts}/postgres?target_session_attrs=read-write"

    def start(self) -> None:
        self.primary.start()
        self.primary.wait_ready()
        asyncio.run(migrate(self.primary.url))
        with psycopg.connect(self.primary.url, autocommit=True) as c:
            # Many users insert at a steady rate: the per-user limit is not under test.
            c.execute("update ai_job_settings set rate_limit_per_hour = 1000000")
        self._add_standby()

    def _add_standby(self) -> None:
        other = next(h for ip, h in self.hosts.items() if ip != self.primary.host)
        node = self.primary.standby(host=other.ip, port=PG_PORT, netns=other.ns)
        self.dirs.append(node.dir)
        node.start()
        deadline = time.monotonic() + 60
        while not self.primary.streaming():
            if time.monotonic() > deadline:
                raise RuntimeError("the new standby did not stream within 60 s")
            time.sleep(0.2)
        self.primary.require_sync()
        self.standby = node

    @property
    def can_fail_over(self) -> bool:
        return self.standby is not None and not self.lock.locked()

    def restart(self) -> None:
        """Restart the primary (a fast shutdown, then start)."""
        with self.lock:
            p = self.primary
            p._run(
                "pg_ctl", "-D", str(p.data), "-m", "fast", "-w", "-l", str(p.dir / "log"), "restart"
            )
            p.wait_ready(60)

    def fail_over(self) -> None:
        """The primary dies (an immediate stop), the standby is promoted; then, in
        the background, a new standby is built on the old primary's host."""
        with self.lock:
            assert self.standby is not None
            old, self.primary, self.standby = self.primary, self.standby, None
            old.stop("immediate")
            self.primary.promote()
            self.primary.wait_ready(60)

        def rebuild() -> None:
            with self.lock:
                old.destroy()
                self._add_standby()

        self.rebuilding = threading.Thread(target=rebuild, daemon=True)
        self.rebuilding.start()

    def destroy(self) -> None:
        if self.rebuilding is not None:
            self.rebuilding.join(120)
        for node in (self.primary, self.standby):
            if node is not None:
                node.destroy()


class Fake:
    """`python -m tests.fakeai` on the bridge, with a pace, quotas and its request log."""

    def __init__(self, folder: Path, seed: int) -> None:
        self.url = f"http://{ROOT_IP}:{FAKE_PORT}"
        self.log = folder / "fake-requests.jsonl"
        self.out = open(folder / "fake.out", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "tests.fakeai", "--host", ROOT_IP, "--port", str(FAKE_PORT),
                "--ttft", "0.3", "--tps", "1500", "--size", "800-2400", "--seed", str(seed),
                "--rpm", "600", "--tpm", "2000000", "--itpm", "2000000", "--otpm", "2000000",
                "--log", str(self.log),
            ],
            stdout=self.out, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while True:
            try:
                self.stats()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("the fake providers did not start") from None
                time.sleep(0.1)

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/_fake/stats", timeout=5) as r:
            return dict(json.loads(r.read()))

    def modes(self, **modes: str) -> None:
        req = urllib.request.Request(
            f"{self.url}/_fake/mode", data=json.dumps(modes).encode(), method="POST"
        )
        with urllib.request.urlopen(req, timeout=5):
            pass

    def pause(self, paused: bool) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP if paused else signal.SIGCONT)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGCONT)
        self.proc.terminate()
        self.proc.wait(20)
        self.out.close()


@dataclass
class Proc:
    host: Host
    slot: int
    log: Path
    popen: subprocess.Popen[bytes]
    started: float
    paused: bool = False
    ended: float | None = None


@dataclass
class Fleet:
    """The worker processes: `per_host` on each worker host, each a slot whose
    process may be killed and started again (a new log each time)."""

    folder: Path
    hosts: list[Host]
    per_host: int
    env: dict[str, str]
    procs: list[Proc] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        (self.folder / "logs").mkdir(exist_ok=True)
        self.record = open(self.folder / "processes.jsonl", "a")  # noqa: SIM115

    def start_all(self) -> None:
        for h in self.hosts:
            for slot in range(self.per_host):
                self.start(h, slot)

    def start(self, host: Host, slot: int) -> Proc:
        log = self.folder / "logs" / f"{host.name}-w{slot}-{uuid.uuid4().hex[:6]}.jsonl"
        with open(log, "w") as out:
            popen = subprocess.Popen(
                [*host.exec(), sys.executable, "-m", "listener", "worker"],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=out,
                cwd=ROOT,
            )
        p = Proc(host, slot, log, popen, time.time())
        with self.lock:
            self.procs.append(p)
            log_line(
                self.record, event="start", log=log.name, host=host.name, pid=popen.pid, t=p.started
            )
        return p

    def ready(self, p: Proc, timeout: float = 120) -> float:
        """When the process logged `worker_started` (its start-up done)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and p.popen.poll() is None:
            with open(p.log, "rb") as f:
                for line in f:
                    if b'"worker_started"' in line:
                        return float(json.loads(line)["record"]["time"]["timestamp"])
            time.sleep(0.2)
        return time.time()

    def live(self) -> list[Proc]:
        with self.lock:
            return [p for p in self.procs if p.ended is None]

    def kill(self, p: Proc) -> None:
        os.kill(p.popen.pid, signal.SIGKILL)
        p.popen.wait()
        self._ended(p, "killed")

    def pause(self, p: Proc, paused: bool) -> None:
        os.kill(p.popen.pid, signal.SIGSTOP if paused else signal.SIGCONT)
        p.paused = paused
        with self.lock:
            log_line(self.record, event="stop" if paused else "cont", log=p.log.name, t=time.time())

    def _ended(self, p: Proc, how: str) -> None:
        p.ended = time.time()
        with self.lock:
            log_line(self.record, event=how, log=p.log.name, code=p.popen.returncode, t=p.ended)

    def terminate_all(self, timeout: float = 60) -> None:
        live = self.live()
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.popen.pid, signal.SIGCONT)
                p.popen.terminate()
        for p in live:
            try:
                p.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()
            self._ended(p, "exited")


def worker_env(db_url: str, fake: Fake, storage: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI", "ANTHROPIC"))}
    env.pop("DATABASE_URL", None)
    return env | {
        "DATABASE_URL": f"{db_url}&connect_timeout=3",
        "PYTHONUNBUFFERED": "1",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "DEBUG",  # job_deferred: the end of an attempt, for the checker
        "OPENAI_API_KEY": FAKE_OPENAI_KEY,
        "OPENAI_BASE_URL": f"{fake.url}/v1",
        "ANTHROPIC_API_KEY": FAKE_ANTHROPIC_KEY,
        "ANTHROPIC_BASE_URL": fake.url,
        "AI_PROVIDER_PRIORITY": "openai,anthropic",
        "AI_TIMEOUT_SECONDS": "20",
        "ALLOW_PLACEHOLDER": "0",
        "STORAGE_URL": str(storage),
        "CACHE_TTL_SECONDS": "0",
        "WORKER_CONCURRENCY": "4",
        "HEARTBEAT_INTERVAL_SECONDS": str(HEARTBEAT),
        "STALE_AFTER_SECONDS": str(STALE_AFTER),
        "SWEEP_INTERVAL_SECONDS": str(SWEEP_INTERVAL),
        "RETRY_BASE_SECONDS": "5",
        "SHUTDOWN_GRACE_SECONDS": "10",
        "LISTEN_PROBE_SECONDS": "10",
        "CATALOG_BATCH_SECONDS": "5",
        "PROVIDER_OUTAGE_MAX_WAIT_SECONDS": "900",
        # On the soak's short time scale, like STALE_AFTER (30 s by default).
        "PROVIDER_BREAKER_COOLDOWN_SECONDS": "5",
    }


class Inserter(threading.Thread):
    """Course and media jobs (3 in 5 courses) from `users` users at `rate` a second,
    through the two-host URL; each acknowledged insert is written to inserts.jsonl.
    Every job is tagged `soak-<n>` in its subject and course id (or prompt), which
    the checker finds again in the fake's request log."""

    def __init__(self, url: str, folder: Path, rate: float, users: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.url, self.rate = url, rate
        self.rng = random.Random(seed)
        self.users = [uuid.UUID(int=self.rng.getrandbits(128), version=4) for _ in range(users)]
        self.out = open(folder / "inserts.jsonl", "a")  # noqa: SIM115 - closed in run()
        self.stop = threading.Event()
        self.acked = self.failed = 0

    def run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        n, t0 = 0, time.monotonic()
        try:
            while not self.stop.is_set():
                self.stop.wait(max(0.0, t0 + n / self.rate - time.monotonic()))
                n += 1
                try:
                    if conn is None or conn.closed:
                        conn = psycopg.connect(self.url, autocommit=True, connect_timeout=3)
                    self._insert(conn, n)
                except psycopg.Error:
                    self.failed += 1
                    if conn is not None:
                        conn.close()
                    conn = None
        finally:
            if conn is not None:
                conn.close()
            self.out.close()

    def _insert(self, conn: psycopg.Connection[Any], n: int) -> None:
        tag, user = f"soak-{n}", self.rng.choice(self.users)
        if self.rng.random() < 0.6:
            table = "ai_course_jobs"
            groups = self.rng.randint(2, 4)
            row = conn.execute(
                "insert into ai_course_jobs (subject, course_id, created_by, params)"
                " values (%s, %s, %s, %s) returning id",
                [f"Topic {tag}", tag, user, json.dumps({"groupCount": groups, "itemsPerGroup": 4})],
            ).fetchone()
        else:
            table = "ai_media_jobs"
            kind = "image" if self.rng.random() < 0.6 else "audio"
            row = conn.execute(
                "insert into ai_media_jobs (prompt, media_type, created_by)"
                " values (%s, %s, %s) returning id",
                [f"[{tag}] a picture of a lighthouse", kind, user],
            ).fetchone()
        assert row is not None
        self.acked += 1
        log_line(self.out, id=str(row[0]), table=table, tag=tag, t=time.time())
