"""Draw the soak's throughput over time with its fault windows (run in
bench/.venv, where matplotlib is): `python -m bench.soak.plot data.json out.png`."""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLORS = {
    "kill_worker": "tab:red",
    "pause_worker": "tab:orange",
    "restart_db": "tab:purple",
    "failover": "black",
    "cut_link": "tab:brown",
    "netem": "tab:pink",
    "pause_provider": "tab:olive",
    "provider_429": "tab:cyan",
    "provider_500": "tab:blue",
    "disk_full": "tab:gray",
}


def main(src: str, out: str) -> None:
    with open(src) as f:
        d = json.load(f)
    t0 = d["buckets"][0][0] if d["buckets"] else 0.0
    xs = [(t - t0) / 60 for t, _ in d["buckets"]]
    ys = [n * d["per_min"] for _, n in d["buckets"]]
    fig, ax = plt.subplots(figsize=(11, 3.6), dpi=110)
    seen = set()
    for start, end, kind in d["windows"]:
        label = kind if kind not in seen else None
        seen.add(kind)
        ax.axvspan(
            (start - t0) / 60,
            max(end, start + 1) / 60 - t0 / 60,
            color=COLORS.get(kind, "gray"),
            alpha=0.25,
            lw=0,
            label=label,
        )
    ax.plot(xs, ys, color="tab:green", lw=0.6, alpha=0.35)
    k = 6  # a rolling mean over 30 s of 5-s points
    smooth = [
        sum(ys[max(0, i - k + 1) : i + 1]) / len(ys[max(0, i - k + 1) : i + 1])
        for i in range(len(ys))
    ]
    ax.plot(xs, smooth, color="tab:green", lw=1.4, label="jobs done / min (30 s mean)")
    ax.set_xlabel("minutes")
    ax.set_ylabel("jobs completed per minute")
    ax.set_title(d["title"])
    ax.legend(loc="upper left", fontsize=7, ncol=6, framealpha=0.8)
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
