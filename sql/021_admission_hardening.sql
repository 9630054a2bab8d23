-- 021: the admission of a client's insert, hardened against hostile clients, and a
-- budget that counts what was paid.
--
-- spend       ai_job_charges keeps every provider call the worker made for a job
--             (tokens, and its cost at the list prices; null when the model has no
--             price), written by the worker as each call returns, whatever becomes
--             of the job: a failed attempt, the dead letter, a cancel. A user's
--             spend (ai_job_user_spend) is their calls of the last 24 hours, a call
--             without a price at budget_estimate_usd_per_job, plus, for each job of
--             theirs not finished yet, the estimate less what it paid already: a
--             burst of inserts still cannot outrun the cap before anything is paid.
--             A job cancelled while it ran (or lost with its worker) keeps at least
--             the estimate: the call then under way is paid whether or not its
--             answer is used, and its price is not known.
-- who asks    ai_job_admit, the first BEFORE INSERT trigger (triggers fire in the
--             order of their names), refuses a client's row whose created_by is not
--             auth.uid() before any other trigger runs: the refusal reads like the
--             one of row-level security (which comes after every BEFORE trigger), so
--             a failed insert in another user's name tells nothing of their spend,
--             their hourly count or their courses, and bumps no rejection counter.
-- limits      One trigger per table (ai_*_jobs_limits) checks the budget and the
--             rate limit. A user's admissions queue on their row of
--             ai_job_admissions, which each one updates: under READ COMMITTED each
--             then counts what the previous ones committed; under REPEATABLE READ
--             or SERIALIZABLE an admission committed after this transaction's
--             snapshot makes the update fail (40001, "could not serialize access")
--             instead of letting the counts run on a snapshot that misses it. A
--             client's created_at is the statement's time, not its transaction's:
--             a transaction held open for an hour cannot back-date its rows.
-- course ids  A derived course id whose slug is taken gets a random suffix (10 hex
--             characters) instead of one computed from the owner and the slug,
--             which anyone knowing the owner could take first. The owner's own
--             suffixed id for a slug is remembered (ai_course_owners.slug), so the
--             same subject asked again lands on the same course. An id no longer
--             named by a job of its owner (cancelled ones aside) and with no course
--             in the catalog is released when its jobs are cancelled or purged. A
--             media job may name only a course of its own owner.
-- search_path Every function pins search_path = pg_catalog, public, pg_temp: a
--             temporary table or function, or a session's own search_path, cannot
--             stand in for a name the function uses (pg_temp is searched first, even
--             before pg_catalog, unless the path names it; named last it is never
--             searched for functions and only after our schema for tables). Views
--             need nothing: their names were resolved when they were created.

------------------------------------------------------------------------------
-- What was paid: one row per provider call
------------------------------------------------------------------------------

create table if not exists ai_job_charges (
    id bigint generated always as identity primary key,
    job_table text not null check (job_table in ('ai_course_jobs', 'ai_media_jobs')),
    job_id uuid not null,
    created_by uuid,  -- the job's user (null: a system job), kept if the job is deleted
    provider text not null,
    model text not null,
    input_tokens bigint not null default 0 check (input_tokens >= 0),
    cached_input_tokens bigint not null default 0 check (cached_input_tokens >= 0),
    output_tokens bigint not null default 0 check (output_tokens >= 0),
    cost_usd numeric check (cost_usd >= 0 and cost_usd < 1e9),  -- null: no price known
    charged_at timestamptz not null default now()
);
create index if not exists ai_job_charges_user_idx
    on ai_job_charges (created_by, charged_at) where created_by is not null;
create index if not exists ai_job_charges_job_idx on ai_job_charges (job_id);

-- The worker's record of its calls, in one statement for any number of them.
create or replace function ai_job_add_charges(
    job_tables text[], job_ids uuid[], providers text[], models text[],
    input_tokens bigint[], cached_input_tokens bigint[], output_tokens bigint[],
    costs numeric[])
returns void
language sql
set search_path = pg_catalog, public, pg_temp
as $$
    insert into ai_job_charges (job_table, job_id, created_by, provider, model, input_tokens,
                                cached_input_tokens, output_tokens, cost_usd)
    select c.job_table, c.job_id,
           case c.job_table
               when 'ai_course_jobs' then (select j.created_by from ai_course_jobs j
                                           where j.id = c.job_id)
               else (select m.created_by from ai_media_jobs m where m.id = c.job_id)
           end,
           left(c.provider, 40), left(c.model, 200), greatest(c.input, 0),
           greatest(c.cached, 0), greatest(c.output, 0),
           case when c.cost < 0 then 0 else c.cost end  -- null (no price) stays null
    from unnest(job_tables, job_ids, providers, models, input_tokens, cached_input_tokens,
                output_tokens, costs) as c(job_table, job_id, provider, model, input, cached,
                                           output, cost)
$$;

-- A user's spend since `since`: what their calls cost (a call without a price at
-- the estimate), and for each job of theirs that may still call a provider
-- (pending, processing, failed, stale) or that ended while a call may have been
-- under way (an attempt cancelled while running, or lost with its worker), the
-- estimate less what it paid already.
create or replace function ai_job_user_spend(user_id uuid, since timestamptz)
returns numeric
language sql stable
set search_path = pg_catalog, public, pg_temp
as $$
    with s as (
        select coalesce(max(budget_estimate_usd_per_job), 0.05) as estimate from ai_job_settings
    ), jobs as (
        select 'ai_course_jobs'::text as job_table, id, status from ai_course_jobs
        where created_by = user_id and created_at > since
        union all
        select 'ai_media_jobs', id, status from ai_media_jobs
        where created_by = user_id and created_at > since
    ), held as (
        select j.job_table, j.id from jobs j
        where j.status in ('pending', 'processing', 'failed', 'stale')
           or exists (select from ai_job_attempts a
                      where a.job_id = j.id and a.job_table = j.job_table
                        and a.outcome in ('cancelled', 'lost'))
    )
    select coalesce((select sum(coalesce(c.cost_usd, s.estimate)) from ai_job_charges c
                     where c.created_by = user_id and c.charged_at > since), 0)
         + coalesce((select sum(greatest(s.estimate - coalesce(
                         (select sum(coalesce(c.cost_usd, s.estimate)) from ai_job_charges c
                          where c.job_id = h.id and c.job_table = h.job_table), 0), 0))
                     from held h), 0)
    from s
$$;

------------------------------------------------------------------------------
-- Who asks, first
------------------------------------------------------------------------------

-- As in 011, with the caller checked first, and created_at the statement's time.
create or replace function ai_job_admit() returns trigger
language plpgsql
set search_path = pg_catalog, public, pg_temp
as $$
declare
    lim record;
    trusted boolean;
begin
    -- This function runs as the inserting role (SECURITY INVOKER), so current_user
    -- is the client's role. The owner (and superusers) and service_role keep full
    -- control over what they insert; anyone else inserts for themselves only, and
    -- is told so as row-level security would tell them, before the triggers that
    -- look at that user's counts, spend and courses (they come after this one).
    trusted := pg_has_role(current_user, (select c.relowner from pg_class c where c.oid = tg_relid),
                           'USAGE')
               or pg_has_role(current_user, 'service_role', 'USAGE');
    if not trusted and (new.created_by is null or new.created_by is distinct from auth.uid()) then
        raise exception 'new row violates row-level security policy for table "%"', tg_table_name
            using errcode = 'insufficient_privilege';
    end if;

    -- The defaults stand in should the settings row be missing: never no limit.
    select coalesce(max(s.max_subject_length), 500) as max_subject_length,
           coalesce(max(s.max_prompt_length), 4000) as max_prompt_length,
           coalesce(max(s.max_params_bytes), 8192) as max_params_bytes
    into lim from ai_job_settings s;
    if tg_table_name = 'ai_course_jobs' then
        if length(new.subject) > lim.max_subject_length then
            raise exception 'subject is % characters long, over the limit of %',
                length(new.subject), lim.max_subject_length
                using errcode = 'check_violation',
                      hint = 'ai_job_settings.max_subject_length (MAX_SUBJECT_LENGTH)';
        end if;
    elsif length(new.prompt) > lim.max_prompt_length then
        raise exception 'prompt is % characters long, over the limit of %',
            length(new.prompt), lim.max_prompt_length
            using errcode = 'check_violation',
                  hint = 'ai_job_settings.max_prompt_length (MAX_PROMPT_LENGTH)';
    end if;
    if octet_length(new.params::text) > lim.max_params_bytes then
        raise exception 'params are % bytes long, over the limit of %',
            octet_length(new.params::text), lim.max_params_bytes
            using errcode = 'check_violation',
                  hint = 'ai_job_settings.max_params_bytes (MAX_PARAMS_BYTES)';
    end if;
    if jsonb_path_exists(new.params, 'strict $.**{21}') then
        raise exception 'params are nested more than 20 levels deep'
            using errcode = 'check_violation';
    end if;
    -- The course id names a folder in storage: a slug, checked whole (no trailing
    -- newline: PostgreSQL's $ is the end of the text). Blank means "derive it".
    if new.course_id is not null and btrim(new.course_id) <> ''
       and new.course_id !~ '^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$' then
        raise exception 'course_id % is not a slug (letters, digits, - and _, at most 128)',
            quote_literal(left(new.course_id, 140))
            using errcode = 'check_violation';
    end if;

    if not trusted then
        new.id := gen_random_uuid();
        new.status := 'pending';
        new.retry_count := 0;
        new.max_retries := least(new.max_retries, 10);
        new.error := null;
        -- The statement's time: now() is the transaction's, which a client could
        -- hold open for an hour to insert rows already out of the rate limit's hour.
        new.created_at := statement_timestamp();
        new.run_after := new.created_at;
        new.started_at := null;
        new.last_heartbeat := null;
        new.completed_at := null;
        new.result_path := null;
        new.metrics := null;
        new.claim_token := null;
        new.worker_id := null;
    end if;
    return new;
end
$$;

------------------------------------------------------------------------------
-- The budget and the rate limit, in one trigger, queued per user on a row
------------------------------------------------------------------------------

create table if not exists ai_job_admissions (
    created_by uuid primary key,
    admitted_at timestamptz not null default clock_timestamp()
);

-- BEFORE INSERT, per row with a created_by, after ai_job_admit (by name). SECURITY
-- DEFINER: the other table, the charges, the counters and the settings are not the
-- inserting user's to read or touch; a trigger function cannot be called directly.
create or replace function ai_job_enforce_limits() returns trigger
language plpgsql security definer
set search_path = pg_catalog, public, pg_temp
as $$
declare
    s record;
    n bigint;
    spent numeric;
begin
    -- The user's row: its lock queues their concurrent inserts (into either table);
    -- under REPEATABLE READ or SERIALIZABLE, an insert of theirs committed since
    -- this transaction's snapshot makes this update fail with 40001.
    insert into ai_job_admissions as a (created_by) values (new.created_by)
    on conflict (created_by) do update set admitted_at = excluded.admitted_at;
    select coalesce(max(rate_limit_per_hour), 10) as rate_limit,
           max(daily_budget_usd_per_user) as cap
    into s from ai_job_settings;
    if s.cap is not null then
        spent := ai_job_user_spend(new.created_by, now() - interval '24 hours');
        if spent >= s.cap then
            perform nextval('ai_job_budget_rejections');
            raise exception 'Budget exceeded: $% spent or reserved in the last 24 hours (cap $% per user)',
                round(spent, 4), round(s.cap, 2)
                using errcode = 'AJ402',
                      hint = 'Wait, or change ai_job_settings.daily_budget_usd_per_user.';
        end if;
    end if;
    n := ai_job_user_jobs_last_hour(new.created_by, tg_table_name);
    if n >= s.rate_limit then
        perform nextval('ai_job_rate_limit_rejections');
        raise exception 'Rate limit exceeded: % jobs in the last hour (limit %) in %',
            n, s.rate_limit, tg_table_name
            using errcode = 'AJ429',
                  hint = 'Wait, or change ai_job_settings.rate_limit_per_hour.';
    end if;
    return new;
end
$$;

drop trigger if exists ai_course_jobs_budget on ai_course_jobs;
drop trigger if exists ai_media_jobs_budget on ai_media_jobs;
drop trigger if exists ai_course_jobs_rate_limit on ai_course_jobs;
drop trigger if exists ai_media_jobs_rate_limit on ai_media_jobs;
drop function if exists ai_job_enforce_budget();
drop function if exists ai_job_enforce_rate_limit();

create or replace trigger ai_course_jobs_limits
    before insert on ai_course_jobs
    for each row when (new.created_by is not null)
    execute function ai_job_enforce_limits();

create or replace trigger ai_media_jobs_limits
    before insert on ai_media_jobs
    for each row when (new.created_by is not null)
    execute function ai_job_enforce_limits();

------------------------------------------------------------------------------
-- Course ids: random fallbacks, remembered per owner, released when unused
------------------------------------------------------------------------------

alter table ai_course_owners add column if not exists slug text;

-- The slug each existing id was asked as: itself, or, for an id of 011's scheme
-- (slug-<6 hex of md5(owner/slug/attempt)>), the slug it was derived from.
update ai_course_owners o
set slug = coalesce(
    (select m[1] from regexp_match(o.course_id, '^(.+)-([0-9a-f]{6})$') m
     where exists (select from generate_series(1, 7) attempt
                   where left(md5(coalesce(o.owner::text, 'system') || '/' || m[1] || '/'
                                  || attempt), 6) = m[2])),
    o.course_id)
where o.slug is null;

create index if not exists ai_course_owners_slug_idx on ai_course_owners (slug);
-- The catalog's ids, case-insensitively (ids are owned so): for the release below.
create index if not exists ai_course_catalog_lower_idx on ai_course_catalog (lower(course_id));

create or replace function ai_job_claim_course_id(wanted text, owner_id uuid, may_rename boolean)
returns text
language plpgsql
set search_path = pg_catalog, public, pg_temp
as $$
declare
    id text := lower(wanted);
    holder uuid;
    held boolean := false;
    mine text;
    candidate text;
begin
    for attempt in 1..10 loop
        insert into ai_course_owners as o (course_id, owner, slug) values (id, owner_id, id)
        on conflict (course_id) do nothing;
        if found then
            return wanted;
        end if;
        -- Taken. Held (for share) until this insert commits, so that a release of
        -- the id (a cancel, a purge) waits for it and then sees its job.
        select o.owner into holder from ai_course_owners o where o.course_id = id for share;
        held := found;
        exit when held;  -- else released meanwhile: claim it afresh
    end loop;
    if held and holder is not distinct from owner_id then
        return wanted;
    end if;
    if not may_rename then
        raise exception 'course_id % belongs to a course made by another user', quote_literal(wanted)
            using errcode = 'insufficient_privilege',
                  hint = 'Leave course_id empty to derive one from the subject.';
    end if;
    -- The owner's own id for this slug, from an earlier request: the same subject
    -- asked again lands on the same course.
    select o.course_id into mine from ai_course_owners o
    where o.slug = id and o.owner is not distinct from owner_id
    order by o.claimed_at, o.course_id
    limit 1
    for share;
    if found then
        return mine;
    end if;
    -- A new one, with a random suffix: nobody can tell it in advance, so nobody
    -- can take it first.
    for attempt in 1..10 loop
        candidate := left(id, 116) || '-' || left(replace(gen_random_uuid()::text, '-', ''), 10);
        insert into ai_course_owners (course_id, owner, slug) values (candidate, owner_id, id)
        on conflict (course_id) do nothing;
        if found then
            return candidate;
        end if;
    end loop;
    raise exception 'no free course id for % after 10 random tries', quote_literal(wanted)
        using errcode = 'unique_violation';
end
$$;

-- A media job's course_id, when given, names a course of the job's own owner.
create or replace function ai_media_jobs_defaults() returns trigger
language plpgsql security definer
set search_path = pg_catalog, public, pg_temp
as $$
begin
    if new.course_id is null or btrim(new.course_id) = '' then
        new.course_id := null;
        return new;
    end if;
    -- Held (for share) until the insert commits: a release of the id waits and
    -- then sees this job.
    perform from ai_course_owners o
    where o.course_id = lower(new.course_id) and o.owner is not distinct from new.created_by
    for share;
    if not found then
        raise exception 'course_id % is not a course of yours', quote_literal(left(new.course_id, 140))
            using errcode = 'insufficient_privilege',
                  hint = 'Name a course made by a job of the same user, or leave course_id empty.';
    end if;
    return new;
end
$$;

create or replace trigger ai_media_jobs_set_course_id
    before insert on ai_media_jobs
    for each row execute function ai_media_jobs_defaults();

-- Give back the ids of these (owner, course id) pairs that no job of their owner
-- names any more (cancelled ones aside) and no course in the catalog uses.
-- System ids (no owner) are kept. Returns how many were released.
create or replace function ai_job_release_course_ids(owners uuid[], course_ids text[])
returns bigint
language plpgsql
set search_path = pg_catalog, public, pg_temp
as $$
declare
    r record;
    n bigint := 0;
begin
    for r in
        select distinct u.owner, lower(u.course_id) as id
        from unnest(owners, course_ids) as u(owner, course_id)
        where u.owner is not null and u.course_id is not null
        order by 2, 1  -- one order for every release: none waits on another in a circle
    loop
        -- Locked first, looked at after (each statement sees what committed before
        -- it): an insert that claimed or reused the id holds it until it commits.
        perform from ai_course_owners o where o.course_id = r.id and o.owner = r.owner
        for update;
        continue when not found;
        continue when exists (select from ai_course_jobs j
                              where j.created_by = r.owner and lower(j.course_id) = r.id
                                and j.status <> 'cancelled')
                   or exists (select from ai_media_jobs m
                              where m.created_by = r.owner and lower(m.course_id) = r.id
                                and m.status <> 'cancelled')
                   or exists (select from ai_course_catalog c where lower(c.course_id) = r.id);
        delete from ai_course_owners o where o.course_id = r.id;
        n := n + 1;
    end loop;
    return n;
end
$$;

-- A requeued course job's course id, claimed again for its owner: a cancel may
-- have given it back, and another user taken it since. The job then moves to an
-- id of its owner's, derived from its subject (as 011 moved queued jobs), rather
-- than write into another user's course. Returns how many jobs moved. SECURITY
-- DEFINER, as the insert trigger: the claim is not service_role's to call.
create or replace function ai_job_reclaim_course_ids(job_ids uuid[])
returns bigint
language plpgsql security definer
set search_path = pg_catalog, public, pg_temp
as $$
declare
    r record;
    kept text;
    n bigint := 0;
begin
    for r in
        select j.id, j.created_by, j.course_id, j.subject from ai_course_jobs j
        where j.id = any(job_ids) and j.course_id is not null
        order by j.id
    loop
        begin
            kept := ai_job_claim_course_id(r.course_id, r.created_by, false);
        exception when insufficient_privilege then
            kept := ai_job_claim_course_id(ai_job_slugify(r.subject), r.created_by, true);
        end;
        if kept is distinct from r.course_id then
            update ai_course_jobs set course_id = kept where id = r.id;
            n := n + 1;
        end if;
    end loop;
    return n;
end
$$;

-- As in 003, and a course job's id claimed again (above).
create or replace function requeue_job(job_id uuid, table_name text)
returns void
language plpgsql
set search_path = pg_catalog, public, pg_temp
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
    if t = 'ai_course_jobs' then
        perform ai_job_reclaim_course_ids(array[job_id]);
    end if;
end
$$;

-- As in 016, and the job's course id released when nothing else holds it.
create or replace function ai_job_cancel(job_id uuid, table_name text, only_user uuid)
returns text
language plpgsql
set search_path = pg_catalog, public, pg_temp
as $$
declare
    t text := ai_job_table(table_name);
    st text;
    owner uuid;
    course text;
begin
    execute format('select status, created_by, course_id from %I where id = $1 for update', t)
        into st, owner, course using job_id;
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
    perform ai_job_release_course_ids(array[owner], array[course]);
    return st;
end
$$;

-- As in 017, the course ids of the jobs cancelled or deleted released, those of
-- course jobs requeued claimed again.
create or replace function ai_job_bulk(
    action text, table_name text, status text, provider text, user_id uuid,
    created_after timestamptz, created_before timestamptz, search text, dry_run boolean)
returns bigint
language plpgsql
set search_path = pg_catalog, public, pg_temp
as $$
declare
    t text;
    allowed text[];
    cond text;
    n bigint;
    owners uuid[];
    ids text[];
    requeued uuid[];
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
        owners := null;
        ids := null;
        if dry_run then
            execute format('select count(*) from %I where %s', t, cond) into n;
        elsif action = 'requeue' then
            execute format($q$
                with requeued as (
                    update %1$I j
                    set status = 'pending', retry_count = 0, error = null, run_after = now(),
                        started_at = null, last_heartbeat = null, completed_at = null,
                        claim_token = null, worker_id = null
                    where j.id = any(array(select id from %1$I where %2$s for update skip locked))
                    returning j.id
                )
                select count(*), array_agg(id) from requeued
            $q$, t, cond) into n, requeued;
            if t = 'ai_course_jobs' and requeued is not null then
                perform ai_job_reclaim_course_ids(requeued);
            end if;
        elsif action = 'cancel' then
            execute format($q$
                with cancelled as (
                    update %1$I j
                    set status = 'cancelled', completed_at = clock_timestamp(), claim_token = null
                    where j.id = any(array(select id from %1$I where %2$s for update skip locked))
                    returning j.created_by, j.course_id
                )
                select count(*), array_agg(created_by), array_agg(course_id) from cancelled
            $q$, t, cond) into n, owners, ids;
        else
            execute format($q$
                with gone as (
                    delete from %1$I j
                    where j.id = any(array(select id from %1$I where %2$s for update skip locked))
                    returning j.id, j.created_by, j.course_id
                ), history as (
                    delete from ai_job_attempts a using gone
                    where a.job_table = %1$L and a.job_id = gone.id
                )
                select count(*), array_agg(created_by), array_agg(course_id) from gone
            $q$, t, cond) into n, owners, ids;
        end if;
        if owners is not null then
            perform ai_job_release_course_ids(owners, ids);
        end if;
        total := total + coalesce(n, 0);
    end loop;
    return total;
end
$$;

-- As in 016, and: the course ids of purged jobs released; calls as old as the jobs
-- forgotten; a user's admission row untouched for a day removed (it only queues
-- their inserts: the next one makes it again).
create or replace function purge_old_jobs(older_than interval default '90 days')
returns bigint
language plpgsql
set search_path = pg_catalog, public, pg_temp
as $$
declare
    n bigint;
    owners uuid[];
    ids text[];
    total bigint := 0;
begin
    with gone as (
        delete from ai_course_jobs
        where status in ('done', 'dead_letter', 'cancelled') and completed_at < now() - older_than
        returning created_by, course_id
    )
    select count(*), array_agg(created_by), array_agg(course_id) into n, owners, ids from gone;
    total := total + n;
    perform ai_job_release_course_ids(owners, ids);
    with gone as (
        delete from ai_media_jobs
        where status in ('done', 'dead_letter', 'cancelled') and completed_at < now() - older_than
        returning created_by, course_id
    )
    select count(*), array_agg(created_by), array_agg(course_id) into n, owners, ids from gone;
    total := total + n;
    perform ai_job_release_course_ids(owners, ids);
    delete from ai_job_attempts where ended_at < now() - older_than;
    delete from ai_job_charges where charged_at < now() - older_than;
    delete from ai_job_admissions where admitted_at < now() - interval '1 day';
    return total;
end
$$;

------------------------------------------------------------------------------
-- Every other function: its search_path pinned
------------------------------------------------------------------------------

do $$
declare
    f text;
begin
    foreach f in array array[
        'ai_job_table(text)', 'ai_job_type(text)', 'ai_job_slugify(text)',
        'ai_course_jobs_defaults()', 'ai_job_user_jobs_last_hour(uuid, text)',
        'check_ai_job_rate_limit(uuid, text)', 'mark_stale_jobs(interval)',
        'move_to_dead_letter()',
        'claim_jobs(text, text, integer)', 'claim_job(text, uuid, text)',
        'claim_due_job(text, uuid, text)', 'heartbeat_jobs(text, uuid[], uuid[])',
        'complete_jobs(text, uuid[], uuid[], text[], jsonb[])',
        'complete_and_claim(text, text, integer, uuid[], uuid[], text[], jsonb[])',
        'fail_job(text, uuid, uuid, text, double precision, boolean)',
        'release_jobs(text, uuid[], uuid[])', 'rescue_stale_jobs(integer)', 'next_job_due()',
        'ai_jobs_notify_insert()', 'ai_jobs_notify_pending()', 'ai_jobs_notify_events()',
        'ai_job_provider_failed(text, text, text, integer, double precision, double precision)',
        'ai_job_provider_succeeded(text)', 'ai_job_provider_probe(text, double precision)',
        'ai_job_provider_reset(text)',
        'defer_job(text, uuid, uuid, double precision, text, double precision)',
        'ai_job_add_usage(text[], text[], bigint[], bigint[], bigint[], bigint[], numeric[])',
        'ai_job_set_paused(text, boolean)', 'pause_jobs(text)', 'resume_jobs(text)',
        'ai_job_cancel_own(uuid, text)', 'cancel_job(uuid, text)',
        'ai_jobs_count_finished()', 'ai_jobs_count_truncated()', 'ai_job_recount()',
        'ai_job_fold_counts()', 'ai_job_status_counts()',
        'ai_job_filter_sql(text, text, text, uuid, timestamptz, timestamptz, text)',
        'find_jobs(text, text, text, uuid, timestamptz, timestamptz, text, timestamptz, uuid,'
            || ' integer)',
        'requeue_jobs(text, text, text, uuid, timestamptz, timestamptz, text, boolean)',
        'cancel_jobs(text, text, text, uuid, timestamptz, timestamptz, text, boolean)',
        'delete_jobs(text, text, text, uuid, timestamptz, timestamptz, text, boolean)'
    ] loop
        execute format('alter function %s set search_path = pg_catalog, public, pg_temp', f);
    end loop;
end
$$;

------------------------------------------------------------------------------
-- Privileges (see 010)
------------------------------------------------------------------------------

alter table ai_job_charges enable row level security;
alter table ai_job_admissions enable row level security;
revoke all on ai_job_charges, ai_job_admissions from public, anon, authenticated, service_role;
-- The worker records calls (ai_job_add_charges) and reads them (costs); retention
-- (purge_old_jobs) deletes old ones and old admission rows.
grant select, insert, delete on ai_job_charges to service_role;
grant select, delete on ai_job_admissions to service_role;
-- The identity column's sequence: inserts draw from it without a grant.
revoke all on sequence ai_job_charges_id_seq from public, anon, authenticated, service_role;

revoke all on function
    ai_job_add_charges(text[], uuid[], text[], text[], bigint[], bigint[], bigint[], numeric[]),
    ai_job_enforce_limits(), ai_media_jobs_defaults(),
    ai_job_release_course_ids(uuid[], text[]), ai_job_reclaim_course_ids(uuid[])
from public, anon, authenticated, service_role;
grant execute on function
    ai_job_add_charges(text[], uuid[], text[], text[], bigint[], bigint[], bigint[], numeric[]),
    ai_job_release_course_ids(uuid[], text[]), ai_job_reclaim_course_ids(uuid[])
to service_role;
