-- bench/batches.py: batch jobs against direct ones, and the watch's load.

-- name: batches_settings
update ai_job_settings set rate_limit_per_hour = 1000000

-- name: batches_insert_course
insert into ai_course_jobs (subject, params, batch)
select 'Subject ' || %(prefix)s || ' ' || g, '{"itemsPerGroup": 3}'::jsonb, %(batch)s
from generate_series(1, %(n)s) g

-- name: batches_left
select count(*) as n from ai_course_jobs where status <> 'done'

-- name: batches_open_jobs
-- Jobs held by open batches, made directly (the watch benchmark): processing, a token each.
insert into ai_course_jobs (subject, status, claim_token, started_at, last_heartbeat, batch)
select 'Watched ' || g, 'processing', gen_random_uuid(), now(), now(), true
from generate_series(1, %(n)s) g
returning id, claim_token

-- name: batches_open_batch
insert into ai_job_batches (id, job_table, state, provider, model, provider_batch_id,
                            lease_until, submitting_at, submitted_at)
values (%(id)s, 'ai_course_jobs', 'submitted', 'openai', 'gpt-4.1-mini', %(provider_batch)s,
        now() - interval '1 second', now(), now())

-- name: batches_open_item
insert into ai_job_batch_items (batch_id, job_table, job_id, claim_token)
values (%(batch)s, 'ai_course_jobs', %(id)s, %(token)s)

-- name: batches_held
select count(*) as n from ai_job_batches where state = 'submitted' and worker_id is not null

-- name: batches_db_counters
-- Transactions (each of the worker's statements is one) and rows written.
select (select xact_commit + xact_rollback from pg_stat_database
        where datname = current_database()) as xacts,
       (select coalesce(sum(n_tup_upd + n_tup_ins + n_tup_del), 0)
        from pg_stat_user_tables) as rows_written
