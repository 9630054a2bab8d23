-- 017: the operators' console: reads whose cost does not grow with history,
-- finding jobs among millions, and bulk actions.
--
-- Counts per status. Counting the live statuses (pending, processing, failed,
-- stale) walks their partial indexes: cost in proportion to the queue, not to the
-- history. The finished statuses (done, dead_letter, cancelled) are counted as
-- they change, by a statement-level trigger (one call per statement, never per
-- row: a claim of 100 jobs or a heartbeat scans its transition rows once and
-- writes nothing). It appends deltas to ai_job_status_deltas, an insert-only
-- table, so that two workers finishing jobs at the same moment never wait on one
-- counter row; ai_job_fold_counts() (each sweep) folds them into
-- ai_job_status_counts. Triggers see every writer: the worker, the runbook's
-- functions, and an operator's own UPDATE or DELETE in psql.
--
-- The runbook's view ai_job_metrics stays as it is, for psql: it scans everything.

create table if not exists ai_job_status_counts (
    job_table text not null check (job_table in ('ai_course_jobs', 'ai_media_jobs')),
    status    text not null,
    jobs      bigint not null default 0,
    timed     bigint not null default 0,            -- rows with a duration
    seconds   double precision not null default 0,  -- sum of completed_at - started_at
    primary key (job_table, status)
);

create table if not exists ai_job_status_deltas (
    job_table text not null,
    status    text not null,
    jobs      bigint not null,
    timed     bigint not null,
    seconds   double precision not null
);

-- SECURITY DEFINER: a signed-in user's insert fires it too, and the counts are
-- not theirs to write.
create or replace function ai_jobs_count_finished() returns trigger
language plpgsql security definer set search_path = public, pg_temp
as $$
begin
    if tg_op = 'INSERT' then
        insert into ai_job_status_deltas
        select tg_table_name, n.status, count(*), count(n.completed_at - n.started_at),
               coalesce(sum(extract(epoch from n.completed_at - n.started_at)), 0)
        from new_rows n
        where n.status in ('done', 'dead_letter', 'cancelled')
        group by n.status;
    elsif tg_op = 'DELETE' then
        insert into ai_job_status_deltas
        select tg_table_name, o.status, -count(*), -count(o.completed_at - o.started_at),
               -coalesce(sum(extract(epoch from o.completed_at - o.started_at)), 0)
        from old_rows o
        where o.status in ('done', 'dead_letter', 'cancelled')
        group by o.status;
    else
        insert into ai_job_status_deltas
        select tg_table_name, d.status, sum(d.jobs), sum(d.timed), sum(d.seconds)
        from (
            select n.status, 1 as jobs, (n.completed_at - n.started_at is not null)::int as timed,
                   coalesce(extract(epoch from n.completed_at - n.started_at), 0) as seconds
            from new_rows n where n.status in ('done', 'dead_letter', 'cancelled')
            union all
            select o.status, -1, -(o.completed_at - o.started_at is not null)::int,
                   -coalesce(extract(epoch from o.completed_at - o.started_at), 0)
            from old_rows o where o.status in ('done', 'dead_letter', 'cancelled')
        ) d
        group by d.status
        having sum(d.jobs) <> 0 or sum(d.timed) <> 0 or sum(d.seconds) <> 0;
    end if;
    return null;
end
$$;

create or replace function ai_jobs_count_truncated() returns trigger
language plpgsql security definer set search_path = public, pg_temp
as $$
begin
    delete from ai_job_status_deltas where job_table = tg_table_name;
    delete from ai_job_status_counts where job_table = tg_table_name;
    return null;
end
$$;

create or replace trigger ai_course_jobs_count_insert
    after insert on ai_course_jobs referencing new table as new_rows
    for each statement execute function ai_jobs_count_finished();
create or replace trigger ai_course_jobs_count_update
    after update on ai_course_jobs referencing old table as old_rows new table as new_rows
    for each statement execute function ai_jobs_count_finished();
create or replace trigger ai_course_jobs_count_delete
    after delete on ai_course_jobs referencing old table as old_rows
    for each statement execute function ai_jobs_count_finished();
create or replace trigger ai_course_jobs_count_truncate
    after truncate on ai_course_jobs
    for each statement execute function ai_jobs_count_truncated();
create or replace trigger ai_media_jobs_count_insert
    after insert on ai_media_jobs referencing new table as new_rows
    for each statement execute function ai_jobs_count_finished();
create or replace trigger ai_media_jobs_count_update
    after update on ai_media_jobs referencing old table as old_rows new table as new_rows
    for each statement execute function ai_jobs_count_finished();
create or replace trigger ai_media_jobs_count_delete
    after delete on ai_media_jobs referencing old table as old_rows
    for each statement execute function ai_jobs_count_finished();
create or replace trigger ai_media_jobs_count_truncate
    after truncate on ai_media_jobs
    for each statement execute function ai_jobs_count_truncated();

-- Count the finished jobs afresh: a full scan, run by this migration, and by an
-- operator after writing rows with triggers off (session_replication_role =
-- replica, as a bulk load may). It locks the job tables against writes while it
-- counts, so that nothing slips between the count and the next delta.
create or replace function ai_job_recount() returns void
language plpgsql
as $$
begin
    lock table ai_course_jobs, ai_media_jobs in share mode;
    lock table ai_job_status_counts, ai_job_status_deltas in exclusive mode;
    delete from ai_job_status_deltas;
    delete from ai_job_status_counts;
    insert into ai_job_status_counts (job_table, status, jobs, timed, seconds)
    select 'ai_course_jobs', status, count(*), count(completed_at - started_at),
           coalesce(sum(extract(epoch from completed_at - started_at)), 0)
    from ai_course_jobs where status in ('done', 'dead_letter', 'cancelled') group by status
    union all
    select 'ai_media_jobs', status, count(*), count(completed_at - started_at),
           coalesce(sum(extract(epoch from completed_at - started_at)), 0)
    from ai_media_jobs where status in ('done', 'dead_letter', 'cancelled') group by status;
end
$$;

select ai_job_recount();

-- Fold the deltas into the counts. Safe from several sessions at once: each delta
-- row is deleted, and so added, by one of them.
create or replace function ai_job_fold_counts() returns bigint
language sql
as $$
    with d as (delete from ai_job_status_deltas returning *),
    folded as (
        insert into ai_job_status_counts as c (job_table, status, jobs, timed, seconds)
        select job_table, status, sum(jobs), sum(timed), sum(seconds)
        from d group by job_table, status
        on conflict (job_table, status) do update
            set jobs = c.jobs + excluded.jobs, timed = c.timed + excluded.timed,
                seconds = c.seconds + excluded.seconds
        returning 1
    )
    select count(*) from d
$$;

------------------------------------------------------------------------------
-- Indexes for finding jobs and for the finished statuses
------------------------------------------------------------------------------

-- Newest first with a tie-breaker, so that keyset pagination is one index walk
-- even when a bulk insert gave thousands of jobs the same created_at. Replaces
-- 001's (created_at) index: the same number of indexes to maintain.
create index if not exists ai_course_jobs_created_id_idx on ai_course_jobs (created_at, id);
create index if not exists ai_media_jobs_created_id_idx on ai_media_jobs (created_at, id);
drop index if exists ai_course_jobs_created_idx;
drop index if exists ai_media_jobs_created_idx;

-- Retention, the hour's dead letters, charts: finished jobs by completion time,
-- cancelled ones included now. Replaces 001's index of done and dead_letter.
create index if not exists ai_course_jobs_ended_idx
    on ai_course_jobs (completed_at) where status in ('done', 'dead_letter', 'cancelled');
create index if not exists ai_media_jobs_ended_idx
    on ai_media_jobs (completed_at) where status in ('done', 'dead_letter', 'cancelled');
drop index if exists ai_course_jobs_finished_idx;
drop index if exists ai_media_jobs_finished_idx;

-- The rare finished statuses, newest first (filtering to them must not walk past
-- a million done jobs). Partial: a row enters them only when it becomes dead
-- letter or cancelled, never on a claim, heartbeat or completion.
create index if not exists ai_course_jobs_dead_idx
    on ai_course_jobs (created_at, id) where status = 'dead_letter';
create index if not exists ai_media_jobs_dead_idx
    on ai_media_jobs (created_at, id) where status = 'dead_letter';
create index if not exists ai_course_jobs_cancelled_idx
    on ai_course_jobs (created_at, id) where status = 'cancelled';
create index if not exists ai_media_jobs_cancelled_idx
    on ai_media_jobs (created_at, id) where status = 'cancelled';

-- Jobs per provider, newest first. Partial on rows that name a provider: only a
-- completion by a real handler writes one (a claim or a heartbeat never does).
create index if not exists ai_course_jobs_provider_idx
    on ai_course_jobs ((metrics ->> 'provider'), created_at, id) where metrics ? 'provider';
create index if not exists ai_media_jobs_provider_idx
    on ai_media_jobs ((metrics ->> 'provider'), created_at, id) where metrics ? 'provider';

------------------------------------------------------------------------------
-- Counts per table and status, from sources that do not grow with history
------------------------------------------------------------------------------

create or replace function ai_job_status_counts()
returns table(job_table text, status text, jobs bigint, avg_duration_seconds double precision)
language sql stable
as $$
    with finished as (
        select job_table, status, sum(jobs) as jobs, sum(timed) as timed, sum(seconds) as seconds
        from (select job_table, status, jobs, timed, seconds from ai_job_status_counts
              union all
              select job_table, status, jobs, timed, seconds from ai_job_status_deltas) c
        group by job_table, status
    ), live as (
        select 'ai_course_jobs'::text as job_table, status, count(*) as jobs
        from ai_course_jobs where status in ('pending', 'failed') group by status
        union all
        select 'ai_course_jobs', 'processing', count(*) from ai_course_jobs where status = 'processing'
        union all
        select 'ai_course_jobs', 'stale', count(*) from ai_course_jobs where status = 'stale'
        union all
        select 'ai_media_jobs', status, count(*)
        from ai_media_jobs where status in ('pending', 'failed') group by status
        union all
        select 'ai_media_jobs', 'processing', count(*) from ai_media_jobs where status = 'processing'
        union all
        select 'ai_media_jobs', 'stale', count(*) from ai_media_jobs where status = 'stale'
    )
    select job_table, status, jobs::bigint,
           case when timed > 0 then round((seconds / timed)::numeric, 2)::float8 end
    from finished where jobs <> 0
    union all
    select job_table, status, jobs, null::float8 from live where jobs <> 0
$$;

------------------------------------------------------------------------------
-- Finding jobs
------------------------------------------------------------------------------

-- The WHERE conditions of a filter on one job table, values quoted as literals
-- (format %L) so that each query is planned for its own values. search: a job id,
-- or the start of one (8 or more hex digits, dashes allowed: a primary-key range),
-- or else text found in the subject or prompt (case-insensitive; a walk of the
-- newest jobs that stops at a page of matches, so a rare text over a long
-- history costs a scan: narrow it with the other filters).
create or replace function ai_job_filter_sql(
    t text, status text, provider text, user_id uuid,
    created_after timestamptz, created_before timestamptz, search text)
returns text
language plpgsql immutable
as $$
declare
    label text := case t when 'ai_course_jobs' then 'subject' else 'prompt' end;
    cond text := 'true';
    hex text;
    words text;
begin
    if status is not null then
        cond := cond || format(' and status = %L', status);
    end if;
    if provider is not null then
        cond := cond || format(' and metrics ? ''provider'' and metrics ->> ''provider'' = %L',
                               provider);
    end if;
    if user_id is not null then
        cond := cond || format(' and created_by = %L::uuid', user_id);
    end if;
    if created_after is not null then
        cond := cond || format(' and created_at >= %L::timestamptz', created_after);
    end if;
    if created_before is not null then
        cond := cond || format(' and created_at < %L::timestamptz', created_before);
    end if;
    search := nullif(btrim(search), '');
    if search is not null then
        hex := lower(replace(search, '-', ''));
        words := '%' || replace(replace(replace(search, '\', '\\'), '%', '\%'), '_', '\_') || '%';
        if hex ~ '^[0-9a-f]{32}$' then
            cond := cond || format(' and id = %L::uuid', hex);
        elsif hex ~ '^[0-9a-f]{8,31}$' then  -- the start of an id, as the list shows it
            cond := cond || format(' and id between %L::uuid and %L::uuid',
                                   rpad(hex, 32, '0'), rpad(hex, 32, 'f'));
        else
            cond := cond || format(' and %I ilike %L', label, words);
        end if;
    end if;
    return cond;
end
$$;

-- One page of jobs, newest first (created_at, then id), both tables merged unless
-- table_name names one. (The status and provider columns are named job_status and
-- job_provider: a function's output columns cannot share its arguments' names.) The next page starts after the last row of this one:
-- pass its created_at and id as cursor_created_at / cursor_id (keyset
-- pagination: every page is an index walk, however deep).
create or replace function find_jobs(
    table_name text default null, status text default null, provider text default null,
    user_id uuid default null, created_after timestamptz default null,
    created_before timestamptz default null, search text default null,
    cursor_created_at timestamptz default null, cursor_id uuid default null,
    page_size int default 50)
returns table(job_table text, job_type text, id uuid, label text, job_status text,
              retry_count int, max_retries int, error text, created_by uuid,
              created_at timestamptz, started_at timestamptz, completed_at timestamptz,
              duration_seconds double precision, job_provider text)
language plpgsql stable
as $$
declare
    t text;
    parts text[] := '{}';
    after text := '';
begin
    if table_name is not null then
        perform ai_job_table(table_name);
    end if;
    if cursor_created_at is not null and cursor_id is not null then
        -- (created_at, id) < cursor, spelled so that the index takes created_at.
        after := format(' and created_at <= %1$L::timestamptz'
                        ' and (created_at < %1$L::timestamptz or id < %2$L::uuid)',
                        cursor_created_at, cursor_id);
    end if;
    foreach t in array array['ai_course_jobs', 'ai_media_jobs'] loop
        if table_name is null or table_name = t then
            parts := parts || format($q$
                (select %1$L::text as job_table, %2$L::text as job_type, id,
                        %3$I as label, status, retry_count, max_retries, error, created_by,
                        created_at, started_at, completed_at,
                        extract(epoch from completed_at - started_at)::float8 as duration_seconds,
                        metrics ->> 'provider' as provider
                 from %1$I where %4$s%5$s
                 order by created_at desc, id desc limit %6$s)
            $q$, t, ai_job_type(t), case t when 'ai_course_jobs' then 'subject' else 'prompt' end,
                ai_job_filter_sql(t, status, provider, user_id, created_after, created_before,
                                  search),
                after, page_size);
        end if;
    end loop;
    return query execute 'select * from (' || array_to_string(parts, ' union all ')
        || format(') jobs order by created_at desc, id desc limit %s', page_size);
end
$$;

------------------------------------------------------------------------------
-- Bulk actions on a filter (the same arguments as find_jobs)
------------------------------------------------------------------------------

-- Which statuses each bulk action applies to:
--   requeue  failed, dead_letter, stale, cancelled  (a done job is re-run one at a time)
--   cancel   pending, failed                        (running jobs: cancel_job, one by one)
--   delete   done, dead_letter, cancelled
-- With dry_run, nothing changes: the count is what the confirmation shows.
create or replace function ai_job_bulk(
    action text, table_name text, status text, provider text, user_id uuid,
    created_after timestamptz, created_before timestamptz, search text, dry_run boolean)
returns bigint
language plpgsql
as $$
declare
    t text;
    allowed text[];
    cond text;
    n bigint;
    total bigint := 0;
begin
    allowed := case action
        when 'requeue' then array['failed', 'dead_letter', 'stale', 'cancelled']
        when 'cancel' then array['pending', 'failed']
        when 'delete' then array['done', 'dead_letter', 'cancelled'] end;
    if allowed is null then
        raise exception 'Unknown bulk action: % (expected requeue, cancel or delete)', action
            using errcode = 'invalid_parameter_value';
    end if;
    if table_name is not null then
        perform ai_job_table(table_name);
    end if;
    foreach t in array array['ai_course_jobs', 'ai_media_jobs'] loop
        continue when table_name is not null and table_name <> t;
        cond := ai_job_filter_sql(t, status, provider, user_id, created_after, created_before,
                                  search)
                || format(' and status = any(%L::text[])', allowed);
        if dry_run then
            execute format('select count(*) from %I where %s', t, cond) into n;
        elsif action = 'requeue' then
            execute format($q$
                update %1$I j
                set status = 'pending', retry_count = 0, error = null, run_after = now(),
                    started_at = null, last_heartbeat = null, completed_at = null,
                    claim_token = null, worker_id = null
                where j.id = any(array(select id from %1$I where %2$s for update skip locked))
            $q$, t, cond);
            get diagnostics n = row_count;
        elsif action = 'cancel' then
            execute format($q$
                update %1$I j
                set status = 'cancelled', completed_at = clock_timestamp(), claim_token = null
                where j.id = any(array(select id from %1$I where %2$s for update skip locked))
            $q$, t, cond);
            get diagnostics n = row_count;
        else
            execute format($q$
                with gone as (
                    delete from %1$I j
                    where j.id = any(array(select id from %1$I where %2$s for update skip locked))
                    returning j.id
                ), history as (
                    delete from ai_job_attempts a using gone
                    where a.job_table = %1$L and a.job_id = gone.id
                )
                select count(*) from gone
            $q$, t, cond) into n;
        end if;
        total := total + coalesce(n, 0);
    end loop;
    return total;
end
$$;

-- The runbook-style names, with the filter as named arguments, e.g. in psql:
--   select requeue_jobs(status => 'dead_letter', created_after => now() - interval '1 hour');
--   select cancel_jobs(user_id => '…', dry_run => true);   -- how many, without changing
create or replace function requeue_jobs(
    table_name text default null, status text default null, provider text default null,
    user_id uuid default null, created_after timestamptz default null,
    created_before timestamptz default null, search text default null,
    dry_run boolean default false)
returns bigint
language sql
as $$ select ai_job_bulk('requeue', table_name, status, provider, user_id, created_after,
                         created_before, search, dry_run) $$;

create or replace function cancel_jobs(
    table_name text default null, status text default null, provider text default null,
    user_id uuid default null, created_after timestamptz default null,
    created_before timestamptz default null, search text default null,
    dry_run boolean default false)
returns bigint
language sql
as $$ select ai_job_bulk('cancel', table_name, status, provider, user_id, created_after,
                         created_before, search, dry_run) $$;

create or replace function delete_jobs(
    table_name text default null, status text default null, provider text default null,
    user_id uuid default null, created_after timestamptz default null,
    created_before timestamptz default null, search text default null,
    dry_run boolean default false)
returns bigint
language sql
as $$ select ai_job_bulk('delete', table_name, status, provider, user_id, created_after,
                         created_before, search, dry_run) $$;

------------------------------------------------------------------------------
-- Privileges: operators and the worker only (service_role).
------------------------------------------------------------------------------

alter table ai_job_status_counts enable row level security;
alter table ai_job_status_deltas enable row level security;
revoke all on ai_job_status_counts, ai_job_status_deltas
    from public, anon, authenticated, service_role;
grant select, insert, update, delete on ai_job_status_counts, ai_job_status_deltas to service_role;

revoke execute on function
    ai_jobs_count_finished(), ai_jobs_count_truncated(), ai_job_fold_counts(),
    ai_job_recount(), ai_job_status_counts(),
    ai_job_filter_sql(text, text, text, uuid, timestamptz, timestamptz, text),
    find_jobs(text, text, text, uuid, timestamptz, timestamptz, text, timestamptz, uuid, int),
    ai_job_bulk(text, text, text, text, uuid, timestamptz, timestamptz, text, boolean),
    requeue_jobs(text, text, text, uuid, timestamptz, timestamptz, text, boolean),
    cancel_jobs(text, text, text, uuid, timestamptz, timestamptz, text, boolean),
    delete_jobs(text, text, text, uuid, timestamptz, timestamptz, text, boolean)
from public, anon, authenticated, service_role;
grant execute on function
    ai_job_fold_counts(),
    ai_job_recount(), ai_job_status_counts(),
    ai_job_filter_sql(text, text, text, uuid, timestamptz, timestamptz, text),
    find_jobs(text, text, text, uuid, timestamptz, timestamptz, text, timestamptz, uuid, int),
    ai_job_bulk(text, text, text, text, uuid, timestamptz, timestamptz, text, boolean),
    requeue_jobs(text, text, text, uuid, timestamptz, timestamptz, text, boolean),
    cancel_jobs(text, text, text, uuid, timestamptz, timestamptz, text, boolean),
    delete_jobs(text, text, text, uuid, timestamptz, timestamptz, text, boolean)
to service_role;
