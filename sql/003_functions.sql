-- 003: every state change of a job, as functions that psql and the Python worker share.
--
-- Functions that take a table name accept exactly 'ai_course_jobs' or
-- 'ai_media_jobs' (ai_job_table raises otherwise); only a name that passed that
-- check is ever spliced into a statement, and then through format('%I').
--
-- Error codes raised here (the Python side translates them by SQLSTATE):
--   22023 invalid_parameter_value          unknown job table
--   P0002 no_data_found                     unknown job id
--   55000 object_not_in_prerequisite_state  job is running, cannot requeue
--   AJ429 (ours)                            rate limit exceeded

create or replace function ai_job_table(table_name text) returns text
language plpgsql immutable
as $$
begin
    if table_name in ('ai_course_jobs', 'ai_media_jobs') then
        return table_name;
    end if;
    raise exception 'Unknown job table: % (expected ai_course_jobs or ai_media_jobs)',
        coalesce(quote_literal(table_name), 'NULL')
        using errcode = 'invalid_parameter_value';
end
$$;

-- 'course' or 'media', as job_type in mark_stale_jobs and ai_job_metrics.
create or replace function ai_job_type(table_name text) returns text
language sql immutable
as $$ select case table_name when 'ai_course_jobs' then 'course' when 'ai_media_jobs' then 'media' end $$;

-- "Algebra Basics!" -> 'algebra-basics'. Accents are folded by hand because the
-- unaccent extension is not everywhere.
create or replace function ai_job_slugify(subject text) returns text
language sql immutable
as $$
    select coalesce(nullif(left(btrim(regexp_replace(lower(translate(subject,
        'ÀÁÂÃÄÅàáâãäåÈÉÊËèéêëÌÍÎÏìíîïÒÓÔÕÖØòóôõöøÙÚÛÜùúûüÇçÑñÝýÿ',
        'AAAAAAaaaaaaEEEEeeeeIIIIiiiiOOOOOOooooooUUUUuuuuCcNnYyy')),
        '[^a-z0-9]+', '-', 'g'), '-'), 80), ''), 'course')
$$;

create or replace function ai_course_jobs_defaults() returns trigger
language plpgsql
as $$
begin
    if new.course_id is null or btrim(new.course_id) = '' then
        new.course_id := ai_job_slugify(new.subject);
    end if;
    return new;
end
$$;

-- The jobs a user created in the last hour in one table.
create or replace function ai_job_user_jobs_last_hour(user_id uuid, table_name text)
returns bigint
language plpgsql stable
as $$
declare
    n bigint;
begin
    execute format(
        'select count(*) from %I where created_by = $1 and created_at > now() - interval ''1 hour''',
        ai_job_table(table_name))
    into n using user_id;
    return n;
end
$$;

create or replace function check_ai_job_rate_limit(user_id uuid, table_name text default 'ai_course_jobs')
returns boolean
language plpgsql stable
as $$
begin
    if user_id is null then
        return true;  -- system jobs are exempt
    end if;
    return ai_job_user_jobs_last_hour(user_id, table_name)
        < (select rate_limit_per_hour from ai_job_settings);
end
$$;

-- BEFORE INSERT, per row, for rows with a created_by. Concurrent inserts by one
-- user into one table queue on a transaction-level advisory lock, so each counts
-- the rows the previous ones committed (every statement of a volatile function
-- takes a fresh snapshot in READ COMMITTED). Earlier rows of the same multi-row
-- INSERT are visible too. SECURITY DEFINER: the rejection counter and the
-- settings are not the inserting user's to touch.
create or replace function ai_job_enforce_rate_limit() returns trigger
language plpgsql security definer set search_path = public, pg_temp
as $$
declare
    lim int;
    n bigint;
begin
    select rate_limit_per_hour into lim from ai_job_settings;
    perform pg_advisory_xact_lock(hashtext(tg_table_name), hashtext(new.created_by::text));
    n := ai_job_user_jobs_last_hour(new.created_by, tg_table_name);
    if n >= lim then
        perform nextval('ai_job_rate_limit_rejections');
        raise exception 'Rate limit exceeded: % jobs in the last hour (limit %) in %',
            n, lim, tg_table_name
            using errcode = 'AJ429',
                  hint = 'Wait, or change ai_job_settings.rate_limit_per_hour.';
    end if;
    return new;
end
$$;

-- Runbook: processing jobs whose heartbeat is older than stale_after become stale.
-- SKIP LOCKED: a row being written by its worker right now is not stale.
create or replace function mark_stale_jobs(stale_after interval default '5 minutes')
returns table(job_id uuid, job_type text, stale_duration interval)
language plpgsql
as $$
declare
    t text;
begin
    foreach t in array array['ai_course_jobs', 'ai_media_jobs'] loop
        return query execute format($q$
            update %1$I j set status = 'stale'
            from (select id from %1$I
                  where status = 'processing'
                    and coalesce(last_heartbeat, started_at, created_at) < now() - $1
                  for update skip locked) s
            where j.id = s.id
            returning j.id, %2$L::text,
                      date_trunc('second', now() - coalesce(j.last_heartbeat, j.started_at, j.created_at))
        $q$, t, ai_job_type(t)) using stale_after;
    end loop;
end
$$;

-- Runbook: failed jobs that have used all their retries go to the dead letter.
create or replace function move_to_dead_letter()
returns table(job_id uuid, job_type text, retry_count int)
language plpgsql
as $$
declare
    t text;
begin
    foreach t in array array['ai_course_jobs', 'ai_media_jobs'] loop
        return query execute format($q$
            update %1$I j set status = 'dead_letter', completed_at = now(), claim_token = null
            from (select id from %1$I
                  where status = 'failed' and retry_count >= max_retries
                  for update skip locked) s
            where j.id = s.id
            returning j.id, %2$L::text, j.retry_count
        $q$, t, ai_job_type(t));
    end loop;
end
$$;

-- Runbook: back to pending with a clean slate. The status change fires the
-- ai_jobs notification, so a listening worker picks the job up at once.
create or replace function requeue_job(job_id uuid, table_name text)
returns void
language plpgsql
as $$
declare
    t text := ai_job_table(table_name);
    st text;
begin
    execute format('select status from %I where id = $1 for update', t) into st using job_id;
    if st is null then
        raise exception 'Job % not found in %', job_id, t using errcode = 'no_data_found';
    end if;
    if st = 'processing' then
        raise exception 'Job % is processing; mark it stale first (select * from mark_stale_jobs())', job_id
            using errcode = 'object_not_in_prerequisite_state';
    end if;
    execute format($q$
        update %I set status = 'pending', retry_count = 0, error = null, run_after = now(),
               started_at = null, last_heartbeat = null, completed_at = null,
               claim_token = null, worker_id = null
        where id = $1
    $q$, t) using job_id;
end
$$;

-- Runbook retention: finished jobs completed longer ago than older_than.
create or replace function purge_old_jobs(older_than interval default '90 days')
returns bigint
language plpgsql
as $$
declare
    n bigint;
    total bigint := 0;
begin
    delete from ai_course_jobs
    where status in ('done', 'dead_letter') and completed_at < now() - older_than;
    get diagnostics n = row_count;
    total := total + n;
    delete from ai_media_jobs
    where status in ('done', 'dead_letter') and completed_at < now() - older_than;
    get diagnostics n = row_count;
    return total + n;
end
$$;

create or replace view ai_job_metrics as
select job_type, status, count(*) as count,
       round(avg(extract(epoch from completed_at - started_at))::numeric, 2) as avg_duration_seconds
from (
    select 'course'::text as job_type, status, started_at, completed_at from ai_course_jobs
    union all
    select 'media'::text, status, started_at, completed_at from ai_media_jobs
) jobs
group by job_type, status;

------------------------------------------------------------------------------
-- The worker's state changes. Each write after the claim names the claim_token
-- it was given: a job that was marked stale and handed to another worker no
-- longer matches, and the late write changes nothing.
------------------------------------------------------------------------------

-- Claim up to max_jobs due jobs of one table (or of both, course jobs first,
-- when table_name is null). Due: pending, or failed with retries left, and
-- run_after reached. SKIP LOCKED: however many workers call this at once, each
-- row goes to one of them.
--
-- Static statements, one per table, rather than EXECUTE format(): this is the
-- hot path between a NOTIFY and a running job, and a static statement keeps its
-- cached plan (measured: about 0.13 ms a call against 0.55 ms planned each time).
create or replace function claim_jobs(table_name text, worker text, max_jobs int default 1)
returns table(job_table text, id uuid, claim_token uuid, retry_count int, max_retries int, job jsonb)
language plpgsql
as $$
#variable_conflict use_column
declare
    got int := 0;
begin
    if table_name is not null then
        perform ai_job_table(table_name);
    end if;
    if table_name is null or table_name = 'ai_course_jobs' then
        return query
        update ai_course_jobs j
        set status = 'processing', started_at = clock_timestamp(),
            last_heartbeat = clock_timestamp(), claim_token = gen_random_uuid(),
            worker_id = worker, completed_at = null
        from (select id from ai_course_jobs
              where status in ('pending', 'failed') and run_after <= now()
                and (status = 'pending' or retry_count < max_retries)
              order by run_after
              limit max_jobs
              for update skip locked) due
        where j.id = due.id
        returning 'ai_course_jobs'::text, j.id, j.claim_token, j.retry_count, j.max_retries,
                  to_jsonb(j);
        get diagnostics got = row_count;
    end if;
    if (table_name is null and got < max_jobs) or table_name = 'ai_media_jobs' then
        return query
        update ai_media_jobs j
        set status = 'processing', started_at = clock_timestamp(),
            last_heartbeat = clock_timestamp(), claim_token = gen_random_uuid(),
            worker_id = worker, completed_at = null
        from (select id from ai_media_jobs
              where status in ('pending', 'failed') and run_after <= now()
                and (status = 'pending' or retry_count < max_retries)
              order by run_after
              limit max_jobs - got
              for update skip locked) due
        where j.id = due.id
        returning 'ai_media_jobs'::text, j.id, j.claim_token, j.retry_count, j.max_retries,
                  to_jsonb(j);
    end if;
end
$$;

-- Claim one given job now, if it can run (pending, or failed with retries left),
-- whatever its run_after: the operator's "look at that job now".
create or replace function claim_job(table_name text, job_id uuid, worker text)
returns table(job_table text, id uuid, claim_token uuid, retry_count int, max_retries int, job jsonb)
language plpgsql
as $$
begin
    return query execute format($q$
        update %1$I j
        set status = 'processing', started_at = clock_timestamp(),
            last_heartbeat = clock_timestamp(), claim_token = gen_random_uuid(),
            worker_id = $1, completed_at = null
        from (select id from %1$I
              where id = $2 and status in ('pending', 'failed')
                and (status = 'pending' or retry_count < max_retries)
              for update skip locked) due
        where j.id = due.id
        returning %1$L::text, j.id, j.claim_token, j.retry_count, j.max_retries, to_jsonb(j)
    $q$, ai_job_table(table_name)) using worker, job_id;
end
$$;

-- The jobs of this list that the caller still holds get a fresh heartbeat; the
-- ids returned are those still held.
create or replace function heartbeat_jobs(table_name text, job_ids uuid[], tokens uuid[])
returns setof uuid
language plpgsql
as $$
begin
    return query execute format($q$
        update %I j set last_heartbeat = clock_timestamp()
        from unnest($1, $2) as h(id, token)
        where j.id = h.id and j.claim_token = h.token and j.status = 'processing'
        returning j.id
    $q$, ai_job_table(table_name)) using job_ids, tokens;
end
$$;

-- Finish a batch of jobs. A job marked stale but not yet handed on is still
-- accepted from the worker that holds its token: the work is done, keep it.
-- Static statements per table, like claim_jobs: this runs once per batch of
-- finished jobs, thousands of times a second under load.
create or replace function complete_jobs(
    table_name text, job_ids uuid[], tokens uuid[], result_paths text[], job_metrics jsonb[])
returns setof uuid
language plpgsql
as $$
begin
    if ai_job_table(table_name) = 'ai_course_jobs' then
        return query
        update ai_course_jobs j
        set status = 'done', completed_at = clock_timestamp(), result_path = d.result_path,
            metrics = d.metrics, error = null, claim_token = null
        from unnest(job_ids, tokens, result_paths, job_metrics) as d(id, token, result_path, metrics)
        where j.id = d.id and j.claim_token = d.token and j.status in ('processing', 'stale')
        returning j.id;
    else
        return query
        update ai_media_jobs j
        set status = 'done', completed_at = clock_timestamp(), result_path = d.result_path,
            metrics = d.metrics, error = null, claim_token = null
        from unnest(job_ids, tokens, result_paths, job_metrics) as d(id, token, result_path, metrics)
        where j.id = d.id and j.claim_token = d.token and j.status in ('processing', 'stale')
        returning j.id;
    end if;
end
$$;

-- The worker's busy loop: write the jobs that finished since the last claim and
-- claim the next ones in one transaction, one commit instead of two. Rows with
-- kind 'done' acknowledge a completion; rows with kind 'claimed' are new jobs.
create or replace function complete_and_claim(
    table_name text, worker text, max_jobs int,
    job_ids uuid[], tokens uuid[], result_paths text[], job_metrics jsonb[])
returns table(kind text, job_table text, id uuid, claim_token uuid, retry_count int,
              max_retries int, job jsonb)
language plpgsql
as $$
begin
    return query
    select 'done'::text, table_name, c.id, null::uuid, null::int, null::int, null::jsonb
    from complete_jobs(table_name, job_ids, tokens, result_paths, job_metrics) as c(id);
    return query
    select 'claimed'::text, c.* from claim_jobs(table_name, worker, max_jobs) as c;
end
$$;

-- One failed attempt: count it, keep the error, and either wait for the retry
-- (failed, run_after = now + base * 2^(n-1), jittered by +-25%) or, at
-- max_retries, go to the dead letter. give_up sends it there at once (a job
-- that can never succeed, such as invalid params). Returns nothing if the token
-- no longer matches (the job was taken away from this worker).
create or replace function fail_job(
    table_name text, job_id uuid, token uuid, error_message text,
    retry_base_seconds double precision default 10, give_up boolean default false)
returns table(status text, retry_count int, run_after timestamptz)
language plpgsql
as $$
begin
    return query execute format($q$
        update %I j
        set retry_count = j.retry_count + 1,
            error = left(coalesce($3, 'unknown error'), 2000),
            claim_token = null,
            status = case when $5 or j.retry_count + 1 >= j.max_retries then 'dead_letter'
                          else 'failed' end,
            completed_at = case when $5 or j.retry_count + 1 >= j.max_retries
                                then clock_timestamp() end,
            run_after = case when $5 or j.retry_count + 1 >= j.max_retries then j.run_after
                             else clock_timestamp() + make_interval(secs =>
                                  $4 * power(2, j.retry_count) * (0.75 + random() * 0.5)) end
        where j.id = $1 and j.claim_token = $2 and j.status in ('processing', 'stale')
        returning j.status, j.retry_count, j.run_after
    $q$, ai_job_table(table_name)) using job_id, token, error_message, retry_base_seconds, give_up;
end
$$;

-- Give jobs back without counting an attempt (graceful shutdown).
create or replace function release_jobs(table_name text, job_ids uuid[], tokens uuid[])
returns setof uuid
language plpgsql
as $$
begin
    return query execute format($q$
        update %I j
        set status = 'pending', started_at = null, last_heartbeat = null,
            claim_token = null, worker_id = null, run_after = now()
        from unnest($1, $2) as r(id, token)
        where j.id = r.id and j.claim_token = r.token and j.status in ('processing', 'stale')
        returning j.id
    $q$, ai_job_table(table_name)) using job_ids, tokens;
end
$$;

-- Stale jobs go back to work by themselves, counting a failed attempt, so a job
-- that keeps killing its workers ends in the dead letter. At most max_jobs per
-- table per call (the sweeper calls again while it gets a full page).
create or replace function rescue_stale_jobs(max_jobs int default 100)
returns table(job_id uuid, job_type text, status text)
language plpgsql
as $$
declare
    t text;
begin
    foreach t in array array['ai_course_jobs', 'ai_media_jobs'] loop
        return query execute format($q$
            update %1$I j
            set retry_count = j.retry_count + 1,
                error = 'Worker lost: heartbeat older than the stale timeout',
                claim_token = null, worker_id = null,
                status = case when j.retry_count + 1 >= j.max_retries then 'dead_letter' else 'pending' end,
                completed_at = case when j.retry_count + 1 >= j.max_retries then now() end,
                run_after = now()
            from (select id from %1$I where status = 'stale'
                  order by last_heartbeat limit $1 for update skip locked) s
            where j.id = s.id
            returning j.id, %2$L::text, j.status
        $q$, t, ai_job_type(t)) using max_jobs;
    end loop;
end
$$;

-- When the next job becomes due (null: none waiting), for the worker's timer.
create or replace function next_job_due() returns timestamptz
language sql stable
as $$
    select min(run_after) from (
        (select run_after from ai_course_jobs
         where status in ('pending', 'failed') and (status = 'pending' or retry_count < max_retries)
         order by run_after limit 1)
        union all
        (select run_after from ai_media_jobs
         where status in ('pending', 'failed') and (status = 'pending' or retry_count < max_retries)
         order by run_after limit 1)
    ) due
$$;

create or replace trigger ai_course_jobs_defaults
    before insert on ai_course_jobs
    for each row execute function ai_course_jobs_defaults();

create or replace trigger ai_course_jobs_rate_limit
    before insert on ai_course_jobs
    for each row when (new.created_by is not null)
    execute function ai_job_enforce_rate_limit();

create or replace trigger ai_media_jobs_rate_limit
    before insert on ai_media_jobs
    for each row when (new.created_by is not null)
    execute function ai_job_enforce_rate_limit();
