-- The statements the benchmark sends itself, each under a `-- name:` header
-- (loaded by bench.queries.sql). The worker under test sends its own.

-- name: create_database
-- The name is checked against [a-z0-9_] before it is spliced in (bench/pgserver.py).
create database {name}

-- name: drop_database
drop database if exists {name} with (force)

-- name: server_settings
select version() as version,
       current_setting('fsync') as fsync,
       current_setting('synchronous_commit') as synchronous_commit,
       current_setting('shared_buffers') as shared_buffers,
       current_setting('wal_level') as wal_level,
       current_setting('max_connections') as max_connections

-- name: db_commits
-- Transactions committed in this database: divided by the jobs run, how many
-- commits (round trips, for an autocommit client) each job cost.
select xact_commit::float8 as n from pg_stat_database where datname = current_database()

-- name: wal_syncs_pg17
-- WAL flushes of the cluster (PostgreSQL 14 to 17).
select wal_sync::float8 as n from pg_stat_wal

-- name: wal_syncs_pg18
-- WAL flushes of the cluster (PostgreSQL 18 moved them to pg_stat_io).
select coalesce(sum(fsyncs), 0)::float8 as n from pg_stat_io where object = 'wal'

-- name: clear_stats_snapshot
select pg_stat_clear_snapshot()

-- name: ours_enqueue_one
-- One job, one transaction (the connection is in autocommit).
insert into ai_course_jobs (subject) values (%(subject)s) returning id

-- name: ours_enqueue_bulk
-- One statement: the insert trigger sends one notification for the whole batch.
insert into ai_course_jobs (subject)
select 'bench ' || g from generate_series(1, %(n)s) g

-- name: ours_remaining
select count(*) as n from ai_course_jobs where status in ('pending', 'processing')

-- name: ours_add_finished
-- Finished rows that a claim must not pay for: done, completed in the past.
insert into ai_course_jobs (subject, status, started_at, completed_at, last_heartbeat, result_path)
select 'old ' || g, 'done', now() - interval '2 days', now() - interval '1 day',
       now() - interval '1 day', 'courses/old/course.json'
from generate_series(1, %(n)s) g

-- name: ours_vacuum_analyze
vacuum analyze ai_course_jobs

-- name: checkpoint
-- After filling a million rows: write their pages out now, not while another
-- database's claims are being timed (needs a superuser or pg_checkpoint).
checkpoint

-- name: ours_claim_one
select id from claim_jobs('ai_course_jobs', 'bench', 1)

-- name: floor_claim_one
-- The latency floor: the notified row, claimed by one UPDATE.
update ai_course_jobs
set status = 'processing', started_at = clock_timestamp(), last_heartbeat = clock_timestamp(),
    claim_token = gen_random_uuid()
where id = %(id)s and status = 'pending'
returning id

-- name: floor_claim_batch
-- The throughput floor: the next 100 due rows, claimed by one UPDATE.
update ai_course_jobs j
set status = 'processing', started_at = clock_timestamp(), last_heartbeat = clock_timestamp(),
    claim_token = gen_random_uuid()
from (select id from ai_course_jobs
      where status = 'pending' and run_after <= now()
      order by run_after
      limit %(n)s
      for update skip locked) due
where j.id = due.id
returning j.id

-- name: floor_finish_batch
update ai_course_jobs
set status = 'done', completed_at = clock_timestamp(), claim_token = null
where id = any(%(ids)s)

-- name: ours_started_lag
-- Commit-to-claim as the database sees it: started_at against the client's commit
-- time (same machine, same clock).
select id::text as id, extract(epoch from started_at)::float8 as started
from ai_course_jobs where started_at is not null

-- name: pgqueuer_remaining
select count(*) as n from pgqueuer

-- name: procrastinate_remaining
select count(*) as n from procrastinate_jobs where status in ('todo', 'doing')

-- name: server_version_num
select current_setting('server_version_num')::int as n

-- name: floor_listen
listen ai_jobs

-- name: backend_pid
select pg_backend_pid() as pid

-- name: skip_triggers
-- Filling finished rows only: no notification or insert check is wanted for them
-- (needs a superuser; without one the fill just runs the triggers).
set session_replication_role = replica

-- name: restore_triggers
set session_replication_role = default

-- name: console_add_history
-- Finished course jobs of the past 30 days (older than a day): the history the
-- console's reads must not pay for. One in a hundred a dead letter.
insert into ai_course_jobs (subject, status, created_at, started_at, completed_at,
                            last_heartbeat, result_path, metrics)
select 'old ' || g, case when g %% 100 = 0 then 'dead_letter' else 'done' end,
       now() - interval '30 days' + (g %% 2000000) * interval '1 s',
       now() - interval '30 days' + (g %% 2000000) * interval '1 s' + interval '2 s',
       now() - interval '30 days' + (g %% 2000000) * interval '1 s' + interval '32 s',
       now() - interval '30 days' + (g %% 2000000) * interval '1 s' + interval '30 s',
       'courses/old/course.json',
       jsonb_build_object('provider', case when g %% 3 = 0 then 'anthropic' else 'openai' end,
                          'generationDurationMs', 28000, 'inputTokens', 900,
                          'outputTokens', 2400, 'estimatedCostUsd', 0.004)
from generate_series(%(offset)s + 1, %(offset)s + %(n)s) g

-- name: console_recount
select ai_job_recount()

-- name: console_recent_done
-- The last hour's work, the same at every history size.
insert into ai_course_jobs (subject, status, created_at, started_at, completed_at, result_path, metrics)
select 'recent ' || g, 'done', now() - g * interval '10 s' - interval '40 s',
       now() - g * interval '10 s' - interval '30 s', now() - g * interval '10 s',
       'courses/recent/course.json',
       jsonb_build_object('provider', case when g % 2 = 0 then 'anthropic' else 'openai' end,
                          'generationDurationMs', 25000 + g, 'inputTokens', 900,
                          'outputTokens', 2400, 'estimatedCostUsd', 0.004)
from generate_series(1, 300) g

-- name: console_recent_live
insert into ai_course_jobs (subject, status, started_at, last_heartbeat, completed_at,
                            retry_count, error)
select 'live ' || g,
       case when g <= 20 then 'pending' when g <= 30 then 'processing' else 'dead_letter' end,
       case when g > 20 then now() - interval '1 minute' end,
       case when g > 20 then now() - interval '30 s' end,
       case when g > 30 then now() - interval '10 s' end,
       case when g > 30 then 3 else 0 end,
       case when g > 30 then 'HTTP 500' end
from generate_series(1, 90) g

-- name: console_recent_failures
-- Sixty failed attempts of the last hour (10 jobs now waiting to retry).
insert into ai_job_attempts (job_table, job_id, attempt, worker_id, started_at, ended_at,
                             outcome, next_status, error)
select 'ai_course_jobs', gen_random_uuid(), 1, 'bench', now() - g * interval '50 s',
       now() - g * interval '50 s' + interval '5 s', 'failed', 'failed', 'HTTP 429'
from generate_series(1, 60) g

-- name: console_fold
select ai_job_fold_counts()

-- name: bench_metrics_view
-- The runbook's view, as an operator reads it in psql.
select * from ai_job_metrics order by job_type, status

-- name: ours_done_times
-- When each finished job was written done (the full pipeline's catalog lag).
select id::text as id, extract(epoch from completed_at)::float8 as done
from ai_course_jobs where status = 'done'

-- name: ours_done_count
select count(*) as n from ai_course_jobs where status = 'done'

-- name: ours_catalog_rows
select count(*) as n from ai_course_catalog

-- name: fair_settings
-- bench/fair.py: no rate limit for the queued jobs; the per-user cap of the case.
update ai_job_settings set rate_limit_per_hour = 1000000000, max_running_per_user = %(cap)s

-- name: fair_enqueue
-- n course jobs, dealt to the users in turn (a null user: no created_by).
insert into ai_course_jobs (subject, created_by)
select 'bench ' || g, (%(users)s::uuid[])[1 + g %% cardinality(%(users)s::uuid[])]
from generate_series(1, %(n)s) g

-- name: fair_vacuum
vacuum analyze ai_course_jobs

-- name: fair_backend
select pg_backend_pid()

-- name: fair_complete_and_claim
select kind, id, claim_token
from complete_and_claim('ai_course_jobs', 'bench', %(n)s, %(ids)s, %(tokens)s, %(paths)s,
                        %(metrics)s::jsonb[])
