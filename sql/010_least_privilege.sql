-- 010: least privilege for everything migrations 001-009 created.
--
-- On Supabase every browser reaches the tables through PostgREST as `anon` (the
-- anon key) or `authenticated` (a signed-in user's JWT), and the project's
-- default privileges grant both of them, and service_role, ALL on whatever is
-- later created in schema public; PostgreSQL itself grants EXECUTE on every new
-- function to PUBLIC. Migrations 001-009 revoked none of that: anon could
-- truncate the job tables, rewrite ai_job_settings or the catalog, and setval the
-- rejection counter. This file takes it all back and grants what each role needs
-- (docs/security.md):
--
--   anon           nothing
--   authenticated  insert the request columns of a job for itself and read its own
--                  jobs' public columns (never claim_token or worker_id); read the
--                  rate limit; call check_ai_job_rate_limit
--   service_role   the worker's and the operators' statements and functions (no
--                  TRUNCATE, TRIGGER or REFERENCES: a trigger it could plant
--                  would run with the rights of whoever writes the table next)
--   the owner      everything (the migrator, usually the worker too)
--
-- Row-level security is enabled on every table; a table with no policy is closed
-- to every role but the owner and service_role (BYPASSRLS on Supabase and in
-- sql/002). Objects are named one by one: schema public on Supabase also holds
-- the project's own tables and functions, which are none of our business.
--
-- Rule for every later migration: end with `revoke all ... from public, anon,
-- authenticated, service_role` on each object it creates, then grant what is
-- needed; tests/integration/test_privileges.py fails on anything else.

-- Tables and the view --------------------------------------------------------

revoke all on table ai_course_jobs, ai_media_jobs, ai_job_settings, ai_job_counter_samples,
    ai_course_catalog, ai_job_alert_state, ai_jobs_migrations, ai_job_metrics
    from public, anon, authenticated, service_role;

grant select, insert, update, delete on ai_course_jobs, ai_media_jobs to service_role;
grant select, update on ai_job_settings to service_role;
grant select, insert, delete on ai_job_counter_samples to service_role;
grant select, insert, update, delete on ai_course_catalog to service_role;
grant select, insert, update on ai_job_alert_state to service_role;
grant select on ai_jobs_migrations to service_role;
-- A view reads its tables with its owner's rights, past row-level security:
-- counts over every user's jobs are for operators only.
grant select on ai_job_metrics to service_role;

-- A signed-in user: the request columns (course_id too: sql/011 checks whose
-- course it is), and the public columns of the rows RLS lets them see.
grant insert (subject, params, created_by, course_id) on ai_course_jobs to authenticated;
grant insert (prompt, media_type, params, created_by, course_id) on ai_media_jobs to authenticated;
grant select (id, status, params, retry_count, max_retries, error, created_by, created_at,
              run_after, started_at, last_heartbeat, completed_at, result_path, metrics,
              subject, course_id)
    on ai_course_jobs to authenticated;
grant select (id, status, params, retry_count, max_retries, error, created_by, created_at,
              run_after, started_at, last_heartbeat, completed_at, result_path, metrics,
              prompt, media_type, course_id)
    on ai_media_jobs to authenticated;
-- check_ai_job_rate_limit runs as its caller and reads the limit.
grant select (singleton, rate_limit_per_hour) on ai_job_settings to authenticated;

-- Row-level security everywhere (the job tables have had it since 004).
alter table ai_job_settings enable row level security;
alter table ai_job_counter_samples enable row level security;
alter table ai_course_catalog enable row level security;
alter table ai_job_alert_state enable row level security;
alter table ai_jobs_migrations enable row level security;

drop policy if exists ai_job_settings_read on ai_job_settings;
create policy ai_job_settings_read on ai_job_settings for select to authenticated using (true);

-- The rejection counter -------------------------------------------------------
-- Bumped only by the rate-limit trigger (SECURITY DEFINER); read by operators.

revoke all on sequence ai_job_rate_limit_rejections
    from public, anon, authenticated, service_role;
grant select on sequence ai_job_rate_limit_rejections to service_role;

-- Functions -------------------------------------------------------------------

revoke all on function
    ai_job_table(text),
    ai_job_type(text),
    ai_job_slugify(text),
    ai_course_jobs_defaults(),
    ai_job_user_jobs_last_hour(uuid, text),
    check_ai_job_rate_limit(uuid, text),
    ai_job_enforce_rate_limit(),
    mark_stale_jobs(interval),
    move_to_dead_letter(),
    requeue_job(uuid, text),
    purge_old_jobs(interval),
    claim_jobs(text, text, integer),
    claim_job(text, uuid, text),
    heartbeat_jobs(text, uuid[], uuid[]),
    complete_jobs(text, uuid[], uuid[], text[], jsonb[]),
    complete_and_claim(text, text, integer, uuid[], uuid[], text[], jsonb[]),
    fail_job(text, uuid, uuid, text, double precision, boolean),
    release_jobs(text, uuid[], uuid[]),
    rescue_stale_jobs(integer),
    next_job_due(),
    ai_jobs_notify_insert(),
    ai_jobs_notify_pending(),
    ai_jobs_notify_events()
    from public, anon, authenticated, service_role;

-- Trigger functions need no EXECUTE grant to fire; what they call does, as the
-- inserting role, unless they run as their owner. The course_id default calls
-- ai_job_slugify: it now runs as its owner (and sql/011 replaces its body).
alter function ai_course_jobs_defaults() security definer set search_path = public, pg_temp;

-- Operators and a worker connected as service_role: the runbook's functions and
-- the worker's state changes, with the helpers they call as their caller.
grant execute on function
    ai_job_table(text),
    ai_job_type(text),
    ai_job_slugify(text),
    ai_job_user_jobs_last_hour(uuid, text),
    check_ai_job_rate_limit(uuid, text),
    mark_stale_jobs(interval),
    move_to_dead_letter(),
    requeue_job(uuid, text),
    purge_old_jobs(interval),
    claim_jobs(text, text, integer),
    claim_job(text, uuid, text),
    heartbeat_jobs(text, uuid[], uuid[]),
    complete_jobs(text, uuid[], uuid[], text[], jsonb[]),
    complete_and_claim(text, text, integer, uuid[], uuid[], text[], jsonb[]),
    fail_job(text, uuid, uuid, text, double precision, boolean),
    release_jobs(text, uuid[], uuid[]),
    rescue_stale_jobs(integer),
    next_job_due()
    to service_role;

-- A signed-in user may ask whether they can still insert (sql/004). It counts
-- with the caller's rights, so RLS limits it to the caller's own jobs.
grant execute on function
    check_ai_job_rate_limit(uuid, text),
    ai_job_user_jobs_last_hour(uuid, text),
    ai_job_table(text)
    to authenticated;
