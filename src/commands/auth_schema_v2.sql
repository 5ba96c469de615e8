-- rlsgate: schema `auth`, version 2: envelopes bound to one backend.
--
-- Version 1 accepted an envelope in any session of its login role until its
-- expiry, so a value read with `show rlsgate.session` could be SET in another
-- session. From version 2 the proxy binds the envelope after login, once it
-- knows the backend, with set_config as a bound parameter:
--   PAYLOAD = base64 of {"v":2,"user":<login role>,"pid":<backend pid>,
--                        "started":<backend start, microseconds since 1970>,
--                        "exp":<unix s>,"claims":{..}|null}
-- (KID and MAC as in version 1). auth.session() accepts it only in the backend
-- whose process id and start time it names: a process id reused by a later
-- backend has another start time. The expiry is compared with the start of
-- the current statement, not of the transaction, so an expired envelope does
-- not live on inside a transaction begun before it expired.
--
-- Installed by `rlsgate init-db` on top of version 1, in the same
-- transaction; idempotent like version 1.

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
    -- never bound (the proxy opens every session with an empty value and
    -- binds the envelope right after login) or returned to that value by
    -- SET, RESET or DISCARD ALL; neither may pass for "no claims".
    if raw is null then
        return null;
    end if;
    if raw = '' then
        raise exception 'rlsgate: session claims were cleared (by SET, RESET or DISCARD ALL) in this session'
            using errcode = '28000',
                  hint = 'Reconnect through rlsgate to bind them again.';
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

    if envelope -> 'v' is distinct from '2'::jsonb then
        raise exception 'rlsgate: session claims have an unsupported envelope version'
            using errcode = '28000',
                  hint = 'The proxy and schema auth must be of the same rlsgate version: upgrade the proxy.';
    end if;

    if (envelope ->> 'user') is distinct from session_user::text then
        raise exception 'rlsgate: session claims were issued for another login role, not %', session_user
            using errcode = '28000';
    end if;

    -- The backend the envelope was issued for: this process, started then.
    if (envelope -> 'pid') is distinct from pg_catalog.to_jsonb(pg_catalog.pg_backend_pid())
       or (envelope -> 'started') is distinct from (
           select pg_catalog.to_jsonb((extract(epoch from a.backend_start)
                                       * 1000000)::bigint)
             from pg_catalog.pg_stat_get_activity(pg_catalog.pg_backend_pid()) a) then
        raise exception 'rlsgate: session claims were issued for another session'
            using errcode = '28000';
    end if;

    -- bigint, not numeric: the numeric comparison costs a float-to-text round
    -- trip on every call.
    expires := envelope -> 'exp';
    if pg_catalog.jsonb_typeof(expires) is distinct from 'number' then
        raise exception 'rlsgate: session claims have no expiry'
            using errcode = '28000';
    end if;
    if expires::bigint <= pg_catalog.date_part('epoch', pg_catalog.statement_timestamp()) then
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

revoke all on function auth.session() from public;
grant execute on function auth.session() to public;
