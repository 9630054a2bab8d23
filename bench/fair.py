"""`python -m bench.fair [--jobs N] [--batch N] [--rounds N]`: the cost of fair
claims (sql/025) in the server's CPU. One connection drains N queued no-op
course jobs through complete_and_claim (batches of --batch, each claim carrying
the previous batch's completions, as a busy worker does) and reads its backend's
CPU time; the jobs belong to no user (the plain claim), to one user, to 10 or
100 users, or to 10 users with max_running_per_user = 5. Rounds rotate the
cases; medians and ranges in microseconds of server CPU per job."""

from __future__ import annotations

import sys

from bench import venv

if __name__ == "__main__":
    venv.ensure(sys.argv[1:], module="bench.fair")

import argparse
import asyncio
import time
import uuid
from typing import Any

import psycopg

from bench import pgserver, stats
from bench.proc import cpu_seconds
from bench.queries import sql
from bench.systems import ai_jobs

# case: (users, cap); users 0: a null created_by
CASES = {
    "no user": (0, None),
    "1 user": (1, None),
    "10 users": (10, None),
    "100 users": (100, None),
    "10 users, cap 5": (10, 5),
}


def drain(url: str, jobs: int, batch: int, users: int, cap: int | None) -> tuple[float, float]:
    """Server CPU µs per job and wall µs per job for one drain."""
    with psycopg.connect(url, autocommit=True) as c:
        who = [str(uuid.uuid4()) for _ in range(users)] or [None]
        c.execute(sql("fair_settings"), {"cap": cap})
        c.execute(sql("fair_enqueue"), {"n": jobs, "users": who})
        c.execute(sql("fair_vacuum"))
        pid = c.execute(sql("fair_backend")).fetchone()[0]  # type: ignore[index]
        held: list[tuple[Any, Any]] = []
        cpu0, t0 = cpu_seconds(pid), time.perf_counter()
        claimed = 0
        while True:
            rows = c.execute(
                sql("fair_complete_and_claim"),
                {
                    "n": batch,
                    "ids": [h[0] for h in held],
                    "tokens": [h[1] for h in held],
                    "paths": ["x"] * len(held),
                    "metrics": [None] * len(held),
                },
            ).fetchall()
            held = [(r[1], r[2]) for r in rows if r[0] == "claimed"]
            claimed += len(held)
            if not held:
                break
        wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
        assert claimed == jobs, (claimed, jobs)
        return 1e6 * cpu / jobs, 1e6 * wall / jobs


async def run(jobs: int, batch: int, rounds: int) -> dict[str, list[tuple[float, float]]]:
    found: dict[str, list[tuple[float, float]]] = {name: [] for name in CASES}
    names = list(CASES)
    with pgserver.server() as srv:
        for r in range(rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                db = f"bench_fair_{r}_{names.index(name)}"
                url = srv.create_database(db)
                try:
                    await ai_jobs.prepare(url)
                    cpu, wall = drain(url, jobs, batch, *CASES[name])
                finally:
                    srv.drop_database(db)
                found[name].append((cpu, wall))
                line = f"server CPU {cpu:6.1f} µs/job  wall {wall:6.1f} µs/job"
                print(f"round {r + 1} {name:16} {line}", flush=True)
    return found


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fair", description=__doc__)
    p.add_argument("--jobs", type=int, default=10000, help="jobs per drain (10000)")
    p.add_argument("--batch", type=int, default=10, help="jobs per claim (10)")
    p.add_argument("--rounds", type=int, default=3, help="rounds (3)")
    opts = p.parse_args(argv)
    found = asyncio.run(run(opts.jobs, opts.batch, opts.rounds))
    print("\n| jobs of | server CPU µs/job, median (range) | wall µs/job, median (range) |")
    print("|---|---|---|")
    for name, figures in found.items():
        cells = []
        for i in range(2):
            xs = [f[i] for f in figures]
            cells.append(f"{stats.median(xs):.1f} ({min(xs):.1f} to {max(xs):.1f})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
