"""One module per system under test. Each has two sides:

parent (load generator, bench.scenarios): ``LABEL``, ``prepare(url)``,
``open_enqueuer(url)`` -> object with ``one() -> key`` and ``close()``,
``enqueue_bulk(url, n)``, ``remaining(url) -> int``;

child (worker process, bench.child): ``worker(opts, rec)``, an async context
manager that sets the worker up and yields ``run(stop_event)``; handlers call
``rec.hit(key)`` first thing, with the key that ``one()`` returned for that job.
An optional ``run_loop`` replaces asyncio.run (pgqueuer runs on uvloop, as its
command line does)."""

# Module names, in the order the report lists them.
LATENCY = ("ai_jobs", "ai_jobs_full", "pgqueuer_sys", "procrastinate_sys", "floor")
THROUGHPUT = ("ai_jobs", "ai_jobs_full", "pgqueuer_sys", "procrastinate_sys", "floor")
MULTI = ("ai_jobs", "pgqueuer_sys", "procrastinate_sys")
