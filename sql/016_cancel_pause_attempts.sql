-- 016: cancel a job, pause a job type, and keep the end of every attempt.
--
-- cancelled   a terminal status, like done: set by cancel_job, purged by retention.
--             A cancelled job never starts; a running one loses its claim_token at
--             once (so nothing its worker writes later changes the row) and its
--             worker hears {"cancel": "<id>", "table": "..."} on ai_jobs and stops it.
-- pause       ai_job_queues holds one row per job table. claim_jobs and claim_job
--             hand out no job of a paused table, whatever the worker heard, so a
--             pause holds at once for every worker; pause_jobs and resume_jobs
--             notify ai_jobs ({"table": ..., "paused": ...}) so that workers stop
--             asking and start again without waiting for a sweep.
-- attempts    ai_job_attempts keeps one row per attempt that did not succeed
--             (failed, lost with its worker, cancelled while running), written by
--             fail_job, rescue_stale_jobs, defer_job (once it counts) and cancel_job. A successful attempt is the
--             job row itself (started_at .. completed_at): nothing is added to the
--             path of a job that succeeds.
--
-- Error codes, as in 003: 22023 unknown table, P0002 unknown job (also: a job that
-- is not the caller's), 55000 a job in a state that forbids the change.

------------------------------------------------------------------------------
-- Status `cancelled`
------------------------------------------------------------------------------

alter table ai_course_jobs drop constraint if exists ai_course_jobs_status_check;
alter table ai_course_jobs add constraint ai_course_jobs_status_check
    check (status in ('pending', 'processing', 'done', 'failed', 'dead_letter', 'stale',
                      'cancelled'));
alter table ai_media_jobs drop constraint if exists ai_media_jobs_status_check;
alter table ai_media_jobs add constraint ai_media_jobs_status_check
    check (status in ('pending', 'processing', 'done', 'failed', 'dead_letter', 'stale',
                      'cancelled'));

------------------------------------------------------------------------------
-- Attempts
------------------------------------------------------------------------------

create table if not exists ai_job_attempts (
    id          bigint generated always as identity primary key,
    job_table   text not null check (job_table in ('ai_course_jobs', 'ai_media_jobs')),
    job_id      uuid not null,
    attempt     int not null,            -- 1 for the first attempt (retry_count + 1 then)
    worker_id   text,
    started_at  timestamptz,
    ended_at    timestamptz not null default clock_timestamp(),
    outcome     text not null check (outcome in ('failed', 'lost', 'cancelled')),
    next_status text not null,           -- what the job became: failed, dead_letter, pending, cancelled
    error       text
);

-- One job's attempts (the job page), and retention / charts by time.
create index if not exists ai_job_attempts_job_idx on ai_job_attempts (job_id);
create index if not exists ai_job_attempts_ended_idx on ai_job_attempts (ended_at);

------------------------------------------------------------------------------
-- Pause
------------------------------------------------------------------------------

create table if not exists ai_job_queues (
    job_table  text primary key check (job_table in ('ai_course_jobs', 'ai_media_jobs')),
    paused     boolean not null default false,
    changed_at timestamptz not null default now(),
    changed_by text
);
insert into ai_job_queues (job_table) values ('ai_course_jobs'), ('ai_media_jobs')
on conflict do nothing;

-- Sets the pause state; returns true when this call changed it. Notifies either
-- way, so a worker that missed the last notification hears this one. The payload
-- names the table: a worker of an older version reads it as "look at that table",
-- which is harmless (claim_jobs refuses a paused table).
create or replace function ai_job_set_paused(table_name text, pause boolean)
returns boolean
language plpgsql
as $$
declare
    t text := ai_job_table(table_name);
    changed boolean;
begin
    update ai_job_queues
    set paused = pause, changed_at = now(), changed_by = session_user
    where job_table = t and paused is distinct from pause;
    changed := found;
    perform pg_notify('ai_jobs', json_build_object('table', t, 'paused', pause)::text);
    perform pg_notify('ai_jobs_events', 'ai_job_queues');  -- dashboards
    return changed;
end
$$;

create or replace function pause_jobs(table_name text) returns boolean
language sql
as $$ select ai_job_set_paused(table_name, true) $$;

create or replace function resume_jobs(table_name text) returns boolean
language sql
as $$ select ai_job_set_paused(table_name, false) $$;

-- Claim up to max_jobs due jobs of one table (or of both, course jobs first, when
-- table_name is null); as in 009, and nothing from a paused table. The pause test
-- is an uncorrelated EXISTS: planned as a one-time filter, one primary-key probe
-- per call, and the statements stay static (cached plans).
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
        where j.id = any(array(
            select id from ai_course_jobs
            where status in ('pending', 'failed') and run_after <= now()
              and (status = 'pending' or retry_count < max_retries)
              and not exists (select from ai_job_queues q
                              where q.job_table = 'ai_course_jobs' and q.paused)
            order by run_after
            limit max_jobs
            for update of ai_course_jobs skip locked))
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
        where j.id = any(array(
            select id from ai_media_jobs
            where status in ('pending', 'failed') and run_after <= now()
              and (status = 'pending' or retry_count < max_retries)
              and not exists (select from ai_job_queues q
                              where q.job_table = 'ai_media_jobs' and q.paused)
            order by run_after
            limit max_jobs - got
            for update of ai_media_jobs skip locked))
        returning 'ai_media_jobs'::text, j.id, j.claim_token, j.retry_count, j.max_retries,
                  to_jsonb(j);
    end if;
end
$$;

-- The operator's "look at that job now" (003), also refused while paused.
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
                and not exists (select from ai_job_queues q where q.job_table = %1$L and q.paused)
              for update of %1$I skip locked) due
        where j.id = due.id
        returning %1$L::text, j.id, j.claim_token, j.retry_count, j.max_retries, to_jsonb(j)
    $q$, ai_job_table(table_name)) using worker, job_id;
end
$$;

-- When the next job of an unpaused table becomes due (null: none), for the
-- worker's timer. A resume notifies the workers, which then look by themselves.
create or replace function next_job_due() returns timestamptz
language sql stable
as $$
    select min(run_after) from (
        (select run_after from ai_course_jobs
         where status in ('pending', 'failed') and (status = 'pending' or retry_count < max_retries)
           and not exists (select from ai_job_queues q
                           where q.job_table = 'ai_course_jobs' and q.paused)
         order by run_after limit 1)
        union all
        (select run_after from ai_media_jobs
         where status in ('pending', 'failed') and (status = 'pending' or retry_count < max_retries)
           and not exists (select from ai_job_queues q
                           where q.job_table = 'ai_media_jobs' and q.paused)
         order by run_after limit 1)
    ) due
$$;

------------------------------------------------------------------------------
-- Failures, kept per attempt
------------------------------------------------------------------------------

-- One failed attempt, as in 011 (the counter, the base, the exponent and the wait
-- bounded; a failure that cannot be written still ends the job), and the attempt
-- kept in ai_job_attempts. Single-row statements read INTO variables rather than
-- RETURN QUERY: a row already returned could not be taken back if the fallback ran.
create or replace function fail_job(
    table_name text, job_id uuid, token uuid, error_message text,
    retry_base_seconds double precision default 10, give_up boolean default false)
returns table(status text, retry_count int, run_after timestamptz)
language plpgsql
as $$
declare
    t text := ai_job_table(table_name);
begin
    begin
        execute format($q$
            with failed as (
                update %1$I j
                set retry_count = least(j.retry_count, 999) + 1,
                    error = left(coalesce($3, 'unknown error'), 2000),
                    claim_token = null,
                    status = case when $5 or j.retry_count >= j.max_retries - 1 then 'dead_letter'
                                  else 'failed' end,
                    completed_at = case when $5 or j.retry_count >= j.max_retries - 1
                                        then clock_timestamp() end,
                    run_after = case when $5 or j.retry_count >= j.max_retries - 1 then j.run_after
                                     else clock_timestamp() + make_interval(secs => least(86400,
                                          greatest(0, least($4, 86400))
                                          * power(2, least(j.retry_count, 20))
                                          * (0.75 + random() * 0.5))) end
                where j.id = $1 and j.claim_token = $2 and j.status in ('processing', 'stale')
                returning j.id, j.status, j.retry_count, j.run_after, j.started_at, j.worker_id,
                          j.error
            ), kept as (
                insert into ai_job_attempts
                    (job_table, job_id, attempt, worker_id, started_at, outcome, next_status, error)
                select %1$L, f.id, f.retry_count, f.worker_id, f.started_at, 'failed', f.status,
                       f.error
                from failed f
            )
            select f.status, f.retry_count, f.run_after from failed f
        $q$, t) into status, retry_count, run_after
        using job_id, token, error_message, retry_base_seconds, give_up;
    exception when others then
        execute format($q$
            update %I j
            set status = 'dead_letter', completed_at = clock_timestamp(), claim_token = null,
                error = left('Failure could not be recorded (' || $3 || '): '
                             || coalesce($4, 'unknown error'), 2000)
            where j.id = $1 and j.claim_token = $2 and j.status in ('processing', 'stale')
            returning j.status, j.retry_count, j.run_after
        $q$, t) into status, retry_count, run_after
        using job_id, token, sqlerrm, error_message;
    end;
    if status is not null then
        return next;
    end if;
end
$$;

-- Stale jobs go back to work by themselves, counting a failed attempt (as in 011,
-- the counter bounded); the lost attempt is kept in ai_job_attempts.
create or replace function rescue_stale_jobs(max_jobs int default 100)
returns table(job_id uuid, job_type text, status text)
language plpgsql
as $$
declare
    t text;
begin
    foreach t in array array['ai_course_jobs', 'ai_media_jobs'] loop
        return query execute format($q$
            with rescued as (
                update %1$I j
                set retry_count = least(j.retry_count, 999) + 1,
                    error = 'Worker lost: heartbeat older than the stale timeout',
                    claim_token = null, worker_id = null,
                    status = case when j.retry_count >= j.max_retries - 1
                                  then 'dead_letter' else 'pending' end,
                    completed_at = case when j.retry_count >= j.max_retries - 1 then now() end,
                    run_after = now()
                from (select id, worker_id from %1$I where status = 'stale'
                      order by last_heartbeat limit $1 for update skip locked) s
                where j.id = s.id
                returning j.id, j.status, j.retry_count, j.started_at, j.error,
                          s.worker_id as lost_worker
            ), kept as (
                insert into ai_job_attempts
                    (job_table, job_id, attempt, worker_id, started_at, outcome, next_status, error)
                select %1$L, r.id, r.retry_count, r.lost_worker, r.started_at, 'lost', r.status,
                       r.error
                from rescued r
            )
            select r.id, %2$L::text, r.status from rescued r
        $q$, t, ai_job_type(t)) using max_jobs;
    end loop;
end
$$;

-- defer_job (014), the same, and a deferral that counts an attempt (the job has
-- waited for its providers longer than the limit) is kept in ai_job_attempts like
-- a failure.
create or replace function defer_job(
    table_name text, job_id uuid, token uuid, wait_seconds double precision, reason text,
    max_wait_seconds double precision default 1800)
returns table(status text, retry_count int, run_after timestamptz, counted boolean)
language plpgsql
as $$
begin
    return query execute format($q$
        with w as (
            select id, worker_id,
                   case when error is null then clock_timestamp()
                        else coalesce(provider_wait_since, clock_timestamp()) end as since
            from %1$I
            where id = $1 and claim_token = $2 and status in ('processing', 'stale')
            for update
        ), c as (
            select id, worker_id, since,
                   since < clock_timestamp() - make_interval(secs => $5) as counted
            from w
        ), d as (
            update %1$I j
            set retry_count = case when c.counted then least(j.retry_count, 999) + 1
                               else j.retry_count end,
                status = case when not c.counted then 'pending'
                              when j.retry_count >= j.max_retries - 1 then 'dead_letter'
                              else 'failed' end,
                completed_at = case when c.counted and j.retry_count >= j.max_retries - 1
                                    then clock_timestamp() end,
                run_after = clock_timestamp() + make_interval(secs => greatest($3, 0)),
                error = left(case when c.counted
                                  then coalesce($4, 'providers unavailable')
                                       || format(' (waiting since %%s, past the %%ss limit)',
                                                 to_char(c.since, 'YYYY-MM-DD HH24:MI:SSOF'), $5)
                                  else coalesce($4, 'providers unavailable') end, 2000),
                provider_wait_since = c.since,
                started_at = case when c.counted then j.started_at end,
                last_heartbeat = case when c.counted then j.last_heartbeat end,
                claim_token = null, worker_id = null
            from c
            where j.id = c.id
            returning j.id, j.status, j.retry_count, j.run_after, c.counted, c.worker_id,
                      j.started_at, j.error
        ), kept as (
            insert into ai_job_attempts
                (job_table, job_id, attempt, worker_id, started_at, outcome, next_status, error)
            select %1$L, d.id, d.retry_count, d.worker_id, d.started_at, 'failed', d.status,
                   d.error
            from d where d.counted
        )
        select d.status, d.retry_count, d.run_after, d.counted from d
    $q$, ai_job_table(table_name)) using job_id, token, wait_seconds, reason, max_wait_seconds;
end
$$;

------------------------------------------------------------------------------
-- Cancel
------------------------------------------------------------------------------

-- The work of a cancel, for any job (only_user null) or only for a job created by
-- only_user. Returns the status the job had. A job that is not the caller's is
-- "not found", as row-level security would make it.
create or replace function ai_job_cancel(job_id uuid, table_name text, only_user uuid)
returns text
language plpgsql
as $$
declare
    t text := ai_job_table(table_name);
    st text;
    owner uuid;
begin
    execute format('select status, created_by from %I where id = $1 for update', t)
        into st, owner using job_id;
    if st is null or (only_user is not null and owner is distinct from only_user) then
        raise exception 'Job % not found in %', job_id, t using errcode = 'no_data_found';
    end if;
    if st in ('done', 'dead_letter', 'cancelled') then
        raise exception 'Job % is already %: only a pending, failed, processing or stale job can be cancelled',
            job_id, st using errcode = 'object_not_in_prerequisite_state';
    end if;
    if st in ('processing', 'stale') then
        -- The attempt under way ends here; its worker hears it and stops.
        execute format($q$
            insert into ai_job_attempts
                (job_table, job_id, attempt, worker_id, started_at, outcome, next_status, error)
            select %1$L, id, retry_count + 1, worker_id, started_at, 'cancelled', 'cancelled',
                   'Cancelled while running'
            from %1$I where id = $1
        $q$, t) using job_id;
        perform pg_notify('ai_jobs', json_build_object('cancel', job_id, 'table', t)::text);
    end if;
    execute format($q$
        update %I set status = 'cancelled', completed_at = clock_timestamp(), claim_token = null
        where id = $1
    $q$, t) using job_id;
    return st;
end
$$;

-- A signed-in user's cancel: only a job they created (auth.uid()). SECURITY
-- DEFINER, because that user may not update the job tables themselves.
create or replace function ai_job_cancel_own(job_id uuid, table_name text)
returns text
language plpgsql security definer set search_path = public, pg_temp
as $$
declare
    me uuid := auth.uid();
begin
    if me is null then
        raise exception 'Cancelling a job needs a signed-in user (auth.uid() is null)'
            using errcode = 'insufficient_privilege';
    end if;
    return ai_job_cancel(job_id, table_name, me);
end
$$;

-- Public: a pending, failed, processing or stale job becomes cancelled; returns the
-- status it had. A caller who may update the job table (the owner, service_role:
-- operators and the worker) may cancel any job; anyone else (authenticated) only
-- their own, through ai_job_cancel_own. SECURITY INVOKER, so that the privilege
-- check sees the real caller.
create or replace function cancel_job(job_id uuid, table_name text)
returns text
language plpgsql
as $$
begin
    if has_table_privilege(ai_job_table(table_name), 'UPDATE') then
        return ai_job_cancel(job_id, table_name, null);
    end if;
    return ai_job_cancel_own(job_id, table_name);
end
$$;

------------------------------------------------------------------------------
-- Retention: cancelled jobs go like done ones; attempts as old as that too.
------------------------------------------------------------------------------

create or replace function purge_old_jobs(older_than interval default '90 days')
returns bigint
language plpgsql
as $$
declare
    n bigint;
    total bigint := 0;
begin
    delete from ai_course_jobs
    where status in ('done', 'dead_letter', 'cancelled') and completed_at < now() - older_than;
    get diagnostics n = row_count;
    total := total + n;
    delete from ai_media_jobs
    where status in ('done', 'dead_letter', 'cancelled') and completed_at < now() - older_than;
    get diagnostics n = row_count;
    total := total + n;
    delete from ai_job_attempts where ended_at < now() - older_than;
    return total;
end
$$;

------------------------------------------------------------------------------
-- Privileges
------------------------------------------------------------------------------

alter table ai_job_attempts enable row level security;
alter table ai_job_queues enable row level security;
revoke all on ai_job_attempts, ai_job_queues from public, anon, authenticated, service_role;
grant select, insert, update, delete on ai_job_attempts, ai_job_queues to service_role;
-- The identity column's sequence: inserts draw from it without a grant.
revoke all on sequence ai_job_attempts_id_seq from public, anon, authenticated, service_role;

revoke execute on function
    ai_job_set_paused(text, boolean), pause_jobs(text), resume_jobs(text),
    claim_jobs(text, text, int), claim_job(text, uuid, text), next_job_due(),
    fail_job(text, uuid, uuid, text, double precision, boolean), rescue_stale_jobs(int),
    defer_job(text, uuid, uuid, double precision, text, double precision),
    ai_job_cancel(uuid, text, uuid), ai_job_cancel_own(uuid, text), cancel_job(uuid, text),
    purge_old_jobs(interval)
from public, anon, authenticated, service_role;
grant execute on function
    ai_job_set_paused(text, boolean), pause_jobs(text), resume_jobs(text),
    claim_jobs(text, text, int), claim_job(text, uuid, text), next_job_due(),
    fail_job(text, uuid, uuid, text, double precision, boolean), rescue_stale_jobs(int),
    defer_job(text, uuid, uuid, double precision, text, double precision),
    ai_job_cancel(uuid, text, uuid), ai_job_cancel_own(uuid, text), cancel_job(uuid, text),
    purge_old_jobs(interval)
to service_role;
-- A signed-in user cancels their own jobs: cancel_job, which hands them to
-- ai_job_cancel_own (checks auth.uid()). ai_job_table: cancel_job's table check.
grant execute on function cancel_job(uuid, text), ai_job_cancel_own(uuid, text)
to authenticated;
grant execute on function ai_job_table(text) to authenticated;
