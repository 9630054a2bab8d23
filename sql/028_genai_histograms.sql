-- 028: the provider calls' histograms as OpenTelemetry's GenAI conventions name
-- them, for /metrics (listener/web/metrics.py): gen_ai_client_token_usage (tokens
-- per call, input and output) and gen_ai_client_operation_duration_seconds (one
-- call's duration, failed calls included), by operation (chat, generate_content),
-- provider and requested model.
--
-- Workers add what their calls observed every few seconds, as they add the usage
-- totals (ai_job_add_usage), so each histogram is a real ever-growing counter,
-- shared by every web process. counts are per bucket (not cumulative), in the
-- order of the upper bounds the workers use (listener/providers/meter.py), the
-- last one +Inf; a worker whose bounds differ in number is refused, not mixed in.

create table if not exists ai_job_call_histograms (
    metric      text not null check (metric in ('token_usage', 'operation_duration')),
    operation   text not null,
    provider    text not null,
    model       text not null,  -- folded to 'other' beyond the known models
    token_type  text not null,  -- input or output for token_usage; '' for the duration
    counts      bigint[] not null,
    sum         double precision not null default 0,
    count       bigint not null default 0,
    updated_at  timestamptz not null default now(),
    primary key (metric, operation, provider, model, token_type)
);

-- One row per histogram observed since the last call; counts as text ('{1,0,2}').
create or replace function ai_job_add_call_histograms(
    metrics text[], operations text[], providers text[], models text[], token_types text[],
    counts text[], sums double precision[], totals bigint[])
returns void
language sql
set search_path = pg_catalog, public, pg_temp
as $$
    insert into ai_job_call_histograms as h
        (metric, operation, provider, model, token_type, counts, sum, count)
    select m, o, p, mo, tt, c::bigint[], s, n
    from unnest(metrics, operations, providers, models, token_types, counts, sums, totals)
        as u(m, o, p, mo, tt, c, s, n)
    on conflict (metric, operation, provider, model, token_type) do update
    set counts = (
            select array_agg(coalesce(a, 0) + coalesce(b, 0) order by i)
            from unnest(h.counts, excluded.counts) with ordinality as x(a, b, i)
        ),
        sum = h.sum + excluded.sum,
        count = h.count + excluded.count,
        updated_at = now()
    where cardinality(h.counts) = cardinality(excluded.counts)
$$;

-- Least privilege: the workers and operators (service_role) only.
alter table ai_job_call_histograms enable row level security;
revoke all on ai_job_call_histograms from public, anon, authenticated, service_role;
grant select, insert, update, delete on ai_job_call_histograms to service_role;
revoke execute on function
    ai_job_add_call_histograms(text[], text[], text[], text[], text[], text[],
                               double precision[], bigint[])
    from public, anon, authenticated, service_role;
grant execute on function
    ai_job_add_call_histograms(text[], text[], text[], text[], text[], text[],
                               double precision[], bigint[])
    to service_role;
