"""The batches' watch, a duty of every worker: at each tick, one statement
(ai_job_batch_watch) renews the leases of the batches this worker holds, takes
over those whose holder stopped renewing, and keeps their jobs' heartbeats;
then each batch is moved on: a collecting one sent when it is
BATCH_COLLECT_SECONDS old (or full), an intent without its provider batch id
found or sent, a sent one asked about every BATCH_POLL_SECONDS and, once
ended, its results read back into its jobs (each through the executor, as a
claimed job: validated, repaired, stored and completed by the course handler),
and the rest of its jobs sent back to pending (ai_job_batch_end).

Each job table has its own batches (a batch has one endpoint): course jobs go
to the first provider of the chain with a Batch API, image jobs to OpenAI's
(the Images API). A batch is moved on through its table's lane: its door
(collect.py, which reads the answers back into the table's handler) and its
Batch APIs.

The providers' batch queues (submit.py, sql/030): a collecting batch that finds
no room waits, and is looked at again after BATCH_POLL_SECONDS, or at the next
tick once one of this worker's batches ended (room freed); a batch that OpenAI
failed for its enqueued-token limit teaches the limit and its jobs wait in a new
collecting batch, without an attempt and without going the direct way."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from loguru import logger
from psycopg_pool import AsyncConnectionPool

from listener import dal, tracing
from listener.batches.collect import BatchRouter
from listener.batches.crash import crash_point
from listener.batches.submit import WAITING, Submitter
from listener.completer import Completer
from listener.errors import scrub
from listener.executor import Executor
from listener.jobs import Job
from listener.providers.batchapi import BatchAPI
from listener.rows import BatchWatchRow
from listener.settings import Settings

ADOPT = 20  # batches one tick takes over at most
# Failed sends of one batch (a network error, a 429 of a per-minute limit of the
# Batches endpoints) before its jobs go the direct way, no attempt counted; each
# next try waits BATCH_POLL_SECONDS, so that the tries outlast a minute's limit.
SUBMIT_TRIES = 5
DRAIN_SECONDS = 30.0
# A queue refusal that its limit does not explain: the next try of that queue
# waits this many BATCH_COLLECT_SECONDS / BATCH_POLL_SECONDS (10 minutes by
# default), unless a batch of it ends first.
REFUSED_PACE = 10
# A batch whose provider no worker here has a Batch API for ends this long after
# it was made: its jobs may wait a day for queue room before it is sent
# (submit.QUEUE_WAIT_SECONDS), and the provider may take a day to run it.
ORPHAN_SECONDS = 50 * 3600.0
RESULTS_AT_ONCE = 50  # answered jobs stored at once (no provider call but a repair)


@dataclass
class Lane:
    """One job table's batches: its door, and its Batch APIs by provider."""

    router: BatchRouter
    apis: dict[str, BatchAPI[Any]] = field(default_factory=dict)
    first: BatchAPI[Any] | None = None  # the chain's first provider with one
    # Results read one batch at a time (images: a results file of tens of MB and
    # its decoded images held until stored), or all at once (None).
    reads: asyncio.Semaphore | None = None


class BatchService:
    def __init__(
        self,
        settings: Settings,
        pool: AsyncConnectionPool[Any],
        routers: dict[str, BatchRouter],
        apis: list[BatchAPI[Any]],
    ) -> None:
        """`routers`: each table's door; `apis`: the Batch APIs in the chain's
        order, each for its table."""
        self.settings = settings
        self.pool = pool
        self.lanes = {table: Lane(router) for table, router in routers.items()}
        for api in apis:
            lane = self.lanes.get(api.table)
            if lane is not None and api.name not in lane.apis:
                lane.apis[api.name] = api
                lane.first = lane.first or api
        stale = settings.stale_after_seconds
        # A lease outlives a few ticks; a job's heartbeat is written when a quarter of
        # STALE_AFTER_SECONDS old, so that a batch taken over after its lease ran out
        # has its jobs' heartbeats kept before the stale rescue could see them.
        self.tick_seconds = min(
            settings.heartbeat_interval_seconds, stale / 6, settings.batch_poll_seconds, 10.0
        )
        self.lease_seconds = stale / 3
        self.beat_after = stale / 4
        self.collect_seconds = settings.batch_collect_seconds
        self.poll_seconds = settings.batch_poll_seconds
        for lane in self.lanes.values():
            lane.router.enabled = lane.first is not None
        self.worker_id: str | None = None
        self.executor: Executor | None = None
        self.completer: Completer | None = None
        self.submitter: Submitter | None = None
        self._busy: dict[UUID, asyncio.Task[None]] = {}
        self._polled: dict[UUID, float] = {}
        self._tries: dict[UUID, int] = {}
        self._wait: dict[UUID, float] = {}  # a batch that found no room: not before then
        self._retry: dict[UUID, float] = {}  # a batch whose send failed: not before then
        self._let_go: set[UUID] = set()  # batches let go for want of their API (logged once)
        self.held = 0  # open batches held at the last tick
        self.ended = 0

    @property
    def tables(self) -> frozenset[str]:
        """The tables whose batch jobs this worker sends to a Batch API."""
        return frozenset(t for t, lane in self.lanes.items() if lane.router.enabled)

    def attach(self, worker_id: str, executor: Executor, completer: Completer) -> None:
        """The worker that runs the batches (its id holds their leases)."""
        self.worker_id = worker_id
        self.executor = executor
        self.completer = completer
        for lane in self.lanes.values():
            lane.router.worker_id = worker_id
        self.submitter = Submitter(
            self.pool,
            worker_id,
            executor.fail,
            self.lease_seconds,
            REFUSED_PACE * max(self.collect_seconds, self.poll_seconds),
        )

    async def tick(self) -> None:
        if self.worker_id is None:
            return
        rows = await dal.BATCH_WATCH.all(
            self.pool,
            {
                "worker": self.worker_id,
                "lease": self.lease_seconds,
                "adopt": ADOPT,
                "beat_after": self.beat_after,
            },
        )
        self.held = len(rows)
        now = time.monotonic()
        for row in rows:
            bid = row["id"]
            lane = self.lanes.get(row["job_table"])
            if bid in self._busy or lane is None:
                continue
            state = row["state"]
            if state in ("collecting", "submitting") and now < self._retry.get(bid, 0.0):
                continue
            if row["provider"] and row["provider"] not in lane.apis:
                self._spawn(bid, self._no_api(row))  # at once: for a worker that has it
            elif state == "collecting":
                full = row["jobs"] >= lane.router.max_jobs
                due = row["age_seconds"] >= self.collect_seconds or full
                if due and now >= self._wait.get(bid, 0.0):
                    self._spawn(bid, self._submit(lane, row))
            elif state == "submitting" and now >= self._wait.get(bid, 0.0):
                self._spawn(bid, self._submit(lane, row))
            elif state == "submitted" and now - self._polled.get(bid, 0.0) >= self.poll_seconds:
                self._polled[bid] = now
                self._spawn(bid, self._watch(lane, row))

    def _spawn(self, bid: UUID, coro: Any) -> None:
        task = asyncio.ensure_future(self._logged(bid, coro))
        self._busy[bid] = task
        task.add_done_callback(lambda _t: self._busy.pop(bid, None))

    @staticmethod
    async def _logged(bid: UUID, coro: Any) -> None:
        """A batch's step; its failure (the database away, say) is logged, and the
        step is taken again at a later tick."""
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.bind(action="batch_step", batch=str(bid)).warning(
                f"batch step failed: {type(exc).__name__}: {scrub(str(exc))}"
            )

    async def aclose(self) -> None:
        """Stop the batches' work under way; their leases run out and any worker
        takes them over (an intent half sent is found at the provider)."""
        for task in list(self._busy.values()):
            task.cancel()
        await asyncio.gather(*self._busy.values(), return_exceptions=True)

    async def _submit(self, lane: Lane, row: BatchWatchRow) -> None:
        assert self.submitter is not None
        bid = row["id"]
        api = lane.apis.get(row["provider"] or "") if row["provider"] else lane.first
        log = logger.bind(action="batch_submit", batch=str(bid))
        if api is None:  # a collecting batch (an intent's API not here: the tick let it go)
            await self._end(bid, "failed", "no provider of the chain has a Batch API")
            return
        try:
            done = await self.submitter.submit(row, api)
            self._tries.pop(bid, None)
            self._retry.pop(bid, None)
            if done == WAITING:  # no room in the provider's queue: not at every tick
                self._wait[bid] = time.monotonic() + self.poll_seconds
            else:
                self._wait.pop(bid, None)
        except Exception as exc:
            tries = self._tries[bid] = self._tries.get(bid, 0) + 1
            self._retry[bid] = time.monotonic() + self.poll_seconds
            log.bind(provider=api.name, tries=tries).warning(
                f"could not send the batch (try {tries}/{SUBMIT_TRIES}): {type(exc).__name__}"
            )
            if tries >= SUBMIT_TRIES:
                self._tries.pop(bid, None)
                self._retry.pop(bid, None)
                await self._end(bid, "failed", f"the batch could not be sent: {type(exc).__name__}")

    async def _watch(self, lane: Lane, row: BatchWatchRow) -> None:
        bid, pbid = row["id"], row["provider_batch_id"]
        api = lane.apis.get(row["provider"] or "")
        log = logger.bind(action="batch_watch", batch=str(bid), provider_batch=pbid)
        if pbid is None:  # (never: a submitted batch has its provider's id)
            await self._end(bid, "failed", "no provider batch id")
            return
        if api is None:
            await self._no_api(row)
            return
        try:
            state = await api.state(pbid)
        except Exception as exc:
            log.warning(f"could not ask about the batch: {type(exc).__name__}")
            return
        if state.outcome is None:
            return
        if state.queue_full:
            assert self.submitter is not None
            error = state.error or "token_limit_exceeded"
            await self.submitter.refuse(bid, api, state.queue_limit, error)
            self._polled.pop(bid, None)
            return
        try:
            if lane.reads is None:
                await self._results(lane, row, api, state.outcome, state.error)
            else:
                async with lane.reads:
                    await self._results(lane, row, api, state.outcome, state.error)
        except Exception as exc:  # read again at the next poll (or by whoever takes it over)
            log.warning(f"could not read the batch's results: {type(exc).__name__}")

    async def _no_api(self, row: BatchWatchRow) -> None:
        """A batch sent (or being sent) to a provider this worker has no Batch API
        for (its key is not set here, or this table's batches are not this
        worker's): another worker may have it, so the lease is let go at once,
        never the batch ended while its provider may run it (it would be paid
        twice). ORPHAN_SECONDS after it was made, no worker having read it, it
        ends, and its jobs go the direct way."""
        bid, provider = row["id"], row["provider"]
        why = f"no Batch API for provider {provider} in this worker"
        if row["age_seconds"] >= ORPHAN_SECONDS:
            await self._end(bid, "failed", f"{why} or any other for a day")
            return
        await dal.BATCH_LET_GO.run(self.pool, {"batch": bid, "worker": self.worker_id})
        if bid not in self._let_go:
            self._let_go.add(bid)
            logger.bind(action="batch_let_go", batch=str(bid), provider=provider).warning(
                f"{why}: left to a worker that has one"
            )

    async def _results(
        self, lane: Lane, row: BatchWatchRow, api: BatchAPI[Any], outcome: str, error: str | None
    ) -> None:
        """Read the ended batch's results into its jobs, then end it."""
        assert self.executor is not None and self.completer is not None
        bid, pbid = row["id"], str(row["provider_batch_id"])
        held = {
            r["id"]: r
            for r in await dal.BATCH_JOBS.all(self.pool, {"batch": bid, "worker": self.worker_id})
        }
        if tracing.on:  # the batch's span: each answered job's attempt links to it
            name, attributes = f"batch results {api.name}", {"ai_jobs.batch.id": str(bid)}
            with tracing.span(name, attributes | {"ai_jobs.provider_batch_id": pbid}):
                return await self._read(lane, row, api, outcome, error, held)
        await self._read(lane, row, api, outcome, error, held)

    async def _read(
        self,
        lane: Lane,
        row: BatchWatchRow,
        api: BatchAPI[Any],
        outcome: str,
        error: str | None,
        held: dict[UUID, Any],
    ) -> None:
        bid, pbid = row["id"], str(row["provider_batch_id"])
        log = logger.bind(action="batch_results", batch=str(bid), provider_batch=pbid)
        results = await api.results(pbid, set(held)) if held and outcome != "failed" else None
        if results is not None:
            if results.skipped:
                log.warning(f"{results.skipped} line(s) of the batch's results skipped")
            jobs = [Job.from_claim(held[j]) for j in results.answers]
            for job in jobs:
                lane.router.results[job.id] = (api.name, results.answers[job.id])
            # The first job on its own, written, before the others: a worker that
            # dies reading the results leaves the written ones done and the rest to
            # whoever takes the batch over (the crash test's moment).
            await self._run(jobs[:1])
            if jobs:
                crash_point("reading_results")
            await self._run(jobs[1:])
        await self._end(bid, outcome, error)

    async def _run(self, jobs: list[Job]) -> None:
        """Run the answered jobs as claimed ones, and wait for their ends' writes."""
        assert self.executor is not None and self.completer is not None
        if not jobs:
            return
        for i in range(0, len(jobs), RESULTS_AT_ONCE):
            part = jobs[i : i + RESULTS_AT_ONCE]
            await asyncio.gather(*(self.executor.start(j) for j in part), return_exceptions=True)
        try:
            async with asyncio.timeout(DRAIN_SECONDS):
                await self.completer.drain()
        except TimeoutError:
            logger.bind(action="batch_results").warning("completions still unwritten")

    async def _end(self, bid: UUID, outcome: str, error: str | None) -> None:
        row = await dal.BATCH_END.first(
            self.pool,
            {"batch": bid, "worker": self.worker_id, "outcome": outcome, "error": error},
        )
        returned = row["returned"] if row else 0
        self.ended += 1
        self._polled.pop(bid, None)
        self._let_go.discard(bid)
        self._wait.clear()  # room freed in a queue: the waiting batches look again
        logger.bind(action="batch_ended", batch=str(bid), outcome=outcome, returned=returned).info(
            f"batch ended ({outcome}); {returned} job(s) back to pending"
        )
