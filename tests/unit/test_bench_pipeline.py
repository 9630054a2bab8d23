"""The full pipeline's figures (bench/pipeline.py): what the worker's log says, and
the worst round against the targets."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bench import pipeline

LOG = """\
12:00:00.001 INFO    worker started {'action': 'worker_started'}
12:00:01.002 WARNING catalog: database busy: the save got no answer in 4 s {'action': 'x'}
12:00:01.003 WARNING catalog: database busy: the save got no answer in 4 s {'action': 'x'}
12:00:02.004 ERROR   completion lost {'action': 'completion_lost'}
a traceback line that mentions WARNING in passing
pipeline-stats {"claims": 200, "saves": 0, "lookups": 300, "renders": 10}
"""


def test_log_findings_counts_warning_and_error_lines_and_reads_the_worker_counts() -> None:
    found = pipeline.log_findings(LOG)
    assert found["log_warnings"] == 2 and found["log_errors"] == 1
    assert found["log_examples"] == [
        "catalog: database busy: the save got no answer in 4 s",
        "completion lost",
    ]
    assert found["lookups_per_job"] == 300 and found["claims_per_job"] == 200


def _round(**over: Any) -> dict[str, Any]:
    base = {
        "jobs_per_s": 300.0,
        "jobs_per_s_to_done": 290.0,
        "jobs": 1000,
        "commits_per_job": 0.9,
        "catalog_lag_max_s": 1.0,
        "catalog_lag_p50_s": 0.2,
        "catalog_lag_p99_s": 0.8,
        "catalog_batch_seconds": 5.0,
        "catalog_listed_before_stop": 1000,
        "catalog_renders_seen": 20,
        "log_warnings": 0,
        "log_errors": 0,
        "log_examples": [],
    }
    return base | over


def test_summary_holds_every_round_to_the_targets_by_its_worst() -> None:
    rounds = [_round(), _round(commits_per_job=1.3, log_warnings=2), _round(catalog_lag_max_s=6)]
    noop = {"jobs_per_s": 6000.0, "range": {"jobs_per_s": [5000.0, 7000.0]}}
    out = pipeline.summarize(rounds, noop)
    t = out["targets"]
    assert out["commits_per_job"] == 1.3 and not t["commits_per_job"]["met"]
    assert out["log_warnings"] == 2 and not t["log_warnings"]["met"]
    assert out["catalog_lag_max_s"] == 6 and not t["catalog_lag_max_s"]["met"]
    assert t["catalog_listed_before_stop"]["met"]
    assert out["jobs_per_s"] == 300.0 and out["noop_jobs_per_s"] == 6000.0
    table = pipeline.table(out)
    assert "| no-op handler, same worker: jobs/s | 6000" in table


def test_the_catalog_watch_notes_when_each_job_was_first_listed(tmp_path: Path) -> None:
    watch = pipeline.CatalogWatch(tmp_path)
    watch.look()  # no file yet
    path = tmp_path / "courses" / "catalog.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"courses": [{"jobId": "a"}]}))
    watch.look()
    first = watch.first_seen["a"]
    path.write_text(json.dumps({"courses": [{"jobId": "a"}, {"jobId": "b"}]}))
    os.utime(path, (first + 1, first + 1))
    watch.look()
    assert watch.first_seen == {"a": first, "b": first + 1} and watch.renders_seen == 2
