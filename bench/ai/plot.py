"""docs/bench-ai.png: jobs done per quota minute over the run for each
configuration against the quota's optimum (left), and the light users' p95 wait
(right). Drawn with matplotlib in bench/.venv."""

from __future__ import annotations

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
    rows = result["configs"]
    load = result["load"]
    end = load["quota_minutes"]
    fig, (ax, bx) = plt.subplots(
        1, 2, figsize=(12, 4.2), dpi=110, gridspec_kw={"width_ratios": [2.2, 1]}
    )
    for r in rows:
        xs, ys = _rate(r["done_times"], end)
        dashed = r["workers"] == 1
        ax.plot(
            xs,
            ys,
            color=STYLE.get(r["system"], "black"),
            ls="--" if dashed else "-",
            lw=1.0 if r["provider_limits"] else 1.6,
            alpha=0.6 if r["provider_limits"] else 1.0,
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
    p95 = [r["wait_p95_s"].get("light") or 0.0 for r in rows]
    bx.barh(names, p95, color=[STYLE.get(r["system"], "black") for r in rows])
    bx.axvline(load["mean_call_s"], color="tab:red", lw=0.8, ls=":", label="one slot's time")
    bx.set_xscale("log")
    bx.set_xlabel("light users' p95 wait, s (log)")
    bx.tick_params(axis="y", labelsize=6.5)
    bx.invert_yaxis()
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
