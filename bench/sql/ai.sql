-- The statements of `make bench-ai` (bench/ai/), each under a `-- name:` header.

-- name: ai_unlimited_inserts
-- The crowd inserts hundreds of jobs per user in minutes: the per-user hourly
-- rate limit (a guard against abuse, not the subject here) is lifted.
update ai_job_settings set rate_limit_per_hour = 1000000

-- name: ai_has_user_cap
-- Whether this checkout's schema has fair claims' per-user cap (migration 025).
select exists (
    select 1 from information_schema.columns
    where table_schema = 'public' and table_name = 'ai_job_settings'
      and column_name = 'max_running_per_user'
) as present

-- name: ai_set_user_cap
update ai_job_settings set max_running_per_user = %(cap)s

-- name: ai_insert_jobs
-- One statement for a batch of jobs of the crowd (the heavy user's all at once).
insert into ai_course_jobs (subject, created_by)
select s, u from unnest(%(subjects)s::text[], %(users)s::uuid[]) as t(s, u)

-- name: ai_workers_alive
select count(*)::int as n from ai_job_workers

-- name: ai_jobs
-- Every job of a run, as the report needs them (epoch seconds).
select created_by::text as user_id,
       status,
       retry_count,
       extract(epoch from created_at)::float8 as created,
       extract(epoch from started_at)::float8 as started,
       extract(epoch from completed_at)::float8 as completed,
       coalesce((metrics ->> 'outputTokens')::int, 0) as out_tokens,
       coalesce((metrics ->> 'inputTokens')::int, 0) as in_tokens
from ai_course_jobs

-- name: ai_db_counters
-- Transactions of this database so far (pg_stat_database; a statement outside a
-- transaction block is one transaction).
select xact_commit::float8 as commits, xact_rollback::float8 as rollbacks,
       tup_updated::float8 as updated, tup_inserted::float8 as inserted
from pg_stat_database where datname = current_database()

-- name: ai_course_updates
-- Rows of ai_course_jobs updated so far (heartbeats among them).
select coalesce(n_tup_upd, 0)::float8 as n from pg_stat_user_tables
where relname = 'ai_course_jobs'

-- name: ai_running
select count(*)::int as n from ai_course_jobs where status = 'processing'

-- name: ai_quota_rows
-- The shared buckets as they were last written (--keep: a trace of them).
select provider, model, tpm, tokens, requests, window_seconds, learning_calls,
       extract(epoch from refilled_at)::float8 as refilled_at,
       extract(epoch from limited_at)::float8 as limited_at,
       (to_jsonb(q) ->> 'share')::float8 as share  -- sql/036's; null before it
from ai_job_provider_quotas q
