-- 026: Supabase Realtime reads the job tables.
--
-- Supabase Realtime's postgres_changes reads changes through logical
-- replication from the publication `supabase_realtime`, then checks each change
-- against the subscriber's row-level security (docs/supabase.md). Where that
-- publication exists (a Supabase project), both job tables are added to it, so
-- that an app can watch one job's row (status, progress, partial_result) as the
-- worker writes it. Where it does not (plain PostgreSQL), nothing is done: no
-- publication is created here, since an unread publication costs nothing but a
-- slot that reads it would keep WAL.
--
-- Idempotent: a table already published is left as it is. Replica identity
-- stays the default (the primary key): an UPDATE's change carries the new row
-- whole, which is what a subscriber to UPDATE events reads.
do $$
declare
    t text;
begin
    if not exists (select 1 from pg_publication where pubname = 'supabase_realtime') then
        return;
    end if;
    foreach t in array array['ai_course_jobs', 'ai_media_jobs'] loop
        if not exists (
            select 1 from pg_publication_tables
            where pubname = 'supabase_realtime' and schemaname = 'public' and tablename = t
        ) then
            execute format('alter publication supabase_realtime add table public.%I', t);
        end if;
    end loop;
end
$$;
