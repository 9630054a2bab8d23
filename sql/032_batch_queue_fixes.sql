-- 032: the batch queues' refusals and pauses (sql/030; docs/generation.md,
-- "Batch jobs"). Same signatures, same grants (create or replace keeps them).
--
-- ai_job_batch_refused:
--   - a refusal that states no usable number while nothing of ours is enqueued
--     learned nothing, so after the pause the same whole batch was sent again
--     (every pause, for a day): it now learns half the refused batch (at least
--     one unit), still unstated and still paced, so each such refusal halves
--     the next batch until one fits or a single job is left (a queue with
--     nothing of ours enqueued takes at least one job);
--   - a stated limit below what the provider has already accepted of ours (the
--     units our other open batches hold) is not believed: it is taken as no
--     number;
--   - the fallback limit, what our other open batches held, is a floor of the
--     provider's limit (it had accepted them), not a ceiling.
-- ai_job_batch_fit: the pause after such a refusal is lifted by the end of a
-- batch of that queue that was submitted (the provider held it), not by any
-- ended batch (one that never was sent frees no room).

-- Before the collecting batch `p_batch` is sent to `p_provider`: as many of its
-- jobs as fit in the room its queue has (the learned limit less what is
-- enqueued), oldest first; `p_jobs` and `p_units` are the jobs the sender read
-- and what each would hold (a job that joined since is left for the next
-- batch). With jobs kept, the batch becomes the intent (state submitting,
-- queue_units their sum) and the jobs not kept move to a new collecting batch
-- (or go the direct way past `p_wait_bound`); with none kept, the batch stays
-- collecting as it is. Nothing fits while a refusal the limit did not explain
-- is being waited out (retry_at), unless a submitted batch of that queue ended
-- since. A queue with nothing enqueued takes at least one job (the provider
-- decides), unless it alone is over a limit the provider stated: that job can
-- never go in a batch, and goes the direct way.
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
              and x.state = 'ended' and x.ended_at > q.refused_at
              and x.submitted_at is not null);
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
-- token_limit_exceeded; Anthropic: 429 at its creation, its message naming the
-- queue). The limit learned, in this order:
--   - the provider's number `p_limit`, when it is one: at least what the
--     provider had already accepted of ours (the units our other open batches
--     of that queue hold, and 1) and at most 10^12 (stated);
--   - else those units, when there are some: at least what the provider had
--     accepted, so its limit is that or more (a floor, kept to stay under it);
--   - else, nothing of ours being enqueued, half the refused batch's units (at
--     least 1): a guess, so that the next batch is half this one.
-- A refusal that the limit learned does not explain (our count with this batch
-- was under it, or the limit is the guess: the queue is someone else's too, or
-- this batch alone is over it) paces the next try of the queue by `p_retry`
-- seconds, unless a submitted batch of it ends first. The batch ends (failed,
-- `p_error`) and its jobs wait for the next batch: moved to a new collecting
-- batch of `worker`, no attempt counted (the direct way past `p_wait_bound`).
-- Returns the limit learned and the jobs moved / sent direct.
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
    held bigint;
    learned bigint;
    is_stated boolean;
    guessed boolean := false;
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
    held := greatest(coalesce(b.queue_units, 0), 0);
    is_stated := coalesce(p_limit between greatest(enq, 1) and 1000000000000, false);
    if is_stated then
        learned := p_limit;
    elsif enq > 0 then
        learned := enq;
    else
        learned := greatest(held / 2, 1);
        guessed := true;
    end if;
    paced := guessed or enq + greatest(held, 1) <= learned;
    now_ := clock_timestamp();
    update ai_job_batches x
    set state = 'ended', outcome = 'failed', error = left(p_error, 500), ended_at = now_
    where x.id = p_batch;
    insert into ai_job_batch_queues as q
        (provider, scope, limit_units, stated, learned_at, refused_at, retry_at, refusals, error)
    values (p_provider, p_scope, learned, is_stated, now_, now_,
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
