-- The worker registry (sql/012_worker_registry.sql), each under a `-- name:` header.

-- name: worker_beat
-- Register, or refresh, this process's row. An upsert: a row expired while the
-- process was cut off from the database comes back with its next beat.
insert into ai_job_workers (id, host, pid, started_at, last_seen, listener_state,
                            jobs_running, version, probe_seconds, reconnects)
values (%(id)s, %(host)s, %(pid)s, %(started_at)s, now(), %(listener_state)s,
        %(jobs_running)s, %(version)s, %(probe_seconds)s, %(reconnects)s)
on conflict (id) do update
set last_seen = now(), listener_state = excluded.listener_state,
    jobs_running = excluded.jobs_running, probe_seconds = excluded.probe_seconds,
    reconnects = excluded.reconnects

-- name: worker_remove
delete from ai_job_workers where id = %(id)s

-- name: workers_expire
-- Rows of processes that stopped beating (killed, host lost): a sweep duty.
delete from ai_job_workers
where last_seen < now() - make_interval(secs => %(seconds)s)
returning id

-- name: workers_list
-- The live worker processes: seen within the live window.
select id, host, pid, started_at, last_seen, listener_state, jobs_running, version,
       probe_seconds, reconnects,
       round(extract(epoch from now() - last_seen)::numeric, 1)::float8 as seen_seconds_ago
from ai_job_workers
where last_seen > now() - make_interval(secs => %(live_seconds)s)
order by started_at, id

-- name: worker_alert_values
-- no_worker: jobs due (pending, or failed and due for their retry) for longer
-- than the grace, counted only while no live worker listens (or polls). worker_deaf: live workers that report a deaf
-- LISTEN connection.
with live as (
    select listener_state from ai_job_workers
    where last_seen > now() - make_interval(secs => %(live_seconds)s)
)
select
    (select count(*) from live where listener_state in ('listening', 'polling')) as listening,
    (select count(*) from live where listener_state = 'deaf') as deaf,
    (select count(*) from ai_course_jobs
      where status in ('pending', 'failed')
        and coalesce(run_after, created_at) < now() - make_interval(secs => %(grace)s))
    + (select count(*) from ai_media_jobs
      where status in ('pending', 'failed')
        and coalesce(run_after, created_at) < now() - make_interval(secs => %(grace)s))
      as waiting
