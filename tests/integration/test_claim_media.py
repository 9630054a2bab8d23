"""Media claims by type (sql/038, ai_job_claim_media): while one media lane is
held or gated, a worker claims the other types alone. The types left out stay
pending and untouched; a null media_type (an invalid job) is never left out;
the fair order and the per-user cap hold as in claim_jobs; a paused queue
gives nothing; bad arguments give nothing."""

from __future__ import annotations

import threading
from typing import Any

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
    """Due media jobs named `names`, oldest first (an hour old, a second apart)."""
    return [
        insert_media(
            c,
            name,
            media_type,  # type: ignore[arg-type]
            created_by=user,
            run_after=c.execute(
                "select now() - interval '1 hour' + %s * interval '1 second' as t",
                [len(c.execute("select id from ai_media_jobs").fetchall())],
            ).fetchone()["t"],
        )
        for name in names
    ]


def _claim(c: Any, n: int, skip: list[str] | None, worker: str = "w") -> list[str]:
    rows = c.execute("select * from ai_job_claim_media(%s, %s, %s)", [worker, n, skip]).fetchall()
    assert all(r["job_table"] == "ai_media_jobs" for r in rows)
    return [r["job"]["prompt"] for r in rows]


def test_the_skipped_type_stays_pending_and_the_others_are_claimed(c: Any) -> None:
    images = _add(c, "image", ["i1", "i2", "i3"])  # the oldest
    _add(c, "audio", ["a1", "a2"])
    assert sorted(_claim(c, 10, ["image"])) == ["a1", "a2"]
    assert [job(c, i, "ai_media_jobs")["status"] for i in images] == ["pending"] * 3
    assert _claim(c, 10, ["image"]) == []
    # The images, claimed apart, oldest first, as many as asked.
    assert sorted(_claim(c, 2, ["audio"])) == ["i1", "i2"]
    assert _claim(c, 2, ["audio"]) == ["i3"]


def test_no_skip_claims_every_type_in_age_order(c: Any) -> None:
    _add(c, "audio", ["a1"])
    _add(c, "image", ["i1"])
    _add(c, "audio", ["a2"])
    assert sorted(_claim(c, 2, None)) == ["a1", "i1"]
    assert _claim(c, 2, []) == ["a2"]


def test_a_job_of_no_type_is_never_left_out(c: Any) -> None:
    # An invalid job (media_type null): whichever claim takes it refuses it at once.
    _add(c, None, ["none"])
    _add(c, "image", ["i1"])
    assert _claim(c, 5, ["image", "audio"]) == ["none"]


def test_the_fair_order_and_the_cap_apply_within_the_types_claimed(c: Any) -> None:
    _add(c, "image", ["Ai1", "Ai2"], A)  # A's images: the oldest
    _add(c, "audio", ["Aa1", "Aa2", "Aa3"], A)
    _add(c, "audio", ["Ba1", "Ba2"], B)
    # Fair between A and B among the audio jobs: A's images are not counted as
    # claimable, nor taken.
    assert sorted(_claim(c, 2, ["image"])) == ["Aa1", "Ba1"]
    c.execute("update ai_job_settings set max_running_per_user = 2")
    # A runs one, B one: with a cap of 2, one more each, whatever is asked.
    assert sorted(_claim(c, 10, ["image"])) == ["Aa2", "Ba2"]
    assert _claim(c, 10, ["image"]) == []
    assert _claim(c, 10, ["audio"]) == []  # A's images: A is at the cap


def test_the_cap_holds_under_concurrent_claims_of_two_types(db_url: str, c: Any) -> None:
    """Two workers claim A's images and A's audio at once: the cap counts both."""
    _add(c, "image", [f"i{n}" for n in range(5)], A)
    _add(c, "audio", [f"a{n}" for n in range(5)], A)
    c.execute("update ai_job_settings set max_running_per_user = 3")
    got: list[list[str]] = []
    start = threading.Barrier(2)

    def claim(skip: str) -> None:
        with connect(db_url) as mine:
            start.wait()
            got.append(_claim(mine, 5, [skip], worker=skip))

    threads = [threading.Thread(target=claim, args=(t,)) for t in ("image", "audio")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(len(g) for g in got) == 3
    running = c.execute("select count(*) as n from ai_media_jobs where status = 'processing'")
    assert running.fetchone()["n"] == 3


def test_a_paused_queue_and_bad_counts_give_nothing(c: Any) -> None:
    _add(c, "audio", ["a1"])
    assert _claim(c, 0, ["image"]) == []
    assert c.execute("select * from ai_job_claim_media('w', null, null)").fetchall() == []
    c.execute("select pause_jobs('ai_media_jobs')")
    assert _claim(c, 5, ["image"]) == []
    c.execute("select resume_jobs('ai_media_jobs')")
    assert _claim(c, 5, ["image"]) == ["a1"]
