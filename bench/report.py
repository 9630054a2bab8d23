"""The results as a Markdown table (printed, and pasted in docs/benchmarks.md) and
as a PNG: latency distributions (all rounds' samples) and throughputs (median
bars, range whiskers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ORDER = ("ai-jobs", "ai-jobs-full", "pgqueuer", "procrastinate", "floor")
LABELS = {
    "ai_jobs": "ai-jobs",
    "ai_jobs_full": "ai-jobs-full",
    "pgqueuer_sys": "pgqueuer",
    "procrastinate_sys": "procrastinate",
    "floor": "floor",
}


def _rng(entry: dict[str, Any], key: str, fmt: str) -> str:
    lo, hi = entry["range"][key]
    return f"{entry[key]:{fmt}} ({lo:{fmt}} to {hi:{fmt}})"


def table(res: dict[str, Any]) -> str:
    lat, thr, multi = res["latency"], res["throughput"], res["throughput_4_workers"]
    lines = [
        "| system | latency p50 ms | p95 ms | p99 ms | max ms | jobs/s, 1 worker | "
        "jobs/s, 4 workers |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ORDER:
        if name not in lat and name not in thr:
            continue
        row = [name]
        for key in ("p50_ms", "p95_ms", "p99_ms", "max_ms"):
            row.append(_rng(lat[name], key, ".2f") if name in lat else "-")
        row.append(_rng(thr[name], "jobs_per_s", ".0f") if name in thr else "-")
        row.append(_rng(multi[name], "jobs_per_s", ".0f") if name in multi else "-")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("| target | value | wanted | met |")
    lines.append("|---|---|---|---|")
    for name, t in res["targets"].items():
        lines.append(
            f"| {name} | {t['value']:.3g} | {t['target']} | {'yes' if t['met'] else 'no'} |"
        )
    lines.append("")
    lines.append("| finished rows | claim p50 ms | claim p95 ms |")
    lines.append("|---|---|---|")
    for n, c in res["claim_cost_by_finished_rows"].items():
        lines.append(f"| {int(n):,} | {_rng(c, 'p50_ms', '.3f')} | {_rng(c, 'p95_ms', '.3f')} |")
    if "pipeline" in res:
        from bench.pipeline import table as pipeline_table

        lines.append("")
        lines.append(pipeline_table(res["pipeline"]))
    if "console_cost_by_finished_rows" in res:
        from bench.console import table as console_table

        lines.append("")
        lines.append(console_table(res["console_cost_by_finished_rows"]))
    return "\n".join(lines)


def plot(res: dict[str, Any], samples: dict[str, list[float]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for key, ms in samples.items():
        if not ms:
            continue
        xs = sorted(ms)
        ys = [100 * (i + 1) / len(xs) for i in range(len(xs))]
        ax1.plot(xs, ys, label=LABELS.get(key, key))
    ax1.set_xscale("symlog", linthresh=1.0)
    ax1.set_xlabel("enqueue commit → handler start (ms, symlog)")
    ax1.set_ylabel("percent of jobs")
    ax1.set_title(
        f"Latency, paced single inserts (all rounds, {res['config']['latency_jobs']}/round)"
    )
    ax1.grid(True, alpha=0.3)
    ax1.legend()

    names = [n for n in ORDER if n in res["throughput"]]
    med = [res["throughput"][n]["jobs_per_s"] for n in names]
    lo = [
        m - res["throughput"][n]["range"]["jobs_per_s"][0] for n, m in zip(names, med, strict=True)
    ]
    hi = [
        res["throughput"][n]["range"]["jobs_per_s"][1] - m for n, m in zip(names, med, strict=True)
    ]
    x = range(len(names))
    ax2.bar([i - 0.2 for i in x], med, 0.4, yerr=[lo, hi], capsize=4, label="1 worker process")
    mnames = [n for n in names if n in res["throughput_4_workers"]]
    if mnames:
        mx = [names.index(n) + 0.2 for n in mnames]
        mm = [res["throughput_4_workers"][n]["jobs_per_s"] for n in mnames]
        mlo = [
            m - res["throughput_4_workers"][n]["range"]["jobs_per_s"][0]
            for n, m in zip(mnames, mm, strict=True)
        ]
        mhi = [
            res["throughput_4_workers"][n]["range"]["jobs_per_s"][1] - m
            for n, m in zip(mnames, mm, strict=True)
        ]
        ax2.bar(mx, mm, 0.4, yerr=[mlo, mhi], capsize=4, label="4 worker processes")
    ax2.set_xticks(list(x), names, rotation=15)
    ax2.set_ylabel("jobs/s (median, whiskers: range)")
    cfg = res["config"]
    ax2.set_title(
        f"Throughput, draining {cfg['throughput_jobs']:,} queued no-op jobs "
        f"(full pipeline: {cfg['full_pipeline_jobs']:,})"
    )
    ax2.grid(True, axis="y", alpha=0.3)
    ax2.legend()
    fig.suptitle(f"{res['mode']} run, {res['config']['rounds']} rounds, {res['generated_at']}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
