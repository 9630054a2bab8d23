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
