#!/usr/bin/env bash
# psql through rlsgate, used as its users use it: a connection string or
# separate parameters with the JWT in PGPASSWORD, psql variables, server-side
# PREPARE/EXECUTE, transactions, and the errors it prints.
#
# The connection details come from the environment (tests/integration/clients.rs sets
# them): RLSGATE_HOST, RLSGATE_PORT, RLSGATE_DB, ALICE_TOKEN, BOB_TOKEN,
# EXPIRED_TOKEN, and SHORT_TOKEN, alice's token whose sessions the proxy ends
# at SHORT_TOKEN_ENDS_AT (unix seconds). With RLSGATE_SSLMODE=require (the
# proxy has a certificate), every connection is encrypted: libpq's
# PGSSLMODE=require, which does not check the certificate. With
# RLSGATE_POOL_MODE=transaction (the proxy lends its RLSGATE_POOL_SIZE
# backends per transaction), PREPARE/EXECUTE run inside one transaction, as
# transaction mode keeps them, and more checks follow: the statements that
# mode refuses, and a session's SET on each backend it moves to. Exits 0
# only if every check passed; prints each check.
set -uo pipefail

export PSQLRC=/dev/null PGCONNECT_TIMEOUT=10
unset PGPASSWORD PGSERVICE PGSSLMODE
if [ -n "${RLSGATE_SSLMODE:-}" ]; then
  export PGSSLMODE=$RLSGATE_SSLMODE
fi

failures=()
check() { # NAME WANT GOT
  if [ "$3" = "$2" ]; then
    echo "ok   $1: $3"
  else
    echo "FAIL $1: want [$2], got [$3]"
    failures+=("$1")
  fi
}
check_contains() { # NAME NEEDLE HAYSTACK
  if [[ "$3" == *"$2"* ]]; then
    echo "ok   $1: $3"
  else
    echo "FAIL $1: [$2] not in [$3]"
    failures+=("$1")
  fi
}

out=$(mktemp)
short_out=$(mktemp)
trap 'rm -f "$out" "$short_out"' EXIT

txn=false
if [ "${RLSGATE_POOL_MODE:-}" = transaction ]; then
  txn=true
fi

# Connection string, the token as the password in it.
{
  # docs:begin psql-url
  psql "postgresql://authenticated:$ALICE_TOKEN@$RLSGATE_HOST:$RLSGATE_PORT/$RLSGATE_DB" -At -c 'select auth.user_id()'
  # docs:end
} >"$out" 2>&1
check "connection string: auth.user_id() is alice" alice "$(cat "$out")"

# Separate parameters, the token in PGPASSWORD.
{
  # docs:begin psql-parameters
  PGPASSWORD=$ALICE_TOKEN psql -h "$RLSGATE_HOST" -p "$RLSGATE_PORT" -U authenticated -d "$RLSGATE_DB" -At -c 'select auth.user_id()'
  # docs:end
} >"$out" 2>&1
check "parameters: auth.user_id() is alice" alice "$(cat "$out")"

if [ "${RLSGATE_SSLMODE:-}" = require ]; then
  PGPASSWORD=$ALICE_TOKEN psql -h "$RLSGATE_HOST" -p "$RLSGATE_PORT" -U authenticated -d "$RLSGATE_DB" -c '\conninfo' >"$out" 2>&1
  check_contains "\\conninfo: the session is encrypted" "SSL connection" "$(cat "$out")"
fi

as() { # TOKEN, then psql's arguments
  local token=$1
  shift
  PGPASSWORD=$token psql -h "$RLSGATE_HOST" -p "$RLSGATE_PORT" -U authenticated -d "$RLSGATE_DB" \
    -At -q -v ON_ERROR_STOP=1 "$@"
}

# A long query with the short-lived token, in the background: the proxy
# ends it when the token expires.
as "$SHORT_TOKEN" -c 'select pg_sleep(60)' >"$short_out" 2>&1 &
short_pid=$!

# A script on standard input: each statement is its own query. In
# transaction mode a prepared statement lasts one transaction.
as "$ALICE_TOKEN" -v title='psql: parameterized' -v txn=$txn >"$out" 2>&1 <<'SQL'
insert into todos (title) values (:'title') returning user_id;
select count(*) from todos where title = :'title';
\if :txn
begin;
\endif
prepare add_todo(text) as insert into todos (title) values ($1);
execute add_todo('psql: prepared 0');
execute add_todo('psql: prepared 1');
execute add_todo('psql: prepared 2');
\if :txn
commit;
\endif
select count(*) from todos where title like 'psql: prepared %';
begin;
insert into todos (title) values ('psql: committed');
commit;
begin;
insert into todos (title) values ('psql: rolled back');
rollback;
select string_agg(title, ',' order by title) from todos where title in ('psql: committed', 'psql: rolled back');
select string_agg(distinct user_id, ',') from todos;
SQL
status=$?
check "the script ran" 0 "$status"
mapfile -t lines <"$out"
check "a psql variable inserts a row that is alice's" alice "${lines[0]:-}"
check "the select finds it" 1 "${lines[1]:-}"
check "the prepared insert ran three times" 3 "${lines[2]:-}"
check "the committed transaction stays, the rolled back one does not" "psql: committed" "${lines[3]:-}"
check "alice sees only her own rows" alice "${lines[4]:-}"

as "$ALICE_TOKEN" -v VERBOSITY=verbose -c "insert into todos (user_id, title) values ('bob', 'psql: planted')" >"$out" 2>&1
status=$?
check "an insert for bob fails" 1 "$status"
check_contains "the refusal has SQLSTATE 42501" "ERROR:  42501: new row violates row-level security policy" "$(cat "$out")"

as "$BOB_TOKEN" -c 'select string_agg(distinct user_id, $$,$$) from todos' >"$out" 2>&1
check "bob sees only his own rows" bob "$(cat "$out")"

# libpq gives a failed connection's error as text (psql exits 2); its
# SQLSTATE is not shown, the other drivers' checks see the 28000.
as "$EXPIRED_TOKEN" -c 'select 1' >"$out" 2>&1
status=$?
check "an expired token is refused" 2 "$status"
check_contains "the refusal says the token expired" "FATAL:  token expired at" "$(cat "$out")"

wait "$short_pid"
status=$?
check "a query running when its token expires ends psql" 2 "$status"
check_contains "psql shows why" "FATAL:  token expired at" "$(cat "$short_out")"
if [ "$(date +%s)" -lt "$((SHORT_TOKEN_ENDS_AT - 1))" ]; then
  echo "FAIL the session ended before its token expired"
  failures+=("the session ended before its token expired")
fi

if $txn; then
  # shellcheck source=transaction_mode.sh
  source "$(dirname "$0")/transaction_mode.sh"
fi

psql --version
if [ "${#failures[@]}" -gt 0 ]; then
  echo "${#failures[@]} check(s) failed: ${failures[*]}"
  exit 1
fi
echo "all psql checks passed"
