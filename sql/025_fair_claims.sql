-- 025: fair claims and a per-user cap (docs/design.md, "Fair claims").
--
-- When jobs of several users are due, each claim goes to the user with the
-- fewest jobs processing, oldest job first within a user; jobs with a null
-- created_by count as one user. No user's jobs run more than
-- ai_job_settings.max_running_per_user at once (null: no cap), counted over both
-- job tables: a user with one course and one media job processing has two.
--   update ai_job_settings set max_running_per_user = 2;   -- from psql, no restart
--
-- Every claim path reads the setting at each call: claim_jobs (and run-once's
-- claim through it), complete_and_claim, claim_due_job (the notified job: a job
-- of a user at the cap is not claimed and stays pending) and claim_job (the
-- operator's).
--
-- The cap under concurrency. With a cap set, a claim first takes a transaction
-- advisory lock per user whose jobs it may claim (pg_advisory_xact_lock, the key
-- pair (hashtext('ai-jobs user'), hashtext(user)), taken in the order of their
-- keys so that two claims never wait on each other in a cycle), and only then,
-- in a new statement, counts the users' processing jobs and picks the jobs to
-- claim. Under READ COMMITTED a statement's snapshot is taken when it starts, so
-- a claim that waited for a user's lock sees the jobs the holder claimed (the
-- lock is released at its commit): two claims can never both pass the cap. A
-- hash shared by two users only makes their claims wait for each other.
--
-- Cheap when there is nothing to share. Without a cap, and when the due jobs of a
-- table are one user's (or all null), the claim is the statement of 020 as it
-- was, after three probes of the index below (one when every due job's
-- created_by is null). The fair pick is the cost of fairness: a walk over the
-- users with claimable jobs (one index probe each) and a count of the jobs
-- processing (the running index: as many rows as jobs running).
--
-- A capped user's job waits pending; a worker that knows a cap is set (it reads
-- the setting at each sweep, and a change of the setting notifies every worker to
-- sweep) looks at both tables again whenever one of its jobs ends, and the
-- completion's own claim round (complete_and_claim) sees the slot that just freed.

alter table ai_job_settings
    add column if not exists max_running_per_user int
        constraint ai_job_settings_max_running_per_user_check
        check (max_running_per_user >= 1);

-- The users with claimable jobs, and each user's oldest first. Partial, like the
-- claim index: only pending and failed rows (no claim inserts into it). The newest
-- job of a user comes first in the index, so a probe for a user finds a live
-- entry at once, not the entries of the jobs just claimed.
create index if not exists ai_course_jobs_due_user_idx
    on ai_course_jobs (created_by, run_after desc) where status in ('pending', 'failed');
create index if not exists ai_media_jobs_due_user_idx
    on ai_media_jobs (created_by, run_after desc) where status in ('pending', 'failed');

------------------------------------------------------------------------------
-- Helpers
------------------------------------------------------------------------------

-- A user's key in the fair pick and in their lock: created_by, the nil uuid for a
-- null created_by (one user), written out where used (a function per row, with
-- its pinned search_path, cost a few microseconds a call).

-- Lock these users (keys) for this transaction, in the order of their lock keys.
create or replace function ai_job_lock_users(users uuid[]) returns void
language plpgsql
set search_path = pg_catalog, public, pg_temp
as $$
declare
    k int;
begin
    for k in select distinct hashtext(u::text) from unnest(users) u order by 1 loop
        perform pg_advisory_xact_lock(hashtext('ai-jobs user'), k);
    end loop;
end
$$;

-- Processing jobs per user key, both tables (the running indexes). PL/pgSQL, not
-- SQL: a SQL function that cannot be inlined is planned again at every call.
create or replace function ai_job_running_by_user()
returns table(user_key uuid, running int)
language plpgsql stable
set search_path = pg_catalog, public, pg_temp
as $$
begin
    return query
    select coalesce(r.created_by, '00000000-0000-0000-0000-000000000000'::uuid), count(*)::int
    from (select created_by from ai_course_jobs where status = 'processing'
          union all
          select created_by from ai_media_jobs where status = 'processing') r
    group by 1;
end
$$;

-- Are the claimable rows of a table one user's (or none)? Probes of the due-user
-- index: the lowest user, then anyone above it, then the null user.
create or replace function ai_job_one_user_due(table_name text) returns boolean
language plpgsql stable
set search_path = pg_catalog, public, pg_temp
as $$
declare
    u uuid;
begin
    if table_name = 'ai_course_jobs' then
        select created_by into u from ai_course_jobs
        where status in ('pending', 'failed') and created_by is not null
        order by created_by, run_after desc limit 1;
        return u is null
            or ((select created_by from ai_course_jobs
                 where status in ('pending', 'failed') and created_by > u
                 order by created_by, run_after desc limit 1) is null
                and (select 1 from ai_course_jobs
                     where status in ('pending', 'failed') and created_by is null
                     order by created_by, run_after desc limit 1) is null);
    else
        select created_by into u from ai_media_jobs
        where status in ('pending', 'failed') and created_by is not null
        order by created_by, run_after desc limit 1;
        return u is null
            or ((select created_by from ai_media_jobs
                 where status in ('pending', 'failed') and created_by > u
                 order by created_by, run_after desc limit 1) is null
                and (select 1 from ai_media_jobs
                     where status in ('pending', 'failed') and created_by is null
                     order by created_by, run_after desc limit 1) is null);
    end if;
end
$$;

-- The user keys with pending or failed rows in a table: one probe of the due-user
-- index per user (a skip scan), the null user last.
create or replace function ai_job_due_users(table_name text) returns uuid[]
language plpgsql stable
set search_path = pg_catalog, public, pg_temp
as $$
begin
    if table_name = 'ai_course_jobs' then
        return array(
            with recursive u(k) as (
                (select created_by from ai_course_jobs
                 where status in ('pending', 'failed') and created_by is not null
                 order by created_by, run_after desc limit 1)
                union all
                select (select created_by from ai_course_jobs
                        where status in ('pending', 'failed') and created_by > u.k
                        order by created_by, run_after desc limit 1)
                from u where u.k is not null)
            select k from u where k is not null
            union all
            select '00000000-0000-0000-0000-000000000000'::uuid
            where (select 1 from ai_course_jobs
                   where status in ('pending', 'failed') and created_by is null
                   order by created_by, run_after desc limit 1) is not null);
    else
        return array(
            with recursive u(k) as (
                (select created_by from ai_media_jobs
                 where status in ('pending', 'failed') and created_by is not null
                 order by created_by, run_after desc limit 1)
                union all
                select (select created_by from ai_media_jobs
                        where status in ('pending', 'failed') and created_by > u.k
                        order by created_by, run_after desc limit 1)
                from u where u.k is not null)
            select k from u where k is not null
            union all
            select '00000000-0000-0000-0000-000000000000'::uuid
            where (select 1 from ai_media_jobs
                   where status in ('pending', 'failed') and created_by is null
                   order by created_by, run_after desc limit 1) is not null);
    end if;
end
$$;

-- The fair order of a table's claimable jobs of these users, for a claim of
-- `wanted` jobs: a user's k-th job (oldest first) stands at level running + k - 1;
-- the jobs go by level, then age; with a cap, no job at a level of cap or more.
-- Up to `wanted` jobs of a user (no claim takes more), twice `wanted` in all (a
-- claim takes the first ones it can lock). (A user's jobs
-- are read `order by created_by desc, run_after`, the user given as a range of
-- one: the due-user index read backwards, an order the claim index cannot give.
-- With `created_by = u.k` the planner drops created_by from the order, since it
-- is fixed, and took the claim index, filtering every due job by user.)
create or replace function ai_job_fair_pick(table_name text, users uuid[], wanted int, cap int)
returns uuid[]
language plpgsql stable
set search_path = pg_catalog, public, pg_temp
set plan_cache_mode = force_generic_plan
as $$
begin
    if table_name = 'ai_course_jobs' then
        return array(
            select d.id
            from (select u.k, coalesce(r.running, 0) as running
                  from unnest(users) u(k)
                  left join ai_job_running_by_user() r on r.user_key = u.k) u
            cross join lateral (
                select c.id, c.run_after,
                       u.running + row_number() over (order by c.run_after, c.id) - 1 as level
                from ((select id, run_after from ai_course_jobs
                       where created_by >= u.k and created_by <= u.k
                         and status in ('pending', 'failed')
                         and run_after <= now() and (status = 'pending' or retry_count < max_retries)
                       order by created_by desc, run_after
                       limit greatest(0, least(wanted, coalesce(cap - u.running, wanted))))
                      union all
                      (select id, run_after from ai_course_jobs
                       where u.k = '00000000-0000-0000-0000-000000000000'::uuid
                         and created_by is null
                         and status in ('pending', 'failed')
                         and run_after <= now() and (status = 'pending' or retry_count < max_retries)
                       order by created_by desc, run_after
                       limit greatest(0, least(wanted, coalesce(cap - u.running, wanted))))) c
            ) d
            order by d.level, d.run_after, d.id
            limit 2 * wanted);
    else
        return array(
            select d.id
            from (select u.k, coalesce(r.running, 0) as running
                  from unnest(users) u(k)
                  left join ai_job_running_by_user() r on r.user_key = u.k) u
            cross join lateral (
                select c.id, c.run_after,
                       u.running + row_number() over (order by c.run_after, c.id) - 1 as level
                from ((select id, run_after from ai_media_jobs
                       where created_by >= u.k and created_by <= u.k
                         and status in ('pending', 'failed')
                         and run_after <= now() and (status = 'pending' or retry_count < max_retries)
                       order by created_by desc, run_after
                       limit greatest(0, least(wanted, coalesce(cap - u.running, wanted))))
                      union all
                      (select id, run_after from ai_media_jobs
                       where u.k = '00000000-0000-0000-0000-000000000000'::uuid
                         and created_by is null
                         and status in ('pending', 'failed')
                         and run_after <= now() and (status = 'pending' or retry_count < max_retries)
                       order by created_by desc, run_after
                       limit greatest(0, least(wanted, coalesce(cap - u.running, wanted))))) c
            ) d
            order by d.level, d.run_after, d.id
            limit 2 * wanted);
    end if;
end
$$;

-- What a claim of up to max_jobs jobs of a table takes: null when the plain
-- order of 020 is fair (no cap, at most one user's jobs claimable); else the
-- candidates in the fair order (up to twice as many as wanted: a claim takes the
-- first ones it can lock, so that one locked by a concurrent claim is not a slot
-- lost), within the cap, the users' locks taken when capped. `held`: the users
-- the caller locked already (claim_jobs over both tables); only their jobs are
-- picked.
create or replace function ai_job_fair_ids(table_name text, max_jobs int, held uuid[] default null)
returns uuid[]
language plpgsql
set search_path = pg_catalog, public, pg_temp
as $$
declare
    cap int;
    users uuid[];
begin
    select max_running_per_user into cap from ai_job_settings;
    if cap is null and ai_job_one_user_due(table_name) then
        return null;
    end if;
    users := ai_job_due_users(table_name);
    if cap is not null then
        if held is null then
            perform ai_job_lock_users(users);
        else
            users := array(select unnest(users) intersect select unnest(held));
        end if;
    end if;
    -- A new statement, a new snapshot: what the locks' holders claimed is seen.
    return ai_job_fair_pick(table_name, users, greatest(max_jobs, 0), cap);
end
$$;

-- May a job of this user be claimed now? True without a cap; with one, the user's
-- lock taken, whether they run fewer jobs than the cap.
create or replace function ai_job_under_cap(created_by uuid) returns boolean
language plpgsql
set search_path = pg_catalog, public, pg_temp
as $$
declare
    cap int;
    k uuid := coalesce(created_by, '00000000-0000-0000-0000-000000000000'::uuid);
begin
    select max_running_per_user into cap from ai_job_settings;
    if cap is null then
        return true;
    end if;
    perform ai_job_lock_users(array[k]);
    -- A new statement, a new snapshot: what the lock's last holder claimed is seen.
    return coalesce((select r.running from ai_job_running_by_user() r where r.user_key = k), 0)
           < cap;
end
$$;

------------------------------------------------------------------------------
-- The claims
------------------------------------------------------------------------------

-- The notified job (the fast path): as in 020, and not when its user is at the
-- cap (it stays pending). Without a cap, no fairness work: the worker sends it
-- only when its last claim round found the table empty, so no other user's job is
-- known to wait. The cap's test is a filter of the one statement (without a cap,
-- a one-time filter: ai_job_under_cap is not called), not a statement of its own.
-- ai_job_under_cap takes the user's lock and counts in statements of its own,
-- each with a new snapshot, as the fair pick does.
create or replace function claim_due_job(table_name text, job_id uuid, worker text)
returns table(job_table text, id uuid, claim_token uuid, retry_count int, max_retries int, job jsonb)
language plpgsql
set search_path = pg_catalog, public, pg_temp
as $$
#variable_conflict use_column
begin
    if ai_job_table(table_name) = 'ai_course_jobs' then
        return query
        update ai_course_jobs j
        set status = 'processing', started_at = clock_timestamp(),
            last_heartbeat = clock_timestamp(), claim_token = gen_random_uuid(),
            worker_id = worker, completed_at = null
        where j.id = (
            select id from ai_course_jobs
            where id = job_id and status in ('pending', 'failed') and run_after <= now()
              and (status = 'pending' or retry_count < max_retries)
              and not exists (select from ai_job_queues q
                              where q.job_table = 'ai_course_jobs' and q.paused)
              and (not exists (select from ai_job_settings
                               where max_running_per_user is not null)
                   or ai_job_under_cap(created_by))
            for update of ai_course_jobs skip locked)
        returning 'ai_course_jobs'::text, j.id, j.claim_token, j.retry_count, j.max_retries,
                  jsonb_build_object('id', j.id, 'subject', j.subject, 'course_id', j.course_id,
                                     'params', j.params);
    else
        return query
        update ai_media_jobs j
        set status = 'processing', started_at = clock_timestamp(),
            last_heartbeat = clock_timestamp(), claim_token = gen_random_uuid(),
            worker_id = worker, completed_at = null
        where j.id = (
            select id from ai_media_jobs
            where id = job_id and status in ('pending', 'failed') and run_after <= now()
              and (status = 'pending' or retry_count < max_retries)
              and not exists (select from ai_job_queues q
                              where q.job_table = 'ai_media_jobs' and q.paused)
              and (not exists (select from ai_job_settings
                               where max_running_per_user is not null)
                   or ai_job_under_cap(created_by))
            for update of ai_media_jobs skip locked)
        returning 'ai_media_jobs'::text, j.id, j.claim_token, j.retry_count, j.max_retries,
                  jsonb_build_object('id', j.id, 'prompt', j.prompt, 'media_type', j.media_type,
                                     'course_id', j.course_id, 'params', j.params);
    end if;
end
$$;

-- As in 020, in the fair order when it differs from the plain one. Over both
-- tables (table_name null: run-once), every user of either is locked first.
create or replace function claim_jobs(table_name text, worker text, max_jobs int default 1)
returns table(job_table text, id uuid, claim_token uuid, retry_count int, max_retries int, job jsonb)
language plpgsql
set search_path = pg_catalog, public, pg_temp
set plan_cache_mode = force_generic_plan
as $$
#variable_conflict use_column
declare
    got int := 0;
    ids uuid[];
    held uuid[];
begin
    if table_name is not null then
        perform ai_job_table(table_name);
    elsif exists (select from ai_job_settings where max_running_per_user is not null) then
        held := ai_job_due_users('ai_course_jobs') || ai_job_due_users('ai_media_jobs');
        perform ai_job_lock_users(held);
    end if;
    if table_name is null or table_name = 'ai_course_jobs' then
        ids := null;
        if held is not null or exists (select from ai_job_settings where max_running_per_user is not null)
           or (select created_by from ai_course_jobs
               where status in ('pending', 'failed') and created_by is not null
               order by created_by, run_after desc limit 1) is not null then
            ids := ai_job_fair_ids('ai_course_jobs', max_jobs, held);
        end if;
        if ids is null then
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
                      jsonb_build_object('id', j.id, 'subject', j.subject, 'course_id', j.course_id,
                                         'params', j.params);
        else
            return query
            update ai_course_jobs j
            set status = 'processing', started_at = clock_timestamp(),
                last_heartbeat = clock_timestamp(), claim_token = gen_random_uuid(),
                worker_id = worker, completed_at = null
            where j.id = any(array(
                select id from ai_course_jobs
                where id = any(ids) and status in ('pending', 'failed') and run_after <= now()
                  and (status = 'pending' or retry_count < max_retries)
                  and not exists (select from ai_job_queues q
                                  where q.job_table = 'ai_course_jobs' and q.paused)
                order by array_position(ids, id)
                limit max_jobs
                for update of ai_course_jobs skip locked))
            returning 'ai_course_jobs'::text, j.id, j.claim_token, j.retry_count, j.max_retries,
                      jsonb_build_object('id', j.id, 'subject', j.subject, 'course_id', j.course_id,
                                         'params', j.params);
        end if;
        get diagnostics got = row_count;
    end if;
    if (table_name is null and got < max_jobs) or table_name = 'ai_media_jobs' then
        ids := null;
        if held is not null or exists (select from ai_job_settings where max_running_per_user is not null)
           or (select created_by from ai_media_jobs
               where status in ('pending', 'failed') and created_by is not null
               order by created_by, run_after desc limit 1) is not null then
            ids := ai_job_fair_ids('ai_media_jobs', max_jobs - got, held);
        end if;
        if ids is null then
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
                      jsonb_build_object('id', j.id, 'prompt', j.prompt, 'media_type', j.media_type,
                                         'course_id', j.course_id, 'params', j.params);
        else
            return query
            update ai_media_jobs j
            set status = 'processing', started_at = clock_timestamp(),
                last_heartbeat = clock_timestamp(), claim_token = gen_random_uuid(),
                worker_id = worker, completed_at = null
            where j.id = any(array(
                select id from ai_media_jobs
                where id = any(ids) and status in ('pending', 'failed') and run_after <= now()
                  and (status = 'pending' or retry_count < max_retries)
                  and not exists (select from ai_job_queues q
                                  where q.job_table = 'ai_media_jobs' and q.paused)
                order by array_position(ids, id)
                limit max_jobs - got
                for update of ai_media_jobs skip locked))
            returning 'ai_media_jobs'::text, j.id, j.claim_token, j.retry_count, j.max_retries,
                      jsonb_build_object('id', j.id, 'prompt', j.prompt, 'media_type', j.media_type,
                                         'course_id', j.course_id, 'params', j.params);
        end if;
    end if;
end
$$;

-- As in 020: the finished jobs written done, then the claim, in the fair order
-- when it differs from the plain one (the claim sees the slots the completion
-- freed: the same transaction).
create or replace function complete_and_claim(
    table_name text, worker text, max_jobs int,
    job_ids uuid[], tokens uuid[], result_paths text[], job_metrics jsonb[])
returns table(kind text, job_table text, id uuid, claim_token uuid, retry_count int,
              max_retries int, job jsonb)
language plpgsql
set search_path = pg_catalog, public, pg_temp
set plan_cache_mode = force_generic_plan
as $$
#variable_conflict use_column
declare
    ids uuid[];
begin
    if ai_job_table(table_name) = 'ai_course_jobs' then
        return query
        update ai_course_jobs j
        set status = 'done', completed_at = clock_timestamp(),
            result_path = result_paths[array_position(tokens, j.claim_token)],
            metrics = job_metrics[array_position(tokens, j.claim_token)],
            error = null, claim_token = null
        where j.id = any(job_ids) and j.status in ('processing', 'stale')
          and j.claim_token is not null
          and job_ids[array_position(tokens, j.claim_token)] = j.id
        returning 'done'::text, 'ai_course_jobs'::text, j.id, null::uuid, null::int, null::int,
                  null::jsonb;
        ids := null;
        if exists (select from ai_job_settings where max_running_per_user is not null)
           or (select created_by from ai_course_jobs
               where status in ('pending', 'failed') and created_by is not null
               order by created_by, run_after desc limit 1) is not null then
            ids := ai_job_fair_ids('ai_course_jobs', max_jobs);
        end if;
        if ids is null then
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
            returning 'claimed'::text, 'ai_course_jobs'::text, j.id, j.claim_token, j.retry_count,
                      j.max_retries,
                      jsonb_build_object('id', j.id, 'subject', j.subject, 'course_id', j.course_id,
                                         'params', j.params);
        else
            return query
            update ai_course_jobs j
            set status = 'processing', started_at = clock_timestamp(),
                last_heartbeat = clock_timestamp(), claim_token = gen_random_uuid(),
                worker_id = worker, completed_at = null
            where j.id = any(array(
                select id from ai_course_jobs
                where id = any(ids) and status in ('pending', 'failed') and run_after <= now()
                  and (status = 'pending' or retry_count < max_retries)
                  and not exists (select from ai_job_queues q
                                  where q.job_table = 'ai_course_jobs' and q.paused)
                order by array_position(ids, id)
                limit max_jobs
                for update of ai_course_jobs skip locked))
            returning 'claimed'::text, 'ai_course_jobs'::text, j.id, j.claim_token, j.retry_count,
                      j.max_retries,
                      jsonb_build_object('id', j.id, 'subject', j.subject, 'course_id', j.course_id,
                                         'params', j.params);
        end if;
    else
        return query
        update ai_media_jobs j
        set status = 'done', completed_at = clock_timestamp(),
            result_path = result_paths[array_position(tokens, j.claim_token)],
            metrics = job_metrics[array_position(tokens, j.claim_token)],
            error = null, claim_token = null
        where j.id = any(job_ids) and j.status in ('processing', 'stale')
          and j.claim_token is not null
          and job_ids[array_position(tokens, j.claim_token)] = j.id
        returning 'done'::text, 'ai_media_jobs'::text, j.id, null::uuid, null::int, null::int,
                  null::jsonb;
        ids := null;
        if exists (select from ai_job_settings where max_running_per_user is not null)
           or (select created_by from ai_media_jobs
               where status in ('pending', 'failed') and created_by is not null
               order by created_by, run_after desc limit 1) is not null then
            ids := ai_job_fair_ids('ai_media_jobs', max_jobs);
        end if;
        if ids is null then
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
                limit max_jobs
                for update of ai_media_jobs skip locked))
            returning 'claimed'::text, 'ai_media_jobs'::text, j.id, j.claim_token, j.retry_count,
                      j.max_retries,
                      jsonb_build_object('id', j.id, 'prompt', j.prompt, 'media_type', j.media_type,
                                         'course_id', j.course_id, 'params', j.params);
        else
            return query
            update ai_media_jobs j
            set status = 'processing', started_at = clock_timestamp(),
                last_heartbeat = clock_timestamp(), claim_token = gen_random_uuid(),
                worker_id = worker, completed_at = null
            where j.id = any(array(
                select id from ai_media_jobs
                where id = any(ids) and status in ('pending', 'failed') and run_after <= now()
                  and (status = 'pending' or retry_count < max_retries)
                  and not exists (select from ai_job_queues q
                                  where q.job_table = 'ai_media_jobs' and q.paused)
                order by array_position(ids, id)
                limit max_jobs
                for update of ai_media_jobs skip locked))
            returning 'claimed'::text, 'ai_media_jobs'::text, j.id, j.claim_token, j.retry_count,
                      j.max_retries,
                      jsonb_build_object('id', j.id, 'prompt', j.prompt, 'media_type', j.media_type,
                                         'course_id', j.course_id, 'params', j.params);
        end if;
    end if;
end
$$;

-- The operator's "look at that job now" (as in 020), within the cap.
create or replace function claim_job(table_name text, job_id uuid, worker text)
returns table(job_table text, id uuid, claim_token uuid, retry_count int, max_retries int, job jsonb)
language plpgsql
set search_path = pg_catalog, public, pg_temp
as $$
declare
    owner uuid;
begin
    execute format('select created_by from %I where id = $1', ai_job_table(table_name))
    into owner using job_id;
    if not ai_job_under_cap(owner) then
        return;
    end if;
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
        returning %1$L::text, j.id, j.claim_token, j.retry_count, j.max_retries, %2$s
    $q$, ai_job_table(table_name),
       case ai_job_table(table_name)
           when 'ai_course_jobs' then
               $e$jsonb_build_object('id', j.id, 'subject', j.subject, 'course_id', j.course_id,
                                     'params', j.params)$e$
           else
               $e$jsonb_build_object('id', j.id, 'prompt', j.prompt, 'media_type', j.media_type,
                                     'course_id', j.course_id, 'params', j.params)$e$
       end) using worker, job_id;
end
$$;

-- A change of the cap is told to the workers as an empty notification ("sweep
-- now"): each sweep reads the setting, so a worker learns at once whether a job's
-- end is a reason to look.
create or replace function ai_job_settings_changed() returns trigger
language plpgsql
set search_path = pg_catalog, public, pg_temp
as $$
begin
    if new.max_running_per_user is distinct from old.max_running_per_user then
        perform pg_notify('ai_jobs', '');
    end if;
    return null;
end
$$;

drop trigger if exists ai_job_settings_changed on ai_job_settings;
create trigger ai_job_settings_changed
    after update on ai_job_settings
    for each row execute function ai_job_settings_changed();

------------------------------------------------------------------------------
-- Privileges: the worker and operators (service_role) only. The settings row's
-- new column is covered by 010's grants (service_role: select, update).
------------------------------------------------------------------------------

revoke all on function
    ai_job_lock_users(uuid[]), ai_job_running_by_user(),
    ai_job_one_user_due(text), ai_job_due_users(text), ai_job_fair_pick(text, uuid[], int, int),
    ai_job_fair_ids(text, int, uuid[]), ai_job_under_cap(uuid), ai_job_settings_changed()
from public, anon, authenticated, service_role;
grant execute on function
    ai_job_lock_users(uuid[]), ai_job_running_by_user(),
    ai_job_one_user_due(text), ai_job_due_users(text), ai_job_fair_pick(text, uuid[], int, int),
    ai_job_fair_ids(text, int, uuid[]), ai_job_under_cap(uuid)
to service_role;
