-- 027: the providers' Batch APIs (docs/generation.md, "Batch jobs").
--
-- A course job with `batch = true` is claimed like any other; its worker then
-- hands it to a batch instead of calling a provider (ai_job_batch_take): the job
-- stays `processing`, with `progress.phase = 'batched'` and a claim token of the
-- batch's own (the item's), so that the worker that claimed it writes nothing
-- more about it, and every later write about it (its result, its return to
-- pending) must present the item's token, as any claim's.
--
-- ai_job_batches, one row per batch, its id made here before anything is sent
-- (it travels in the provider's batch metadata), in states:
--   collecting   jobs gather in it (BATCH_COLLECT_SECONDS, or up to a size cap)
--   submitting   its requests are being sent (the intent: recorded BEFORE the
--                upload); provider and model are set. A watcher that finds a
--                batch in this state after its holder died looks for it among
--                the provider's batches (by its id in the metadata) before it
--                sends anything.
--   submitted    the provider took it: provider_batch_id
--   ended        its results were read (outcome: completed, expired, failed,
--                cancelled, empty); its unfinished jobs went back to pending
-- Each row has a lease (worker_id, lease_until) that its watcher renews at every
-- tick (ai_job_batch_watch, one statement for all of a worker's batches, which
-- also keeps its jobs' heartbeats so that the stale rescue never takes them);
-- any worker takes over a batch whose lease ran out.
--
-- ai_job_batch_items: the batch's jobs and the token each holds.

create table if not exists ai_job_batches (
    id                uuid primary key default gen_random_uuid(),
    job_table         text not null check (job_table in ('ai_course_jobs', 'ai_media_jobs')),
    state             text not null default 'collecting'
                      check (state in ('collecting', 'submitting', 'submitted', 'ended')),
    provider          text,
    model             text,
    provider_batch_id text unique,
    input_file_id     text,
    worker_id         text,
    lease_until       timestamptz not null default clock_timestamp(),
    created_at        timestamptz not null default clock_timestamp(),
    submitting_at     timestamptz,
    submitted_at      timestamptz,
    ended_at          timestamptz,
    outcome           text check (outcome in ('completed', 'expired', 'failed', 'cancelled', 'empty')),
    error             text
);

create index if not exists ai_job_batches_open_idx on ai_job_batches (lease_until)
    where state <> 'ended';
create index if not exists ai_job_batches_worker_idx on ai_job_batches (worker_id)
    where state <> 'ended';

create table if not exists ai_job_batch_items (
    batch_id    uuid not null references ai_job_batches (id) on delete cascade,
    job_table   text not null check (job_table in ('ai_course_jobs', 'ai_media_jobs')),
    job_id      uuid not null,
    claim_token uuid not null,
    primary key (batch_id, job_id)
);

create index if not exists ai_job_batch_items_job_idx on ai_job_batch_items (job_id);

-- The worker that claimed job `job_id` (holding `token`) hands it to a batch, if
-- the job asks for one: the batch's id, or null (not a batch job, or no longer
-- held with that token: run it, or leave it). The job joins the batch of its
-- table that this worker is collecting (a new one past `max_jobs` jobs), or,
-- when an earlier attempt of it is still in an open batch (its worker died and
-- the stale rescue handed it on), that batch again: one request per job.
-- The row lock comes before the check of the token: a claim not yet committed
-- (the fast path) is waited for, and the locked row is the claimed one.
create or replace function ai_job_batch_take(
    table_name text, job_id uuid, token uuid, worker text, lease_seconds double precision,
    max_jobs int)
returns uuid
language plpgsql
set search_path = pg_catalog, public, pg_temp
as $$
declare
    t text := ai_job_table(table_name);
    is_batch boolean;
    st text;
    held uuid;
    b uuid;
    item uuid;
begin
    -- No lock for the usual job: `batch` is the client's, the claim does not change it.
    execute format('select batch from %I where id = $1', t) into is_batch using job_id;
    if not coalesce(is_batch, false) then
        return null;
    end if;
    execute format('select status, claim_token from %I where id = $1 for update', t)
        into st, held using job_id;
    if st is distinct from 'processing' or held is distinct from token then
        return null;
    end if;
    select i.batch_id, i.claim_token into b, item
    from ai_job_batch_items i join ai_job_batches x on x.id = i.batch_id
    where i.job_id = ai_job_batch_take.job_id and x.state <> 'ended'
    order by x.created_at desc limit 1;
    if b is null then
        perform pg_advisory_xact_lock(hashtext('ai_job_batch_take'), hashtext(worker || t));
        select x.id into b from ai_job_batches x
        where x.worker_id = worker and x.job_table = t and x.state = 'collecting'
          and (select count(*) from ai_job_batch_items i where i.batch_id = x.id) < max_jobs
        order by x.created_at desc limit 1
        for update;  -- against ai_job_batch_submitting: the job is in what is sent, or not
        if b is null then
            insert into ai_job_batches (job_table, worker_id, lease_until)
            values (t, worker, clock_timestamp() + make_interval(secs => lease_seconds))
            returning id into b;
        end if;
        item := gen_random_uuid();
        insert into ai_job_batch_items (batch_id, job_table, job_id, claim_token)
        values (b, t, job_id, item);
    end if;
    execute format($q$
        update %I set claim_token = $2, last_heartbeat = clock_timestamp(),
               progress = jsonb_build_object('phase', 'batched', 'percent', 0)
        where id = $1
    $q$, t) using job_id, item;
    return b;
end
$$;

-- The batch's holder is about to send it to `p_provider`: the intent, recorded
-- before the upload. Returns the jobs still held by their items (as a claim
-- returns them); items whose jobs went elsewhere (cancelled) are dropped. A batch
-- left without jobs ends (outcome empty). Nothing when the lease is not
-- `worker`'s or the batch was sent already.
create or replace function ai_job_batch_submitting(
    p_batch uuid, worker text, p_provider text, p_model text)
returns table(id uuid, claim_token uuid, retry_count int, max_retries int, job jsonb)
language plpgsql
set search_path = pg_catalog, public, pg_temp
as $$
#variable_conflict use_column
declare
    t text;
begin
    update ai_job_batches x
    set state = 'submitting', provider = p_provider, model = p_model,
        submitting_at = coalesce(x.submitting_at, clock_timestamp())
    where x.id = p_batch and x.worker_id = worker and x.state in ('collecting', 'submitting')
    returning x.job_table into t;
    if t is null then
        return;
    end if;
    if t = 'ai_course_jobs' then
        delete from ai_job_batch_items i
        where i.batch_id = p_batch and not exists (
            select from ai_course_jobs j
            where j.id = i.job_id and j.claim_token = i.claim_token and j.status = 'processing');
        return query
        select j.id, j.claim_token, j.retry_count, j.max_retries,
               jsonb_build_object('id', j.id, 'subject', j.subject, 'course_id', j.course_id,
                                  'params', j.params)
        from ai_job_batch_items i join ai_course_jobs j
             on j.id = i.job_id and j.claim_token = i.claim_token
        where i.batch_id = p_batch and j.status = 'processing'
        order by j.id;
    else
        delete from ai_job_batch_items i
        where i.batch_id = p_batch and not exists (
            select from ai_media_jobs j
            where j.id = i.job_id and j.claim_token = i.claim_token and j.status = 'processing');
        return query
        select j.id, j.claim_token, j.retry_count, j.max_retries,
               jsonb_build_object('id', j.id, 'prompt', j.prompt, 'media_type', j.media_type,
                                  'course_id', j.course_id, 'params', j.params)
        from ai_job_batch_items i join ai_media_jobs j
             on j.id = i.job_id and j.claim_token = i.claim_token
        where i.batch_id = p_batch and j.status = 'processing'
        order by j.id;
    end if;
    if not found then
        update ai_job_batches x
        set state = 'ended', outcome = 'empty', ended_at = clock_timestamp()
        where x.id = p_batch;
    end if;
end
$$;

-- The provider took the batch: its id there (and the uploaded file's).
create or replace function ai_job_batch_submitted(
    p_batch uuid, worker text, p_batch_id text, p_file_id text)
returns boolean
language sql
set search_path = pg_catalog, public, pg_temp
as $$
    with done as (
        update ai_job_batches
        set state = 'submitted', provider_batch_id = p_batch_id, input_file_id = p_file_id,
            submitted_at = clock_timestamp()
        where id = p_batch and worker_id = worker and state = 'submitting'
        returning 1
    )
    select exists (select from done)
$$;

-- A worker's watch, every tick, in one statement: the leases of the open
-- batches it holds renewed, up to `adopt` batches whose lease ran out taken
-- over, the heartbeat of each of their jobs still held by its item written
-- when older than `beat_after` seconds (so a job's row is written a few times
-- per STALE_AFTER_SECONDS, not at every tick), and the batches it now holds
-- returned with their age (by the database's clock) and the number of jobs
-- each holds.
create or replace function ai_job_batch_watch(
    worker text, lease_seconds double precision, adopt int, beat_after double precision)
returns table(id uuid, job_table text, state text, provider text, model text,
              provider_batch_id text, age_seconds double precision, jobs int)
language plpgsql
set search_path = pg_catalog, public, pg_temp
as $$
#variable_conflict use_column
declare
    held uuid[];
    lease timestamptz := clock_timestamp() + make_interval(secs => lease_seconds);
    stale timestamptz := clock_timestamp() - make_interval(secs => beat_after);
begin
    held := array(
        select y.id from ai_job_batches y
        where y.worker_id = worker and y.state <> 'ended'
        for update skip locked)
        || array(
        select z.id from ai_job_batches z
        where z.state <> 'ended' and z.lease_until < clock_timestamp()
          and z.worker_id is distinct from worker
        order by z.lease_until
        limit adopt
        for update skip locked);
    -- A lease is renewed once half of it is gone (not at every tick: fewer writes).
    update ai_job_batches x set worker_id = worker, lease_until = lease
    where x.id = any(held)
      and (x.worker_id is distinct from worker
           or x.lease_until < clock_timestamp() + make_interval(secs => lease_seconds / 2));
    update ai_course_jobs j set last_heartbeat = clock_timestamp()
    from ai_job_batch_items i
    where i.batch_id = any(held) and i.job_table = 'ai_course_jobs'
      and j.id = i.job_id and j.claim_token = i.claim_token and j.status = 'processing'
      and j.last_heartbeat < stale;
    update ai_media_jobs j set last_heartbeat = clock_timestamp()
    from ai_job_batch_items i
    where i.batch_id = any(held) and i.job_table = 'ai_media_jobs'
      and j.id = i.job_id and j.claim_token = i.claim_token and j.status = 'processing'
      and j.last_heartbeat < stale;
    return query
    select x.id, x.job_table, x.state, x.provider, x.model, x.provider_batch_id,
           extract(epoch from clock_timestamp() - x.created_at)::float8,
           (select count(*)::int from ai_job_batch_items i where i.batch_id = x.id)
    from ai_job_batches x where x.id = any(held)
    order by x.created_at;
end
$$;

-- The jobs of a batch that the provider answered, as their results are read:
-- each with the token of its item, if still held by it (a job cancelled or
-- finished meanwhile is not returned).
create or replace function ai_job_batch_jobs(p_batch uuid, worker text)
returns table(job_table text, id uuid, claim_token uuid, retry_count int, max_retries int,
              job jsonb)
language sql
set search_path = pg_catalog, public, pg_temp
as $$
    select 'ai_course_jobs'::text, j.id, j.claim_token, j.retry_count, j.max_retries,
           jsonb_build_object('id', j.id, 'subject', j.subject, 'course_id', j.course_id,
                              'params', j.params)
    from ai_job_batches x
    join ai_job_batch_items i on i.batch_id = x.id
    join ai_course_jobs j on j.id = i.job_id and j.claim_token = i.claim_token
    where x.id = p_batch and x.worker_id = worker and i.job_table = 'ai_course_jobs'
      and j.status = 'processing'
    union all
    select 'ai_media_jobs'::text, j.id, j.claim_token, j.retry_count, j.max_retries,
           jsonb_build_object('id', j.id, 'prompt', j.prompt, 'media_type', j.media_type,
                              'course_id', j.course_id, 'params', j.params)
    from ai_job_batches x
    join ai_job_batch_items i on i.batch_id = x.id
    join ai_media_jobs j on j.id = i.job_id and j.claim_token = i.claim_token
    where x.id = p_batch and x.worker_id = worker and i.job_table = 'ai_media_jobs'
      and j.status = 'processing'
$$;

-- The batch ended (`p_outcome`) and its results were read: every job it still
-- holds (no result, or none that could be used) goes back to pending, without
-- an attempt counted and with `batch` false, so that it goes the direct way next
-- (docs/generation.md). The number of jobs sent back.
create or replace function ai_job_batch_end(
    p_batch uuid, worker text, p_outcome text, p_error text)
returns int
language plpgsql
set search_path = pg_catalog, public, pg_temp
as $$
declare
    n int := 0;
    m int := 0;
begin
    update ai_job_batches
    set state = 'ended', outcome = p_outcome, error = left(p_error, 500),
        ended_at = clock_timestamp()
    where id = p_batch and worker_id = worker and state <> 'ended';
    if not found then
        return 0;
    end if;
    update ai_course_jobs j
    set status = 'pending', started_at = null, last_heartbeat = null, claim_token = null,
        worker_id = null, run_after = now(), progress = null, batch = false
    from ai_job_batch_items i
    where i.batch_id = p_batch and i.job_table = 'ai_course_jobs'
      and j.id = i.job_id and j.claim_token = i.claim_token and j.status = 'processing';
    get diagnostics n = row_count;
    update ai_media_jobs j
    set status = 'pending', started_at = null, last_heartbeat = null, claim_token = null,
        worker_id = null, run_after = now(), progress = null, batch = false
    from ai_job_batch_items i
    where i.batch_id = p_batch and i.job_table = 'ai_media_jobs'
      and j.id = i.job_id and j.claim_token = i.claim_token and j.status = 'processing';
    get diagnostics m = row_count;
    return n + m;
end
$$;

-- Least privilege: the worker and operators (service_role) only.
alter table ai_job_batches enable row level security;
alter table ai_job_batch_items enable row level security;
revoke all on ai_job_batches, ai_job_batch_items from public, anon, authenticated, service_role;
grant select, insert, update, delete on ai_job_batches, ai_job_batch_items to service_role;
revoke all on function
    ai_job_batch_take(text, uuid, uuid, text, double precision, int),
    ai_job_batch_submitting(uuid, text, text, text),
    ai_job_batch_submitted(uuid, text, text, text),
    ai_job_batch_watch(text, double precision, int, double precision),
    ai_job_batch_jobs(uuid, text),
    ai_job_batch_end(uuid, text, text, text)
    from public, anon, authenticated, service_role;
grant execute on function
    ai_job_batch_take(text, uuid, uuid, text, double precision, int),
    ai_job_batch_submitting(uuid, text, text, text),
    ai_job_batch_submitted(uuid, text, text, text),
    ai_job_batch_watch(text, double precision, int, double precision),
    ai_job_batch_jobs(uuid, text),
    ai_job_batch_end(uuid, text, text, text)
    to service_role;
