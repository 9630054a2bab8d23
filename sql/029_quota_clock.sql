-- Provider quotas: the buckets' clock read after the row lock (sql/023 read it
-- at the function's start). A call that read the clock, then waited for the
-- row behind one that read it later (a lock queue, a backend descheduled on a
-- busy machine), wrote an earlier refilled_at than the one it found, and the
-- next call refilled that interval a second time: with several worker
-- processes the shared buckets drifted ahead of the provider's and let calls
-- through that it refused (make bench-ai, docs/benchmarks.md). Same signatures,
-- same grants (create or replace keeps them).

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
                wait_ := greatest(wait_, (p_cost[k] - lvl[k]) * q.window_seconds / lim[k]);
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

create or replace function ai_job_quota_settle(
    p_provider text, p_model text, p_back double precision[], p_caps bigint[],
    p_limits bigint[], p_remaining bigint[], p_age_seconds double precision,
    p_window_seconds double precision, p_heard boolean, p_learning int, p_limited boolean)
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
begin
    insert into ai_job_provider_quotas as t (provider, model) values (p_provider, p_model)
    on conflict do nothing;
    select * into q from ai_job_provider_quotas t
    where t.provider = p_provider and t.model = p_model for update;
    -- The time is read once the row is ours: never before the time the last
    -- writer refilled to (it may have read the clock later and locked first).
    now_ := greatest(clock_timestamp(), q.refilled_at);
    -- Brought to now under the limits that applied until now, then given back.
    lvl := ai_job_quota_levels(q, ai_job_quota_limits(q, p_caps), now_);
    for k in 1..4 loop
        lvl[k] := lvl[k] + coalesce(p_back[k], 0);
    end loop;

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
                              * stated / q.window_seconds);
        elsif p_limited then
            lvl[k] := least(lvl[k], 0);
        end if;
    end loop;

    update ai_job_provider_quotas t
    set rpm = q.rpm, tpm = q.tpm, itpm = q.itpm, otpm = q.otpm,
        requests = lvl[1], tokens = lvl[2], input_tokens = lvl[3], output_tokens = lvl[4],
        window_seconds = q.window_seconds,
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

-- Least privilege, as sql/023 left them: the worker and operators (service_role) only.
revoke execute on function
    ai_job_quota_reserve(text, text, int, double precision[], bigint[], double precision, int),
    ai_job_quota_settle(text, text, double precision[], bigint[], bigint[], bigint[],
                        double precision, double precision, boolean, int, boolean)
    from public, anon, authenticated, service_role;
grant execute on function
    ai_job_quota_reserve(text, text, int, double precision[], bigint[], double precision, int),
    ai_job_quota_settle(text, text, double precision[], bigint[], bigint[], bigint[],
                        double precision, double precision, boolean, int, boolean)
    to service_role;
