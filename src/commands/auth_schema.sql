-- rlsgate: schema `auth`, version 1.
--
-- Version 2 (auth_schema_v2.sql) replaces auth.session() and the envelope:
-- read it for what is in force. This file stays as it was installed, so that
-- an upgrade runs the same steps as a fresh install.
--
-- Installed by `rlsgate init-db`, which runs this file inside one transaction
-- under an advisory lock and records version 1 in auth.schema_version. Every
-- statement is idempotent, so running it again changes nothing.
--
-- The proxy puts one setting into the startup packet of each upstream
-- session: rlsgate.session = KID.PAYLOAD.MAC, where
--   KID     = hex of the first 8 bytes of sha256(key),
--   PAYLOAD = base64 of {"v":1,"user":<login role>,"exp":<unix s>,"claims":{..}},
--   MAC     = hex of HMAC-SHA256(key, 'KID.PAYLOAD').
-- auth.session() verifies it on every call. HMAC is built from the core
-- sha256() and pads precomputed by the installer, so no extension is needed
-- and the raw key never reaches the database.
--
-- Operators and types in jwt(), user_id() and uid() are written
-- OPERATOR(pg_catalog.x) / pg_catalog.type: those functions run with the
-- caller's search_path (so the planner can inline them), and a caller able to
-- create objects in some schema could otherwise shadow `->>` or `uuid` and
-- forge what policies see.

create schema if not exists auth;
revoke all on schema auth from public;
grant usage on schema auth to public;

create table if not exists auth.schema_version (
    version integer primary key,
    installed_at timestamptz not null default pg_catalog.now()
);
revoke all on auth.schema_version from public;

-- Readable only by the owner (the role that ran init-db): the pads are as good
-- as the key for forging claims.
create table if not exists auth.signing_keys (
    key_id text primary key
        constraint signing_keys_key_id_format check (key_id operator(pg_catalog.~) '^[0-9a-f]{16}$'),
    inner_pad bytea not null
        constraint signing_keys_inner_pad_length check (pg_catalog.length(inner_pad) = 64),
    outer_pad bytea not null
        constraint signing_keys_outer_pad_length check (pg_catalog.length(outer_pad) = 64),
    added_at timestamptz not null default pg_catalog.now()
);
revoke all on auth.signing_keys from public;

-- Default privileges (ALTER DEFAULT PRIVILEGES ... GRANT SELECT ON TABLES, as
-- some managed setups configure for reporting roles) may have granted the new
-- tables to other roles; only their owner may read them.
do $revoke$
declare
    grant_ record;
begin
    for grant_ in
        select distinct c.oid::pg_catalog.regclass::text as tab,
                        a.grantee::pg_catalog.regrole::text as grantee
          from pg_catalog.pg_class c,
               pg_catalog.aclexplode(c.relacl) a
         where c.oid in ('auth.signing_keys'::pg_catalog.regclass,
                         'auth.schema_version'::pg_catalog.regclass)
           and a.grantee <> 0
           and a.grantee <> c.relowner
    loop
        execute pg_catalog.format('revoke all on %s from %s', grant_.tab, grant_.grantee);
    end loop;
end;
$revoke$;

-- The verified claims of this session, or NULL when the proxy bound none (a
-- role served without a token). A value that is present but does not verify
-- raises 28000 instead of returning NULL, so a broken or forged setting can
-- never be mistaken for "anonymous". No EXCEPTION block: it would open a
-- subtransaction on every call.
create or replace function auth.session() returns jsonb
language plpgsql
stable
security definer
set search_path = pg_catalog, pg_temp
as $function$
declare
    raw text := pg_catalog.current_setting('rlsgate.session', true);
    parts text[];
    ipad bytea;
    opad bytea;
    envelope jsonb;
    expires jsonb;
begin
    -- Unset: a connection that did not come through the proxy. Set but empty:
    -- someone cleared the value with SET (the proxy binds one to every
    -- session, null claims included), which must not pass for "no claims".
    if raw is null then
        return null;
    end if;
    if raw = '' then
        raise exception 'rlsgate: session claims were cleared by SET in this session'
            using errcode = '28000';
    end if;

    parts := pg_catalog.string_to_array(raw, '.');
    if pg_catalog.cardinality(parts) <> 3 then
        raise exception 'rlsgate: session claims are malformed (expected KID.PAYLOAD.MAC)'
            using errcode = '28000';
    end if;

    select k.inner_pad, k.outer_pad into ipad, opad
      from auth.signing_keys k
     where k.key_id = parts[1];
    if not found then
        if parts[1] ~ '^[0-9a-f]{16}$' then
            raise exception 'rlsgate: session claims were signed with unknown key %', parts[1]
                using errcode = '28000',
                      hint = 'Register the proxy''s claims signing key with `rlsgate init-db`.';
        end if;
        raise exception 'rlsgate: session claims have a malformed key id'
            using errcode = '28000';
    end if;

    if pg_catalog.encode(
           pg_catalog.sha256(opad || pg_catalog.sha256(
               ipad || pg_catalog.convert_to(parts[1] || '.' || parts[2], 'UTF8'))),
           'hex') <> parts[3] then
        raise exception 'rlsgate: session claims have an invalid signature'
            using errcode = '28000';
    end if;

    -- Signed by a key holder, so a decoding error here means a proxy bug; the
    -- error it raises is loud enough.
    envelope := pg_catalog.convert_from(pg_catalog.decode(parts[2], 'base64'), 'UTF8')::pg_catalog.jsonb;

    if envelope -> 'v' is distinct from '1'::jsonb then
        raise exception 'rlsgate: session claims have an unsupported envelope version'
            using errcode = '28000';
    end if;

    if (envelope ->> 'user') is distinct from session_user::text then
        raise exception 'rlsgate: session claims were issued for another login role, not %', session_user
            using errcode = '28000';
    end if;

    -- bigint, not numeric: the numeric comparison costs a float-to-text round
    -- trip on every call.
    expires := envelope -> 'exp';
    if pg_catalog.jsonb_typeof(expires) is distinct from 'number' then
        raise exception 'rlsgate: session claims have no expiry'
            using errcode = '28000';
    end if;
    if expires::bigint <= pg_catalog.date_part('epoch', pg_catalog.now()) then
        raise exception 'rlsgate: session claims expired at %',
            pg_catalog.to_char(pg_catalog.to_timestamp(expires::double precision) at time zone 'UTC',
                               'YYYY-MM-DD"T"HH24:MI:SS"Z"')
            using errcode = '28000';
    end if;

    -- A role served without a token: the proxy bound "no claims" on purpose.
    if pg_catalog.jsonb_typeof(envelope -> 'claims') = 'null' then
        return null;
    end if;
    if pg_catalog.jsonb_typeof(envelope -> 'claims') is distinct from 'object' then
        raise exception 'rlsgate: session claims are missing from the envelope'
            using errcode = '28000';
    end if;
    return envelope -> 'claims';
end;
$function$;

-- Same as auth.session(), under the name pg_session_jwt also provides.
create or replace function auth.jwt() returns jsonb
language sql
stable
as $function$
    select auth.session()
$function$;

create or replace function auth.user_id() returns text
language sql
stable
as $function$
    select auth.session() operator(pg_catalog.->>) 'sub'
$function$;

-- `sub` as a uuid when it is written as one (any case), else NULL: providers
-- whose subjects are not uuids (e.g. "user_2abc") still work with user_id().
-- plpgsql rather than one inlinable SQL expression: substring() with a capture
-- group costs several times more than the `~` test.
create or replace function auth.uid() returns uuid
language plpgsql
stable
as $function$
declare
    sub text := auth.session() operator(pg_catalog.->>) 'sub';
begin
    if sub operator(pg_catalog.~)
       '^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$' then
        return sub::pg_catalog.uuid;
    end if;
    return null;
end;
$function$;

revoke all on function auth.session() from public;
revoke all on function auth.jwt() from public;
revoke all on function auth.user_id() from public;
revoke all on function auth.uid() from public;
grant execute on function auth.session() to public;
grant execute on function auth.jwt() to public;
grant execute on function auth.user_id() to public;
grant execute on function auth.uid() to public;
