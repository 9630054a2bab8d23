-- 035: ai_job_claim_batch (sql/033) takes its users' locks in one order.
--
-- Under a per-user cap it claimed one job at a time and ai_job_under_cap took
-- each job's user's lock as it came: two workers claiming batch jobs at once
-- could take two users' locks in opposite orders and deadlock (PostgreSQL then
-- aborts one claim; no job is lost, but that worker's claim round fails). Now
-- every due user's lock is taken first, ordered by lock key as the fair claims
-- take them (sql/025), so batch claims, fair claims and the fast path's claims
-- all lock users in the same order, and only those users' jobs are taken (one
-- whose first job came after the list would be locked out of that order). The
-- same function otherwise; same signature, same grants (create or replace keeps
-- them).

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
    locked uuid[];
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
        select id, created_by from %1$I
        where batch %2$s and status in ('pending', 'failed') and run_after <= now()
          and (status = 'pending' or retry_count < max_retries)
          and coalesce(created_by, %3$L::uuid) <> all($1)
          and ($3::uuid[] is null or coalesce(created_by, %3$L::uuid) = any($3))
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
            into ids using full_, max_jobs, null::uuid[];
        return query execute claim using worker, ids;
        return;
    end if;
    -- Every due user's lock first, in the order of their lock keys, as the fair
    -- pick takes them (ai_job_fair_ids): ai_job_under_cap would otherwise take
    -- them one by one in the order of the jobs, and two claims taking two users
    -- in opposite orders deadlock.
    -- Only their jobs are taken: a user whose first job came after this list was
    -- made would be locked out of that order.
    locked := ai_job_due_users(t);
    perform ai_job_lock_users(locked);
    while got < max_jobs and tries < 2 * max_jobs + 10 loop
        tries := tries + 1;
        execute due || ' limit 1 for update skip locked' into picked, owner
            using full_, 0, locked;
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
