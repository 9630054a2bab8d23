-- The catalog reads of `make schema` (listener/schema.py): the definitions of the
-- public schema's own objects (not those of extensions), each in an order that
-- does not depend on the server (names, then column numbers).

-- name: schema_drop_database
drop database if exists ai_jobs_schema with (force)

-- name: schema_create_database
create database ai_jobs_schema

-- name: schema_tables
select c.relname::text as name, c.relrowsecurity as row_security
from pg_class c
join pg_namespace n on n.oid = c.relnamespace
where n.nspname = 'public' and c.relkind in ('r', 'p')
  and not exists (select from pg_depend d where d.objid = c.oid and d.deptype = 'e')
order by c.relname

-- name: schema_columns
select c.relname::text as table_name, a.attname::text as name,
       format_type(a.atttypid, a.atttypmod) as type, a.attnotnull as not_null,
       pg_get_expr(ad.adbin, ad.adrelid) as default_value,
       a.attidentity::text as identity, a.attgenerated::text as generated
from pg_attribute a
join pg_class c on c.oid = a.attrelid
join pg_namespace n on n.oid = c.relnamespace
left join pg_attrdef ad on ad.adrelid = a.attrelid and ad.adnum = a.attnum
where n.nspname = 'public' and c.relkind in ('r', 'p') and a.attnum > 0 and not a.attisdropped
order by c.relname, a.attnum

-- name: schema_constraints
-- Not the NOT NULL constraints PostgreSQL 18 keeps here too: the columns say those.
select c.relname::text as table_name, k.conname::text as name, k.contype::text as kind,
       pg_get_constraintdef(k.oid, true) as definition
from pg_constraint k
join pg_class c on c.oid = k.conrelid
join pg_namespace n on n.oid = c.relnamespace
where n.nspname = 'public' and k.contype in ('p', 'u', 'f', 'c', 'x')
order by c.relname, k.conname

-- name: schema_indexes
-- Those that no constraint made (a primary key's or unique constraint's index is
-- in its table's definition).
select t.relname::text as table_name, i.relname::text as name,
       pg_get_indexdef(x.indexrelid) as definition
from pg_index x
join pg_class i on i.oid = x.indexrelid
join pg_class t on t.oid = x.indrelid
join pg_namespace n on n.oid = t.relnamespace
where n.nspname = 'public'
  and not exists (select from pg_constraint k where k.conindid = x.indexrelid)
order by t.relname, i.relname

-- name: schema_views
select c.relname::text as name, c.relkind = 'm' as materialized,
       pg_get_viewdef(c.oid, true) as definition
from pg_class c
join pg_namespace n on n.oid = c.relnamespace
where n.nspname = 'public' and c.relkind in ('v', 'm')
order by c.relname

-- name: schema_sequences
-- Standalone sequences (not those of identity or serial columns: their columns say so).
select c.relname::text as name, format_type(s.seqtypid, null) as type, s.seqstart as start,
       s.seqincrement as increment, s.seqmin as min_value, s.seqmax as max_value,
       s.seqcache as cache, s.seqcycle as cycle
from pg_sequence s
join pg_class c on c.oid = s.seqrelid
join pg_namespace n on n.oid = c.relnamespace
where n.nspname = 'public'
  and not exists (
      select from pg_depend d
      where d.objid = c.oid and d.classid = 'pg_class'::regclass and d.deptype in ('a', 'i', 'e')
  )
order by c.relname

-- name: schema_functions
select p.proname::text as name, pg_get_function_identity_arguments(p.oid) as arguments,
       pg_get_functiondef(p.oid) as definition
from pg_proc p
join pg_namespace n on n.oid = p.pronamespace
where n.nspname = 'public' and p.prokind in ('f', 'p')
  and not exists (select from pg_depend d where d.objid = p.oid and d.deptype = 'e')
order by p.proname, pg_get_function_identity_arguments(p.oid)

-- name: schema_triggers
select c.relname::text as table_name, t.tgname::text as name,
       pg_get_triggerdef(t.oid, true) as definition
from pg_trigger t
join pg_class c on c.oid = t.tgrelid
join pg_namespace n on n.oid = c.relnamespace
where n.nspname = 'public' and not t.tgisinternal
order by c.relname, t.tgname

-- name: schema_policies
select c.relname::text as table_name, p.polname::text as name, p.polpermissive as permissive,
       p.polcmd::text as command,
       array(
           select case when r = 0 then 'public' else pg_get_userbyid(r)::text end
           from unnest(p.polroles) as r order by 1
       ) as roles,
       pg_get_expr(p.polqual, p.polrelid) as using_expr,
       pg_get_expr(p.polwithcheck, p.polrelid) as check_expr
from pg_policy p
join pg_class c on c.oid = p.polrelid
join pg_namespace n on n.oid = c.relnamespace
where n.nspname = 'public'
order by c.relname, p.polname
