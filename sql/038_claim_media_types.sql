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
-- A type at a time, each through an index that leads with it: the claim index
-- of 001 leads with run_after, and the type left out may be the one with a
-- backlog. The bounds are written as row comparisons on the index's columns
-- (`(media_type, run_after) <= (t, now())`): with `media_type = t` from an
-- unnest, a generic plan guesses half the rows match and walks the claim index
-- instead. The fair order (025) over these types is ai_job_fair_pick_types:
-- the limits applied within each user's candidates (a user's older images do
-- not crowd out their speech job), through an index on (created_by, media_type,
-- run_after): `created_by = u` and the row comparison on the next two columns (a
-- row comparison over all three would end the index walk only at the next user,
-- reading the user's other types through). The null user's jobs of a type are
-- read through the type's index, past other users' jobs of that type.
-- ai_job_fair_ids is dropped and created again with two new arguments, last and
-- optional, that send it to that pick: the calls of 025, 033 and 034 keep their
-- meaning. Grants as before, and the new functions'.

create index if not exists ai_media_jobs_type_claim_idx
    on ai_media_jobs (media_type, run_after) where status in ('pending', 'failed');
create index if not exists ai_media_jobs_user_type_claim_idx
    on ai_media_jobs (created_by, media_type, run_after) where status in ('pending', 'failed');
create index if not exists ai_media_jobs_untyped_claim_idx
    on ai_media_jobs (run_after) where status in ('pending', 'failed') and media_type is null;

drop function ai_job_fair_ids(text, int, uuid[]);

-- The fair order of ai_job_fair_pick (025) over ai_media_jobs' jobs of these
-- types (and of none), at most limits[i] of types[i] among each user's
-- candidates.
create function ai_job_fair_pick_types(users uuid[], wanted int, cap int,
                                       types text[], limits int[])
returns uuid[]
language plpgsql stable
set search_path = pg_catalog, public, pg_temp
set plan_cache_mode = force_generic_plan
as $$
begin
    return array(
        select d.id
        from (select u.k, coalesce(r.running, 0) as running,
                     greatest(0, least(wanted, coalesce(cap - coalesce(r.running, 0), wanted)))
                         as room
              from unnest(users) u(k)
              left join ai_job_running_by_user() r on r.user_key = u.k) u
        cross join lateral (
            select c.id, c.run_after,
                   u.running + row_number() over (order by c.run_after, c.id) - 1 as level
            from (select s.id, s.run_after
                  from ((select x.id, x.run_after
                         from unnest(types, limits) t(mt, lim)
                         cross join lateral (
                             select id, run_after from ai_media_jobs
                             where u.k <> '00000000-0000-0000-0000-000000000000'::uuid
                               and created_by = u.k
                               and (media_type, run_after) >= (t.mt, '-infinity'::timestamptz)
                               and (media_type, run_after) <= (t.mt, now())
                               and status in ('pending', 'failed')
                               and (status = 'pending' or retry_count < max_retries)
                             order by media_type, run_after
                             limit least(greatest(coalesce(t.lim, 0), 0), u.room)) x)
                        union all
                        (select x.id, x.run_after
                         from unnest(types, limits) t(mt, lim)
                         cross join lateral (
                             select id, run_after from ai_media_jobs
                             where u.k = '00000000-0000-0000-0000-000000000000'::uuid
                               and (media_type, run_after) >= (t.mt, '-infinity'::timestamptz)
                               and (media_type, run_after) <= (t.mt, now())
                               and created_by is null
                               and status in ('pending', 'failed')
                               and (status = 'pending' or retry_count < max_retries)
                             order by media_type, run_after
                             limit least(greatest(coalesce(t.lim, 0), 0), u.room)) x)
                        union all
                        (select id, run_after from ai_media_jobs
                         where media_type is null
                           and (created_by = u.k
                                or (u.k = '00000000-0000-0000-0000-000000000000'::uuid
                                    and created_by is null))
                           and status in ('pending', 'failed') and run_after <= now()
                           and (status = 'pending' or retry_count < max_retries)
                         order by run_after
                         limit u.room)) s
                  order by s.run_after, s.id
                  limit u.room) c
        ) d
        order by d.level, d.run_after, d.id
        limit 2 * wanted);
end
$$;

-- As in 025; with `types`, the pick of ai_job_fair_pick_types.
create function ai_job_fair_ids(table_name text, max_jobs int, held uuid[] default null,
                                types text[] default null, limits int[] default null)
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
    if types is null then
        return ai_job_fair_pick(table_name, users, greatest(max_jobs, 0), cap);
    end if;
    return ai_job_fair_pick_types(users, greatest(max_jobs, 0), cap, types, limits);
end
$$;

-- Up to max_jobs claimable media jobs of the types in `types` (and of none),
-- at most limits[i] of types[i], in the order claim_jobs takes them (the oldest
-- first, or fair between users within the cap). Each type's candidates are
-- locked as they are read (a row another claim holds is passed over, the next
-- one taken), then the oldest of them all are claimed: up to the sum of the
-- limits less max_jobs stay locked, unclaimed, until this claim commits.
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
    if cardinality(types) <> (select count(distinct t) from unnest(types) t)
       or cardinality(types) <> coalesce(cardinality(limits), 0) then
        raise exception 'ai_job_claim_media: types must not repeat or be null, one limit each'
            using errcode = '22023';
    end if;
    if exists (select from ai_job_settings where max_running_per_user is not null)
       or (select created_by from ai_media_jobs
           where status in ('pending', 'failed') and created_by is not null
           order by created_by, run_after desc limit 1) is not null then
        ids := ai_job_fair_ids('ai_media_jobs', max_jobs, null, types, limits);
    end if;
    -- The jobs to claim, locked: each type's oldest candidates up to its limit,
    -- locked as they are read, then the oldest of them all; or the fair
    -- candidates still claimable, each type's first ones up to its limit, taken
    -- in the fair order as they can be locked.
    if ids is null then
        ids := array(
            select c.id
            from ((select x.id, x.run_after
                   from unnest(types, limits) t(mt, lim)
                   cross join lateral (
                       select id, run_after from ai_media_jobs
                       where (media_type, run_after) >= (t.mt, '-infinity'::timestamptz)
                         and (media_type, run_after) <= (t.mt, now())
                         and status in ('pending', 'failed')
                         and (status = 'pending' or retry_count < max_retries)
                       order by media_type, run_after
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
            limit max_jobs);
    else
        ids := array(
            select id from ai_media_jobs
            where id = any(array(
                    select c.id
                    from (select m.id, m.media_type,
                                 row_number() over (partition by m.media_type
                                                    order by o.pos) as k
                          from unnest(ids) with ordinality o(id, pos)
                          join ai_media_jobs m on m.id = o.id
                          where m.status in ('pending', 'failed') and m.run_after <= now()
                            and (m.status = 'pending' or m.retry_count < m.max_retries)) c
                    where c.media_type is null
                       or c.k <= coalesce(limits[array_position(types, c.media_type)], 0)))
              and status in ('pending', 'failed') and run_after <= now()
              and (status = 'pending' or retry_count < max_retries)
            order by array_position(ids, id)
            limit max_jobs
            for update of ai_media_jobs skip locked);
    end if;
    return query
    update ai_media_jobs j
    set status = 'processing', started_at = clock_timestamp(),
        last_heartbeat = clock_timestamp(), claim_token = gen_random_uuid(),
        worker_id = worker, completed_at = null
    where j.id = any(ids)
    returning 'ai_media_jobs'::text, j.id, j.claim_token, j.retry_count, j.max_retries,
              jsonb_build_object('id', j.id, 'prompt', j.prompt, 'media_type', j.media_type,
                                 'course_id', j.course_id, 'params', j.params,
                                 'batch', j.batch);
end
$$;

revoke all on function
    ai_job_fair_pick_types(uuid[], int, int, text[], int[]),
    ai_job_fair_ids(text, int, uuid[], text[], int[]),
    ai_job_claim_media(text, int, text[], int[])
    from public, anon, authenticated, service_role;
grant execute on function
    ai_job_fair_pick_types(uuid[], int, int, text[], int[]),
    ai_job_fair_ids(text, int, uuid[], text[], int[]),
    ai_job_claim_media(text, int, text[], int[])
    to service_role;
