-- 033: batch jobs are claimed while their table's claims are held for a spent
-- per-minute quota (docs/generation.md, "Batch jobs").
--
-- A job with `batch = true` makes no per-minute call: its request goes into a
-- batch, which the providers count against their batch queue limits (sql/030).
-- But the claim loop holds a table whose provider's per-minute quota is spent
-- (listener/providers/gate.py), and its claims take the oldest jobs first: with
-- a backlog of direct jobs, a batch job waited behind all of them, for hours,
-- when it could have been in a batch within BATCH_COLLECT_SECONDS. During such a
-- hold the worker claims the table's batch jobs alone with this function.
--
-- Which jobs: the course table's batch jobs, and the media table's image jobs
-- (a Batch API takes images; speech has none, so an audio job asking for a
-- batch runs direct and waits for the quota like any other). Paused queues and
-- the per-user cap hold as in every claim. Oldest first; fairness between
-- users does not matter here: the jobs all go into the same batch within
-- seconds. Under a cap, one job per statement, so that each statement sees the
-- ones before it (ai_job_under_cap counts in a new snapshot), and a user found
-- at the cap is passed over for the rest of the call.

create index if not exists ai_course_jobs_batch_due_idx on ai_course_jobs (run_after)
    where batch and status in ('pending', 'failed');
create index if not exists ai_media_jobs_batch_due_idx on ai_media_jobs (run_after)
    where batch and media_type = 'image' and status in ('pending', 'failed');

create or replace function ai_job_claim_batch(table_name text, worker text, max_jobs int)
returns table(job_table text, id uuid, claim_token uuid, retry_count int, max_retries int, job jsonb)
language plpgsql
set search_path = pg_catalog, public, pg_temp
as $$
declare
    t text := ai_job_table(table_name);
    nil constant uuid := '00000000-0000-0000-0000-000000000000';
    due text;
    claim text;
    full_ uuid[] := '{}';
    ids uuid[];
    picked uuid;
    owner uuid;
    got int := 0;
    tries int := 0;
begin
    if max_jobs is null or max_jobs < 1
       or exists (select from ai_job_queues q where q.job_table = t and q.paused) then
        return;
    end if;
    due := format($d$
        select id, created_by from %I
        where batch %s and status in ('pending', 'failed') and run_after <= now()
          and (status = 'pending' or retry_count < max_retries)
          and coalesce(created_by, %L::uuid) <> all($1)
        order by run_after
    $d$, t, case when t = 'ai_media_jobs' then $m$and media_type = 'image'$m$ else '' end, nil);
    claim := format($c$
        update %1$I j
        set status = 'processing', started_at = clock_timestamp(),
            last_heartbeat = clock_timestamp(), claim_token = gen_random_uuid(),
            worker_id = $1, completed_at = null
        where j.id = any($2)
        returning %1$L::text, j.id, j.claim_token, j.retry_count, j.max_retries, %2$s
    $c$, t,
       case t
           when 'ai_course_jobs' then
               $e$jsonb_build_object('id', j.id, 'subject', j.subject, 'course_id', j.course_id,
                                     'params', j.params, 'batch', j.batch)$e$
           else
               $e$jsonb_build_object('id', j.id, 'prompt', j.prompt, 'media_type', j.media_type,
                                     'course_id', j.course_id, 'params', j.params,
                                     'batch', j.batch)$e$
       end);
    if not exists (select from ai_job_settings where max_running_per_user is not null) then
        execute format('select array(select s.id from (%s limit $2 for update skip locked) s)',
                       due)
            into ids using full_, max_jobs;
        return query execute claim using worker, ids;
        return;
    end if;
    while got < max_jobs and tries < 2 * max_jobs + 10 loop
        tries := tries + 1;
        execute due || ' limit 1 for update skip locked' into picked, owner using full_;
        exit when picked is null;
        if ai_job_under_cap(owner) then
            return query execute claim using worker, array[picked];
            got := got + 1;
        else
            full_ := full_ || coalesce(owner, nil);
        end if;
    end loop;
end
$$;

revoke all on function ai_job_claim_batch(text, text, int) from public, anon, authenticated, service_role;
grant execute on function ai_job_claim_batch(text, text, int) to service_role;
