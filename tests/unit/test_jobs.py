"""Job.from_claim builds, without the dataclass's __init__, the Job that
__init__ builds from the same claimed row."""

from __future__ import annotations

import dataclasses
import uuid

import pytest

from listener.jobs import Job
from listener.rows import ClaimedRow


def claimed() -> ClaimedRow:
    job_id = uuid.uuid4()
    return {
        "job_table": "ai_media_jobs",
        "id": job_id,
        "claim_token": uuid.uuid4(),
        "retry_count": 2,
        "max_retries": 3,
        "job": {"id": str(job_id), "prompt": "a cat", "params": {"n": 1}},
    }


def test_from_claim_is_the_constructors_job() -> None:
    rec = claimed()
    job = Job.from_claim(rec)
    built = Job(
        table=rec["job_table"],
        id=rec["id"],
        claim_token=rec["claim_token"],
        retry_count=rec["retry_count"],
        max_retries=rec["max_retries"],
        row=rec["job"],
    )
    assert job == built and repr(job) == repr(built)
    assert vars(job) == vars(built)  # every field, the key included
    assert job.key == built.key == str(rec["id"])
    assert (job.attempt, job.job_type, job.params) == (3, "media", {"n": 1})
    assert {f.name for f in dataclasses.fields(Job)} == set(vars(job))


def test_a_replaced_id_has_its_own_key() -> None:
    job = Job.from_claim(claimed())
    other = uuid.uuid4()
    assert dataclasses.replace(job, id=other).key == str(other)
    assert dataclasses.replace(job, row={}).key == job.key


def test_a_claimed_job_stays_frozen() -> None:
    job = Job.from_claim(claimed())
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.retry_count = 0  # type: ignore[misc]
