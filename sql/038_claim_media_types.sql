-- 038: media claims by type, each type within its own limit.
--
-- A media job calls the image model or the speech model (media_type), and a
-- provider meters each model on its own quota. The claim gate
-- (listener/providers/gate.py) holds or admits claims per lane: a course job's,
-- an image job's, a speech job's. While no lane of ai_media_jobs is held or
-- gated, a worker claims that table as before (claim_jobs, complete_and_claim,
-- unchanged). While one is, it claims with ai_job_claim_media: the types given,
-- each at most its limit (what the gate admits for a gated lane, the free slots
-- for the others), in one statement and in the usual order (oldest first, or
-- fair between users within the cap), so that speech jobs neither wait at the
-- image quota's pace nor behind the images it admits (and the reverse). A row
-- whose media_type is null (an invalid job, refused at once) is never left out;
-- it counts against max_jobs alone.
--
-- The oldest first, a type at a time: an index per type (the claim index of 001
-- leads with run_after, and a type left out may be the one with a backlog), and
-- a small one for the null type. The fair order (025) gets the same filter:
-- ai_job_fair_pick and ai_job_fair_ids take `only_types` (default null: every
-- type), dropped and created again with the new argument; the calls of 025, 033
-- and 034 with fewer arguments keep their meaning. (The fair pick reads each due
-- user's jobs through the due-user index of 025 and filters them by type: with a
-- cap set or several users due, a claim by type reads past a user's jobs of the
-- types left out.) Grants as before, and the new function's.

create index if not exists ai_media_jobs_type_claim_idx
    on ai_media_jobs (media_type, run_after) where status in ('pending', 'failed');
create index if not exists ai_media_jobs_untyped_claim_idx
    on ai_media_jobs (run_after) where status in ('pending', 'failed') and media_type is null;

drop function ai_job_fair_pick(text, uuid[], int, int);
drop function ai_job_fair_ids(text, int, uuid[]);

create function ai_job_fair_pick(table_name text, users uuid[], wanted int, cap int,
                                 only_types text[] default null)
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
                         and (only_types is null or media_type is null
                              or media_type = any(only_types))
                       order by created_by desc, run_after
                       limit greatest(0, least(wanted, coalesce(cap - u.running, wanted))))
                      union all
                      (select id, run_after from ai_media_jobs
                       where u.k = '00000000-0000-0000-0000-000000000000'::uuid
                         and created_by is null
                         and status in ('pending', 'failed')
                         and run_after <= now() and (status = 'pending' or retry_count < max_retries)
                         and (only_types is null or media_type is null
                              or media_type = any(only_types))
                       order by created_by desc, run_after
                       limit greatest(0, least(wanted, coalesce(cap - u.running, wanted))))) c
            ) d
            order by d.level, d.run_after, d.id
            limit 2 * wanted);
    end if;
end
$$;

-- As in 025, with the media types to pick passed on (null: every type).
create function ai_job_fair_ids(table_name text, max_jobs int, held uuid[] default null,
                                only_types text[] default null)
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
    return ai_job_fair_pick(table_name, users, greatest(max_jobs, 0), cap, only_types);
end
$$;

-- Up to max_jobs claimable media jobs of the types in `types` (and of none),
-- at most limits[i] of types[i], in the order claim_jobs takes them (the oldest
-- first, or fair between users within the cap).
create function ai_job_claim_media(worker text, max_jobs int, types text[], limits int[])
returns table(job_table text, id uuid, claim_token uuid, retry_count int, max_retries int, job jsonb)
language plpgsql
set search_path = pg_catalog, public, pg_temp
set plan_cache_mode = force_generic_plan
as $$
#variable_conflict use_column
declare
    ids uuid[];
begin
    if max_jobs is null or max_jobs < 1 or types is null
       or exists (select from ai_job_queues q where q.job_table = 'ai_media_jobs' and q.paused) then
        return;
    end if;
    if exists (select from ai_job_settings where max_running_per_user is not null)
       or (select created_by from ai_media_jobs
           where status in ('pending', 'failed') and created_by is not null
           order by created_by, run_after desc limit 1) is not null then
        ids := ai_job_fair_ids('ai_media_jobs', max_jobs, null, types);
    end if;
    if ids is null then
        -- Each type's oldest, up to its limit, locked as they are read; then the
        -- oldest of them all, up to max_jobs (the others' locks end at the commit).
        return query
        update ai_media_jobs j
        set status = 'processing', started_at = clock_timestamp(),
            last_heartbeat = clock_timestamp(), claim_token = gen_random_uuid(),
            worker_id = worker, completed_at = null
        where j.id = any(array(
            select c.id
            from ((select x.id, x.run_after
                   from unnest(types, limits) t(mt, lim)
                   cross join lateral (
                       select id, run_after from ai_media_jobs
                       where media_type = t.mt
                         and status in ('pending', 'failed') and run_after <= now()
                         and (status = 'pending' or retry_count < max_retries)
                       order by run_after
                       limit least(greatest(coalesce(t.lim, 0), 0), max_jobs)
                       for update of ai_media_jobs skip locked) x)
                  union all
                  (select u.id, u.run_after
                   from (select id, run_after from ai_media_jobs
                         where media_type is null
                           and status in ('pending', 'failed') and run_after <= now()
                           and (status = 'pending' or retry_count < max_retries)
                         order by run_after
                         limit max_jobs
                         for update of ai_media_jobs skip locked) u)) c
            order by c.run_after
            limit max_jobs))
        returning 'ai_media_jobs'::text, j.id, j.claim_token, j.retry_count, j.max_retries,
                  jsonb_build_object('id', j.id, 'prompt', j.prompt, 'media_type', j.media_type,
                                     'course_id', j.course_id, 'params', j.params,
                                     'batch', j.batch);
    else
        -- The fair candidates (of these types and of none), each type's first
        -- ones up to its limit, taken in the fair order as they can be locked.
        return query
        update ai_media_jobs j
        set status = 'processing', started_at = clock_timestamp(),
            last_heartbeat = clock_timestamp(), claim_token = gen_random_uuid(),
            worker_id = worker, completed_at = null
        where j.id = any(array(
            select id from ai_media_jobs
            where id = any(array(
                    select c.id
                    from (select m.id, m.media_type,
                                 row_number() over (partition by m.media_type
                                                    order by o.pos) as k
                          from unnest(ids) with ordinality o(id, pos)
                          join ai_media_jobs m on m.id = o.id) c
                    where c.media_type is null
                       or c.k <= coalesce(limits[array_position(types, c.media_type)], 0)))
              and status in ('pending', 'failed') and run_after <= now()
              and (status = 'pending' or retry_count < max_retries)
            order by array_position(ids, id)
            limit max_jobs
            for update of ai_media_jobs skip locked))
        returning 'ai_media_jobs'::text, j.id, j.claim_token, j.retry_count, j.max_retries,
                  jsonb_build_object('id', j.id, 'prompt', j.prompt, 'media_type', j.media_type,
                                     'course_id', j.course_id, 'params', j.params,
                                     'batch', j.batch);
    end if;
end
$$;

revoke all on function
    ai_job_fair_pick(text, uuid[], int, int, text[]),
    ai_job_fair_ids(text, int, uuid[], text[]),
    ai_job_claim_media(text, int, text[], int[])
    from public, anon, authenticated, service_role;
grant execute on function
    ai_job_fair_pick(text, uuid[], int, int, text[]),
    ai_job_fair_ids(text, int, uuid[], text[]),
    ai_job_claim_media(text, int, text[], int[])
    to service_role;
