"""Media claims by type (sql/038, ai_job_claim_media): while a media lane is held
or gated, a worker claims the types it may, each within its limit, in one
statement. The types not asked for stay pending and untouched; the oldest job
goes first whatever its type; a null media_type (an invalid job) is never left
out; the fair order and the per-user cap hold as in claim_jobs; a type left out
is not read through (its backlog); a paused queue and bad arguments give
nothing."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest

from tests.helpers import connect, insert_media, job

A = "aaaaaaaa-0000-4000-8000-000000000001"
B = "bbbbbbbb-0000-4000-8000-000000000002"


@pytest.fixture
def c(db_url: str) -> Any:
    with connect(db_url) as conn:
        conn.execute("update ai_job_settings set rate_limit_per_hour = 100000")
        yield conn


def _add(c: Any, media_type: str | None, names: list[str], user: str | None = None) -> list[str]:
    """Due media jobs named `names`, each younger than every job added before."""
    ids = []
    for name in names:
        n = c.execute("select count(*) as n from ai_media_jobs").fetchone()["n"]
        at = c.execute(
            "select now() - interval '1 hour' + %s * interval '1 second' as t", [n]
        ).fetchone()["t"]
        ids.append(insert_media(c, name, media_type, created_by=user, run_after=at))  # type: ignore[arg-type]
    return ids


def _claim(c: Any, n: int, limits: dict[str, int], worker: str = "w") -> list[str]:
    """The prompts of the jobs claimed, oldest first."""
    rows = c.execute(
        "select * from ai_job_claim_media(%s, %s, %s, %s)",
        [worker, n, list(limits), list(limits.values())],
    ).fetchall()
    assert all(r["job_table"] == "ai_media_jobs" for r in rows)
    names = [r["job"]["prompt"] for r in rows]
    return sorted(
        names, key=lambda p: (p.rstrip("0123456789"), int(p[len(p.rstrip("0123456789")) :] or 0))
    )


def test_the_types_not_asked_for_stay_pending(c: Any) -> None:
    images = _add(c, "image", ["i1", "i2", "i3"])  # the oldest
    _add(c, "audio", ["a1", "a2"])
    assert _claim(c, 10, {"audio": 10}) == ["a1", "a2"]
    assert [job(c, i, "ai_media_jobs")["status"] for i in images] == ["pending"] * 3
    assert _claim(c, 10, {"audio": 10}) == []
    assert _claim(c, 2, {"image": 5}) == ["i1", "i2"]
    assert _claim(c, 2, {"image": 5}) == ["i3"]


def test_each_type_within_its_limit_and_the_oldest_first(c: Any) -> None:
    _add(c, "image", ["i1", "i2", "i3"])
    _add(c, "audio", ["a1", "a2", "a3"])
    # One image admitted (its quota), the audio jobs up to the free slots.
    assert _claim(c, 3, {"image": 1, "audio": 3}) == ["a1", "a2", "i1"]
    # No type goes first by its place in the list: the oldest job does.
    assert _claim(c, 1, {"audio": 5, "image": 5}) == ["i2"]


def test_an_older_job_of_an_unmetered_type_is_not_kept_behind_a_metered_one(c: Any) -> None:
    _add(c, "audio", ["a1"])  # the oldest
    _add(c, "image", [f"i{n}" for n in range(1, 6)])
    # A slot at a time, the image quota admitting one each time: the speech
    # job, older, goes first.
    assert _claim(c, 1, {"image": 1, "audio": 1}) == ["a1"]
    assert _claim(c, 1, {"image": 1, "audio": 1}) == ["i1"]


def test_a_job_of_no_type_is_never_left_out(c: Any) -> None:
    # An invalid job (media_type null): whichever claim takes it refuses it at once.
    _add(c, None, ["none"])
    _add(c, "image", ["i1"])
    assert _claim(c, 5, {"image": 0}) == ["none"]
    assert _claim(c, 5, {}) == []


def test_the_fair_order_and_the_cap_apply_within_the_types_claimed(c: Any) -> None:
    _add(c, "image", ["Ai1", "Ai2"], A)  # A's images: the oldest
    _add(c, "audio", ["Aa1", "Aa2", "Aa3"], A)
    _add(c, "audio", ["Ba1", "Ba2"], B)
    # Fair between A and B among the audio jobs: A's images are neither counted
    # as candidates nor taken.
    assert _claim(c, 2, {"audio": 5}) == ["Aa1", "Ba1"]
    # Within a type's limit, fair too: one image of A beside B's audio.
    assert _claim(c, 2, {"image": 1, "audio": 0}) == ["Ai1"]
    c.execute("update ai_job_settings set max_running_per_user = 3")
    # A runs two, B one: with a cap of 3, one more of A's, two of B's at most.
    assert _claim(c, 10, {"audio": 10, "image": 10}) == ["Ai2", "Ba2"]
    assert _claim(c, 10, {"audio": 10, "image": 10}) == []


def test_a_users_older_images_do_not_crowd_out_their_speech_job(c: Any) -> None:
    """Fair path (two users due): the image limit applies within each user's
    candidates, so the speech job behind a user's images is picked too."""
    _add(c, "image", [f"Ai{n}" for n in range(1, 6)], A)
    _add(c, "audio", ["Aa1"], A)
    _add(c, "image", [f"Bi{n}" for n in range(1, 6)], B)
    assert _claim(c, 3, {"image": 1, "audio": 3}) == ["Aa1", "Ai1"]


def test_the_cap_holds_under_concurrent_claims_of_two_types(db_url: str, c: Any) -> None:
    """Two workers claim A's images and A's audio at once: the cap counts both."""
    _add(c, "image", [f"i{n}" for n in range(5)], A)
    _add(c, "audio", [f"a{n}" for n in range(5)], A)
    c.execute("update ai_job_settings set max_running_per_user = 3")
    got: list[list[str]] = []
    start = threading.Barrier(2)

    def claim(kind: str) -> None:
        with connect(db_url) as mine:
            start.wait()
            got.append(_claim(mine, 5, {kind: 5}, worker=kind))

    threads = [threading.Thread(target=claim, args=(t,)) for t in ("image", "audio")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(len(g) for g in got) == 3
    running = c.execute("select count(*) as n from ai_media_jobs where status = 'processing'")
    assert running.fetchone()["n"] == 3


def _read(c: Any, limits: dict[str, int], n: int = 4) -> tuple[int, int]:
    """Claim; the jobs claimed, and the rows of ai_media_jobs its scans read (by
    sequential scans, and index entries of every index of the table)."""
    c.execute("select pg_stat_force_next_flush()")
    c.commit()
    with c.transaction():
        got = c.execute(
            "select * from ai_job_claim_media('w', %s, %s, %s)",
            [n, list(limits), list(limits.values())],
        ).fetchall()
        read = c.execute(
            "select pg_stat_get_xact_tuples_returned(t)"
            " + (select sum(pg_stat_get_xact_tuples_returned(indexrelid)) from pg_index"
            "    where indrelid = t) as n"
            " from (select 'ai_media_jobs'::regclass::oid as t) x"
        ).fetchone()["n"]
    return len(got), read


@pytest.mark.parametrize("users", [False, True])
def test_a_type_left_out_is_not_read_through(c: Any, users: bool) -> None:
    """A backlog of images and a claim of speech alone, on a table whose history
    holds both types (the statistics of a real one): an index walk of the speech
    jobs, not a read past every image, in the plain order and in the fair pick
    (two users due)."""
    c.execute(
        "insert into ai_media_jobs (prompt, media_type, status, run_after, completed_at)"
        " select 'done ' || g, case when g % 2 = 0 then 'image' else 'audio' end, 'done',"
        "  now() - interval '3 hours', now() - interval '3 hours'"
        " from generate_series(1, 40000) g"
    )
    c.execute(
        "insert into ai_media_jobs (prompt, media_type, run_after)"
        " select 'old image ' || g, 'image', now() - interval '2 hours' + g * interval '1 ms'"
        " from generate_series(1, 20000) g"
    )
    if users:  # (an update: the insert trigger's rate limit counts a user's rows)
        c.execute("update ai_media_jobs set created_by = %s where prompt like 'old image %%'", [A])
    for name in ("a1", "a2"):
        insert_media(c, name, "audio", created_by=A if users else None)
    if users:
        insert_media(c, "b1", "image", created_by=B)
    c.execute("vacuum analyze ai_media_jobs")
    got, read = _read(c, {"audio": 4})
    assert got == 2
    assert read < 200, f"{read} rows of ai_media_jobs read to claim 2"


def test_a_paused_queue_and_bad_arguments_give_nothing(c: Any) -> None:
    _add(c, "audio", ["a1"])
    assert _claim(c, 0, {"audio": 5}) == []
    assert c.execute("select * from ai_job_claim_media('w', null, null, null)").fetchall() == []
    assert c.execute("select * from ai_job_claim_media('w', 5, null, null)").fetchall() == []
    assert _claim(c, 5, {"audio": -1}) == []
    for types, limits in ((["audio", "audio"], [1, 1]), (["audio"], []), (["audio", None], [1, 1])):
        with pytest.raises(psycopg.errors.InvalidParameterValue), c.transaction():
            c.execute("select * from ai_job_claim_media('w', 5, %s, %s)", [types, limits])
    c.execute("select pause_jobs('ai_media_jobs')")
    assert _claim(c, 5, {"audio": 5}) == []
    c.execute("select resume_jobs('ai_media_jobs')")
    assert _claim(c, 5, {"audio": 5}) == ["a1"]
