"""Planted edits of the SQL, each run against the tests that should catch it.

mutmut mutates Python only; the state machine lives in SQL functions and the
statements of listener/queries. Each edit below is a bug we could plausibly
write (a guard dropped, a bound moved by one, a filter lost). For each one, the
repository's code is copied to a scratch folder, the edit applied to the copy,
and the chosen test files run there (their template database is migrated from
the copy's sql/). A run that fails kills the edit; one that passes means the
edit survived: no test tells the bug from the code.

    python -m tests.mutants.planted [NAME ...]     # all, or the named edits

Needs what the tests need (TEST_DATABASE_URL, or the embedded server). Prints
one line per edit and the survivors at the end; exits 0 whatever survived (a
report, not a gate), 1 when the unedited tests fail or an edit no longer
applies.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COPIED = ("listener", "sql", "triggers", "tests", "pyproject.toml")
TIMEOUT = 900  # seconds for one edit's tests


@dataclass(frozen=True)
class Edit:
    name: str
    path: str  # in the repository
    old: str
    new: str
    tests: tuple[str, ...]
    within: str = ""  # the edit applies to the first `old` after this text (a definition)
    means: str = ""  # the bug it plants

    def superseded(self, root: Path) -> str | None:
        """A later migration that defines the edited function again (the edit
        would change nothing the tests run), if any."""
        if not (self.path.startswith("sql/") and self.within.startswith("create or replace")):
            return None
        later = sorted(
            p for p in (root / "sql").glob("[0-9]*.sql") if p.name > Path(self.path).name
        )
        return next((p.name for p in later if self.within in p.read_text()), None)

    def apply(self, root: Path) -> None:
        target = root / self.path
        text = target.read_text()
        start = text.index(self.within) if self.within else 0
        at = text.find(self.old, start)
        if at < 0:
            raise LookupError(f"{self.name}: the text to edit is no longer in {self.path}")
        target.write_text(text[:at] + self.new + text[at + len(self.old) :])


SQL = "tests/integration/test_sql_functions.py"
PAUSED_COURSE = (
    "              and not exists (select from ai_job_queues q\n"
    "                              where q.job_table = 'ai_course_jobs' and q.paused)\n"
)

EDITS = (
    Edit(
        "cancel-stale-silent",
        "sql/021_admission_hardening.sql",
        "    if st in ('processing', 'stale') then",
        "    if st = 'processing' then",
        ("tests/integration/test_cancel_pause.py",),
        within="create or replace function ai_job_cancel(",
        means="cancelling a stale job tells no worker and records no attempt",
    ),
    Edit(
        "complete-and-claim-ignores-pause",
        "sql/020_lean_drain.sql",
        PAUSED_COURSE,
        "",
        (SQL,),
        within="create or replace function complete_and_claim(",
        means="the busy loop's completion-and-claim hands out jobs of a paused table",
    ),
    Edit(
        "claim-due-job-ignores-pause",
        "sql/020_lean_drain.sql",
        PAUSED_COURSE,
        "",
        (SQL, "tests/integration/test_fastpath.py"),
        within="create or replace function claim_due_job(",
        means="the fast path claims a notified job of a paused table",
    ),
    Edit(
        "claim-ignores-run-after",
        "sql/020_lean_drain.sql",
        "            where status in ('pending', 'failed') and run_after <= now()\n",
        "            where status in ('pending', 'failed')\n",
        (SQL,),
        within="create or replace function claim_jobs(",
        means="a claim takes a job whose retry backoff has not ended",
    ),
    Edit(
        "claim-ignores-max-retries",
        "sql/020_lean_drain.sql",
        "              and (status = 'pending' or retry_count < max_retries)\n",
        "",
        (SQL,),
        within="create or replace function claim_jobs(",
        means="a claim takes a failed job that has used all its attempts",
    ),
    Edit(
        "completion-ignores-token-place",
        "sql/020_lean_drain.sql",
        "          and job_ids[array_position(tokens, j.claim_token)] = j.id\n",
        "",
        (SQL,),
        within="create or replace function complete_jobs(",
        means="a completion writes a job whose token came beside another job's id",
    ),
    Edit(
        "heartbeat-revives-any-status",
        "sql/009_primary_key_lookups.sql",
        "          and j.status = 'processing'\n",
        "",
        (SQL, "tests/integration/test_leases.py"),
        within="create or replace function heartbeat_jobs(",
        means="a heartbeat keeps a stale job held (its worker is never told it lost it)",
    ),
    Edit(
        "release-ignores-token",
        "sql/009_primary_key_lookups.sql",
        "and j.id = r.id and j.claim_token = r.token",
        "and j.id = r.id",
        (SQL, "tests/integration/test_leases.py"),
        within="create or replace function release_jobs(",
        means="a worker releases a job another worker has claimed since",
    ),
    Edit(
        "fail-dead-letters-one-late",
        "sql/016_cancel_pause_attempts.sql",
        "status = case when $5 or j.retry_count >= j.max_retries - 1 then 'dead_letter'",
        "status = case when $5 or j.retry_count >= j.max_retries then 'dead_letter'",
        (SQL,),
        within="create or replace function fail_job(",
        means="a failing job gets one attempt more than max_retries",
    ),
    Edit(
        "defer-ignores-max-wait",
        "sql/016_cancel_pause_attempts.sql",
        "since < clock_timestamp() - make_interval(secs => $5) as counted",
        "since < clock_timestamp() - make_interval(secs => 1800) as counted",
        ("tests/integration/test_deferral.py",),
        within="create or replace function defer_job(",
        means="PROVIDER_OUTAGE_MAX_WAIT_SECONDS ignored: the default 30 minutes always",
    ),
    Edit(
        "mark-stale-ignores-heartbeat",
        "sql/003_functions.sql",
        "and coalesce(last_heartbeat, started_at, created_at) < now() - $1",
        "and coalesce(started_at, created_at) < now() - $1",
        (SQL, "tests/integration/test_recovery.py"),
        within="create or replace function mark_stale_jobs(",
        means="a long job whose worker still beats is marked stale and run twice",
    ),
    Edit(
        "keyset-skips-equal-times",
        "sql/017_console.sql",
        "' and created_at <= %1$L::timestamptz'\n"
        "                        ' and (created_at < %1$L::timestamptz or id < %2$L::uuid)'",
        "' and created_at < %1$L::timestamptz and %2$L::uuid is not null'",
        ("tests/integration/test_console_web.py",),
        within="create or replace function find_jobs(",
        means="the console's next page skips rows that share the boundary's created_at",
    ),
    Edit(
        "medic-counts-busy-backends",
        "listener/queries/core.sql",
        "  and state in ('idle', 'idle in transaction', 'idle in transaction (aborted)')\n",
        "",
        ("tests/integration/test_pool_medic.py",),
        within="-- name: idle_backends",
        means="the pool medic shuts down a connection whose long query is still running",
    ),
)


def copy_repository(into: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", ".hypothesis", ".pytest_cache", "*.pyc")
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, into / name, ignore=ignore)
        else:
            shutil.copy2(src, into / name)


def run_tests(root: Path, tests: tuple[str, ...]) -> tuple[int, str]:
    """Run pytest in the copy, importing the copy's `listener`."""
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    try:
        done = subprocess.run(
            cmd, cwd=root, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {TIMEOUT}s"
    return done.returncode, done.stdout + done.stderr


def imports_the_copy(root: Path) -> bool:
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run(
        [sys.executable, "-c", "import listener; print(listener.__file__)"],
        cwd=root, env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return Path(out.strip()).resolve().is_relative_to(root.resolve())


def first_failure(output: str) -> str:
    found = re.search(r"^FAILED (\S+)", output, re.MULTILINE)
    if found:
        return found.group(1)
    return output.strip().splitlines()[-1] if output.strip() else "no output"


def main(names: list[str]) -> int:
    edits = [e for e in EDITS if not names or e.name in names]
    if unknown := set(names) - {e.name for e in EDITS}:
        print(f"no such edit: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 1
    tests = tuple(sorted({t for e in edits for t in e.tests}))
    with tempfile.TemporaryDirectory(prefix="ai-jobs-mutants-") as scratch:
        clean = Path(scratch) / "clean"
        copy_repository(clean)
        if not imports_the_copy(clean):
            print("the copy's tests would import another checkout's listener", file=sys.stderr)
            return 1
        t0 = time.monotonic()
        code, output = run_tests(clean, tests)
        if code != 0:
            print(f"the unedited tests fail ({first_failure(output)}):\n{output[-3000:]}")
            return 1
        print(f"unedited: {len(tests)} test file(s) pass ({time.monotonic() - t0:.0f}s)")
        survivors: list[Edit] = []
        for edit in edits:
            root = Path(scratch) / edit.name
            copy_repository(root)
            try:
                if later := edit.superseded(root):
                    raise LookupError(f"{edit.name}: {later} defines that function again")
                edit.apply(root)
            except (LookupError, ValueError) as exc:
                print(f"cannot apply: {exc}", file=sys.stderr)
                return 1
            t0 = time.monotonic()
            code, output = run_tests(root, edit.tests)
            took = f"{time.monotonic() - t0:.0f}s"
            if code == 0:
                survivors.append(edit)
                print(f"SURVIVED {edit.name} ({took}): {edit.means}")
            elif code == 1:
                print(f"killed   {edit.name} ({took}) by {first_failure(output)}")
            else:
                print(f"error    {edit.name} ({took}, exit {code}): {first_failure(output)}")
            shutil.rmtree(root, ignore_errors=True)
        print(f"\n{len(edits)} planted edit(s), {len(survivors)} survived")
        for edit in survivors:
            print(f"  {edit.name}: {edit.path}: {edit.means}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
