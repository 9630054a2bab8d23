"""A worker process frozen with SIGSTOP in the middle of a generation, past
STALE_AFTER: another worker rescues its job and finishes it; then SIGCONT. The
frozen worker finishes its generation and stores it, and its file never replaces
the winner's: the stored result is the one whose digest the row's metrics hold,
on the local folder and on Supabase Storage (listener/results.py)."""

from __future__ import annotations

import hashlib
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import fakesupabase
from tests.fakeai import FAKE_ANTHROPIC_KEY, FAKE_OPENAI_KEY, FakeAI, Pace
from tests.fakesupabase import FAKE_SERVICE_KEY
from tests.helpers import connect, insert_course, job, wait_until
from tests.workers import WorkerProcess

pytestmark = pytest.mark.timeout(90)
PATH = "courses/frozen/course.json"


class Stored:
    """The workers' storage, read by the test: a local folder or the fake Supabase."""

    def __init__(self, env: dict[str, str], files: Callable[[], dict[str, bytes]]) -> None:
        self.env = env
        self.files = files

    def digest(self, path: str = PATH) -> str | None:
        data = self.files().get(path)
        return None if data is None else hashlib.sha256(data).hexdigest()

    def staged(self) -> list[str]:
        return [p for p in self.files() if p.startswith(".attempts/")]


@pytest.fixture(params=["local", "supabase"])
def storage(request: pytest.FixtureRequest) -> Iterator[Stored]:
    if request.param == "local":
        root = Path(tempfile.mkdtemp())

        def local() -> dict[str, bytes]:
            return {
                str(p.relative_to(root)): p.read_bytes()
                for p in root.rglob("*")
                if p.is_file() and not p.name.startswith(".")
            }

        yield Stored({"STORAGE_URL": str(root)}, local)
        return
    with fakesupabase.running() as supa:

        def bucket() -> dict[str, bytes]:
            with supa.lock:
                return {p: data for (_, p), (data, _) in supa.objects.items()}

        yield Stored(
            {"STORAGE_URL": supa.storage_url, "SUPABASE_SERVICE_ROLE_KEY": FAKE_SERVICE_KEY},
            bucket,
        )


def test_a_worker_frozen_past_stale_after_never_replaces_the_winner(
    db_url: str, fake: FakeAI, storage: Stored
) -> None:
    # A generation takes seconds, and each one is drawn at its own size: the two
    # attempts' files differ.
    fake.pace = Pace(ttft=0.3, tps=2000, size=(4000, 9000), seed=3)
    common = {
        "OPENAI_API_KEY": FAKE_OPENAI_KEY,
        "OPENAI_BASE_URL": fake.openai_url,
        "ANTHROPIC_API_KEY": FAKE_ANTHROPIC_KEY,
        "ANTHROPIC_BASE_URL": fake.anthropic_url,
        "ALLOW_PLACEHOLDER": "0",
        "CACHE_TTL_SECONDS": "0",
        "RETRY_BASE_SECONDS": "0.2",
        **storage.env,
    }
    # The frozen worker beats every 120 s: woken up, it reaches its storage write
    # before its next heartbeat could tell it that the job is gone, however long
    # the rescuer took to start while it was frozen.
    frozen = WorkerProcess(
        db_url, HEARTBEAT_INTERVAL_SECONDS=120, STALE_AFTER_SECONDS=360, **common
    ).started()
    rescuer: WorkerProcess | None = None
    try:
        with connect(db_url) as c:
            jid = insert_course(c, "Frozen", course_id="frozen")
        frozen.wait_for("job_started", lambda e: e["job_id"] == jid)
        wait_until(lambda: fake.count("openai", "/chat/completions") == 1, what="its request")
        frozen.signal(signal.SIGSTOP)  # while the answer streams

        rescuer = WorkerProcess(
            db_url,
            HEARTBEAT_INTERVAL_SECONDS=1,
            STALE_AFTER_SECONDS=3,
            SWEEP_INTERVAL_SECONDS=1,
            **common,
        ).started()
        with connect(db_url) as c:
            row = wait_until(
                lambda: (r := job(c, jid))["status"] == "done" and r, timeout=30, what="done"
            )
        assert row["worker_id"] != frozen.actions("worker_started")[0]["worker"]
        assert row["retry_count"] == 1  # the frozen attempt counted as lost
        won = row["metrics"]["resultSha256"]
        wait_until(lambda: storage.digest() == won, timeout=5, what="the winner's file")

        frozen.signal(signal.SIGCONT)
        # It finishes its generation, stores it (staged: the path is taken), and its
        # completion is refused.
        frozen.wait_for("course_generate", lambda e: e.get("job_id") == jid, timeout=20)
        frozen.wait_for("job_lost", lambda e: e["job_id"] == jid, timeout=20)
        # Two generations: the frozen one and the rescuer's. The rescuer may have gone
        # to Anthropic: the frozen call still holds OpenAI's quota-learning lease.
        calls = [(r.provider, r.path) for r in fake.requests]
        generations = fake.count("openai", "/chat/completions") + fake.count(
            "anthropic", "/messages"
        )
        assert generations == 2, calls
        with connect(db_url) as c:
            assert job(c, jid)["metrics"]["resultSha256"] == won
        frozen.signal(signal.SIGTERM)
        assert frozen.wait() == 0
        assert storage.digest() == won
        assert storage.staged() == []  # the loser's staged file discarded
    finally:
        for w in (frozen, rescuer):
            if w is not None and w.proc.poll() is None:
                w.signal(signal.SIGCONT)
                w.signal(signal.SIGTERM)
                w.wait()
