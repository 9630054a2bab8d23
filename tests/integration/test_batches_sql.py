"""The batches' state changes (sql/027) against a real database: who may take a
job into a batch, the lease and its takeover, the heartbeats it keeps, and the
end that sends the unfinished jobs back without an attempt."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.helpers import connect, insert_course, insert_media, job


@pytest.fixture
def c(db_url: str) -> Any:
    with connect(db_url) as conn:
        yield conn


def claim(c: Any, worker: str = "w1") -> dict[str, Any]:
    row = c.execute("select * from claim_jobs('ai_course_jobs', %s, 1)", [worker]).fetchone()
    assert row is not None
    return dict(row)


def take(c: Any, claimed: dict[str, Any], worker: str = "w1", token: Any = None) -> Any:
    row = c.execute(
        "select ai_job_batch_take('ai_course_jobs', %s, %s, %s, 60, 1000) as b",
        [claimed["id"], token or claimed["claim_token"], worker],
    ).fetchone()
    return row["b"]


def watch(c: Any, worker: str, lease: float = 60) -> list[dict[str, Any]]:
    return [
        dict(r)
        for r in c.execute(
            "select * from ai_job_batch_watch(%s, %s, 20, 0)", [worker, lease]
        ).fetchall()
    ]


def test_only_a_held_batch_job_is_taken(c: Any) -> None:
    insert_course(c, "Direct")
    assert take(c, claim(c)) is None  # batch = false: run it directly
    insert_course(c, "Batched", batch=True)
    claimed = claim(c)
    assert take(c, claimed, token=uuid.uuid4()) is None  # not its claim
    b = take(c, claimed)
    assert b is not None
    row = job(c, str(claimed["id"]))
    assert row["status"] == "processing" and row["progress"]["phase"] == "batched"
    assert row["claim_token"] != claimed["claim_token"]  # the worker's writes are refused now
    done = c.execute(
        "select * from complete_jobs('ai_course_jobs', %s, %s, %s, %s)",
        [[claimed["id"]], [claimed["claim_token"]], ["x"], [None]],
    ).fetchall()
    assert done == []
    assert take(c, claimed) is None  # its old token again: nothing


def test_a_worker_collects_into_one_batch_and_a_rescued_job_rejoins_it(c: Any) -> None:
    for i in range(3):
        insert_course(c, f"Batched {i}", batch=True)
    batches = {take(c, claim(c)) for _ in range(3)}
    assert len(batches) == 1
    (b,) = batches
    # Its worker is gone long enough for the stale rescue: the job comes back...
    c.execute("update ai_course_jobs set last_heartbeat = now() - interval '1 hour'")
    c.execute("select mark_stale_jobs('1 minute')")
    c.execute("select rescue_stale_jobs(10)")
    again = claim(c, "w2")
    assert take(c, again, "w2") == b  # ... and joins its open batch, not a new one
    items = c.execute("select count(*) as n from ai_job_batch_items").fetchone()["n"]
    assert items == 3


def test_the_lease_is_taken_over_and_the_heartbeats_kept(c: Any) -> None:
    insert_course(c, "Batched", batch=True)
    claimed = claim(c)
    b = take(c, claimed)
    assert [r["id"] for r in watch(c, "w1")] == [b]
    assert watch(c, "w2") == []  # w1's lease holds
    c.execute("update ai_job_batches set lease_until = now() - interval '1 second'")
    c.execute("update ai_course_jobs set last_heartbeat = now() - interval '1 hour'")
    (row,) = watch(c, "w2")
    assert row["id"] == b and row["state"] == "collecting" and row["jobs"] == 1
    assert watch(c, "w1") == []  # no longer w1's
    beat = job(c, str(claimed["id"]))["last_heartbeat"]
    stale = c.execute("select count(*) as n from mark_stale_jobs('1 minute')").fetchone()
    assert stale["n"] == 0 and beat is not None


def test_the_end_sends_unfinished_jobs_back_without_an_attempt(c: Any) -> None:
    for i in range(2):
        insert_course(c, f"Batched {i}", batch=True)
    first, second = claim(c), claim(c)
    b = take(c, first)
    take(c, second)
    jobs = c.execute(
        "select * from ai_job_batch_submitting(%s, 'w1', 'openai', 'gpt-4.1-mini')", [b]
    ).fetchall()
    assert {r["id"] for r in jobs} == {first["id"], second["id"]}
    assert (
        c.execute(
            "select ai_job_batch_submitted(%s, 'w2', 'batch_x', 'file_x') as ok", [b]
        ).fetchone()["ok"]
        is False
    )  # not the lease holder
    assert c.execute(
        "select ai_job_batch_submitted(%s, 'w1', 'batch_x', 'file_x') as ok", [b]
    ).fetchone()["ok"]
    c.execute("select cancel_job(%s, 'ai_course_jobs')", [first["id"]])
    held = c.execute("select * from ai_job_batch_jobs(%s, 'w1')", [b]).fetchall()
    assert [r["id"] for r in held] == [second["id"]]
    n = c.execute("select ai_job_batch_end(%s, 'w1', 'expired', 'expired') as n", [b]).fetchone()
    assert n["n"] == 1
    back = job(c, str(second["id"]))
    assert back["status"] == "pending" and back["retry_count"] == 0 and back["batch"] is False
    assert job(c, str(first["id"]))["status"] == "cancelled"
    ended = c.execute("select state, outcome from ai_job_batches").fetchone()
    assert (ended["state"], ended["outcome"]) == ("ended", "expired")


# -- the providers' batch queues (sql/030) ----------------------------------------


def batched(c: Any, n: int, worker: str = "w1") -> tuple[Any, list[Any]]:
    """`n` batch jobs taken into one collecting batch of `worker`."""
    for i in range(n):
        insert_course(c, f"Queued {i}", batch=True)
    claimed = [claim(c, worker) for _ in range(n)]
    batches = {take(c, x, worker) for x in claimed}
    assert len(batches) == 1
    return batches.pop(), [x["id"] for x in claimed]


def fit(
    c: Any, b: Any, jobs: list[Any], units: list[int], worker: str = "w1", **kw: Any
) -> dict[str, Any]:
    provider = kw.get("provider", "anthropic")
    row = c.execute(
        "select * from ai_job_batch_fit(%s, %s, %s, 'm1', %s, %s, %s, %s, 60, 3600)",
        [b, worker, provider, kw.get("scope", "*"), jobs, units, kw.get("bound", 86400.0)],
    ).fetchone()
    return dict(row) if row else {}


def refused(c: Any, b: Any, limit: Any, worker: str = "w1", retry: float = 600) -> dict[str, Any]:
    row = c.execute(
        "select * from ai_job_batch_refused(%s, %s, 'anthropic', '*', %s, 'queue full', %s,"
        " 86400, 60)",
        [b, worker, limit, retry],
    ).fetchone()
    return dict(row)


def batch_of(c: Any, job_id: Any) -> dict[str, Any]:
    return dict(
        c.execute(
            "select x.* from ai_job_batch_items i join ai_job_batches x on x.id = i.batch_id"
            " where i.job_id = %s and x.state <> 'ended'",
            [job_id],
        ).fetchone()
    )


def learn(c: Any, limit: int | None, stated: bool = False, scope: str = "*") -> None:
    c.execute(
        "insert into ai_job_batch_queues (provider, scope, limit_units, stated)"
        " values ('anthropic', %s, %s, %s)",
        [scope, limit, stated],
    )


def test_a_batch_larger_than_the_room_is_split_and_the_rest_waits(c: Any) -> None:
    learn(c, 2)
    b, ids = batched(c, 3)
    got = fit(c, b, ids, [1, 1, 1])
    assert (got["kept"], got["units"], got["moved"], got["direct"]) == (2, 2, 1, 0)
    sent = c.execute("select state, queue_units from ai_job_batches where id = %s", [b])
    assert dict(sent.fetchone()) == {"state": "submitting", "queue_units": 2}
    (left,) = [i for i in ids if batch_of(c, i)["id"] != b]
    rest = batch_of(c, left)
    assert rest["state"] == "collecting" and rest["worker_id"] == "w1"
    row = job(c, str(left))
    assert row["status"] == "processing" and row["retry_count"] == 0
    assert row["progress"]["phase"] == "batched"
    jobs = c.execute(
        "select id from ai_job_batch_submitting(%s, 'w1', 'anthropic', 'm1')", [b]
    ).fetchall()
    assert len(jobs) == 2 and left not in {r["id"] for r in jobs}


def test_every_workers_open_batches_count_and_a_full_queue_sends_nothing(c: Any) -> None:
    learn(c, 2)
    b1, ids1 = batched(c, 2, "w1")
    assert fit(c, b1, ids1, [1, 1], "w1")["kept"] == 2
    b2, ids2 = batched(c, 1, "w2")
    got = fit(c, b2, ids2, [1], "w2")
    assert got["kept"] == 0 and got["enqueued"] == 2 and got["queue_limit"] == 2
    state = c.execute("select state from ai_job_batches where id = %s", [b2]).fetchone()
    assert state["state"] == "collecting"  # as it was: it waits
    c.execute("select ai_job_batch_end(%s, 'w1', 'completed', null)", [b1])
    assert fit(c, b2, ids2, [1], "w2")["kept"] == 1  # room freed


def test_other_models_share_anthropics_queue_not_openais(c: Any) -> None:
    learn(c, 1, scope="*")
    b1, ids1 = batched(c, 1, "w1")
    assert fit(c, b1, ids1, [1], "w1")["kept"] == 1
    b2, ids2 = batched(c, 1, "w2")
    assert fit(c, b2, ids2, [1], "w2")["enqueued"] == 1
    b3, ids3 = batched(c, 1, "w3")
    got = fit(c, b3, ids3, [5], "w3", provider="openai", scope="m1")
    assert got["kept"] == 1 and got["enqueued"] == 0 and got["queue_limit"] is None


def test_a_refusal_learns_what_was_accepted_and_its_jobs_wait_without_an_attempt(
    c: Any,
) -> None:
    b1, ids1 = batched(c, 2, "w1")
    assert fit(c, b1, ids1, [1, 1], "w1")["kept"] == 2  # nothing known: all go
    b2, ids2 = batched(c, 3, "w2")
    assert fit(c, b2, ids2, [1, 1, 1], "w2")["kept"] == 3
    got = refused(c, b2, None, "w2")  # no number: at least the 2 it had accepted
    assert got == {"queue_limit": 2, "paced": False, "moved": 3, "direct": 0}
    ended = c.execute("select state, outcome, error from ai_job_batches where id = %s", [b2])
    assert dict(ended.fetchone()) == {"state": "ended", "outcome": "failed", "error": "queue full"}
    for i in ids2:
        row = job(c, str(i))
        assert row["status"] == "processing" and row["retry_count"] == 0 and row["batch"]
        assert batch_of(c, i)["state"] == "collecting"
    waiting = batch_of(c, ids2[0])["id"]
    assert fit(c, waiting, ids2, [1, 1, 1], "w2")["kept"] == 0  # full: 2 of 2
    c.execute("select ai_job_batch_end(%s, 'w1', 'completed', null)", [b1])
    got = fit(c, waiting, ids2, [1, 1, 1], "w2")
    assert (got["kept"], got["moved"]) == (2, 1)


def submitted_and_ended(c: Any, worker: str = "w9", sent: bool = True) -> None:
    """A batch of the queue ends: one the provider held (`sent`), or one that
    never was submitted (a send that failed)."""
    other, (held,) = batched(c, 1, worker)
    c.execute(
        "update ai_job_batches set provider = 'anthropic', state = 'submitting',"
        " submitted_at = case when %s then clock_timestamp() end where id = %s",
        [sent, other],
    )
    c.execute("select ai_job_batch_end(%s, %s, 'completed', null)", [other, worker])
    c.execute("select cancel_job(%s, 'ai_course_jobs')", [held])  # claimed by none again


@pytest.mark.parametrize("limit", [None, 0, -5, 10**15])
def test_a_refusal_without_a_usable_number_paces_the_next_try(c: Any, limit: Any) -> None:
    b, ids = batched(c, 2)
    assert fit(c, b, ids, [1, 1])["kept"] == 2
    got = refused(c, b, limit)  # nothing else enqueued: the guess is half the batch
    assert got == {"queue_limit": 1, "paced": True, "moved": 2, "direct": 0}
    q = c.execute("select * from ai_job_batch_queues").fetchone()
    assert q["limit_units"] == 1 and not q["stated"] and q["retry_at"] > q["refused_at"]
    waiting = batch_of(c, ids[0])["id"]
    assert fit(c, waiting, ids, [1, 1])["kept"] == 0  # not before retry_at...
    submitted_and_ended(c, sent=False)
    assert fit(c, waiting, ids, [1, 1])["kept"] == 0  # ... a batch never sent frees nothing
    submitted_and_ended(c, sent=True)
    got = fit(c, waiting, ids, [1, 1])  # ... unless a submitted batch of it ended
    assert (got["kept"], got["moved"]) == (1, 1)


def test_refusals_with_nothing_of_ours_enqueued_halve_the_batch_down_to_one_job(
    c: Any,
) -> None:
    """No number and nothing of ours in the queue: after each pause, the batch
    sent is half the one refused, not the same one again (every pause for a
    day); a single job refused stays paced."""
    b, ids = batched(c, 8)
    for expected in (8, 4, 2, 1, 1):
        got = fit(c, b, ids, [1] * len(ids))
        assert got["kept"] == expected
        got = refused(c, b, None)
        assert got["paced"] is True and got["queue_limit"] == max(expected // 2, 1)
        b = batch_of(c, ids[-1])["id"]
        assert fit(c, b, ids, [1] * len(ids))["kept"] == 0  # paced
        c.execute("update ai_job_batch_queues set retry_at = now() - interval '1 second'")
    rows = [job(c, str(i)) for i in ids]
    assert all(r["retry_count"] == 0 and r["batch"] for r in rows)


def test_one_job_over_the_guess_is_paced_not_sent_again_at_once(c: Any) -> None:
    b, ids = batched(c, 1)
    assert fit(c, b, ids, [500])["kept"] == 1
    got = refused(c, b, None)
    assert got["queue_limit"] == 250 and got["paced"] is True
    waiting = batch_of(c, ids[0])["id"]
    assert fit(c, waiting, ids, [500])["kept"] == 0  # not at the next tick
    c.execute("update ai_job_batch_queues set retry_at = now() - interval '1 second'")
    assert fit(c, waiting, ids, [500])["kept"] == 1  # the one job of an empty queue


def test_a_stated_limit_below_what_was_accepted_is_not_believed(c: Any) -> None:
    b1, ids1 = batched(c, 2, "w1")
    assert fit(c, b1, ids1, [10, 10], "w1")["kept"] == 2
    b2, ids2 = batched(c, 2, "w2")
    assert fit(c, b2, ids2, [10, 10], "w2")["kept"] == 2
    got = refused(c, b2, 5, "w2")  # 5 < the 20 the provider holds of ours
    assert got["queue_limit"] == 20 and got["paced"] is False
    q = c.execute("select limit_units, stated from ai_job_batch_queues").fetchone()
    assert dict(q) == {"limit_units": 20, "stated": False}
    c.execute("select ai_job_batch_end(%s, 'w1', 'completed', null)", [b1])
    waiting = batch_of(c, ids2[0])["id"]
    got = fit(c, waiting, ids2, [10, 10], "w2")  # not sent the direct way: 10 > 5
    assert (got["kept"], got["direct"]) == (2, 0)


def test_a_stated_limit_is_kept_and_a_job_over_it_alone_goes_direct(c: Any) -> None:
    b, ids = batched(c, 2)
    assert fit(c, b, ids, [10, 10])["kept"] == 2
    got = refused(c, b, 15)
    assert got["queue_limit"] == 15 and got["paced"] is False  # 20 > 15: explained
    waiting = batch_of(c, ids[0])["id"]
    insert_course(c, "Huge", batch=True)
    huge = claim(c)
    assert take(c, huge) == waiting
    got = fit(c, waiting, [*ids, huge["id"]], [10, 10, 99])
    assert (got["kept"], got["direct"], got["moved"]) == (1, 1, 1)
    row = job(c, str(huge["id"]))
    assert row["status"] == "pending" and row["batch"] is False and row["retry_count"] == 0


def test_a_job_that_waited_past_the_bound_goes_the_direct_way(c: Any) -> None:
    learn(c, 1)
    b1, ids1 = batched(c, 1, "w1")
    assert fit(c, b1, ids1, [1], "w1")["kept"] == 1  # the queue is full now
    b, ids = batched(c, 2, "w2")
    c.execute(
        "update ai_course_jobs set created_at = now() - interval '25 hours' where id = %s",
        [ids[1]],
    )
    got = fit(c, b, ids, [1, 1], "w2")
    assert (got["kept"], got["moved"], got["direct"]) == (0, 0, 1)
    old = job(c, str(ids[1]))
    assert old["status"] == "pending" and old["batch"] is False and old["retry_count"] == 0
    assert batch_of(c, ids[0])["id"] == b  # the other waits in its batch
    c.execute(
        "update ai_course_jobs set created_at = now() - interval '25 hours' where id = %s",
        [ids[0]],
    )
    c.execute("update ai_job_batches set worker_id = 'w2' where id = %s", [b1])
    assert refused(c, b1, None, "w2")["direct"] == 0  # ids1[0] is young: it waits


# -- image batches (ai_media_jobs) ---------------------------------------------------


def fit_model(c: Any, b: Any, jobs: list[Any], units: list[int], model: str) -> dict[str, Any]:
    """OpenAI's fit: the queue is the model's."""
    row = c.execute(
        "select * from ai_job_batch_fit(%s, 'w1', 'openai', %s, %s, %s, %s, 86400, 60, 3600)",
        [b, model, model, jobs, units],
    ).fetchone()
    return dict(row) if row else {}


def test_image_and_course_batches_are_apart_and_so_are_their_queues(c: Any) -> None:
    insert_course(c, "Queued", batch=True)
    insert_media(c, "a fox", "image", batch=True)
    course = claim(c)
    row = c.execute("select * from claim_jobs('ai_media_jobs', 'w1', 1)").fetchone()
    image = dict(row)
    assert image["job"]["batch"] is True  # the claim says it (sql/034): no lookup per job
    bc = take(c, course)
    bi = c.execute(
        "select ai_job_batch_take('ai_media_jobs', %s, %s, 'w1', 60, 50) as b",
        [image["id"], image["claim_token"]],
    ).fetchone()["b"]
    assert bc is not None and bi is not None and bc != bi  # a batch has one endpoint
    assert {r["id"]: r["job_table"] for r in watch(c, "w1")} == {
        bc: "ai_course_jobs",
        bi: "ai_media_jobs",
    }
    # The chat model's queue is full and paced: its batch waits; the image model's
    # queue is another one, and its batch goes.
    c.execute(
        "insert into ai_job_batch_queues (provider, scope, limit_units, stated, refused_at,"
        " retry_at) values ('openai', 'gpt-4.1-mini', 1, false, now(), now() + interval '1 hour')"
    )
    assert fit_model(c, bc, [course["id"]], [5], "gpt-4.1-mini")["kept"] == 0
    got = fit_model(c, bi, [image["id"]], [5], "gpt-image-1")
    assert (got["kept"], got["enqueued"], got["queue_limit"]) == (1, 0, None)
    enqueued = "select ai_job_batch_enqueued('openai', %s, null) as n"
    assert c.execute(enqueued, ["gpt-image-1"]).fetchone()["n"] == 5
    assert c.execute(enqueued, ["gpt-4.1-mini"]).fetchone()["n"] == 0
    # The image queue refuses its batch: it learns and paces the image model only.
    c.execute("delete from ai_job_batch_queues")
    c.execute(
        "select * from ai_job_batch_refused(%s, 'w1', 'openai', 'gpt-image-1', 2, 'full',"
        " 600, 86400, 60)",
        [bi],
    )
    queues = c.execute("select scope, limit_units from ai_job_batch_queues").fetchall()
    assert [(q["scope"], q["limit_units"]) for q in queues] == [("gpt-image-1", 2)]
    got = fit_model(c, bc, [course["id"]], [5], "gpt-4.1-mini")
    assert got["kept"] == 1, got  # the chat model's queue is not the image model's
    back = job(c, str(image["id"]), "ai_media_jobs")
    assert back["status"] == "processing" and back["retry_count"] == 0  # waits for room
