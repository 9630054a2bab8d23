"""`python -m bench.ab OTHER [--jobs N] [--rounds N] [--drain N]`: enqueue-commit
-> handler start of this checkout's worker against the worker of another
checkout (a git worktree of an earlier commit: `git worktree add ../base
<commit>`), interleaved round by round on one server, with the floor in the same
rounds; with `--drain N`, the jobs/s of one worker process draining N no-op jobs
instead. A change on
the latency path is smaller than the difference between two runs of the whole
bench; measured this way, both workers meet the same machine state.

Both workers run on this checkout's schema (the bench migrates each database
from its own process); each worker process starts in its own checkout
(bench.proc starts `python -m bench.child` from ROOT), so OTHER's `listener`
package is the one measured there."""

from __future__ import annotations

import sys

from bench import venv

if __name__ == "__main__":
    venv.ensure(sys.argv[1:], module="bench.ab")

# After the switch into the bench's environment:
import argparse
import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench import pgserver, proc, scenarios, stats

HERE = proc.ROOT


# One measure of one system in one round: its figures, and a line for the log.
Measure = Callable[[pgserver.Server, str, str], Awaitable[tuple[list[float], str]]]


async def interleave(other: Path, rounds: int, measure: Measure) -> dict[str, list[list[float]]]:
    """`measure` for the other checkout's worker, this one's and the floor, in a
    rotating order round by round on one server: their figures, by system."""
    systems = [("other", "ai_jobs", other), ("this", "ai_jobs", HERE), ("this", "floor", HERE)]
    found: dict[str, list[list[float]]] = {f"{w} {s}": [] for w, s, _ in systems}
    with pgserver.server() as srv:
        for r in range(rounds):
            k = r % len(systems)
            for which, name, root in systems[k:] + systems[:k]:
                proc.ROOT = root
                figures, line = await measure(srv, name, f"ab{r}_{which}_{name}")
                found[f"{which} {name}"].append(figures)
                print(f"round {r + 1} {which:5} {name:8} {line}", flush=True)
    proc.ROOT = HERE
    return found


def latency(jobs: int) -> Measure:
    async def measure(srv: pgserver.Server, name: str, tag: str) -> tuple[list[float], str]:
        res = await scenarios.latency(srv, name, tag, jobs, 0.02)
        p50, p99 = res["p50_ms"], res["p99_ms"]
        return [p50, p99], f"p50 {p50:.3f} ms  p99 {p99:.3f} ms"

    return measure


def drain(jobs: int) -> Measure:
    """jobs/s, and the CPU seconds per 1,000 jobs of the server and of the worker
    (steadier than jobs/s on a machine shared with other work)."""

    async def measure(srv: pgserver.Server, name: str, tag: str) -> tuple[list[float], str]:
        res = await scenarios.throughput(srv, name, f"d{tag}", jobs)
        rate = float(res["jobs_per_s"])
        server, worker = float(res["server_cpu_s_per_1k"]), float(res["worker_cpu_s_per_1k"])
        return [rate, server, worker], (
            f"{rate:.0f} jobs/s  server {server:.3f} s  worker {worker:.3f} s per 1k jobs"
        )

    return measure


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.ab",
        description="Handler-start latency of this checkout's worker against another's, "
        "interleaved round by round, with the floor in the same rounds.",
    )
    p.add_argument("other", type=Path, help="the other checkout's root (relative to this one's)")
    p.add_argument("--jobs", type=int, default=300, help="paced jobs per round (300)")
    p.add_argument("--rounds", type=int, default=4, help="rounds (4)")
    p.add_argument("--drain", type=int, metavar="N", help="jobs/s draining N no-op jobs instead")
    opts = p.parse_args(argv)
    if not (opts.other / "listener" / "worker.py").is_file():
        p.error(f"{opts.other} is not a checkout of this project")
    if opts.drain:
        found = asyncio.run(interleave(opts.other.resolve(), opts.rounds, drain(opts.drain)))
        columns = ["jobs/s", "server CPU s/1k jobs", "worker CPU s/1k jobs"]
    else:
        found = asyncio.run(interleave(opts.other.resolve(), opts.rounds, latency(opts.jobs)))
        columns = ["p50 ms", "p99 ms"]
    print("\n| worker | " + " | ".join(f"{c}, median of rounds (range)" for c in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, rounds in found.items():
        cells = []
        for i in range(len(columns)):
            d = (0 if i == 0 else 3) if opts.drain else 2  # decimals
            xs = [figures[i] for figures in rounds]
            cells.append(f"{stats.median(xs):.{d}f} ({min(xs):.{d}f} to {max(xs):.{d}f})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
