-- The core statements Python sends, each under a `-- name:` header (see db.queries()).
-- The state changes themselves are functions in sql/003_functions.sql; these are thin calls.

-- name: migrate_lock
-- One migrator at a time per database; held until the file's transaction ends.
select pg_advisory_xact_lock(hashtext('ai-jobs migrate'))

-- name: create_migrations_table
create table if not exists ai_jobs_migrations (
    version    int primary key,
    name       text not null,
    applied_at timestamptz not null default now()
)

-- name: applied_migrations
select version, name from ai_jobs_migrations order by version

-- name: record_migration
insert into ai_jobs_migrations (version, name) values (%(version)s, %(name)s)

-- name: set_rate_limit
update ai_job_settings set rate_limit_per_hour = %(limit)s

-- name: set_request_limits
update ai_job_settings
set max_subject_length = %(max_subject_length)s, max_prompt_length = %(max_prompt_length)s,
    max_params_bytes = %(max_params_bytes)s

-- name: enqueue_course
insert into ai_course_jobs (subject, params, created_by, max_retries, course_id)
values (%(subject)s, %(params)s, %(user)s, %(max_retries)s, %(course_id)s)
returning id

-- name: enqueue_media
insert into ai_media_jobs (prompt, media_type, params, created_by, max_retries, course_id)
values (%(prompt)s, %(media_type)s, %(params)s, %(user)s, %(max_retries)s, %(course_id)s)
returning id

-- name: queue_depth
-- Live statuses from their partial indexes, finished ones from the counts kept
-- by sql/017's triggers: flat however much history the tables keep.
select job_table, status, jobs as count, avg_duration_seconds from ai_job_status_counts()

-- name: queue_pauses
select job_table, paused, changed_at, changed_by from ai_job_queues order by job_table

-- name: pause_jobs
select pause_jobs(%(table)s) as changed

-- name: resume_jobs
select resume_jobs(%(table)s) as changed

-- name: cancel_job
select cancel_job(%(id)s, %(table)s) as previous

-- name: fold_counts
-- The finished-status deltas into their counts (each sweep keeps the deltas few).
select ai_job_fold_counts() as folded

-- name: claim_jobs
select * from claim_jobs(%(table)s, %(worker)s, %(n)s)

-- name: claim_job
select * from claim_job(%(table)s, %(id)s, %(worker)s)

-- name: claim_due_job
-- The job a notification names, claimed the moment it arrives (the worker's fast path).
select * from claim_due_job(%(table)s, %(id)s, %(worker)s)

-- name: claim_batch
-- A table's batch jobs alone, while its per-minute quota holds its other claims.
select * from ai_job_claim_batch(%(table)s, %(worker)s, %(n)s)

-- name: claim_media
-- Media jobs of these types, at most limits[i] of types[i] (sql/038), while a
-- media lane is held or gated.
select * from ai_job_claim_media(%(worker)s, %(n)s, %(types)s::text[], %(limits)s::int[])

-- name: heartbeat_jobs
select heartbeat_jobs as id from heartbeat_jobs(%(table)s, %(ids)b, %(tokens)b)

-- name: complete_jobs
-- The arrays go in binary format (the b placeholders): psycopg quotes a text
-- array element by element, a cost per finished job that binary does not have.
-- The metrics come as one JSON array (one document to encode, not one per job),
-- made the jsonb[] of complete_jobs here, in their order.
select complete_jobs as id from complete_jobs(%(table)s, %(ids)b, %(tokens)b, %(paths)b,
    array(select m from jsonb_array_elements(%(metrics)b) with ordinality as e(m, i) order by i))

-- name: complete_and_claim
-- The metrics as in complete_jobs: one JSON array.
select * from complete_and_claim(%(table)s, %(worker)s, %(n)s, %(ids)b, %(tokens)b, %(paths)b,
    array(select m from jsonb_array_elements(%(metrics)b) with ordinality as e(m, i) order by i))

-- name: fail_job
select status, retry_count, extract(epoch from run_after - clock_timestamp())::float8 as due_in
from fail_job(%(table)s, %(id)s, %(token)s, %(error)s, %(base)s, %(give_up)s)

-- name: release_jobs
select release_jobs as id from release_jobs(%(table)s, %(ids)b, %(tokens)b)

-- name: mark_stale_jobs
select * from mark_stale_jobs(make_interval(secs => %(seconds)s))

-- name: rescue_stale_jobs
select * from rescue_stale_jobs(%(n)s)

-- name: move_to_dead_letter
select * from move_to_dead_letter()

-- name: purge_old_jobs
select purge_old_jobs(make_interval(secs => %(days)s * 86400.0)) as deleted

-- name: requeue_job
select requeue_job(%(id)s, %(table)s)

-- name: find_job_table
select 'ai_course_jobs' as job_table from ai_course_jobs where id = %(id)s
union all
select 'ai_media_jobs' from ai_media_jobs where id = %(id)s

-- name: next_job_due
select extract(epoch from next_job_due() - now())::float8 as seconds

-- name: max_running_per_user
-- The per-user cap (sql/025), read at each sweep: with a cap set, the end of a
-- job is a reason to look (a capped user's job may wait for it).
select max_running_per_user as cap from ai_job_settings

-- name: keepalive
select 1

-- name: server_time
-- The server's clock (db.PoolMedic: when its first look for stuck connections began).
select clock_timestamp() as now

-- name: idle_backends
-- db.PoolMedic: of the backends its pool is waiting on (%(pids)s), those that have
-- sat idle, their last reply sent, since %(seconds)s before %(since)s: the pool's
-- connection to each has lost its reply (or its query) on the way.
select pid from pg_stat_activity
where pid = any(%(pids)s)
  and state in ('idle', 'idle in transaction', 'idle in transaction (aborted)')
  and state_change < %(since)s::timestamptz - make_interval(secs => %(seconds)s)

-- name: listen
listen ai_jobs

-- name: notify
-- A probe of the LISTEN service (listener/listen.py), sent through the pool on the
-- service's own channel: proof that a notification reaches its LISTEN connection.
select pg_notify(%(channel)s, %(payload)s)

-- name: job_state
select status, error, retry_count from ai_course_jobs where id = %(id)s
union all
select status, error, retry_count from ai_media_jobs where id = %(id)s

-- name: progress_jobs
-- The progress of a worker's running jobs, both tables in one statement (one
-- round trip an interval, listener/progress.py); a table with no job here is an
-- empty update.
select p as id from progress_jobs('ai_course_jobs', %(course_ids)s::uuid[],
    %(course_tokens)s::uuid[], %(course_progress)s::jsonb[], %(course_partial)s::jsonb[]) p
union all
select p from progress_jobs('ai_media_jobs', %(media_ids)s::uuid[], %(media_tokens)s::uuid[],
    %(media_progress)s::jsonb[]) p

-- name: job_trace
-- listener/tracing.py, only while tracing is on, as an attempt starts: the job's
-- trace context, its batch flag, and its wait in the queue until now (created_at
-- to this attempt's start).
select trace_parent, batch,
       (extract(epoch from clock_timestamp() - created_at) * 1000)::float8 as queue_wait_ms
from ai_course_jobs where id = %(id)s and %(table)s = 'ai_course_jobs'
union all
select trace_parent, batch,
       (extract(epoch from clock_timestamp() - created_at) * 1000)::float8
from ai_media_jobs where id = %(id)s and %(table)s = 'ai_media_jobs'
