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
from pathlib import Path

from bench import pgserver, proc, scenarios, stats

HERE = proc.ROOT


async def drain(other: Path, jobs: int, rounds: int) -> dict[str, list[float]]:
    systems = [("other", "ai_jobs", other), ("this", "ai_jobs", HERE), ("this", "floor", HERE)]
    found: dict[str, list[float]] = {f"{w} {s}": [] for w, s, _ in systems}
    with pgserver.server() as srv:
        for r in range(rounds):
            k = r % len(systems)
            for which, name, root in systems[k:] + systems[:k]:
                proc.ROOT = root
                res = await scenarios.throughput(srv, name, f"abd{r}_{which}_{name}", jobs)
                found[f"{which} {name}"].append(float(res["jobs_per_s"]))
                rate = res["jobs_per_s"]
                print(f"round {r + 1} {which:5} {name:8} {rate:.0f} jobs/s", flush=True)
    proc.ROOT = HERE
    return found


async def run(other: Path, jobs: int, rounds: int) -> dict[str, list[tuple[float, float]]]:
    systems = [("other", "ai_jobs", other), ("this", "ai_jobs", HERE), ("this", "floor", HERE)]
    found: dict[str, list[tuple[float, float]]] = {f"{w} {s}": [] for w, s, _ in systems}
    with pgserver.server() as srv:
        for r in range(rounds):
            k = r % len(systems)
            for which, name, root in systems[k:] + systems[:k]:
                proc.ROOT = root
                res = await scenarios.latency(srv, name, f"ab{r}_{which}_{name}", jobs, 0.02)
                found[f"{which} {name}"].append((res["p50_ms"], res["p99_ms"]))
                print(f"round {r + 1} {which:5} {name:8} p50 {res['p50_ms']:.3f} ms"
                      f"  p99 {res['p99_ms']:.3f} ms", flush=True)  # fmt: skip
    proc.ROOT = HERE
    return found


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
        rates = asyncio.run(drain(opts.other.resolve(), opts.drain, opts.rounds))
        print("\n| worker | jobs/s, median of rounds (range) |")
        print("|---|---|")
        for name, rate in rates.items():
            print(f"| {name} | {stats.median(rate):.0f} ({min(rate):.0f} to {max(rate):.0f}) |")
        return 0
    found = asyncio.run(run(opts.other.resolve(), opts.jobs, opts.rounds))
    print("\n| worker | p50 ms, median of rounds (range) | p99 ms, median of rounds (range) |")
    print("|---|---|---|")
    for name, rs in found.items():
        p50, p99 = [a for a, _ in rs], [b for _, b in rs]
        print(
            f"| {name} | {stats.median(p50):.2f} ({min(p50):.2f} to {max(p50):.2f}) "
            f"| {stats.median(p99):.2f} ({min(p99):.2f} to {max(p99):.2f}) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
