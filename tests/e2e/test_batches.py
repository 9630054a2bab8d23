"""Batch jobs through the real `ai-jobs worker` and the real SDKs against the
fake's Batch APIs: a batch end to end at the batch price (course jobs, image
jobs; audio jobs direct), a worker killed at each moment of a batch's life (no
job lost, no request sent twice), expiry and failure (back to pending, no
attempt counted), a request's error (that job only), a cancel while batched,
and hostile results files."""

from __future__ import annotations

import json
import signal
import tempfile
import uuid
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import Any

import psycopg
import pytest

from listener.batches.crash import ENV, EXIT_CODE, MOMENTS
from listener.batches.watch import SUBMIT_TRIES
from listener.providers import pricing
from listener.settings import OPENAI_IMAGE_MODEL
from tests.fakeai import FAKE_ANTHROPIC_KEY, FAKE_OPENAI_KEY, FakeAI
from tests.fakeai.fake import FAKE_IMAGE
from tests.helpers import connect, insert_course, insert_media, job, wait_until
from tests.workers import WorkerProcess

pytestmark = pytest.mark.timeout(120)


def batch_env(fake: FakeAI, **extra: Any) -> dict[str, Any]:
    return {
        "OPENAI_API_KEY": FAKE_OPENAI_KEY,
        "OPENAI_BASE_URL": fake.openai_url,
        "ANTHROPIC_API_KEY": FAKE_ANTHROPIC_KEY,
        "ANTHROPIC_BASE_URL": fake.anthropic_url,
        "ALLOW_PLACEHOLDER": "0",
        "CACHE_TTL_SECONDS": "0",
        "HEARTBEAT_INTERVAL_SECONDS": "0.5",
        "STALE_AFTER_SECONDS": "6",
        "SWEEP_INTERVAL_SECONDS": "1",
        "BATCH_COLLECT_SECONDS": "1",
        "BATCH_POLL_SECONDS": "0.3",
        "RETRY_BASE_SECONDS": "0.2",
        **extra,
    }


def insert_batch(c: psycopg.Connection[Any], n: int, **cols: Any) -> list[str]:
    return [
        insert_course(c, f"Tides {i}", params={"itemsPerGroup": 3}, batch=True, **cols)
        for i in range(n)
    ]


MEDIA = "ai_media_jobs"


def insert_images(c: psycopg.Connection[Any], n: int, **cols: Any) -> list[str]:
    return [
        insert_media(c, f"a lighthouse, study {i}", "image", batch=True, **cols) for i in range(n)
    ]


def insert_jobs(c: psycopg.Connection[Any], kind: str, n: int, **cols: Any) -> list[str]:
    """`n` batch jobs: courses, or images."""
    return insert_images(c, n, **cols) if kind == "image" else insert_batch(c, n, **cols)


def table(kind: str) -> str:
    return MEDIA if kind == "image" else "ai_course_jobs"


def statuses(c: psycopg.Connection[Any], ids: list[str], kind: str = "course") -> Counter[str]:
    return Counter(job(c, i, table(kind))["status"] for i in ids)


def all_done(c: psycopg.Connection[Any], ids: list[str], kind: str = "course") -> bool:
    return statuses(c, ids, kind) == Counter({"done": len(ids)})


def open_batches(c: psycopg.Connection[Any]) -> int:
    row = c.execute("select count(*) as n from ai_job_batches where state <> 'ended'").fetchone()
    assert row is not None
    return int(row["n"] if isinstance(row, dict) else row[0])


def direct_calls(fake: FakeAI) -> int:
    return (
        fake.count("openai", "/chat/completions")
        + fake.count("anthropic", "/v1/messages")
        + fake.count("openai", "/images/generations")
    )


def test_a_batch_end_to_end_at_the_batch_price(db_url: str, fake: FakeAI) -> None:
    w = WorkerProcess(db_url, **batch_env(fake)).started()
    try:
        with connect(db_url) as c:
            ids = insert_batch(c, 5)
            wait_until(
                lambda: all(job(c, i)["progress"] == {"phase": "batched", "percent": 0}
                            or job(c, i)["status"] == "done" for i in ids),
                what="batched",
            )  # fmt: skip
            wait_until(lambda: all_done(c, ids), timeout=30, what="all done")
            direct = insert_course(c, "Tides direct", params={"itemsPerGroup": 3})
            wait_until(lambda: job(c, direct)["status"] == "done", what="direct done")
            rows = [job(c, i) for i in ids]
            direct_row = job(c, direct)
            assert open_batches(c) == 0
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
    assert fake.batches.created == {"openai": 1, "anthropic": 0}
    assert sorted(fake.batches.requests_in) == sorted(ids)
    assert direct_calls(fake) == 1  # the direct job's only
    for r in rows:
        m = r["metrics"]
        assert m["batch"] is True and m["provider"] == "openai" and r["retry_count"] == 0
        assert r["result_path"] == f"courses/{r['course_id']}/course.json"
        assert m["estimatedCostUsd"] == pytest.approx(
            direct_row["metrics"]["estimatedCostUsd"] / 2, rel=0.2
        )
    assert "batch" not in direct_row["metrics"]


def test_image_jobs_batch_at_the_batch_price_and_audio_runs_direct(
    db_url: str, fake: FakeAI
) -> None:
    """Image jobs with `batch` go in one batch of /v1/images/generations, stored
    as the direct path stores them; an audio job with `batch` runs direct (no
    Batch API for speech), said once in the log; a course batch is its own."""
    storage = tempfile.mkdtemp()
    w = WorkerProcess(db_url, **batch_env(fake, STORAGE_URL=storage)).started()
    try:
        with connect(db_url) as c:
            ids = insert_images(c, 3)
            courses = insert_batch(c, 2)
            sounds = [insert_media(c, f"a bell {i}", "audio", batch=True) for i in range(2)]
            wait_until(lambda: all_done(c, ids, "image"), timeout=30, what="images done")
            wait_until(lambda: all_done(c, courses), timeout=30, what="courses done")
            wait_until(lambda: all_done(c, sounds, "image"), what="sounds done")
            direct = insert_media(c, "a lighthouse, direct", "image")
            wait_until(lambda: job(c, direct, MEDIA)["status"] == "done", what="direct done")
            rows = [job(c, i, MEDIA) for i in ids]
            sound_rows = [job(c, i, MEDIA) for i in sounds]
            direct_row = job(c, direct, MEDIA)
            ended = c.execute(
                "select job_table, model, outcome from ai_job_batches order by job_table"
            ).fetchall()
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
    assert fake.batches.created == {"openai": 2, "anthropic": 0}
    assert sorted(fake.batches.requests_in) == sorted(ids + courses)
    endpoints = sorted(b.endpoint for b in fake.batches.batches.values())
    assert endpoints == ["/v1/chat/completions", "/v1/images/generations"]
    assert [(r["job_table"], r["outcome"]) for r in ended] == [
        ("ai_course_jobs", "completed"),
        (MEDIA, "completed"),
    ]
    assert ended[1]["model"] == OPENAI_IMAGE_MODEL
    # Direct: the image without `batch` and the two sounds; the batched images never.
    assert fake.count("openai", "/images/generations") == 1
    assert fake.count("openai", "/audio/speech") == 2
    price = pricing.image_cost(OPENAI_IMAGE_MODEL)
    assert price and direct_row["metrics"]["estimatedCostUsd"] == pytest.approx(price)
    for r in rows:
        m = r["metrics"]
        assert m["batch"] is True and m["provider"] == "openai" and r["retry_count"] == 0
        assert m["model"] == OPENAI_IMAGE_MODEL and m["mediaType"] == "image"
        assert m["estimatedCostUsd"] == pytest.approx(price / 2)
        assert r["result_path"] == f"media/{r['id']}.png"
        assert (Path(storage) / r["result_path"]).read_bytes() == FAKE_IMAGE
    for r in [*sound_rows, direct_row]:
        assert "batch" not in r["metrics"] and r["retry_count"] == 0
    told = w.actions("batch_direct")
    assert len(told) == 1 and "speech" in told[0]["message"]


@pytest.mark.parametrize(
    ("moment", "provider", "kind"),
    [(m, "openai", "course") for m in MOMENTS]
    + [("after_create", "anthropic", "course")]
    + [(m, "openai", "image") for m in MOMENTS],
)
def test_a_worker_killed_at_any_moment_loses_nothing_and_sends_nothing_twice(
    db_url: str, fake: FakeAI, moment: str, provider: str, kind: str
) -> None:
    order = "openai,anthropic" if provider == "openai" else "anthropic,openai"
    # A lease (a third of STALE_AFTER_SECONDS) that outlives the second worker's
    # start on a loaded machine: the batch is taken over, its jobs never rescued.
    env = batch_env(fake, AI_PROVIDER_PRIORITY=order, STALE_AFTER_SECONDS="20")
    first = WorkerProcess(db_url, **env, **{ENV: moment}).started()
    with connect(db_url) as c:
        ids = insert_jobs(c, kind, 4)
        code = first.wait(timeout=30)  # it ends itself at that moment, as a kill would
        assert code == EXIT_CODE, first.log()[-3000:]
        sent_before = list(fake.batches.requests_in)
        second = WorkerProcess(db_url, **env).started()
        try:
            wait_until(lambda: all_done(c, ids, kind), timeout=40, what=f"done: {second.log_path}")
            rows = [job(c, i, table(kind)) for i in ids]
        finally:
            second.signal(signal.SIGTERM)
            assert second.wait() == 0
    assert Counter(fake.batches.requests_in) == Counter(ids), (moment, sent_before)
    assert fake.batches.created[provider] == 1
    assert direct_calls(fake) == 0
    for r in rows:
        assert r["retry_count"] == 0 and r["metrics"]["batch"] is True
    if moment == "after_create":
        assert second.actions("batch_submit"), "the intent was found, not sent again"


@pytest.mark.parametrize("moment", ["before_upload", "after_create"])
def test_an_anthropic_intent_is_told_from_a_same_size_batch_by_its_results(
    db_url: str, fake: FakeAI, moment: str
) -> None:
    """Anthropic's batches carry no metadata: a lost intent's batch is known by
    its results. Another batch of the same size, made meanwhile by someone else
    with the key, is not taken for it (the intent's jobs would go unanswered,
    then direct) nor makes it sent again (paid twice): the intent waits until the
    batches that could be it have ended, and reads whose jobs they answered."""
    import anthropic

    fake.batches.delay = 10  # every batch still runs when the intent is taken over
    env = batch_env(fake, AI_PROVIDER_PRIORITY="anthropic", STALE_AFTER_SECONDS="20")
    decoy = anthropic.Anthropic(api_key=FAKE_ANTHROPIC_KEY, base_url=fake.anthropic_url)
    params: Any = {
        "model": "claude-haiku-4-5",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "another application's request"}],
    }
    decoy.messages.batches.create(
        requests=[{"custom_id": f"other-{i}", "params": params} for i in range(3)]
    )
    first = WorkerProcess(db_url, **env, **{ENV: moment}).started()
    with connect(db_url) as c:
        ids = insert_batch(c, 3)
        assert first.wait(timeout=30) == EXIT_CODE, first.log()[-3000:]
        second = WorkerProcess(db_url, **env).started()
        try:
            wait_until(lambda: all_done(c, ids), timeout=60, what=f"done: {second.log_path}")
            rows = [job(c, i) for i in ids]
        finally:
            second.signal(signal.SIGTERM)
            assert second.wait() == 0
    assert fake.batches.created["anthropic"] == 2  # the other one, and the intent's once
    assert sorted(r for r in fake.batches.requests_in if not r.startswith("other-")) == sorted(ids)
    assert direct_calls(fake) == 0
    assert all(r["metrics"]["batch"] is True and r["retry_count"] == 0 for r in rows)


def test_a_worker_without_the_batchs_api_leaves_it_to_one_that_has_it(
    db_url: str, fake: FakeAI
) -> None:
    """The worker that sent an OpenAI batch dies; a worker whose chain has no
    OpenAI takes its lease over. It must not end the batch (its jobs would run
    again the direct way while OpenAI runs the batch: paid twice): it lets go of
    it, and a worker with OpenAI finishes it."""
    env = batch_env(fake, AI_PROVIDER_PRIORITY="openai,anthropic", STALE_AFTER_SECONDS="20")
    first = WorkerProcess(db_url, **env, **{ENV: "after_create"}).started()
    with connect(db_url) as c:
        ids = insert_batch(c, 3)
        assert first.wait(timeout=30) == EXIT_CODE, first.log()[-3000:]
        other = WorkerProcess(db_url, **{**env, "AI_PROVIDER_PRIORITY": "anthropic"}).started()
        try:
            other.wait_for("batch_let_go", timeout=30)
            able = WorkerProcess(db_url, **env).started()
            try:
                wait_until(lambda: all_done(c, ids), timeout=40, what=f"done: {able.log_path}")
                rows = [job(c, i) for i in ids]
            finally:
                able.signal(signal.SIGTERM)
                assert able.wait() == 0
        finally:
            other.signal(signal.SIGTERM)
            assert other.wait() == 0
    assert fake.batches.created == {"openai": 1, "anthropic": 0}
    assert direct_calls(fake) == 0
    assert all(r["metrics"]["batch"] is True and r["retry_count"] == 0 for r in rows)


@pytest.mark.parametrize(
    ("outcome", "provider", "kind"),
    [
        ("expired", "openai", "course"),
        ("failed", "openai", "course"),
        ("expired", "anthropic", "course"),
        ("expired", "openai", "image"),
    ],
)
def test_an_expired_or_failed_batch_sends_its_jobs_the_direct_way_without_an_attempt(
    db_url: str, fake: FakeAI, outcome: str, provider: str, kind: str
) -> None:
    fake.batches.outcome = outcome
    order = "openai,anthropic" if provider == "openai" else "anthropic,openai"
    w = WorkerProcess(db_url, **batch_env(fake, AI_PROVIDER_PRIORITY=order)).started()
    try:
        with connect(db_url) as c:
            ids = insert_jobs(c, kind, 3)
            wait_until(lambda: all_done(c, ids, kind), timeout=30, what="done the direct way")
            rows = [job(c, i, table(kind)) for i in ids]
            ended = w.wait_for("batch_ended")
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
    assert ended["outcome"] == outcome and ended["returned"] == 3
    assert fake.batches.created[provider] == 1 and direct_calls(fake) == 3
    for r in rows:
        assert r["retry_count"] == 0 and r["batch"] is False and "batch" not in r["metrics"]


@pytest.mark.parametrize(
    ("provider", "kind"), [("openai", "course"), ("anthropic", "course"), ("openai", "image")]
)
def test_a_request_error_fails_that_job_only(
    db_url: str, fake: FakeAI, provider: str, kind: str
) -> None:
    fake.batches.delay = 3  # the jobs are in before the batch ends
    order = "openai,anthropic" if provider == "openai" else "anthropic,openai"
    w = WorkerProcess(db_url, **batch_env(fake, AI_PROVIDER_PRIORITY=order)).started()
    try:
        with connect(db_url) as c:
            ids = insert_jobs(c, kind, 3, max_retries=1)
            fake.batches.errors = {ids[1]}
            wait_until(
                lambda: statuses(c, ids, kind) == Counter({"done": 2, "dead_letter": 1}),
                timeout=30,
                what="two done, one failed",
            )
            bad = job(c, ids[1], table(kind))
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
    assert bad["retry_count"] == 1 and "batch request failed" in bad["error"]
    assert "invalid request" in bad["error"]
    assert fake.batches.created[provider] == 1 and direct_calls(fake) == 0


@pytest.mark.parametrize("kind", ["course", "image"])
def test_cancel_of_a_batched_job_is_at_once_and_its_result_ignored(
    db_url: str, fake: FakeAI, kind: str
) -> None:
    fake.batches.delay = 3600
    w = WorkerProcess(db_url, **batch_env(fake)).started()
    try:
        with connect(db_url) as c:
            ids = insert_jobs(c, kind, 2)
            wait_until(lambda: fake.batches.created["openai"] == 1, what="batch sent")
            c.execute("select cancel_job(%s, %s)", [ids[0], table(kind)])
            assert job(c, ids[0], table(kind))["status"] == "cancelled"  # not waiting for it
            fake.batches.delay = 0
            wait_until(
                lambda: job(c, ids[1], table(kind))["status"] == "done", timeout=30, what="done"
            )
            w.wait_for("batch_ended")
            cancelled = job(c, ids[0], table(kind))
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
    assert cancelled["status"] == "cancelled" and cancelled["result_path"] is None
    assert direct_calls(fake) == 0


def test_an_invalid_answer_is_repaired_the_direct_way(db_url: str, fake: FakeAI) -> None:
    """The repair round is a direct call: it takes the one reservation of the
    per-minute quota; the batch's answers take none."""
    fake.batches.delay = 3
    w = WorkerProcess(db_url, **batch_env(fake, PROVIDER_LIMITS="openai=rpm:3")).started()
    try:
        with connect(db_url) as c:
            ids = insert_batch(c, 3)
            fake.batches.invalid = {ids[0]}
            wait_until(lambda: all_done(c, ids), timeout=30, what="done")
            repaired = job(c, ids[0])
            quotas = c.execute(
                "select provider, requests, learned_at, learning_calls from ai_job_provider_quotas"
            ).fetchall()
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
    assert repaired["metrics"]["repairRounds"] == 1 and repaired["metrics"]["batch"] is True
    assert direct_calls(fake) == 1  # the repair round only
    (q,) = quotas  # one call reserved and settled, the repair's: 3 - 1 left
    assert q["provider"] == "openai" and q["learned_at"] is not None
    assert 1.9 <= q["requests"] < 2.5, q
    repair = next(r for r in fake.requests if r.path.endswith("/chat/completions"))
    assert len(repair.body["messages"]) == 4  # the batch's answer and the problem


def test_a_hostile_results_file_costs_no_job(db_url: str, fake: FakeAI) -> None:
    fake.batches.delay = 3
    w = WorkerProcess(db_url, **batch_env(fake)).started()
    try:
        with connect(db_url) as c:
            ids = insert_batch(c, 3)
            error = {"status_code": 400, "body": {"error": {"message": "second answer"}}}
            fake.batches.garbage = [
                "this is not JSON {",
                "[1, 2, 3]",
                json.dumps({"custom_id": "not-a-uuid", "response": None}),
                json.dumps({"custom_id": str(uuid.uuid4()), "response": None}),
                json.dumps({"custom_id": ids[0], "response": error}),  # a duplicate
                json.dumps({"custom_id": ids[1], "response": {"status_code": 200, "body": 7}}),
                "\x00\xff garbage",
            ]
            wait_until(lambda: all_done(c, ids), timeout=30, what="done")
            ended = w.wait_for("batch_ended")
            skipped = w.wait_for("batch_results")
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
    assert ended["returned"] == 0 and "7 line(s)" in skipped["message"]
    assert direct_calls(fake) == 0


def test_hostile_image_answers_fail_those_jobs_only(db_url: str, fake: FakeAI) -> None:
    """An image answer that is not JSON, has no data or no b64_json, or a b64_json
    that does not decode: that job's attempt fails with a clear error; the good
    image of the same batch is stored, nothing else is lost or sent again."""
    fake.batches.delay = 3
    storage = tempfile.mkdtemp()
    w = WorkerProcess(db_url, **batch_env(fake, STORAGE_URL=storage)).started()
    try:
        with connect(db_url) as c:
            ids = insert_images(c, 5, max_retries=1)
            fake.batches.bodies = {
                ids[0]: "<html>not json</html>",
                ids[1]: {"created": 1, "data": []},
                ids[2]: {"created": 1, "data": [{"url": "http://127.0.0.1:9/x.png"}]},
                ids[3]: {"created": 1, "data": [{"b64_json": "%%% not base64 %%%"}]},
            }
            wait_until(
                lambda: statuses(c, ids, "image") == Counter({"done": 1, "dead_letter": 4}),
                timeout=30,
                what="one done, four failed",
            )
            rows = [job(c, i, MEDIA) for i in ids]
            ended = w.wait_for("batch_ended")
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
    why = ["not a JSON object", "no data", "no b64_json", "b64_json is not base64"]
    for r, reason in zip(rows[:4], why, strict=True):
        assert r["retry_count"] == 1 and r["result_path"] is None
        assert r["error"].endswith(f"the batch's answer is not an image: {reason}"), r["error"]
    good = rows[4]
    assert good["metrics"]["batch"] is True and good["retry_count"] == 0
    assert (Path(storage) / good["result_path"]).read_bytes() == FAKE_IMAGE
    assert ended["returned"] == 0 and ended["outcome"] == "completed"
    assert fake.batches.created["openai"] == 1 and direct_calls(fake) == 0


def test_batch_answers_are_not_per_minute_calls(db_url: str, fake: FakeAI) -> None:
    """A provider cap of one call a minute holds the direct jobs, not a batch's."""
    w = WorkerProcess(db_url, **batch_env(fake, PROVIDER_LIMITS="openai=rpm:1")).started()
    try:
        with connect(db_url) as c:
            ids = insert_batch(c, 5)
            wait_until(lambda: all_done(c, ids), timeout=30, what="all done within the minute")
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
    assert fake.batches.created["openai"] == 1 and direct_calls(fake) == 0


@pytest.mark.parametrize("kind", ["course", "image"])
def test_batch_jobs_go_into_a_batch_while_a_spent_quota_holds_the_direct_ones(
    db_url: str, fake: FakeAI, kind: str
) -> None:
    """One call a minute: the direct jobs wait for the next minute; batch jobs
    inserted after them, which make no per-minute call, are claimed alone
    (sql/033) and done within it, not behind the direct ones."""
    env = batch_env(fake, PROVIDER_LIMITS="openai=rpm:1", AI_PROVIDER_PRIORITY="openai")
    w = WorkerProcess(db_url, **env).started()
    try:
        with connect(db_url) as c:
            direct = [
                insert_course(c, f"Direct {i}", params={"itemsPerGroup": 3})
                if kind == "course"
                else insert_media(c, f"a direct cat {i}", "image")
                for i in range(3)
            ]
            wait_until(lambda: statuses(c, direct, kind)["done"] == 1, what="the minute's one call")
            ids = insert_jobs(c, kind, 4)
            wait_until(
                lambda: all_done(c, ids, kind), timeout=30, what="batch jobs done in the minute"
            )
            left = statuses(c, direct, kind)
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
    assert left["done"] == 1  # still within the minute: the others wait for its quota
    assert fake.batches.created["openai"] == 1 and sorted(fake.batches.requests_in) == sorted(ids)
    assert direct_calls(fake) == 1


def test_every_batch_answer_is_charged_even_when_the_cache_serves_the_job(
    db_url: str, fake: FakeAI
) -> None:
    """Two same requests in one batch: the second is served from the course cache,
    and its request, paid in the batch, is charged to it all the same."""
    fake.batches.delay = 3
    w = WorkerProcess(db_url, **batch_env(fake, CACHE_TTL_SECONDS="3600")).started()
    try:
        with connect(db_url) as c:
            ids = [
                insert_course(c, "Tides", params={"itemsPerGroup": 3}, batch=True) for _ in range(2)
            ]
            wait_until(lambda: all_done(c, ids), timeout=30, what="done")
            rows = [job(c, i) for i in ids]
            charged = c.execute(
                "select job_id, cost_usd from ai_job_charges where job_id = any(%s::uuid[])",
                [ids],
            ).fetchall()
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
    providers = sorted(r["metrics"]["provider"] for r in rows)
    assert providers == ["cache", "openai"] and all(r["metrics"]["batch"] for r in rows)
    assert sorted(str(r["job_id"]) for r in charged) == sorted(ids)
    assert all(r["cost_usd"] > 0 for r in charged)


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_results_that_cannot_be_downloaded_are_read_at_the_next_poll(
    db_url: str, fake: FakeAI, provider: str
) -> None:
    fake.batches.fail_downloads = 2
    order = "openai,anthropic" if provider == "openai" else "anthropic,openai"
    w = WorkerProcess(db_url, **batch_env(fake, AI_PROVIDER_PRIORITY=order)).started()
    try:
        with connect(db_url) as c:
            ids = insert_batch(c, 3)
            wait_until(lambda: all_done(c, ids), timeout=30, what="done")
            failed = w.wait_for("batch_watch")
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
    assert "could not read the batch's results" in failed["message"]
    assert fake.batches.fail_downloads == 0 and fake.batches.created[provider] == 1
    assert direct_calls(fake) == 0


# -- the providers' batch queues (sql/030) ----------------------------------------


def queue(c: psycopg.Connection[Any], provider: str) -> dict[str, Any]:
    row = c.execute("select * from ai_job_batch_queues where provider = %s", [provider]).fetchone()
    assert row is not None
    return dict(row)


def each_answered_once(fake: FakeAI, ids: list[str]) -> bool:
    return Counter(fake.batches.completed_requests()) == Counter(ids)


@pytest.mark.parametrize("message", [None, "Enqueued token limit reached."])
def test_an_openai_queue_refusal_teaches_the_limit_and_its_jobs_wait_for_room(
    db_url: str, fake: FakeAI, message: str | None
) -> None:
    """The second batch is past the model's enqueued tokens: it fails at OpenAI;
    its jobs wait (no attempt, not direct) and go once the first batch ends. With
    the stated limit learned (or, from a message without a number, the tokens
    the first batch held: at least what OpenAI had accepted), no batch is
    refused twice."""
    # The first batch runs until the second is refused, however long a busy
    # machine takes to send it; then it ends.
    fake.batches.delay = 3600
    fake.batches.queue_message = message
    w = WorkerProcess(db_url, **batch_env(fake)).started()
    try:
        with connect(db_url) as c:
            first = insert_batch(c, 3)
            wait_until(lambda: fake.batches.created["openai"] == 1, what="first batch sent")
            (held,) = fake.batches.batches.values()
            limit = held.queued_tokens * 3 // 2  # the first fits; both do not
            fake.batches.queue_limits = {held.model: limit}
            second = [insert_course(c, f"Ebb {i}", batch=True) for i in range(3)]
            wait_until(lambda: fake.batches.refused["openai"] == 1, what="second refused")
            refused = w.wait_for("batch_queue_full")
            fake.batches.delay = 0
            ids = first + second
            wait_until(lambda: all_done(c, ids), timeout=40, what="all done")
            rows = [job(c, i) for i in ids]
            learned = queue(c, "openai")
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
    assert refused["moved"] == 3 and refused["direct"] == 0
    assert fake.batches.refused["openai"] == 1 and direct_calls(fake) == 0
    assert fake.batches.peak["openai"] <= limit
    assert each_answered_once(fake, ids)
    for r in rows:
        assert r["retry_count"] == 0 and r["metrics"]["batch"] is True
    assert learned["refusals"] == 1 and learned["scope"] == held.model
    if message is None:
        assert learned["stated"] and learned["limit_units"] == limit
    else:  # no number: at least what our first batch held (OpenAI had accepted it)
        assert not learned["stated"] and learned["limit_units"] > 0


def test_an_anthropic_429_teaches_the_limit_and_its_jobs_wait_for_room(
    db_url: str, fake: FakeAI
) -> None:
    fake.batches.delay = 3600  # until the second batch is refused
    fake.batches.queue_limit = 3
    env = batch_env(fake, AI_PROVIDER_PRIORITY="anthropic,openai")
    w = WorkerProcess(db_url, **env).started()
    try:
        with connect(db_url) as c:
            first = insert_batch(c, 3)
            wait_until(lambda: fake.batches.created["anthropic"] == 1, what="first batch sent")
            second = [insert_course(c, f"Ebb {i}", batch=True) for i in range(3)]
            refused = w.wait_for("batch_queue_full")
            fake.batches.delay = 0
            ids = first + second
            wait_until(lambda: all_done(c, ids), timeout=40, what="all done")
            rows = [job(c, i) for i in ids]
            learned = queue(c, "anthropic")
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
    assert refused["moved"] == 3 and refused["queue_limit"] == 3
    assert fake.batches.refused["anthropic"] == 1 and direct_calls(fake) == 0
    assert fake.batches.created["anthropic"] == 2 and fake.batches.peak["anthropic"] <= 3
    assert each_answered_once(fake, ids)
    assert all(r["retry_count"] == 0 and r["metrics"]["batch"] is True for r in rows)
    # The 429 names the processing queue and states its limit: believed.
    assert (learned["scope"], learned["limit_units"], learned["stated"]) == ("*", 3, True)


def failed_sends(w: WorkerProcess) -> list[dict[str, Any]]:
    return [e for e in w.actions("batch_submit") if "could not send" in e["message"]]


def spaced(events: list[dict[str, Any]], seconds: float) -> bool:
    times = [e["ts"] for e in events]
    return all(b - a >= seconds for a, b in pairwise(times))


def test_an_anthropic_per_minute_429_is_a_failed_send_not_a_queue_refusal(
    db_url: str, fake: FakeAI
) -> None:
    """A 429 at the creation whose message names no queue (a per-minute limit of
    the Batches endpoints): nothing is learned of the queue; the send is tried
    again after BATCH_POLL_SECONDS (a tick is half that), no attempt counted."""
    fake.batches.rate_limited = 2
    env = batch_env(fake, AI_PROVIDER_PRIORITY="anthropic,openai", BATCH_POLL_SECONDS="1")
    w = WorkerProcess(db_url, **env).started()
    try:
        with connect(db_url) as c:
            ids = insert_batch(c, 3)
            wait_until(lambda: all_done(c, ids), timeout=40, what="all done")
            rows = [job(c, i) for i in ids]
            queues = c.execute("select count(*) as n from ai_job_batch_queues").fetchone()
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
    failed = failed_sends(w)
    assert [e["tries"] for e in failed] == [1, 2] and spaced(failed, 0.9)
    assert fake.batches.throttled == 2 and fake.batches.refused["anthropic"] == 0
    assert queues is not None and queues["n"] == 0 and not w.actions("batch_queue_full")
    assert fake.batches.created["anthropic"] == 1 and direct_calls(fake) == 0
    assert each_answered_once(fake, ids)
    assert all(r["retry_count"] == 0 and r["metrics"]["batch"] is True for r in rows)


def test_a_batch_never_accepted_goes_the_direct_way_after_its_tries(
    db_url: str, fake: FakeAI
) -> None:
    """Every creation answered 429 (not the queue): SUBMIT_TRIES sends, spaced,
    then the jobs go the direct way, no attempt counted; no loop."""
    fake.batches.rate_limited = 1000
    env = batch_env(fake, AI_PROVIDER_PRIORITY="anthropic,openai", BATCH_POLL_SECONDS="1")
    w = WorkerProcess(db_url, **env).started()
    try:
        with connect(db_url) as c:
            ids = insert_batch(c, 2)
            wait_until(lambda: all_done(c, ids), timeout=40, what="done the direct way")
            rows = [job(c, i) for i in ids]
            ended = w.wait_for("batch_ended")
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
    failed = failed_sends(w)
    assert len(failed) == SUBMIT_TRIES and spaced(failed, 0.9)
    assert fake.batches.throttled == SUBMIT_TRIES and fake.batches.created["anthropic"] == 0
    assert ended["outcome"] == "failed" and ended["returned"] == 2
    assert direct_calls(fake) == 2 and not w.actions("batch_queue_full")
    for r in rows:
        assert r["retry_count"] == 0 and r["batch"] is False and "batch" not in r["metrics"]


@pytest.mark.parametrize("workers", [1, 2])
def test_batches_larger_than_the_room_are_split_and_workers_share_the_count(
    db_url: str, fake: FakeAI, workers: int
) -> None:
    """A learned limit of 2 requests: 7 jobs go in batches of at most 2 open at a
    time, across every worker; the provider never refuses one."""
    fake.batches.delay = 1
    fake.batches.queue_limit = 2
    with connect(db_url) as c:
        c.execute(
            "insert into ai_job_batch_queues (provider, scope, limit_units, stated)"
            " values ('anthropic', '*', 2, false)"
        )
    env = batch_env(
        fake,
        AI_PROVIDER_PRIORITY="anthropic,openai",
        BATCH_COLLECT_SECONDS="0.5",
        WORKER_CONCURRENCY="1",
    )
    ws = [WorkerProcess(db_url, **env).started() for _ in range(workers)]
    try:
        with connect(db_url) as c:
            ids = insert_batch(c, 7)
            wait_until(lambda: all_done(c, ids), timeout=60, what="all done")
            rows = [job(c, i) for i in ids]
            senders = c.execute(
                "select count(distinct worker_id) as n from ai_job_batches"
                " where outcome = 'completed'"
            ).fetchone()
    finally:
        for w in ws:
            w.signal(signal.SIGTERM)
        for w in ws:
            assert w.wait() == 0
    assert fake.batches.refused["anthropic"] == 0 and fake.batches.peak["anthropic"] <= 2
    assert fake.batches.created["anthropic"] >= 4 and direct_calls(fake) == 0
    assert each_answered_once(fake, ids)
    assert all(r["retry_count"] == 0 and r["metrics"]["batch"] is True for r in rows)
    # Which worker claims which job is the race of the claims: both usually send
    # (the count shared across workers is held deterministically by
    # test_batches_sql.py's test_every_workers_open_batches_count...).
    assert senders is not None and 1 <= senders["n"] <= workers
