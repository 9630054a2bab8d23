-- 008: the alert rules' firing state, shared by every worker.
--
-- Each worker evaluates the alert rules every minute. A transition (ok -> firing,
-- firing -> ok) is reported by the one worker whose UPDATE changed the row, so
-- that running several workers, or restarting one, never repeats a report.

create table if not exists ai_job_alert_state (
    rule       text primary key,
    firing     boolean not null default false,
    value      double precision,
    changed_at timestamptz not null default now()
);

insert into ai_job_alert_state (rule) values
    ('dead_letter_last_hour'), ('stale_processing'), ('pending_depth'),
    ('avg_processing_time'), ('failure_rate'), ('rate_limit_violations')
on conflict do nothing;

grant all on ai_job_alert_state to service_role;
