-- 030: the providers' batch queue limits (docs/generation.md, "Batch jobs").
--
-- A provider counts batch requests in its batch queue, not as per-minute calls:
-- OpenAI the input tokens of a model's batches not yet ended (a batch past the
-- model's "enqueued tokens" limit is created, then ends failed with
-- token_limit_exceeded), Anthropic the requests of all its batches still
-- processing (a batch past it is answered 429 at its creation). Both count
-- across every worker of the organisation, so the count lives here:
--
-- ai_job_batches.queue_units   what a batch holds in its provider's queue while
--                              it is open (submitting, submitted): the
--                              estimated input tokens of its requests (OpenAI)
--                              or their number (Anthropic); set when it is sent
-- ai_job_batch_queues          per provider and scope (OpenAI: the model;
--                              Anthropic: '*', every model) the limit learned
--                              from the provider's last refusal, and the pace
--                              of the next try when the refusal said nothing
--                              usable
--
-- The enqueued count is the sum of the open batches' queue_units of that
-- provider and scope; ai_job_batch_fit (before a batch is sent) and
-- ai_job_batch_refused (a refusal) read it under one advisory lock per queue,
-- so that two workers never send into the same room.

alter table ai_job_batches add column if not exists queue_units bigint;

create table if not exists ai_job_batch_queues (
    provider    text not null,
    scope       text not null,               -- OpenAI: the model; Anthropic: '*'
    limit_units bigint,                       -- null: not known
    stated      boolean not null default false, -- the provider's own number
    learned_at  timestamptz not null default clock_timestamp(),
    refused_at  timestamptz,
    retry_at    timestamptz,                  -- a refusal not explained by the limit
    refusals    int not null default 0,
    error       text,
    primary key (provider, scope)
);

create index if not exists ai_job_batches_queue_idx on ai_job_batches (provider, model)
    where state in ('submitting', 'submitted');

-- The units of the open batches of a queue (all but `p_except`).
create or replace function ai_job_batch_enqueued(p_provider text, p_scope text, p_except uuid)
returns bigint
language sql
stable
set search_path = pg_catalog, public, pg_temp
as $$
    select coalesce(sum(greatest(x.queue_units, 0)), 0)::bigint
    from ai_job_batches x
    where x.provider = p_provider and (p_scope = '*' or x.model = p_scope)
      and x.state in ('submitting', 'submitted') and x.id is distinct from p_except
$$;

-- The jobs a batch still holds that are not in `p_keep`: those waiting longer
-- than `p_wait_bound` seconds since they were inserted go back to pending the
-- direct way (no attempt counted, `batch` false, as an expired batch's); the
-- others, with `p_move`, move to a new collecting batch of `worker` (their
-- items, tokens and all). Returns (moved, direct).
create or replace function ai_job_batch_leave(
    p_batch uuid, worker text, p_keep uuid[], p_wait_bound double precision,
    lease_seconds double precision, p_move boolean, out moved int, out direct int)
language plpgsql
set search_path = pg_catalog, public, pg_temp
as $$
declare
    t text;
    nb uuid;
begin
    moved := 0;
    direct := 0;
    select x.job_table into t from ai_job_batches x where x.id = p_batch;
    if t is null then
        return;
    end if;
    execute format($q$
        with old as (
            delete from ai_job_batch_items i
            using %1$I j
            where i.batch_id = $1 and i.job_id <> all($2)
              and j.id = i.job_id and j.claim_token = i.claim_token and j.status = 'processing'
              and j.created_at < clock_timestamp() - make_interval(secs => $3)
            returning i.job_id, i.claim_token
        )
        update %1$I j
        set status = 'pending', started_at = null, last_heartbeat = null, claim_token = null,
            worker_id = null, run_after = now(), progress = null, batch = false
        from old where j.id = old.job_id and j.claim_token = old.claim_token
    $q$, t) using p_batch, p_keep, p_wait_bound;
    get diagnostics direct = row_count;
    if not p_move then
        return;
    end if;
    execute format($q$
        select count(*)::int from ai_job_batch_items i join %I j
            on j.id = i.job_id and j.claim_token = i.claim_token and j.status = 'processing'
        where i.batch_id = $1 and i.job_id <> all($2)
    $q$, t) into moved using p_batch, p_keep;
    if moved = 0 then
        return;
    end if;
    insert into ai_job_batches (job_table, worker_id, lease_until)
    values (t, worker, clock_timestamp() + make_interval(secs => lease_seconds))
    returning id into nb;
    execute format($q$
        update ai_job_batch_items i set batch_id = $3
        from %I j
        where i.batch_id = $1 and i.job_id <> all($2)
          and j.id = i.job_id and j.claim_token = i.claim_token and j.status = 'processing'
    $q$, t) using p_batch, p_keep, nb;
end
$$;

-- Before the collecting batch `p_batch` is sent to `p_provider`: as many of its
-- jobs as fit in the room its queue has (the learned limit less what is
-- enqueued), oldest first; `p_jobs` and `p_units` are the jobs the sender read
-- and what each would hold (a job that joined since is left for the next
-- batch). With jobs kept, the batch becomes the intent (state submitting,
-- queue_units their sum) and the jobs not kept move to a new collecting batch
-- (or go the direct way past `p_wait_bound`); with none kept, the batch stays
-- collecting as it is. Nothing fits while a refusal the limit did not explain
-- is being waited out (retry_at), unless a batch of that queue ended since. A
-- queue with nothing enqueued takes at least one job (the provider decides),
-- unless it alone is over a limit the provider stated: that job can never go in
-- a batch, and goes the direct way.
create or replace function ai_job_batch_fit(
    p_batch uuid, worker text, p_provider text, p_model text, p_scope text,
    p_jobs uuid[], p_units bigint[], p_wait_bound double precision,
    lease_seconds double precision, p_limit_ttl double precision)
returns table(kept int, units bigint, enqueued bigint, queue_limit bigint, moved int, direct int)
language plpgsql
set search_path = pg_catalog, public, pg_temp
as $$
declare
    t text;
    q ai_job_batch_queues;
    enq bigint;
    room bigint;  -- null: no limit known
    paced boolean := false;
    no_room boolean := false;
    keep uuid[] := '{}';
    used bigint := 0;
    r record;
    left_ record;
    gone uuid[] := '{}';
begin
    select x.job_table into t from ai_job_batches x
    where x.id = p_batch and x.worker_id = worker and x.state = 'collecting'
    for update;
    if t is null then
        return;
    end if;
    perform pg_advisory_xact_lock(hashtext('ai_job_batch_queue'),
                                  hashtext(p_provider || '/' || p_scope));
    select * into q from ai_job_batch_queues b
    where b.provider = p_provider and b.scope = p_scope
      and b.learned_at > clock_timestamp() - make_interval(secs => p_limit_ttl);
    enq := ai_job_batch_enqueued(p_provider, p_scope, p_batch);
    if q.retry_at is not null and q.retry_at > clock_timestamp() then
        paced := not exists (
            select from ai_job_batches x
            where x.provider = p_provider and (p_scope = '*' or x.model = p_scope)
              and x.state = 'ended' and x.ended_at > q.refused_at);
    end if;
    if paced then
        room := 0;
    elsif q.limit_units is not null then
        room := greatest(q.limit_units - enq, 0);
    end if;
    for r in execute format($q$
        select u.id, greatest(u.units, 0) as units
        from unnest($1::uuid[], $2::bigint[]) as u(id, units)
        join ai_job_batch_items i on i.batch_id = $3 and i.job_id = u.id
        join %I j on j.id = i.job_id and j.claim_token = i.claim_token and j.status = 'processing'
        order by j.created_at, j.id
    $q$, t) using p_jobs, p_units, p_batch
    loop
        if q.stated and q.limit_units is not null and r.units > q.limit_units then
            gone := gone || r.id;  -- never fits a batch: the direct way
            continue;
        end if;
        if no_room then
            continue;  -- oldest first: a later job does not pass an earlier one
        end if;
        if room is null or used + r.units <= room
           or (cardinality(keep) = 0 and enq = 0 and not paced) then
            keep := keep || r.id;
            used := used + r.units;
            no_room := room is not null and used > room;  -- the one job of an empty queue
        else
            no_room := true;
        end if;
    end loop;
    if cardinality(gone) > 0 then
        execute format($q$
            with old as (
                delete from ai_job_batch_items i
                where i.batch_id = $1 and i.job_id = any($2)
                returning i.job_id, i.claim_token
            )
            update %I j
            set status = 'pending', started_at = null, last_heartbeat = null,
                claim_token = null, worker_id = null, run_after = now(), progress = null,
                batch = false
            from old where j.id = old.job_id and j.claim_token = old.claim_token
              and j.status = 'processing'
        $q$, t) using p_batch, gone;
    end if;
    kept := cardinality(keep);
    units := used;
    enqueued := enq;
    queue_limit := q.limit_units;
    moved := 0;
    direct := cardinality(gone);
    if kept = 0 then  -- the batch waits as it is; its jobs past the bound go direct
        select * into left_
        from ai_job_batch_leave(p_batch, worker, keep, p_wait_bound, lease_seconds, false);
        direct := direct + left_.direct;
        return next;
        return;
    end if;
    select * into left_
    from ai_job_batch_leave(p_batch, worker, keep, p_wait_bound, lease_seconds, true);
    moved := left_.moved;
    direct := direct + left_.direct;
    update ai_job_batches x
    set state = 'submitting', provider = p_provider, model = p_model, queue_units = used,
        submitting_at = coalesce(x.submitting_at, clock_timestamp())
    where x.id = p_batch;
    return next;
end
$$;

-- The provider refused batch `p_batch` for its queue (OpenAI: failed with
-- token_limit_exceeded; Anthropic: 429 at its creation). The limit learned: the
-- provider's number `p_limit` when it is one (1 to 10^12), else the units its
-- other open batches held at the time (the queue was full with them: a ceiling),
-- else none. A refusal that this limit does not explain (our count was under it,
-- or no limit could be learned: the queue is someone else's too) paces the next
-- try of the queue by `p_retry` seconds, unless a batch of it ends first. The
-- batch ends (failed, `p_error`) and its jobs wait for the next batch: moved to
-- a new collecting batch of `worker`, no attempt counted (the direct way past
-- `p_wait_bound`). Returns the limit learned and the jobs moved / sent direct.
create or replace function ai_job_batch_refused(
    p_batch uuid, worker text, p_provider text, p_scope text, p_limit bigint, p_error text,
    p_retry double precision, p_wait_bound double precision, lease_seconds double precision)
returns table(queue_limit bigint, paced boolean, moved int, direct int)
language plpgsql
set search_path = pg_catalog, public, pg_temp
as $$
declare
    b ai_job_batches;
    enq bigint;
    learned bigint;
    is_stated boolean;
    now_ timestamptz;
    left_ record;
begin
    select * into b from ai_job_batches x
    where x.id = p_batch and x.worker_id = worker and x.state in ('submitting', 'submitted')
    for update;
    if b.id is null then
        return;
    end if;
    perform pg_advisory_xact_lock(hashtext('ai_job_batch_queue'),
                                  hashtext(p_provider || '/' || p_scope));
    enq := ai_job_batch_enqueued(p_provider, p_scope, p_batch);
    is_stated := p_limit is not null and p_limit between 1 and 1000000000000;
    learned := case when is_stated then p_limit when enq > 0 then enq end;
    paced := learned is null or enq + greatest(coalesce(b.queue_units, 0), 1) <= learned;
    now_ := clock_timestamp();
    update ai_job_batches x
    set state = 'ended', outcome = 'failed', error = left(p_error, 500), ended_at = now_
    where x.id = p_batch;
    insert into ai_job_batch_queues as q
        (provider, scope, limit_units, stated, learned_at, refused_at, retry_at, refusals, error)
    values (p_provider, p_scope, learned, coalesce(is_stated, false), now_, now_,
            case when paced then now_ + make_interval(secs => p_retry) end, 1,
            left(p_error, 500))
    on conflict (provider, scope) do update
    set limit_units = excluded.limit_units, stated = excluded.stated,
        learned_at = excluded.learned_at, refused_at = excluded.refused_at,
        retry_at = excluded.retry_at, refusals = q.refusals + 1, error = excluded.error;
    select * into left_
    from ai_job_batch_leave(p_batch, worker, '{}', p_wait_bound, lease_seconds, true);
    queue_limit := learned;
    moved := left_.moved;
    direct := left_.direct;
    return next;
end
$$;

-- Least privilege: the worker and operators (service_role) only.
alter table ai_job_batch_queues enable row level security;
revoke all on ai_job_batch_queues from public, anon, authenticated, service_role;
grant select, insert, update, delete on ai_job_batch_queues to service_role;
revoke all on function
    ai_job_batch_enqueued(text, text, uuid),
    ai_job_batch_leave(uuid, text, uuid[], double precision, double precision, boolean),
    ai_job_batch_fit(uuid, text, text, text, text, uuid[], bigint[], double precision,
                     double precision, double precision),
    ai_job_batch_refused(uuid, text, text, text, bigint, text, double precision,
                         double precision, double precision)
    from public, anon, authenticated, service_role;
grant execute on function
    ai_job_batch_enqueued(text, text, uuid),
    ai_job_batch_leave(uuid, text, uuid[], double precision, double precision, boolean),
    ai_job_batch_fit(uuid, text, text, text, text, uuid[], bigint[], double precision,
                     double precision, double precision),
    ai_job_batch_refused(uuid, text, text, text, bigint, text, double precision,
                         double precision, double precision)
    to service_role;
