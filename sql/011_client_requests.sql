-- 011: a client sends a request; the bookkeeping is the worker's.
--
-- Whatever a client role (anything but the tables' owner and service_role) puts
-- in an INSERT, the job starts as a fresh request: pending, no attempt counted,
-- created now, every lifecycle column empty, a bounded max_retries. The request
-- itself is held to limits that every role obeys: lengths of subject, prompt and
-- params (in ai_job_settings, written by `ai-jobs migrate` from the settings),
-- params nesting, and the course_id format. Constraints give the worker and the
-- operators' tools values they can compute with: timestamps within 1970-9999,
-- bounded retry counters, metrics whose numbers fit a double. A course id has an
-- owner (ai_course_owners): no job can write into a course another user's job
-- made. fail_job and rescue_stale_jobs can no longer overflow, and a failure that
-- cannot be written as usual still ends the job. Details: docs/security.md.
--
-- Error codes added (translated in listener/errors.py):
--   23514 check_violation           the request breaks a limit
--   42501 insufficient_privilege    the course_id belongs to another user's course

-- Limits of a request -----------------------------------------------------------

alter table ai_job_settings
    add column if not exists max_subject_length int not null default 500
        check (max_subject_length between 1 and 1000000),
    add column if not exists max_prompt_length int not null default 4000
        check (max_prompt_length between 1 and 1000000),
    add column if not exists max_params_bytes int not null default 8192
        check (max_params_bytes between 2 and 10000000);

-- Deeper params are refused: a client's JSON is parsed by the worker, and a few
-- thousand nested arrays fit in a few kilobytes.
-- (jsonpath: an item at level 21 exists.)

create or replace function ai_job_admit() returns trigger
language plpgsql
as $$
declare
    lim record;
    trusted boolean;
begin
    -- The defaults stand in should the settings row be missing: never no limit.
    select coalesce(max(max_subject_length), 500) as max_subject_length,
           coalesce(max(max_prompt_length), 4000) as max_prompt_length,
           coalesce(max(max_params_bytes), 8192) as max_params_bytes
    into lim from ai_job_settings;
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

    -- This function runs as the inserting role (SECURITY INVOKER), so current_user
    -- is the client's role. The owner (and superusers) and service_role keep full
    -- control over what they insert.
    trusted := pg_has_role(current_user, (select relowner from pg_class where oid = tg_relid), 'USAGE')
               or pg_has_role(current_user, 'service_role', 'USAGE');
    if not trusted then
        new.id := gen_random_uuid();
        new.status := 'pending';
        new.retry_count := 0;
        new.max_retries := least(new.max_retries, 10);
        new.error := null;
        new.created_at := now();
        new.run_after := now();
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

-- Fires first of the BEFORE INSERT triggers (they fire in name order): a refused
-- request costs no rate-limit lock and claims no course id.
create or replace trigger ai_course_jobs_admit
    before insert on ai_course_jobs
    for each row execute function ai_job_admit();

create or replace trigger ai_media_jobs_admit
    before insert on ai_media_jobs
    for each row execute function ai_job_admit();

-- Course ids have owners ------------------------------------------------------
--
-- The first job to use a course id claims it for its created_by (null: system
-- jobs, as one owner). Later jobs:
--   * with no course_id, derived from the subject: the slug if it is free or
--     theirs, else the slug plus a suffix derived from the owner and the slug, so
--     the same user asking the same subject again regenerates the same course;
--   * with a course_id given: accepted if it is free or theirs, refused otherwise
--     (an operator regenerates a user's course by requeueing that user's job, or
--     by enqueueing as that user).
-- The claim is an INSERT ... ON CONFLICT on the primary key, so two users asking
-- for one id at once queue on it and one of them gets it. Ids are owned in lower
-- case: 'Algebra' and 'algebra' are one folder on a case-insensitive file system.

create table if not exists ai_course_owners (
    course_id  text primary key,  -- lower(course_id) of the jobs
    owner      uuid,
    claimed_at timestamptz not null default now()
);

create or replace function ai_job_claim_course_id(wanted text, owner_id uuid, may_rename boolean)
returns text
language plpgsql
as $$
declare
    candidate text := wanted;
    holder uuid;
begin
    for attempt in 1..8 loop
        insert into ai_course_owners as o (course_id, owner) values (lower(candidate), owner_id)
        on conflict (course_id) do nothing;
        if found then
            return candidate;
        end if;
        select o.owner into holder from ai_course_owners o where o.course_id = lower(candidate);
        if holder is not distinct from owner_id then
            return candidate;
        end if;
        if not may_rename then
            raise exception 'course_id % belongs to a course made by another user', quote_literal(wanted)
                using errcode = 'insufficient_privilege',
                      hint = 'Leave course_id empty to derive one from the subject.';
        end if;
        candidate := left(wanted, 120) || '-' || left(md5(
            coalesce(owner_id::text, 'system') || '/' || wanted || '/' || attempt), 6);
    end loop;
    raise exception 'no free course id for % after 8 tries', quote_literal(wanted)
        using errcode = 'unique_violation';
end
$$;

-- The course_id default of sql/003, now with its owner. SECURITY DEFINER (since
-- 010): it reads and claims ids of every user, past row-level security.
create or replace function ai_course_jobs_defaults() returns trigger
language plpgsql security definer set search_path = public, pg_temp
as $$
begin
    if new.course_id is null or btrim(new.course_id) = '' then
        new.course_id := ai_job_claim_course_id(ai_job_slugify(new.subject), new.created_by, true);
    else
        new.course_id := ai_job_claim_course_id(new.course_id, new.created_by, false);
    end if;
    return new;
end
$$;

-- Renamed so that it fires after the rate limit: a rejected insert claims nothing.
drop trigger if exists ai_course_jobs_defaults on ai_course_jobs;
create or replace trigger ai_course_jobs_set_course_id
    before insert on ai_course_jobs
    for each row execute function ai_course_jobs_defaults();

-- Existing courses keep their owners: the author of the published course (the
-- catalog's job; a purged job leaves it to the system), then the first job to
-- use each id. Queued jobs that would write into another user's course move to
-- their own id (processing ones cannot be stopped here).
insert into ai_course_owners (course_id, owner, claimed_at)
select distinct on (lower(c.course_id)) lower(c.course_id), j.created_by, c.created_at
from ai_course_catalog c left join ai_course_jobs j on j.id = c.job_id
order by lower(c.course_id), c.created_at
on conflict do nothing;

insert into ai_course_owners (course_id, owner, claimed_at)
select distinct on (lower(course_id)) lower(course_id), created_by, created_at
from ai_course_jobs
where course_id is not null
order by lower(course_id), created_at, id
on conflict do nothing;

update ai_course_jobs j
set course_id = ai_job_claim_course_id(j.course_id, j.created_by, true)
from ai_course_owners o
where o.course_id = lower(j.course_id) and o.owner is distinct from j.created_by
  and j.status in ('pending', 'failed', 'stale');

-- Queued jobs whose params the worker could not even parse (a JSON parser has a
-- depth limit, and the claim parses every row it returns) end now.
update ai_course_jobs
set status = 'dead_letter', completed_at = now(), claim_token = null,
    error = 'Invalid job: params nested more than 20 levels deep'
where status in ('pending', 'failed', 'stale') and jsonb_path_exists(params, 'strict $.**{21}');
update ai_media_jobs
set status = 'dead_letter', completed_at = now(), claim_token = null,
    error = 'Invalid job: params nested more than 20 levels deep'
where status in ('pending', 'failed', 'stale') and jsonb_path_exists(params, 'strict $.**{21}');

-- Values the worker and the operators' tools can compute with ----------------
--
-- Rows written before this migration are brought within the bounds first (a
-- timestamp out of range becomes now() or empty, counters are capped, metrics
-- with a number beyond a double are dropped), so that the constraints hold for
-- every row and no update of an old row trips on them.

update ai_course_jobs
set retry_count = least(retry_count, 1000),
    max_retries = least(max_retries, 100),
    created_at = case when created_at between '1970-01-01' and '9999-12-31' then created_at
                      else now() end,
    run_after = case when run_after between '1970-01-01' and '9999-12-31' then run_after
                     else now() end,
    started_at = case when started_at between '1970-01-01' and '9999-12-31' then started_at end,
    last_heartbeat = case when last_heartbeat between '1970-01-01' and '9999-12-31'
                          then last_heartbeat end,
    completed_at = case when completed_at between '1970-01-01' and '9999-12-31'
                        then completed_at end,
    metrics = case when jsonb_typeof(metrics) = 'object' and not jsonb_path_exists(metrics,
                   'strict $.** ? (@.type() == "number" && (@ > 1e300 || @ < -1e300))')
                   then metrics end
where retry_count > 1000 or max_retries > 100
   or created_at not between '1970-01-01' and '9999-12-31'
   or run_after not between '1970-01-01' and '9999-12-31'
   or started_at not between '1970-01-01' and '9999-12-31'
   or last_heartbeat not between '1970-01-01' and '9999-12-31'
   or completed_at not between '1970-01-01' and '9999-12-31'
   or jsonb_typeof(metrics) <> 'object'
   or jsonb_path_exists(metrics, 'strict $.** ? (@.type() == "number" && (@ > 1e300 || @ < -1e300))');

update ai_media_jobs
set retry_count = least(retry_count, 1000),
    max_retries = least(max_retries, 100),
    created_at = case when created_at between '1970-01-01' and '9999-12-31' then created_at
                      else now() end,
    run_after = case when run_after between '1970-01-01' and '9999-12-31' then run_after
                     else now() end,
    started_at = case when started_at between '1970-01-01' and '9999-12-31' then started_at end,
    last_heartbeat = case when last_heartbeat between '1970-01-01' and '9999-12-31'
                          then last_heartbeat end,
    completed_at = case when completed_at between '1970-01-01' and '9999-12-31'
                        then completed_at end,
    metrics = case when jsonb_typeof(metrics) = 'object' and not jsonb_path_exists(metrics,
                   'strict $.** ? (@.type() == "number" && (@ > 1e300 || @ < -1e300))')
                   then metrics end
where retry_count > 1000 or max_retries > 100
   or created_at not between '1970-01-01' and '9999-12-31'
   or run_after not between '1970-01-01' and '9999-12-31'
   or started_at not between '1970-01-01' and '9999-12-31'
   or last_heartbeat not between '1970-01-01' and '9999-12-31'
   or completed_at not between '1970-01-01' and '9999-12-31'
   or jsonb_typeof(metrics) <> 'object'
   or jsonb_path_exists(metrics, 'strict $.** ? (@.type() == "number" && (@ > 1e300 || @ < -1e300))');

alter table ai_course_jobs
    add constraint ai_course_jobs_bounds_check
        check (retry_count <= 1000 and max_retries <= 100),
    add constraint ai_course_jobs_times_check
        check (created_at between '1970-01-01' and '9999-12-31'
               and run_after between '1970-01-01' and '9999-12-31'
               and (started_at is null or started_at between '1970-01-01' and '9999-12-31')
               and (last_heartbeat is null or last_heartbeat between '1970-01-01' and '9999-12-31')
               and (completed_at is null or completed_at between '1970-01-01' and '9999-12-31')),
    add constraint ai_course_jobs_metrics_check
        check (metrics is null or (jsonb_typeof(metrics) = 'object' and not jsonb_path_exists(metrics,
               'strict $.** ? (@.type() == "number" && (@ > 1e300 || @ < -1e300))')));

alter table ai_media_jobs
    add constraint ai_media_jobs_bounds_check
        check (retry_count <= 1000 and max_retries <= 100),
    add constraint ai_media_jobs_times_check
        check (created_at between '1970-01-01' and '9999-12-31'
               and run_after between '1970-01-01' and '9999-12-31'
               and (started_at is null or started_at between '1970-01-01' and '9999-12-31')
               and (last_heartbeat is null or last_heartbeat between '1970-01-01' and '9999-12-31')
               and (completed_at is null or completed_at between '1970-01-01' and '9999-12-31')),
    add constraint ai_media_jobs_metrics_check
        check (metrics is null or (jsonb_typeof(metrics) = 'object' and not jsonb_path_exists(metrics,
               'strict $.** ? (@.type() == "number" && (@ > 1e300 || @ < -1e300))')));

-- Failures that always end ------------------------------------------------------

-- As in 003, with the arithmetic bounded: the base counts up to a day, the
-- backoff exponent stops at 20 and the wait at a day, whatever the retry count
-- or the base (NaN and infinity included); the counter stops at 1000. Should the write fail all the same, the job goes to the dead letter with
-- both errors rather than stay processing, be rescued when stale, and run again.
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
            update %I j
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
            returning j.status, j.retry_count, j.run_after
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

-- As in 003, with the counter bounded.
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
            set retry_count = least(j.retry_count, 999) + 1,
                error = 'Worker lost: heartbeat older than the stale timeout',
                claim_token = null, worker_id = null,
                status = case when j.retry_count >= j.max_retries - 1 then 'dead_letter'
                              else 'pending' end,
                completed_at = case when j.retry_count >= j.max_retries - 1 then now() end,
                run_after = now()
            from (select id from %1$I where status = 'stale'
                  order by last_heartbeat limit $1 for update skip locked) s
            where j.id = s.id
            returning j.id, %2$L::text, j.status
        $q$, t, ai_job_type(t)) using max_jobs;
    end loop;
end
$$;

-- Privileges (see 010) --------------------------------------------------------

revoke all on table ai_course_owners from public, anon, authenticated, service_role;
grant select, insert, update, delete on ai_course_owners to service_role;
alter table ai_course_owners enable row level security;

revoke all on function ai_job_admit(), ai_job_claim_course_id(text, uuid, boolean)
    from public, anon, authenticated, service_role;

-- ai_job_admit runs as the inserting user and reads the limits.
grant select (max_subject_length, max_prompt_length, max_params_bytes)
    on ai_job_settings to authenticated;
