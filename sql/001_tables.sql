-- 001: the two job tables, their indexes, and the small settings the database owns.
--
-- Both tables carry the same lifecycle columns (see docs/state_machine.md). Two
-- columns are ours beyond the public interface:
--   claim_token  a fresh uuid per claim; every later write by a worker (heartbeat,
--                finish, fail, release) must present it, so a worker that lost its
--                job (marked stale and handed to another worker) cannot overwrite it.
--   worker_id    who holds the job, for operators.

create table if not exists ai_course_jobs (
    id             uuid primary key default gen_random_uuid(),
    status         text not null default 'pending',
    params         jsonb not null default '{}'::jsonb,
    retry_count    int not null default 0,
    max_retries    int not null default 3,
    error          text,
    created_by     uuid,
    created_at     timestamptz not null default now(),
    run_after      timestamptz not null default now(),
    started_at     timestamptz,
    last_heartbeat timestamptz,
    completed_at   timestamptz,
    result_path    text,
    metrics        jsonb,
    claim_token    uuid,
    worker_id      text,
    subject        text not null,
    course_id      text,
    constraint ai_course_jobs_status_check
        check (status in ('pending', 'processing', 'done', 'failed', 'dead_letter', 'stale')),
    constraint ai_course_jobs_retry_check check (retry_count >= 0 and max_retries >= 0),
    constraint ai_course_jobs_params_check check (jsonb_typeof(params) = 'object'),
    constraint ai_course_jobs_subject_check check (length(btrim(subject)) > 0)
);

create table if not exists ai_media_jobs (
    id             uuid primary key default gen_random_uuid(),
    status         text not null default 'pending',
    params         jsonb not null default '{}'::jsonb,
    retry_count    int not null default 0,
    max_retries    int not null default 3,
    error          text,
    created_by     uuid,
    created_at     timestamptz not null default now(),
    run_after      timestamptz not null default now(),
    started_at     timestamptz,
    last_heartbeat timestamptz,
    completed_at   timestamptz,
    result_path    text,
    metrics        jsonb,
    claim_token    uuid,
    worker_id      text,
    prompt         text not null,
    media_type     text,
    course_id      text,
    constraint ai_media_jobs_status_check
        check (status in ('pending', 'processing', 'done', 'failed', 'dead_letter', 'stale')),
    constraint ai_media_jobs_retry_check check (retry_count >= 0 and max_retries >= 0),
    constraint ai_media_jobs_params_check check (jsonb_typeof(params) = 'object'),
    constraint ai_media_jobs_prompt_check check (length(btrim(prompt)) > 0),
    constraint ai_media_jobs_media_type_check check (media_type in ('image', 'audio'))
);

-- Claiming: the next due job. Partial, so the index holds only the few claimable
-- rows however many finished rows the table keeps; the claim stays an index lookup.
create index if not exists ai_course_jobs_claim_idx
    on ai_course_jobs (run_after) where status in ('pending', 'failed');
create index if not exists ai_media_jobs_claim_idx
    on ai_media_jobs (run_after) where status in ('pending', 'failed');

-- Stale detection: only running jobs, ordered by heartbeat age.
create index if not exists ai_course_jobs_running_idx
    on ai_course_jobs (last_heartbeat) where status = 'processing';
create index if not exists ai_media_jobs_running_idx
    on ai_media_jobs (last_heartbeat) where status = 'processing';

-- Rescue of jobs already marked stale (a handful at most).
create index if not exists ai_course_jobs_stale_idx
    on ai_course_jobs (last_heartbeat) where status = 'stale';
create index if not exists ai_media_jobs_stale_idx
    on ai_media_jobs (last_heartbeat) where status = 'stale';

-- Rate limit: one user's jobs of the last hour.
create index if not exists ai_course_jobs_user_idx
    on ai_course_jobs (created_by, created_at) where created_by is not null;
create index if not exists ai_media_jobs_user_idx
    on ai_media_jobs (created_by, created_at) where created_by is not null;

-- Retention and "dead letters in the last hour".
create index if not exists ai_course_jobs_finished_idx
    on ai_course_jobs (completed_at) where status in ('done', 'dead_letter');
create index if not exists ai_media_jobs_finished_idx
    on ai_media_jobs (completed_at) where status in ('done', 'dead_letter');

-- Recent jobs for the dashboard.
create index if not exists ai_course_jobs_created_idx on ai_course_jobs (created_at);
create index if not exists ai_media_jobs_created_idx on ai_media_jobs (created_at);

-- Settings that live in the database so that every client obeys them and an
-- operator can change them from psql without restarting anything:
--   update ai_job_settings set rate_limit_per_hour = 20;
create table if not exists ai_job_settings (
    singleton           boolean primary key default true check (singleton),
    rate_limit_per_hour int not null default 10 check (rate_limit_per_hour >= 0)
);
insert into ai_job_settings (singleton) values (true) on conflict do nothing;

-- Rate-limit rejections. A rejected insert rolls its transaction back, and with it
-- any row it could write; a sequence is not transactional, so nextval() made just
-- before the error survives the rollback, whatever client sent the insert. The
-- worker samples the counter (ai_job_counter_samples) to turn it into a rate.
create sequence if not exists ai_job_rate_limit_rejections;

create table if not exists ai_job_counter_samples (
    counter    text not null,
    sampled_at timestamptz not null default now(),
    value      bigint not null,
    primary key (counter, sampled_at)
);
