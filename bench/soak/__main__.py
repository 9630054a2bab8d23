"""`make soak` (python -m bench.soak): the chaos soak. Needs root: it makes network
namespaces, a bridge, tc qdiscs and a tmpfs, and removes them afterwards (and,
at start, whatever a run that crashed left behind).

    make soak                          # 30 minutes, seed 1
    make soak ARGS="--minutes 5"       # a short one
    make soak ARGS="--calm --minutes 10"   # no faults: the baseline throughput
    make soak ARGS="--baseline /tmp/ai-jobs-soak/<calm run>/summary.json"

Exit status 0 when the checker found no violation, 1 otherwise, 2 on bad usage
(or without root)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

STATE = Path("/tmp/ai-jobs-soak")
LEFTOVERS = STATE / "leftovers.json"


def parse(argv: list[str] | None) -> argparse.Namespace:
    from bench.soak.chaos import KINDS

    p = argparse.ArgumentParser(prog="make soak ARGS=...", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=30.0, help="of steady load (default 30)")
    p.add_argument("--seed", type=int, default=1, help="the chaos and the load repeat with it")
    p.add_argument("--hosts", type=int, default=2, help="worker hosts (default 2)")
    p.add_argument("--workers-per-host", type=int, default=2)
    p.add_argument("--rate", type=float, default=1.5, help="jobs inserted a second")
    p.add_argument("--users", type=int, default=50)
    p.add_argument("--every", default="10-20", help="seconds between faults, LO-HI")
    p.add_argument("--kinds", default=",".join(KINDS), help="fault kinds, comma-separated")
    p.add_argument("--calm", action="store_true", help="no faults (a baseline run)")
    p.add_argument("--baseline", type=Path, help="a calm run's summary.json")
    p.add_argument("--drain", type=float, default=300.0, help="seconds to wait for the queue")
    p.add_argument("--storage-size", default="256m", help="the storage's tmpfs (a day: about 2g)")
    p.add_argument("--out", type=Path, help=f"the run's folder (default: under {STATE})")
    a = p.parse_args(argv)
    lo, _, hi = a.every.partition("-")
    a.every = (float(lo), float(hi or lo))
    a.kinds = tuple(k for k in a.kinds.split(",") if k)
    if unknown := set(a.kinds) - set(KINDS):
        p.error(f"unknown fault kinds: {', '.join(sorted(unknown))}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if os.geteuid() != 0:
        print(
            "soak: needs root (network namespaces, a bridge, tc netem, a tmpfs): "
            "run it as root, e.g. sudo make soak",
            file=sys.stderr,
        )
        return 2
    for tool in ("ip", "tc", "mount", "umount"):
        if shutil.which(tool) is None:
            print(f"soak: {tool} is missing (iproute2, mount)", file=sys.stderr)
            return 2
    clean_leftovers()
    folder = a.out or STATE / time.strftime("run-%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"soak: {folder}", flush=True)
    try:
        return run(a, folder)
    finally:
        clean_leftovers()


def remember(**items: Any) -> None:
    """What to remove if this process dies before its own clean-up."""
    STATE.mkdir(exist_ok=True)
    found = json.loads(LEFTOVERS.read_text()) if LEFTOVERS.exists() else {}
    for k, v in items.items():
        found.setdefault(k, []).append(v)
    LEFTOVERS.write_text(json.dumps(found))


def clean_leftovers() -> None:
    from bench.soak import net

    ended = net.cleanup()
    found = json.loads(LEFTOVERS.read_text()) if LEFTOVERS.exists() else {}
    for pid in found.get("pids", []):
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"tests.fakeai" in cmd or b"bench.soak.wire" in cmd:  # ours, not a reused pid
                os.kill(pid, signal.SIGKILL)
                ended.append(pid)
    for mount in found.get("mounts", []):
        subprocess.run(["umount", "-l", mount], capture_output=True, check=False)
    for folder in found.get("dirs", []):
        shutil.rmtree(folder, ignore_errors=True)
    LEFTOVERS.unlink(missing_ok=True)
    if ended:
        print(f"soak: ended {len(ended)} process(es) left by an earlier run", flush=True)


def run(a: argparse.Namespace, folder: Path) -> int:
    import psycopg
    from psycopg.rows import dict_row

    from bench.soak import check, net, report
    from bench.soak.chaos import Chaos, read_faults
    from bench.soak.cluster import SWEEP_INTERVAL, Database, Fake, Fleet, Inserter, worker_env

    load_before = os.getloadavg()[0]
    workers = [net.Host(f"h{i + 1}", f"{net.SUBNET}.{11 + i}") for i in range(a.hosts)]
    pg = (net.Host("pg1", f"{net.SUBNET}.21"), net.Host("pg2", f"{net.SUBNET}.22"))
    if (wire := net.setup([*workers, *pg], shaped=tuple(workers), seed=a.seed)) is not None:
        remember(pids=wire)
    storage = folder / "storage"
    storage.mkdir(exist_ok=True)
    size = f"size={a.storage_size}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", size, "soak", str(storage)], check=True)
    remember(mounts=str(storage))
    db = Database(pg, folder)
    for d in db.dirs:
        remember(dirs=str(d))
    db.start()
    for d in db.dirs:
        remember(dirs=str(d))
    fake = Fake(folder, a.seed)
    remember(pids=fake.proc.pid)
    fleet = Fleet(folder, workers, a.workers_per_host, worker_env(db.url, fake, storage))
    inserter = Inserter(db.url, folder, a.rate, a.users, a.seed)
    chaos = Chaos(a.seed, folder, fleet, db, fake, storage, a.every, a.kinds)
    (folder / "faults.jsonl").touch()
    try:
        fleet.start_all()
        wait_started(fleet)
        started = time.time()
        inserter.start()
        if not a.calm:
            chaos.start()
        deadline = started + a.minutes * 60
        while time.time() < deadline:
            time.sleep(min(60.0, max(0.0, deadline - time.time())))
            progress(db.url, started, inserter, chaos)
        chaos.stop.set()
        if chaos.is_alive():
            chaos.join(300)
        chaos.heal_all()
        inserter.stop.set()
        inserter.join(30)
        inserts_stopped = time.time()
        drained_at = drain(db, a.drain)
        time.sleep(2 * SWEEP_INTERVAL)  # a recovery look at staged results after the last fault
        for d in db.dirs:
            remember(dirs=str(d))
        fleet.terminate_all()
        (folder / "fake-stats.json").write_text(json.dumps(fake.stats(), indent=1))
        with psycopg.connect(db.url, row_factory=dict_row) as c:
            jobs = check.jobs_from(c.execute(check.JOBS_SQL).fetchall())
        (folder / "jobs.json").write_text(
            json.dumps([vars(j) for j in jobs.values()], indent=0)
        )  # for another look at the run later
        run_ = check.load(folder, jobs, storage, drained_at)
        verdict = check.check(run_)
        summary = report.summarize(
            folder, jobs, read_faults(folder), verdict, started, inserts_stopped, run_.inserts
        )
        summary.info = {
            "title": f"{'calm' if a.calm else 'chaos'} soak, {a.minutes:g} min, seed {a.seed}",
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
            "seed": a.seed,
            "minutes": a.minutes,
            "every": "-" if a.calm else f"{a.every[0]:g}-{a.every[1]:g}",
            "layout": (
                f"{a.hosts} worker hosts x {a.workers_per_host} worker processes (concurrency 4), "
                f"a primary and a synchronous standby on two more hosts, {a.rate:g} jobs/s "
                f"from {a.users} users"
            ),
            "load_before": f"{load_before:.2f}",
            "load_after": f"{os.getloadavg()[0]:.2f}",
            "inserted": inserter.acked,
            "insert_errors": inserter.failed,
        }
        baseline = None
        if a.baseline:
            baseline = json.loads(a.baseline.read_text())["throughput_per_min"]
        path = report.write(summary, folder, baseline)
        print(path.read_text(), flush=True)
        return 1 if verdict.violations else 0
    finally:
        inserter.stop.set()
        chaos.stop.set()
        for p in fleet.live():
            with contextlib.suppress(ProcessLookupError):
                p.popen.kill()
        with contextlib.suppress(Exception):
            fake.stop()
        db.destroy()


def wait_started(fleet: Any, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    for p in fleet.live():
        while b'"worker_started"' not in p.log.read_bytes():
            if p.popen.poll() is not None or time.monotonic() > deadline:
                tail = p.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"worker {p.log.name} did not start:\n{tail}")
            time.sleep(0.2)


def progress(url: str, started: float, inserter: Any, chaos: Any) -> None:
    import psycopg

    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=3) as c:
            rows = c.execute(
                "select status, count(*) from (select status from ai_course_jobs"
                " union all select status from ai_media_jobs) j group by status order by status"
            ).fetchall()
        counts = ", ".join(f"{status} {n}" for status, n in rows)
    except psycopg.Error as exc:
        counts = f"(database: {type(exc).__name__})"
    minute = (time.time() - started) / 60
    print(
        f"soak: {minute:5.1f} min: inserted {inserter.acked}, {counts}; "
        f"faults {chaos.injected}; load {os.getloadavg()[0]:.2f}",
        flush=True,
    )


DUE = """
select count(*) as n from (
    select status, run_after from ai_course_jobs
    union all select status, run_after from ai_media_jobs) j
where status in ('processing', 'stale')
   or (status in ('pending', 'failed') and run_after <= now())
"""


def drain(db: Any, timeout: float) -> float:
    """Wait until no job is running or due (the rest wait for their run_after);
    the time it ended."""
    import psycopg

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(db.url, autocommit=True, connect_timeout=3) as c:
                row = c.execute(DUE).fetchone()
            if row is not None and row[0] == 0:
                break
        except psycopg.Error:
            pass
        time.sleep(1)
    return time.time()


if __name__ == "__main__":
    sys.exit(main())
