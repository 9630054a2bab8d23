-- The providers' Batch APIs (sql/027, listener/batches/).

-- name: batch_take
-- sql/027: a claimed batch job handed to this worker's collecting batch (null: run it).
select ai_job_batch_take(%(table)s, %(id)s, %(token)s, %(worker)s, %(lease)s, %(max_jobs)s)
    as batch_id

-- name: batch_submitting
-- sql/027: the intent to send the batch, recorded before the upload; its jobs.
select id, claim_token, retry_count, max_retries, job
from ai_job_batch_submitting(%(batch)s, %(worker)s, %(provider)s, %(model)s)

-- name: batch_submitted
-- sql/027: the provider's batch id, once it took the batch.
select ai_job_batch_submitted(%(batch)s, %(worker)s, %(provider_batch)s, %(file)s) as recorded

-- name: batch_watch
-- sql/027: the worker's batches, leases renewed (and expired ones adopted), heartbeats kept.
select id, job_table, state, provider, model, provider_batch_id, age_seconds, jobs
from ai_job_batch_watch(%(worker)s, %(lease)s, %(adopt)s, %(beat_after)s)

-- name: batch_let_go
-- This worker has no Batch API for the batch's provider: its lease ends now, for a
-- worker that has one to take it over (ai_job_batch_watch adopts it).
update ai_job_batches set worker_id = null, lease_until = clock_timestamp()
where id = %(batch)s and worker_id = %(worker)s and state <> 'ended'

-- name: batch_recorded
-- A batch's state and the provider batch id recorded for it (a worker whose lease
-- was lost while it created one: is the one it made the intent's?).
select state, provider_batch_id from ai_job_batches where id = %(batch)s

-- name: batch_jobs
-- sql/027: the jobs a batch still holds, with their items' tokens.
select job_table, id, claim_token, retry_count, max_retries, job
from ai_job_batch_jobs(%(batch)s, %(worker)s)

-- name: batch_end
-- sql/027: the batch ended; the jobs it still holds go back to pending (no attempt).
select ai_job_batch_end(%(batch)s, %(worker)s, %(outcome)s, %(error)s) as returned

-- name: batches_open
-- The console's open batches, oldest first.
select b.id, b.job_table, b.state, b.provider, b.model, b.provider_batch_id, b.worker_id,
       b.created_at, b.submitted_at,
       (select count(*)::int from ai_job_batch_items i where i.batch_id = b.id) as jobs
from ai_job_batches b
where b.state <> 'ended'
order by b.created_at
limit %(limit)s

-- name: batch_known
-- The provider batch ids recorded since then (an intent is not one of those).
select provider_batch_id from ai_job_batches
where provider = %(provider)s and provider_batch_id is not null
  and submitted_at >= to_timestamp(%(since)s)

-- name: batch_fit
-- sql/030: the jobs of a collecting batch that fit its provider's batch queue; the intent.
select kept, units, enqueued, queue_limit, moved, direct
from ai_job_batch_fit(%(batch)s, %(worker)s, %(provider)s, %(model)s, %(scope)s, %(jobs)s,
                      %(units)s, %(wait_bound)s, %(lease)s, %(limit_ttl)s)

-- name: batch_refused
-- sql/030: the provider refused the batch for its queue: the limit learned, its jobs wait.
select queue_limit, paced, moved, direct
from ai_job_batch_refused(%(batch)s, %(worker)s, %(provider)s, %(scope)s, %(limit)s, %(error)s,
                          %(retry)s, %(wait_bound)s, %(lease)s)
