-- 024: what a client may ask for and watch: progress, the course as it grows, the
-- batch price, a trace to continue.
--
--   progress        jsonb, null until a worker starts the job; written by workers
--                   only (progress_jobs): percent (integer 0-100, never lowered
--                   within an attempt), phase (generating, storing, batched),
--                   tokensOut, updatedAt; course jobs add groupsDone, groupsTotal.
--                   percent is 100 once the job is done.
--   partial_result  (course jobs) the groups finished so far, in course.json's
--                   shape; null before the first group and again once done.
--   batch           the client's choice of the provider's Batch API.
--   trace_parent    a W3C traceparent from the client, or null.
--
-- What can be enforced here is, for every writer: the shapes (constraints), and
-- the progress rules (ai_job_progress_guard, a BEFORE trigger whose WHEN keeps it
-- from being called at all on the hot path: claims of fresh jobs, heartbeats,
-- completions of jobs that already show 100 and no partial result).
--
-- ai_jobs_notify_events now names the jobs whose status or progress changed, so
-- that a web process can tell the event streams of those jobs (and only those)
-- that they changed. Ids only: any role may LISTEN, and row-level security makes
-- an id worthless; the stream reads the row as its user.

alter table ai_course_jobs
    add column if not exists progress jsonb,
    add column if not exists partial_result jsonb,
    add column if not exists batch boolean not null default false,
    add column if not exists trace_parent text;

alter table ai_media_jobs
    add column if not exists progress jsonb,
    add column if not exists batch boolean not null default false,
    add column if not exists trace_parent text;

------------------------------------------------------------------------------
-- Shapes
------------------------------------------------------------------------------

-- A traceparent as W3C Trace Context level 1 writes it: version 00, lower-case
-- hex, and neither the trace id nor the parent id all zeros (both invalid).
-- Progress as a worker writes it; CASE, not AND, because PostgreSQL may evaluate
-- the operands of AND in any order and the cast must only see a JSON number.
-- (Inline expressions, not functions: a function in a constraint needs EXECUTE
-- for every role that writes the table.)
alter table ai_course_jobs
    drop constraint if exists ai_course_jobs_trace_parent_w3c,
    add constraint ai_course_jobs_trace_parent_w3c check (
        trace_parent is null
        or (trace_parent ~ '^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
            and substr(trace_parent, 4, 32) <> repeat('0', 32)
            and substr(trace_parent, 37, 16) <> repeat('0', 16))),
    drop constraint if exists ai_course_jobs_progress_shape,
    add constraint ai_course_jobs_progress_shape check (
        case
            when progress is null then true
            when jsonb_typeof(progress) <> 'object' then false
            when progress ? 'phase'
                 and (progress -> 'phase') not in ('"generating"', '"storing"', '"batched"')
                then false
            when not progress ? 'percent' then true
            when jsonb_typeof(progress -> 'percent') <> 'number' then false
            else (progress ->> 'percent')::numeric between 0 and 100
                 and (progress ->> 'percent')::numeric = trunc((progress ->> 'percent')::numeric)
        end),
    drop constraint if exists ai_course_jobs_partial_result_object,
    add constraint ai_course_jobs_partial_result_object
        check (partial_result is null or jsonb_typeof(partial_result) = 'object');

alter table ai_media_jobs
    drop constraint if exists ai_media_jobs_trace_parent_w3c,
    add constraint ai_media_jobs_trace_parent_w3c check (
        trace_parent is null
        or (trace_parent ~ '^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
            and substr(trace_parent, 4, 32) <> repeat('0', 32)
            and substr(trace_parent, 37, 16) <> repeat('0', 16))),
    drop constraint if exists ai_media_jobs_progress_shape,
    add constraint ai_media_jobs_progress_shape check (
        case
            when progress is null then true
            when jsonb_typeof(progress) <> 'object' then false
            when progress ? 'phase'
                 and (progress -> 'phase') not in ('"generating"', '"storing"', '"batched"')
                then false
            when not progress ? 'percent' then true
            when jsonb_typeof(progress -> 'percent') <> 'number' then false
            else (progress ->> 'percent')::numeric between 0 and 100
                 and (progress ->> 'percent')::numeric = trunc((progress ->> 'percent')::numeric)
        end);

------------------------------------------------------------------------------
-- The progress rules
------------------------------------------------------------------------------

-- BEFORE INSERT or UPDATE, per row, called only when its trigger's WHEN says a
-- rule is at stake:
--   insert               progress and partial_result start null (a job inserted
--                        as done, by an operator, shows 100);
--   a claim (a new       progress and partial_result of the previous attempt go,
--   claim token while    unless the statement writes them itself;
--   processing)
--   progress written     percent rounded into 0-100 and never below the percent
--                        already written in the same attempt (a missing percent
--                        keeps the one written);
--   done                 percent 100, partial_result null, whoever wrote done.
-- One function for both tables: partial_result is only touched on the course
-- table (a record's fields are looked up when the line runs).
create or replace function ai_job_progress_guard() returns trigger
language plpgsql
set search_path = pg_catalog, public, pg_temp
as $$
declare
    course boolean := tg_table_name = 'ai_course_jobs';
    pct numeric;
    was numeric;
begin
    if tg_op = 'INSERT' then
        new.progress := null;
        if course then
            new.partial_result := null;
        end if;
    elsif new.status = 'processing' and new.claim_token is distinct from old.claim_token
          and new.progress is not distinct from old.progress then
        new.progress := null;
        if course then
            new.partial_result := null;
        end if;
    elsif new.progress is not null and jsonb_typeof(new.progress) = 'object' then
        if jsonb_typeof(new.progress -> 'percent') = 'number' then
            pct := least(100, greatest(0, round((new.progress ->> 'percent')::numeric)));
        end if;
        if old.progress is not null and jsonb_typeof(old.progress -> 'percent') = 'number'
           and new.claim_token is not distinct from old.claim_token then
            was := (old.progress ->> 'percent')::numeric;
            pct := greatest(pct, was);
        end if;
        if pct is not null then
            new.progress := jsonb_set(new.progress, '{percent}', to_jsonb(pct::int));
        end if;
    end if;
    if new.status = 'done' then
        new.progress := coalesce(new.progress, '{}'::jsonb) || '{"percent": 100}'::jsonb;
        if course then
            new.partial_result := null;
        end if;
    end if;
    return new;
end
$$;

-- After ai_*_admit and before the others that may look at the row (names order
-- BEFORE triggers): a client's insert has had its status reset by then.
create or replace trigger ai_course_jobs_progress_insert
    before insert on ai_course_jobs
    for each row
    when (new.progress is not null or new.partial_result is not null or new.status = 'done')
    execute function ai_job_progress_guard();

create or replace trigger ai_media_jobs_progress_insert
    before insert on ai_media_jobs
    for each row when (new.progress is not null or new.status = 'done')
    execute function ai_job_progress_guard();

create or replace trigger ai_course_jobs_progress_update
    before update on ai_course_jobs
    for each row
    when ((new.status = 'done'
           and (new.partial_result is not null or new.progress is null
                or new.progress -> 'percent' is distinct from '100'::jsonb))
          or (new.progress is distinct from old.progress and new.progress is not null)
          or (new.status = 'processing' and new.claim_token is distinct from old.claim_token
              and (old.progress is not null or old.partial_result is not null)))
    execute function ai_job_progress_guard();

create or replace trigger ai_media_jobs_progress_update
    before update on ai_media_jobs
    for each row
    when ((new.status = 'done'
           and (new.progress is null or new.progress -> 'percent' is distinct from '100'::jsonb))
          or (new.progress is distinct from old.progress and new.progress is not null)
          or (new.status = 'processing' and new.claim_token is distinct from old.claim_token
              and old.progress is not null))
    execute function ai_job_progress_guard();

------------------------------------------------------------------------------
-- progress_jobs: the worker's progress for many jobs, one statement
------------------------------------------------------------------------------

-- Like heartbeat_jobs (and a heartbeat too): each job's progress and, for course
-- jobs, its partial result, by claim token; a null progress or partial leaves
-- that column as it is. updatedAt is the database's clock. Returns the ids
-- written; a job no longer held by that token (cancelled, rescued, finished) is
-- left alone. The guard trigger keeps percent from going down.
create or replace function progress_jobs(
    table_name text, job_ids uuid[], tokens uuid[], job_progress jsonb[],
    job_partial jsonb[] default null)
returns setof uuid
language plpgsql
set search_path = pg_catalog, public, pg_temp
as $$
begin
    if ai_job_table(table_name) = 'ai_course_jobs' then
        return query
        update ai_course_jobs j
        set last_heartbeat = clock_timestamp(),
            progress = case when p.progress is null then j.progress
                            else p.progress || jsonb_build_object('updatedAt', clock_timestamp())
                       end,
            partial_result = coalesce(p.partial, j.partial_result)
        from unnest(job_ids, tokens, job_progress, coalesce(job_partial, '{}'::jsonb[]))
             as p(id, token, progress, partial)
        where j.id = any(job_ids) and j.id = p.id and j.claim_token = p.token
          and j.status = 'processing'
        returning j.id;
    else
        return query
        update ai_media_jobs j
        set last_heartbeat = clock_timestamp(),
            progress = case when p.progress is null then j.progress
                            else p.progress || jsonb_build_object('updatedAt', clock_timestamp())
                       end
        from unnest(job_ids, tokens, job_progress) as p(id, token, progress)
        where j.id = any(job_ids) and j.id = p.id and j.claim_token = p.token
          and j.status = 'processing'
        returning j.id;
    end if;
end
$$;

------------------------------------------------------------------------------
-- ai_jobs_events names the jobs that changed
------------------------------------------------------------------------------

-- As in triggers/007, one statement-level trigger per table and event; an
-- update now notifies with the ids of the rows whose status or progress
-- changed, 200 to a notification (a payload stays under PostgreSQL's 8000
-- bytes): '<table> <id> <id> ...'. Inserts and deletes name the table alone,
-- as before (no stream can be open on a job not yet inserted, and a deleted job
-- has ended). Heartbeats and empty claims stay silent.
create or replace function ai_jobs_notify_events() returns trigger
language plpgsql
set search_path = pg_catalog, public, pg_temp
as $$
declare
    ids text;
begin
    if tg_op = 'INSERT' then
        if exists (select 1 from new_rows) then
            perform pg_notify('ai_jobs_events', tg_table_name);
        end if;
    elsif tg_op = 'DELETE' then
        if exists (select 1 from old_rows) then
            perform pg_notify('ai_jobs_events', tg_table_name);
        end if;
    else
        for ids in
            select string_agg(c.id::text, ' ')
            from (select n.id, (row_number() over () - 1) / 200 as chunk
                  from new_rows n join old_rows o on o.id = n.id
                  where n.status is distinct from o.status
                     or n.progress is distinct from o.progress) c
            group by c.chunk
        loop
            perform pg_notify('ai_jobs_events', tg_table_name || ' ' || ids);
        end loop;
    end if;
    return null;
end
$$;

------------------------------------------------------------------------------
-- The event streams' read: many users' jobs, each read as its user
------------------------------------------------------------------------------

-- What `ai-jobs web` does for each user of a request (role authenticated, the
-- token's claims in request.jwt.claims, local), done for many users in one
-- statement: for each i, the jobs job_ids[k] with readers[k] = i, read as role
-- authenticated with claims[i], so row-level security and the column grants
-- decide what each user sees, as they would in a transaction of its own. The
-- streams of a web process re-read their jobs after every change; one user's
-- transaction each (four round trips) held a thousand users' streams to most
-- of a second on a small machine.
-- SECURITY INVOKER: the caller must be a member of authenticated (the web
-- process's role, as for its requests). The SET clause opens a GUC level of
-- its own, so the role and the claims are undone when the function returns.
create or replace function ai_job_read_as_users(claims text[], job_ids uuid[], readers int[])
returns table(reader int, id uuid, job_table text, status text, progress jsonb,
              partial_result jsonb, result_path text, error text,
              created_at timestamptz, completed_at timestamptz)
language plpgsql
set search_path = pg_catalog, public, pg_temp
as $$
declare
    i int;
    mine uuid[];
begin
    perform set_config('role', 'authenticated', true);
    for i in 1 .. coalesce(array_length(claims, 1), 0) loop
        perform set_config('request.jwt.claims', claims[i], true);
        mine := array(select u.j from unnest(job_ids, readers) as u(j, r) where u.r = i);
        return query
        select i, c.id, 'ai_course_jobs'::text, c.status, c.progress, c.partial_result,
               c.result_path, c.error, c.created_at, c.completed_at
        from ai_course_jobs c where c.id = any(mine)
        union all
        select i, m.id, 'ai_media_jobs'::text, m.status, m.progress, null::jsonb,
               m.result_path, m.error, m.created_at, m.completed_at
        from ai_media_jobs m where m.id = any(mine);
    end loop;
end
$$;

------------------------------------------------------------------------------
-- Privileges
------------------------------------------------------------------------------

revoke all on function
    ai_job_read_as_users(text[], uuid[], int[]),
    ai_job_progress_guard(),
    progress_jobs(text, uuid[], uuid[], jsonb[], jsonb[])
    from public, anon, authenticated, service_role;

grant execute on function progress_jobs(text, uuid[], uuid[], jsonb[], jsonb[]) to service_role;
-- A web process connected as a member of service_role (and of authenticated).
grant execute on function ai_job_read_as_users(text[], uuid[], int[]) to service_role;

-- A signed-in user asks for the batch price and hands over a trace, and watches
-- their job: its progress, the course as it grows, whether it was batched.
grant insert (batch, trace_parent) on ai_course_jobs, ai_media_jobs to authenticated;
grant select (progress, partial_result, batch) on ai_course_jobs to authenticated;
grant select (progress, batch) on ai_media_jobs to authenticated;
