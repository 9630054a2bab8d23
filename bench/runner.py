"""`python -m bench [--quick]`: every measurement, systems interleaved round by
round (the order rotates each round), medians and ranges across rounds, written to
bench/results/latest.json and drawn in docs/benchmarks.png."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from bench import console, pgserver, pipeline, scenarios, stats
from bench.systems import LATENCY, MULTI, THROUGHPUT

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "latest.json"
RAW = ROOT / "bench" / "results" / "raw.json.tmp"
PLOT = ROOT / "docs" / "benchmarks.png"
PEERS = ("pgqueuer_sys", "procrastinate_sys")
FINISHED = (0, 100_000, 1_000_000)
T = TypeVar("T")


@dataclass(frozen=True)
class Config:
    rounds: int
    latency_jobs: int
    pace_ms: float
    throughput_jobs: int
    full_pipeline_jobs: int  # the real handler writes files: a smaller drain
    multi_workers: int
    claims: int
    profile: bool
    console_calls: int = 100  # timed calls of each console read, per size and round

    @classmethod
    def of(cls, quick: bool, rounds: int | None) -> Config:
        if quick:
            return cls(rounds or 3, 80, 20.0, 1_000, 1_000, 4, 300, True, 20)
        return cls(rounds or 3, 500, 20.0, 20_000, 5_000, 4, 2_000, True, 100)


def rotated(names: tuple[T, ...], k: int) -> list[T]:
    k %= len(names)
    return [*names[k:], *names[:k]]


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


async def run_all(srv: pgserver.Server, cfg: Config) -> dict[str, Any]:
    lat: dict[str, list[dict[str, Any]]] = {n: [] for n in LATENCY}
    thr: dict[str, list[dict[str, Any]]] = {n: [] for n in THROUGHPUT}
    multi: dict[str, list[dict[str, Any]]] = {n: [] for n in MULTI}
    claim: dict[int, list[dict[str, float]]] = {n: [] for n in FINISHED}
    samples: dict[str, list[float]] = {n: [] for n in LATENCY}
    for r in range(cfg.rounds):
        for name in rotated(LATENCY, r):
            res = await scenarios.latency(
                srv, name, f"lat_{name}_{r}", cfg.latency_jobs, cfg.pace_ms / 1000
            )
            samples[name] += res.pop("samples_ms")
            lat[name].append(res)
            say(
                f"round {r + 1} latency    {name:18} "
                f"p50 {res['p50_ms']:.2f} ms  p99 {res['p99_ms']:.2f} ms"
            )
    for r in range(cfg.rounds):
        for name in rotated(THROUGHPUT, r):
            if name == "ai_jobs_full":  # the same figures, and the pipeline's own
                res = await pipeline.drain(srv, f"thr_{name}_{r}", cfg.full_pipeline_jobs)
            else:
                res = await scenarios.throughput(srv, name, f"thr_{name}_{r}", cfg.throughput_jobs)
            thr[name].append(res)
            say(f"round {r + 1} throughput {name:18} {res['jobs_per_s']:.0f} jobs/s")
    for r in range(cfg.rounds):
        for name in rotated(MULTI, r):
            res = await scenarios.throughput(
                srv, name, f"mul_{name}_{r}", cfg.throughput_jobs, workers=cfg.multi_workers
            )
            multi[name].append(res)
            say(
                f"round {r + 1} {cfg.multi_workers} workers  {name:18} "
                f"{res['jobs_per_s']:.0f} jobs/s"
            )
    dbs = {}
    try:
        for n in FINISHED:
            dbs[n] = await scenarios.claim_db(srv, n)
            say(f"claim cost: {n} finished rows in place")
        per_round = max(50, cfg.claims // cfg.rounds)
        for r in range(cfg.rounds):
            for n in rotated(FINISHED, r):
                res = await scenarios.claim_cost(dbs[n][1], per_round)
                claim[n].append(res)
                say(f"round {r + 1} claim cost {n:>9} finished: p50 {res['p50_ms']:.3f} ms")
    finally:
        for dbname, _ in dbs.values():
            srv.drop_database(dbname)
    console_rounds = await console_cost(srv, cfg)
    profile: dict[str, Any] = {}
    if cfg.profile:
        path = RESULTS.parent / "profile-ai-jobs.json"
        res = await scenarios.throughput(
            srv, "ai_jobs", "profile", cfg.throughput_jobs, profile=path
        )
        profile = json.loads(path.read_text())
        text = profile.pop("text", "")
        (RESULTS.parent / "profile-ai-jobs.txt").write_text(text)
        path.unlink()
        profile["jobs_per_s_while_profiled"] = res["jobs_per_s"]
        say(f"profile: {res['jobs_per_s']:.0f} jobs/s under the profiler")
    return {
        "latency_rounds": lat,
        "latency_samples": samples,
        "throughput_rounds": thr,
        "multi_rounds": multi,
        "claim_rounds": {str(k): v for k, v in claim.items()},
        "console_rounds": console_rounds,
        "profile": profile,
    }


async def console_cost(srv: pgserver.Server, cfg: Config) -> dict[str, Any]:
    """The console's reads at each history size, sizes interleaved round by round."""
    rounds: dict[str, list[Any]] = {str(n): [] for n in FINISHED}
    dbs = {}
    try:
        for n in FINISHED:
            dbs[n] = await console.console_db(srv, n)
            say(f"console cost: {n} finished rows in place")
        for r in range(cfg.rounds):
            for n in rotated(FINISHED, r):
                res = await console.measure(dbs[n][1], cfg.console_calls)
                rounds[str(n)].append(res)
                worst = max(res[k]["p50_ms"] for k in console.FLAT)
                say(f"round {r + 1} console  {n:>9} finished: slowest flat read p50 {worst:.2f} ms")
    finally:
        for dbname, _ in dbs.values():
            srv.drop_database(dbname)
    return rounds


def label(name: str) -> str:
    return {
        "ai_jobs": "ai-jobs",
        "ai_jobs_full": "ai-jobs-full",
        "pgqueuer_sys": "pgqueuer",
        "procrastinate_sys": "procrastinate",
        "floor": "floor",
    }[name]


def summarize(raw: dict[str, Any], cfg: Config, env: dict[str, Any]) -> dict[str, Any]:
    latency = {label(n): stats.across_rounds(rs) for n, rs in raw["latency_rounds"].items()}
    for n, rs in raw["latency_rounds"].items():
        lagged = [r["started_at"] for r in rs if "started_at" in r]
        if lagged:
            latency[label(n)]["started_at"] = stats.across_rounds(lagged)
    throughput = {label(n): stats.across_rounds(rs) for n, rs in raw["throughput_rounds"].items()}
    multi = {label(n): stats.across_rounds(rs) for n, rs in raw["multi_rounds"].items()}
    claim = {k: stats.across_rounds(v) for k, v in raw["claim_rounds"].items()}
    peers = [label(p) for p in PEERS]
    best_p50 = min(float(latency[p]["p50_ms"]) for p in peers)  # type: ignore[arg-type]
    best_p99 = min(float(latency[p]["p99_ms"]) for p in peers)  # type: ignore[arg-type]
    best_thr = max(float(throughput[p]["jobs_per_s"]) for p in peers)  # type: ignore[arg-type]
    ours_lat, ours_thr = latency["ai-jobs"], throughput["ai-jobs"]
    c0 = float(claim["0"]["p50_ms"])  # type: ignore[arg-type]
    c1m = float(claim[str(FINISHED[-1])]["p50_ms"])  # type: ignore[arg-type]
    started = ours_lat.get("started_at", {})
    targets = {
        "latency_p50_vs_best_peer": _target(float(ours_lat["p50_ms"]) / best_p50, "<=", 0.5),  # type: ignore[arg-type]
        "latency_p99_vs_best_peer": _target(float(ours_lat["p99_ms"]) / best_p99, "<=", 0.5),  # type: ignore[arg-type]
        "throughput_vs_best_peer": _target(float(ours_thr["jobs_per_s"]) / best_thr, ">=", 2.0),  # type: ignore[arg-type]
        "latency_p50_vs_floor": _target(
            float(ours_lat["p50_ms"]) / float(latency["floor"]["p50_ms"]),  # type: ignore[arg-type]
            "<=",
            1.4,
        ),
        "latency_p99_vs_floor": _target(
            float(ours_lat["p99_ms"]) / float(latency["floor"]["p99_ms"]),  # type: ignore[arg-type]
            "<=",
            1.4,
        ),
        "started_at_p50_ms": _target(float(started.get("p50_ms", float("nan"))), "<=", 1.0),
        "started_at_p99_ms": _target(float(started.get("p99_ms", float("nan"))), "<=", 5.0),
        "throughput_jobs_per_s": _target(float(ours_thr["jobs_per_s"]), ">=", 5000.0),  # type: ignore[arg-type]
        "claim_1m_vs_0": _target(c1m / c0, "<=", 1.2),
    }
    floor_ratios = {
        "latency_p50": float(ours_lat["p50_ms"]) / float(latency["floor"]["p50_ms"]),  # type: ignore[arg-type]
        "latency_p99": float(ours_lat["p99_ms"]) / float(latency["floor"]["p99_ms"]),  # type: ignore[arg-type]
        "throughput": float(ours_thr["jobs_per_s"]) / float(throughput["floor"]["jobs_per_s"]),  # type: ignore[arg-type]
    }
    return {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "mode": "quick" if cfg.latency_jobs < 500 else "full",
        "config": asdict(cfg),
        "environment": env,
        "latency": latency,
        "throughput": throughput,
        "throughput_4_workers": multi,
        "claim_cost_by_finished_rows": claim,
        "console_cost_by_finished_rows": console.summarize(raw["console_rounds"]),
        "targets": targets,
        "ours_vs_floor": floor_ratios,
        "pipeline": pipeline.summarize(raw["throughput_rounds"]["ai_jobs_full"], ours_thr),
        "profile": raw["profile"],
    }


def _target(value: float, op: str, bound: float) -> dict[str, Any]:
    met = value <= bound if op == "<=" else value >= bound
    return {"value": value, "target": f"{op} {bound:g}", "met": bool(met)}


def environment(srv: pgserver.Server) -> dict[str, Any]:
    import importlib.metadata as md

    def v(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "?"

    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f.readline().split(":")[1].strip()
    except OSError:
        pass
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":")[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {
        "load_average_at_start": list(os.getloadavg()),
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory": mem,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "postgres": srv.describe(),
        "packages": {
            p: v(p)
            for p in ("ai-jobs", "pgqueuer", "procrastinate", "psycopg", "asyncpg", "uvloop")
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small sizes: a run under 3 minutes")
    p.add_argument("--rounds", type=int, default=None, help="rounds per measurement (min 3)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--pipeline-only",
        action="store_true",
        help="only the full pipeline beside the no-op drain (bench/results/pipeline-latest.json)",
    )
    p.add_argument(
        "--console-only",
        action="store_true",
        help="only the console cost part (bench/results/console-latest.json)",
    )
    args = p.parse_args(argv)
    if args.rounds is not None and args.rounds < 3:
        p.error("--rounds must be at least 3")
    cfg = Config.of(args.quick, args.rounds)
    if args.console_only:
        return console_only(cfg)
    if args.pipeline_only:
        return pipeline_only(cfg)
    # SIGTERM unwinds like Ctrl-C: worker processes killed, embedded server removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.monotonic()
    with pgserver.server() as srv:
        env = environment(srv)
        say(f"PostgreSQL {env['postgres']['version'].split(' on ')[0]} ({srv.kind}); {cfg}")
        raw = asyncio.run(run_all(srv, cfg))
    # The raw rounds first: a summary that fails still leaves the measurements.
    RAW.parent.mkdir(parents=True, exist_ok=True)
    RAW.write_text(json.dumps({"config": asdict(cfg), "environment": env, **raw}) + "\n")
    result = summarize(raw, cfg, env)
    result["duration_s"] = round(time.monotonic() - t0, 1)
    result["environment"]["load_average_at_end"] = list(os.getloadavg())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")
    if not args.no_plot:
        from bench.report import plot

        plot(result, raw["latency_samples"], PLOT)
    from bench.report import table

    print(table(result))
    say(f"done in {result['duration_s']} s: {RESULTS.relative_to(ROOT)}")
    return 0


def console_only(cfg: Config) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.monotonic()
    with pgserver.server() as srv:
        env = environment(srv)
        say(f"PostgreSQL {env['postgres']['version'].split(' on ')[0]} ({srv.kind}); {cfg}")
        rounds = asyncio.run(console_cost(srv, cfg))
    result: dict[str, Any] = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "mode": "quick" if cfg.latency_jobs < 500 else "full",
        "config": asdict(cfg),
        "environment": env | {"load_average_at_end": list(os.getloadavg())},
        "console_cost_by_finished_rows": console.summarize(rounds),
        "duration_s": round(time.monotonic() - t0, 1),
    }
    out = RESULTS.parent / "console-latest.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(console.table(result["console_cost_by_finished_rows"]))
    say(f"done in {result['duration_s']} s: {out.relative_to(ROOT)}")
    return 0


def pipeline_only(cfg: Config) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.monotonic()
    with pgserver.server() as srv:
        env = environment(srv)
        say(f"PostgreSQL {env['postgres']['version'].split(' on ')[0]} ({srv.kind}); {cfg}")
        raw = asyncio.run(
            pipeline.rounds(srv, cfg.full_pipeline_jobs, cfg.throughput_jobs, cfg.rounds, say)
        )
    noop = stats.across_rounds(raw["noop_rounds"]) if raw["noop_rounds"] else None
    result: dict[str, Any] = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "mode": "quick" if cfg.latency_jobs < 500 else "full",
        "config": asdict(cfg),
        "environment": env | {"load_average_at_end": list(os.getloadavg())},
        "pipeline": pipeline.summarize(raw["rounds"], noop),
        "pipeline_rounds": raw["rounds"],
        "duration_s": round(time.monotonic() - t0, 1),
    }
    out = RESULTS.parent / "pipeline-latest.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(pipeline.table(result["pipeline"]))
    say(f"done in {result['duration_s']} s: {out.relative_to(ROOT)}")
    return 0
