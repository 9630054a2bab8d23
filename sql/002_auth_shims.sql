-- 002: what Supabase provides and plain PostgreSQL lacks, created only when missing,
-- so that the same policies run on both.
--
-- On Supabase the roles anon, authenticated and service_role and the function
-- auth.uid() already exist and are left untouched. Roles are cluster-wide: two
-- databases of one cluster may run this file at the same moment, so a role that
-- appears between the check and the create is accepted.

do $$
declare
    r text;
begin
    foreach r in array array['anon', 'authenticated'] loop
        if not exists (select 1 from pg_roles where rolname = r) then
            begin
                execute format('create role %I nologin noinherit', r);
            exception when duplicate_object or unique_violation then
                null;
            end;
        end if;
    end loop;
    if not exists (select 1 from pg_roles where rolname = 'service_role') then
        begin
            -- As on Supabase: the server-side role bypasses row-level security.
            create role service_role nologin noinherit bypassrls;
        exception when duplicate_object or unique_violation then
            null;
        end;
    end if;
end
$$;

create schema if not exists auth;

do $$
begin
    if not exists (
        select 1 from pg_proc p join pg_namespace n on n.oid = p.pronamespace
        where n.nspname = 'auth' and p.proname = 'uid'
    ) then
        -- Supabase's definition: the JWT's subject, set by PostgREST per request.
        -- Outside PostgREST a session sets it with
        --   select set_config('request.jwt.claim.sub', '<uuid>', false);
        create function auth.uid() returns uuid
        language sql stable
        as $fn$
            select coalesce(
                nullif(current_setting('request.jwt.claim.sub', true), ''),
                (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
            )::uuid
        $fn$;
    end if;
end
$$;

grant usage on schema auth to anon, authenticated, service_role;
