"""The figures of one configuration's run, at real scale (a quota minute is a
minute; waits are multiplied back by the time scale)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from bench import stats
from bench.ai import load as L
from bench.ai.run import Outcome, pgqueuer_limit


def percentile(xs: list[float], q: float) -> float | None:
    """bench.stats' percentile (q in 0..1), None for no values."""
    return stats.percentile(xs, 100 * q) if xs else None


def jain(xs: list[float]) -> float | None:
    if not xs or not any(xs):
        return None
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs))


def max_min_shares(demands: dict[str, float], total: float) -> dict[str, float]:
    """Water-filling: `total` split over users so that none gets more than it
    asked for and the rest is split equally (max-min fairness)."""
    share: dict[str, float] = {}
    left = dict(demands)
    remaining = total
    while left:
        equal = remaining / len(left)
        small = {u: d for u, d in left.items() if d <= equal}
        if not small:
            for u in left:
                share[u] = equal
            break
        for u, d in small.items():
            share[u] = d
            remaining -= d
            del left[u]
    return share


def compute(o: Outcome, load: L.Load, heavy: str) -> dict[str, Any]:
    s = load.scale
    window = load.window
    t_s = o.t0 + load.steady_from * window
    t_end = o.t_end
    done = [j for j in o.jobs if j.status == "done" and j.completed and j.completed <= t_end]
    steady = [j for j in done if j.completed >= t_s]
    steady_min = (t_end - t_s) / window
    whole_min = (t_end - o.t0) / window
    # `limits` is PROVIDER_LIMITS' share for ai-jobs, and for pgqueuer the share of
    # the quota's calls in flight its concurrency_limit is set to: the quota, and
    # so the optimum, is the provider's own there.
    pgq = o.config.system == "pgqueuer"
    limits = 1.0 if pgq else (o.config.limits or 1.0)
    slots = pgqueuer_limit(load, o.config.limits or 1.0, o.config.slots) if pgq else None
    # The prompt as the provider counted it (each checkout's own prompt): with
    # max_tokens, what one call draws from TPM.
    prompts = [j.in_tokens for j in done if j.in_tokens]
    prompt = sum(prompts) / len(prompts) if prompts else float(L.PROMPT_TOKENS)
    optimum = load.steady_optimum(prompt=prompt)
    if limits != 1.0:  # PROVIDER_LIMITS below the provider's: its own optimum
        optimum = min(
            optimum,
            load.optimum_per_min(tpm=load.tpm * limits, rpm=load.rpm * limits, prompt=prompt),
        )
    jobs_min = len(steady) / steady_min
    tokens_min = sum(j.out_tokens for j in steady) / steady_min

    # Waits: until the claim of the attempt that ran (a job not started by the end
    # counts the time it has waited so far: a lower bound).
    waits: dict[str, list[float]] = defaultdict(list)
    censored: dict[str, int] = defaultdict(int)
    for j in o.jobs:
        if j.created > t_end:
            continue
        if j.started is not None and j.started <= t_end:
            w = max(0.0, j.started - j.created)
        else:
            w = t_end - j.created
            censored["heavy" if j.user == heavy else "light"] += 1
        waits["heavy" if j.user == heavy else "light"].append(w * s)

    # Jain's index over users of (jobs done / max-min fair share of the jobs done),
    # demand being the jobs a user asked for early enough to be done by the end.
    cutoff = t_end - load.mean_call / s
    demand: dict[str, float] = defaultdict(float)
    got: dict[str, float] = defaultdict(float)
    for j in o.jobs:
        if j.created <= cutoff:
            demand[j.user] += 1
    for j in done:
        got[j.user] += 1
    shares = max_min_shares(demand, float(len(done)))
    ratios = [min(1.0, got[u] / shares[u]) if shares[u] > 0 else 1.0 for u in demand]

    calls = int(o.fake.get("requests", {}).get("openai", 0))
    limited = int(o.fake.get("rate_limited", {}).get("openai", 0))
    flights = [n for t, n in o.in_flight if t >= t_s] or [n for _, n in o.in_flight] or [0]
    mean_flight = sum(flights) / len(flights)
    wall = t_end - o.t0
    cores = o.cpu_s / wall if wall > 0 else 0.0
    finished = len([j for j in o.jobs if j.status in ("done", "dead_letter")])
    txns = o.commits + o.rollbacks - o.bench_txns

    def r(x: float | None, d: int = 1) -> float | None:
        return None if x is None else round(x, d)

    return {
        "config": o.config.name,
        "system": o.config.system,
        "workers": o.config.workers,
        "provider_limits": None if pgq else (o.config.limits or None),
        "pgqueuer_calls_share": (o.config.limits or 1.0) if pgq else None,
        "pgqueuer_concurrency_limit": slots,
        "scenario": o.config.scenario,
        "max_running_per_user": o.user_cap,
        "prompt_tokens": r(prompt),
        "optimum_jobs_per_min": r(optimum),
        "jobs_per_min": r(jobs_min),
        "tokens_per_min": round(tokens_min),
        "optimum_tokens_per_min": round(optimum * load.mean_answer),
        "goodput_vs_optimum": r(jobs_min / optimum, 3),
        "jobs_per_min_whole_run": r(len(done) / whole_min),
        "jobs_done": len(done),
        "calls": calls,
        "http_429": limited,
        "http_429_per_1000_calls": r(1000 * limited / calls if calls else 0.0),
        "dead_letters": len([j for j in o.jobs if j.status == "dead_letter"]),
        "failed_attempts": sum(j.failed_attempts for j in o.jobs),
        "wait_p50_s": {k: r(percentile(v, 0.5)) for k, v in sorted(waits.items())},
        "wait_p95_s": {k: r(percentile(v, 0.95)) for k, v in sorted(waits.items())},
        "waits_censored": dict(censored),
        "jain": r(jain(ratios), 3),
        "in_flight_mean": r(mean_flight),
        "worker_rss_mb_max": r(o.rss_mb),
        "worker_cpu_cores": r(cores, 3),
        "cpu_ms_per_s_per_in_flight_call": r(1000 * cores / mean_flight if mean_flight else None),
        "cpu_ms_per_job": r(1000 * o.cpu_s / finished if finished else None),
        "transactions_per_job": r(txns / finished if finished else None, 1),
        "steady_minutes": r(steady_min, 2),
        "done_times": [round((j.completed - o.t0) / window, 3) for j in done if j.completed],
        "done_tokens": [j.out_tokens for j in done],
        "done_light": [j.user != heavy for j in done],
    }
