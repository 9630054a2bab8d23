-- 012: the worker registry, and the alert rules that read it.
--
-- Each `ai-jobs worker` process registers itself at start (one row per process),
-- refreshes last_seen and what it reports (the state of its LISTEN connection,
-- the jobs it runs, its last probe's round trip, its reconnects) every few
-- seconds and on every change of its listener's state, and deletes its row on a
-- clean exit. The row of a process that died stays until a live worker's sweep
-- expires it. `ai-jobs workers`, the dashboard, /metrics and the alert rules
-- no_worker and worker_deaf read it. Only the worker (service_role) writes it.
--
-- listener_state: listening | reconnecting | deaf | polling (LISTEN_MODE=poll)
-- | connecting (at start, before the first LISTEN).

create table if not exists ai_job_workers (
    id             text primary key,                -- host:pid:random, as in worker_id of the jobs
    host           text not null,
    pid            int not null,
    started_at     timestamptz not null default now(),
    last_seen      timestamptz not null default now(),
    listener_state text not null,
    jobs_running   int not null default 0 check (jobs_running >= 0),
    version        text not null,
    probe_seconds  double precision,                -- the last probe's round trip
    reconnects     int not null default 0           -- LISTEN reconnects since the start
);

-- Least privilege (see 010): nobody but the workers and the operators
-- (service_role); row-level security on, with no policy for anyone else.
alter table ai_job_workers enable row level security;
revoke all on ai_job_workers from public, anon, authenticated, service_role;
grant select, insert, update, delete on ai_job_workers to service_role;

insert into ai_job_alert_state (rule) values ('no_worker'), ('worker_deaf')
on conflict do nothing;
