"""docs/bench-ai.png: jobs done per quota minute over the run for each
configuration against the quota's optimum (left), 429s per 1,000 calls and the
light users' p95 wait (right). Drawn with matplotlib in bench/.venv; again from
a run's JSON with `python -m bench.ai.plot bench/results/ai-latest.json out.png`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

STYLE = {"ai-jobs": "tab:green", "base": "tab:gray", "pgqueuer": "tab:blue"}


def _rate(
    times: list[float], end: float, step: float = 0.25, span: float = 1.0
) -> tuple[list[float], list[float]]:
    """Jobs done per quota minute, a rolling mean over `span` minutes."""
    xs, ys = [], []
    t = span
    while t <= end + 1e-9:
        xs.append(t)
        ys.append(sum(1 for x in times if t - span < x <= t) / span)
        t += step
    return xs, ys


def draw(result: dict[str, Any], out: Path) -> None:
    rows = [r for r in result["configs"] if not r.get("scenario")]
    if any(r.get("scenario") for r in result["configs"]):
        draw_conditions(result, out.with_name(out.stem + "-conditions" + out.suffix))
    if not rows:
        return
    load = result["load"]
    end = load["quota_minutes"]
    fig, (ax, cx, bx) = plt.subplots(
        1, 3, figsize=(13, 4.4), dpi=110, gridspec_kw={"width_ratios": [2.2, 1, 1]}
    )
    for r in rows:
        xs, ys = _rate(r["done_times"], end)
        dashed = r["workers"] == 1
        ax.plot(
            xs,
            ys,
            color=STYLE.get(r["system"], "black"),
            ls="--" if dashed else "-",
            lw=1.0 if r["provider_limits"] or (r.get("pgqueuer_calls_share") or 1) != 1 else 1.6,
            alpha=0.6 if r["provider_limits"] or (r.get("pgqueuer_calls_share") or 1) != 1 else 1.0,
            label=r["config"],
        )
    ax.axhline(load["optimum_jobs_per_min"], color="tab:red", lw=0.8, ls=":", label="optimum")
    ax.set_xlabel("quota minutes")
    ax.set_ylabel("jobs done per minute (1-min rolling)")
    ax.set_title(
        f"{load['rpm']} rpm / {load['tpm']:,} tpm, {load['answer_tokens'][0]}-"
        f"{load['answer_tokens'][1]}-token answers at {load['tokens_per_s']:g} tokens/s",
        fontsize=9,
    )
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=6.5, loc="lower right", ncol=2, framealpha=0.8)
    names = [r["config"].replace(", ", "\n", 1) for r in rows]
    colors = [STYLE.get(r["system"], "black") for r in rows]
    per = [r["http_429_per_1000_calls"] for r in rows]
    cx.barh(names, per, color=colors)
    for y, v in enumerate(per):
        cx.text(v, y, f" {v:g}", va="center", fontsize=6.5)
    cx.set_xlabel("429s per 1,000 calls")
    cx.set_xlim(0, 1100)
    cx.tick_params(axis="y", labelsize=6.5)
    cx.invert_yaxis()
    p95 = [r["wait_p95_s"].get("light") or 0.0 for r in rows]
    bx.barh(names, p95, color=colors)
    bx.axvline(load["mean_call_s"], color="tab:red", lw=0.8, ls=":", label="one slot's time")
    bx.set_xlabel("light users' p95 wait, s")
    bx.set_yticks([])
    bx.invert_yaxis()
    bx.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def draw_conditions(result: dict[str, Any], out: Path) -> None:
    """One panel per condition (bench/ai/load.py's SCENARIOS): jobs done per quota
    minute of ai-jobs and pgqueuer against the optimum as it stands at each moment,
    with each one's 429s in its label."""
    rows = [r for r in result["configs"] if r.get("scenario")]
    load = result["load"]
    end = load["quota_minutes"]
    names = list(dict.fromkeys(r["scenario"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), dpi=110, squeeze=False)
    for ax, sc in zip(axes[0], names, strict=True):
        info = load["scenarios"][sc]
        base = load["optimum_jobs_per_min"] * (1 - info.get("foreign", 0.0))
        at, by = info.get("raise_at", 0.0), info.get("raise_by", 1.0)  # as the run ran it
        if at:
            ax.plot([0, at, at, end], [base, base, base * by, base * by], color="tab:red",
                    lw=0.8, ls=":", label="optimum")  # fmt: skip
        else:
            ax.axhline(base, color="tab:red", lw=0.8, ls=":", label="optimum")
        for r in rows:
            if r["scenario"] != sc:
                continue
            xs, ys = _rate(r["done_times"], end)
            label = (
                f"{r['config'].split(',')[0]}: {r['jobs_per_min']:g} jobs/min, "
                f"{r['http_429_per_1000_calls']:g} 429s per 1,000 calls"
            )
            ax.plot(xs, ys, color=STYLE.get(r["system"], "black"), lw=1.6, label=label)
        ax.set_title(info["what"], fontsize=9)
        ax.set_xlabel("quota minutes")
        ax.set_ylabel("jobs done per minute (1-min rolling)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7, loc="lower right", framealpha=0.8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


if __name__ == "__main__":
    draw(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
