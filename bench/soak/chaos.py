"""The chaos driver: a fault every 10-20 s (by default), its kind, target and
length drawn from a seeded generator, so that a run repeats. Each fault runs in
a thread of its own and heals by itself, so faults arrive while others heal; a
target healed is left alone for REST seconds (its recovery is measured).
Every fault is written to faults.jsonl: its kind, target, when it began and when
it was healed (the moment the checker measures recovery from).

Kinds: kill_worker (SIGKILL, started again 1-3 s later), pause_worker (SIGSTOP
past STALE_AFTER, then SIGCONT), restart_db (the primary restarted), failover
(the primary stopped at once, the standby promoted, a new standby built),
cut_link (a worker host's link down 3-8 s), netem (delay and loss on a worker
host's link with tc netem; where the kernel has no netem, a slow link shaped
with tbf), pause_provider (the fake stopped 3-8 s), provider_429 and
provider_500 (both providers answering that), disk_full (the storage's file
system filled 3-6 s)."""

from __future__ import annotations

import contextlib
import errno
import json
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.soak import net
from bench.soak.cluster import STALE_AFTER, Database, Fake, Fleet, log_line

# A target just healed is left alone this long (the recovery target), so that
# its recovery is measured, not cut short by the next fault on it.
REST = 5.0

KINDS = (
    "kill_worker",
    "pause_worker",
    "restart_db",
    "failover",
    "cut_link",
    "netem",
    "pause_provider",
    "provider_429",
    "provider_500",
    "disk_full",
)


class Chaos(threading.Thread):
    def __init__(
        self,
        seed: int,
        folder: Path,
        fleet: Fleet,
        db: Database,
        fake: Fake,
        storage: Path,
        every: tuple[float, float] = (10.0, 20.0),
        kinds: tuple[str, ...] = KINDS,
    ) -> None:
        super().__init__(daemon=True)
        self.rng = random.Random(seed)
        self.fleet, self.db, self.fake, self.storage = fleet, db, fake, storage
        self.every, self.kinds = every, kinds
        self.out = open(folder / "faults.jsonl", "a")  # noqa: SIM115 - closed in run()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.running: list[threading.Thread] = []
        self.busy: set[str] = set()  # resources a fault holds: "db", "provider", "disk", host names
        self.rest_until: dict[str, float] = {}  # resources healed less than REST ago
        self.injected = 0

    def run(self) -> None:
        try:
            while not self.stop.wait(self.rng.uniform(*self.every)):
                self.inject()
            for t in self.running:
                t.join(180)
        finally:
            self.out.close()

    def inject(self) -> None:
        """One fault: the first kind drawn whose target is free."""
        order = list(self.kinds)
        self.rng.shuffle(order)
        for kind in order:
            plan = self.plan(kind)
            if plan is not None:
                resource, act = plan
                with self.lock:
                    self.busy.add(resource)
                t = threading.Thread(target=self._run, args=(kind, resource, act), daemon=True)
                self.running.append(t)
                t.start()
                self.injected += 1
                return

    def _run(self, kind: str, resource: str, act: Callable[[], dict[str, Any]]) -> None:
        start = time.time()
        try:
            detail = act()
            error = None
        except Exception as exc:  # recorded: the report says which fault failed to inject
            detail, error = {}, f"{type(exc).__name__}: {exc}"
        finally:
            with self.lock:
                self.busy.discard(resource)
                self.rest_until[resource] = time.time() + REST
        with self.lock:
            log_line(self.out, kind=kind, start=start, error=error, **detail)

    def free(self, resource: str) -> bool:
        with self.lock:
            return resource not in self.busy and time.time() >= self.rest_until.get(resource, 0)

    def plan(self, kind: str) -> tuple[str, Callable[[], dict[str, Any]]] | None:
        rng = self.rng
        if kind in ("kill_worker", "pause_worker"):
            procs = [p for p in self.fleet.live() if self.free(p.log.name) and not p.paused]
            if not procs:
                return None
            p = rng.choice(procs)
            if kind == "kill_worker":
                wait = rng.uniform(1, 3)

                def kill() -> dict[str, Any]:
                    self.fleet.kill(p)
                    time.sleep(wait)
                    new = self.fleet.start(p.host, p.slot)
                    ready = self.fleet.ready(new)  # its platform's restart is not ours to time
                    return {
                        "target": p.log.name,
                        "new": new.log.name,
                        "restarted": new.started,
                        "healed": ready,
                    }

                return p.log.name, kill
            wait = STALE_AFTER + rng.uniform(2, 6)

            def pause() -> dict[str, Any]:
                self.fleet.pause(p, True)
                time.sleep(wait)
                self.fleet.pause(p, False)
                return {"target": p.log.name, "healed": time.time()}

            return p.log.name, pause
        if kind in ("restart_db", "failover"):
            if not self.free("db") or (kind == "failover" and not self.db.can_fail_over):
                return None

            def restart() -> dict[str, Any]:
                self.db.restart()
                return {"target": self.db.primary.host, "healed": time.time()}

            def failover() -> dict[str, Any]:
                old = self.db.primary.host
                self.db.fail_over()
                return {"target": old, "new": self.db.primary.host, "healed": time.time()}

            return "db", restart if kind == "restart_db" else failover
        if kind in ("cut_link", "netem"):
            hosts = [h for h in self.fleet.hosts if self.free(h.name)]
            if not hosts:
                return None
            h = rng.choice(hosts)
            if kind == "cut_link":
                wait = rng.uniform(3, 8)

                def cut() -> dict[str, Any]:
                    net.link(h, up=False)
                    time.sleep(wait)
                    net.link(h, up=True)
                    return {"target": h.name, "healed": time.time()}

                return h.name, cut
            wait = rng.uniform(5, 10)
            spec = f"delay {rng.choice([50, 100, 200])}ms 20ms loss {rng.choice([1, 5, 10])}%"

            def shape() -> dict[str, Any]:
                applied = net.netem(h, spec)
                time.sleep(wait)
                net.netem(h, None)
                return {"target": h.name, "spec": applied, "healed": time.time()}

            return h.name, shape
        if kind in ("pause_provider", "provider_429", "provider_500"):
            if not self.free("provider"):
                return None
            wait = rng.uniform(3, 8) if kind == "pause_provider" else rng.uniform(5, 10)
            mode = kind.removeprefix("provider_")

            def provider() -> dict[str, Any]:
                if kind == "pause_provider":
                    self.fake.pause(True)
                    time.sleep(wait)
                    self.fake.pause(False)
                else:
                    self.fake.modes(openai=mode, anthropic=mode)
                    time.sleep(wait)
                    self.fake.modes(openai="valid", anthropic="valid")
                return {"target": "fake", "healed": time.time()}

            return "provider", provider
        if kind == "disk_full":
            if not self.free("disk"):
                return None
            wait = rng.uniform(3, 6)

            def fill() -> dict[str, Any]:
                filler = self.storage / ".soak-filler"
                written = fill_disk(filler)
                try:
                    time.sleep(wait)
                finally:
                    filler.unlink(missing_ok=True)
                return {"target": "storage", "bytes": written, "healed": time.time()}

            return "disk", fill
        raise ValueError(f"unknown fault kind {kind!r}")

    def heal_all(self) -> None:
        """At the end: no fault may outlive the run (each heals by itself; this
        makes sure of the shared ones)."""
        for t in self.running:
            t.join(180)
        with contextlib.suppress(Exception):
            self.fake.modes(openai="valid", anthropic="valid")
        for h in self.fleet.hosts:
            net.link(h, up=True)
            net.netem(h, None)


def fill_disk(path: Path) -> int:
    """Write zeros to `path` until the file system is full; the bytes written."""
    written = 0
    chunk = b"\0" * (1 << 20)
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                written += f.write(chunk) or 0
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return written


def read_faults(folder: Path) -> list[dict[str, Any]]:
    with open(folder / "faults.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]
