-- 036: the share of a key's quota this deployment gets, learned from 429s.
--
-- The buckets of sql/023 refill at the limit the provider states, per its
-- window: right for a key the workers have to themselves. Another client of the
-- same key (another application, a notebook, a second deployment) takes part of
-- that refill, and the provider's headers cannot say how much: `remaining`
-- shows what it took so far, but the reset times are the provider's whole refill
-- rate. The buckets then run ahead of the provider's and every other call met a
-- 429 (make bench-ai's shared key: 437 per 1,000 calls with a third of the key's
-- refill taken by another client).
--
-- Each row now has `share`, the part of the stated refill the buckets get
-- (1 until told otherwise). A 429 despite a reservation made since the last
-- 429, whose headers show less left than the call needed, cuts it by a tenth (once for the calls refused together: at most once per
-- thirtieth of the window), and it grows back by 2% of the refill per window (a minute), so the
-- buckets probe for what another client left: a key shared with a steady client
-- meets one 429 in a few minutes instead of one every other call, and a key no
-- longer shared is whole again within a quarter of an hour. A key the workers
-- have to themselves meets no 429 and keeps a share of 1. `ai_job_quota_reset`
-- forgets the share with the rest (it deletes the row).
--
-- ai_job_quota_settle takes one more argument, last and optional (callers of
-- before 036 still reach it); the other functions keep their signatures and
-- grants, and the new ones get the same grants.

alter table ai_job_provider_quotas
    add column share double precision not null default 1
        constraint ai_job_provider_quotas_share check (share > 0 and share <= 1),
    add column share_at timestamptz;

-- The share at `at`: as cut by the last 429, grown back since at 2% a window.
create or replace function ai_job_quota_share(q ai_job_provider_quotas, at timestamptz)
returns double precision
language sql
immutable
set search_path = pg_catalog, public, pg_temp
as $$
    select least(1.0, q.share + greatest(0, extract(epoch from at - coalesce(q.share_at, at)))
                                * 0.02 / q.window_seconds)
$$;

-- The levels at `at`: refilled since refilled_at at limit * share / window per
-- second, up to the limit; a kind newly metered starts full; an unmetered kind
-- is null.
create or replace function ai_job_quota_levels(
    q ai_job_provider_quotas, lim double precision[], at timestamptz)
returns double precision[]
language sql
immutable
set search_path = pg_catalog, public, pg_temp
as $$
    select array_agg(
               case when lim[k] is null then null
                    else least(lim[k], coalesce(lvl[k], lim[k])
                               + greatest(0, extract(epoch from at - q.refilled_at))
                                 * lim[k] * ai_job_quota_share(q, at) / q.window_seconds) end
               order by k)
    from (select array[q.requests, q.tokens, q.input_tokens, q.output_tokens]) l(lvl),
         generate_series(1, 4) k
$$;

create or replace function ai_job_quota_reserve(
    p_provider text, p_model text, p_calls int, p_cost double precision[], p_caps bigint[],
    p_lease_seconds double precision, p_learners int default 1)
returns table(granted int, wait_seconds double precision, metered boolean, learning boolean,
              too_big boolean)
language plpgsql
set search_path = pg_catalog, public, pg_temp
as $$
#variable_conflict use_column
declare
    q ai_job_provider_quotas;
    now_ timestamptz := clock_timestamp();
    lim double precision[];
    lvl double precision[];
    fit double precision;
    wait_ double precision := 0;
    n int;
begin
    if p_calls is null or p_calls < 1 or cardinality(p_cost) <> 4
       or exists (select from unnest(p_cost) c where c is null or c < 0 or c = 'NaN') then
        raise exception 'A quota reservation needs calls >= 1 and four costs >= 0, got % and %',
            p_calls, p_cost using errcode = 'invalid_parameter_value';
    end if;
    insert into ai_job_provider_quotas as t (provider, model) values (p_provider, p_model)
    on conflict do nothing;
    select * into q from ai_job_provider_quotas t
    where t.provider = p_provider and t.model = p_model for update;
    -- The time is read once the row is ours: never before the time the last
    -- writer refilled to (it may have read the clock later and locked first).
    now_ := greatest(clock_timestamp(), q.refilled_at);
    lim := ai_job_quota_limits(q, p_caps);

    if lim[1] is null and lim[2] is null and lim[3] is null and lim[4] is null then
        if q.learned_at is not null then
            return query select p_calls, null::float8, false, false, false;
        end if;
        if q.learning_until is null or q.learning_until <= now_ then
            q.learning_calls := 0;  -- the lease ran out: its callers are gone
        end if;
        n := least(p_calls, greatest(0, coalesce(p_learners, 1) - q.learning_calls));
        if n = 0 then
            return query select 0, extract(epoch from q.learning_until - now_)::float8,
                                true, true, false;
            return;
        end if;
        update ai_job_provider_quotas t
        set learning_until = now_ + make_interval(secs => p_lease_seconds),
            learning_calls = q.learning_calls + n
        where t.provider = p_provider and t.model = p_model;
        return query select n, p_lease_seconds, true, true, false;
        return;
    end if;

    -- Learning calls still in flight took nothing from the buckets: until they are
    -- back, the levels do not count them, so no other call goes.
    if q.learning_calls > 0 and q.learning_until > now_ then
        return query select 0, least(p_lease_seconds,
                                     extract(epoch from q.learning_until - now_))::float8,
                            true, true, false;
        return;
    end if;
    if exists (select from generate_series(1, 4) k where p_cost[k] > lim[k]) then
        return query select 0, null::float8, true, false, true;
        return;
    end if;
    lvl := ai_job_quota_levels(q, lim, now_);
    select least(p_calls, coalesce(min(floor(lvl[k] / p_cost[k])), p_calls)) into fit
    from generate_series(1, 4) k where lim[k] is not null and p_cost[k] > 0;
    n := greatest(0, fit)::int;
    for k in 1..4 loop
        if lim[k] is not null then
            lvl[k] := lvl[k] - n * p_cost[k];
            if n < p_calls and p_cost[k] > 0 and p_cost[k] > lvl[k] then
                wait_ := greatest(wait_, (p_cost[k] - lvl[k]) * q.window_seconds
                                         / (lim[k] * ai_job_quota_share(q, now_)));
            end if;
        end if;
    end loop;
    update ai_job_provider_quotas t
    set requests = lvl[1], tokens = lvl[2], input_tokens = lvl[3], output_tokens = lvl[4],
        refilled_at = now_
    where t.provider = p_provider and t.model = p_model;
    return query select n, case when n < p_calls then wait_ end, true, false, false;
end
$$;

-- p_reserved_seconds (new, last): how long ago the settled call, or the oldest
-- of the reservations given back, was reserved; null: unknown (a caller of
-- before 036). A reservation made before the provider's last 429 was wiped by
-- it (the levels were set to what the provider said it had, which never held
-- that reservation): what it gives back is not the buckets' any more, and its own
-- 429 says nothing new about the share.
drop function ai_job_quota_settle(text, text, double precision[], bigint[], bigint[], bigint[],
                                  double precision, double precision, boolean, int, boolean);
create function ai_job_quota_settle(
    p_provider text, p_model text, p_back double precision[], p_caps bigint[],
    p_limits bigint[], p_remaining bigint[], p_age_seconds double precision,
    p_window_seconds double precision, p_heard boolean, p_learning int, p_limited boolean,
    p_reserved_seconds double precision default null)
returns table(metered boolean)
language plpgsql
set search_path = pg_catalog, public, pg_temp
as $$
#variable_conflict use_column
declare
    q ai_job_provider_quotas;
    now_ timestamptz := clock_timestamp();
    lvl double precision[];
    lim double precision[];
    stated double precision;
    share_ double precision;
    wiped boolean;
begin
    insert into ai_job_provider_quotas as t (provider, model) values (p_provider, p_model)
    on conflict do nothing;
    select * into q from ai_job_provider_quotas t
    where t.provider = p_provider and t.model = p_model for update;
    -- The time is read once the row is ours: never before the time the last
    -- writer refilled to (it may have read the clock later and locked first).
    now_ := greatest(clock_timestamp(), q.refilled_at);
    -- Brought to now under the limits that applied until now, then given back
    -- (not what a 429 since the reservation wiped).
    wiped := q.limited_at is not null and p_reserved_seconds is not null
             and now_ - make_interval(secs => greatest(0, p_reserved_seconds)) <= q.limited_at;
    lvl := ai_job_quota_levels(q, ai_job_quota_limits(q, p_caps), now_);
    for k in 1..4 loop
        lvl[k] := lvl[k] + case when wiped and p_back[k] > 0 then 0
                                else coalesce(p_back[k], 0) end;
    end loop;
    -- A 429 despite a reservation made since the last, whose headers say the
    -- quota held less than the call (a 429 for anything else, an overloaded
    -- provider, says nothing of the share): the buckets refilled faster than the
    -- provider let this deployment have (another client of the key), and the
    -- share is cut; once for the calls refused together.
    share_ := ai_job_quota_share(q, now_);
    if p_limited and coalesce(p_learning, 0) = 0 and not wiped
       and exists (select from generate_series(1, 4) k
                   where p_remaining[k] is not null and p_back[k] > 0
                     and p_remaining[k] < p_back[k])
       and (q.limited_at is null
            or q.limited_at < now_ - make_interval(secs => q.window_seconds / 30)) then
        share_ := greatest(0.05, share_ * 0.9);
    end if;

    if p_limits[1] > 0 then q.rpm := p_limits[1]; end if;
    if p_limits[2] > 0 then q.tpm := p_limits[2]; end if;
    if p_limits[3] > 0 then q.itpm := p_limits[3]; end if;
    if p_limits[4] > 0 then q.otpm := p_limits[4]; end if;
    if p_window_seconds > 0 and p_window_seconds <> 'Infinity' then
        q.window_seconds := least(60, greatest(1, p_window_seconds));
    end if;
    lim := ai_job_quota_limits(q, p_caps);
    for k in 1..4 loop
        if lim[k] is null then
            lvl[k] := null;
            continue;
        end if;
        lvl[k] := least(lim[k], coalesce(lvl[k], lim[k]));
        if p_remaining[k] >= 0 then
            -- Refilled since the call was sent: the provider wrote the headers as it
            -- admitted the call, a little later (a learning call's, not refilled: its
            -- fellow learners may have been admitted since).
            stated := coalesce(p_limits[k], lim[k]);
            lvl[k] := least(lvl[k], p_remaining[k]
                            + case when coalesce(p_learning, 0) > 0 then 0
                                   else greatest(0, coalesce(p_age_seconds, 0)) end
                              * stated * share_ / q.window_seconds);
        elsif p_limited then
            lvl[k] := least(lvl[k], 0);
        end if;
    end loop;

    update ai_job_provider_quotas t
    set rpm = q.rpm, tpm = q.tpm, itpm = q.itpm, otpm = q.otpm,
        requests = lvl[1], tokens = lvl[2], input_tokens = lvl[3], output_tokens = lvl[4],
        window_seconds = q.window_seconds,
        share = share_,
        share_at = now_,
        refilled_at = now_,
        learned_at = case when p_heard then now_ else t.learned_at end,
        learning_calls = greatest(0, t.learning_calls - coalesce(p_learning, 0)),
        learning_until = case when t.learning_calls - coalesce(p_learning, 0) <= 0 then null
                              else t.learning_until end,
        limited_at = case when p_limited then now_ else t.limited_at end
    where t.provider = p_provider and t.model = p_model;
    return query select lim[1] is not null or lim[2] is not null or lim[3] is not null
                        or lim[4] is not null;
end
$$;

revoke execute on function
    ai_job_quota_share(ai_job_provider_quotas, timestamptz),
    ai_job_quota_settle(text, text, double precision[], bigint[], bigint[], bigint[],
                        double precision, double precision, boolean, int, boolean,
                        double precision)
    from public, anon, authenticated, service_role;
grant execute on function
    ai_job_quota_share(ai_job_provider_quotas, timestamptz),
    ai_job_quota_settle(text, text, double precision[], bigint[], bigint[], bigint[],
                        double precision, double precision, boolean, int, boolean,
                        double precision)
    to service_role;
