#!/usr/bin/env bash
# pgbench through rlsgate: the custom script todos.sql with 4 clients of 50
# transactions each, once with -M prepared and once with -M extended, the
# token in PGPASSWORD. Then, through psql, the 400 rows are alice's and bob
# sees none of them. psql is $PSQL, or psql on PATH.
#
# The connection details come from the environment (tests/integration/clients.rs sets
# them): RLSGATE_HOST, RLSGATE_PORT, RLSGATE_DB, ALICE_TOKEN, BOB_TOKEN.
# With RLSGATE_SSLMODE=require (the proxy has a certificate), pgbench and psql
# connect with libpq's PGSSLMODE=require: encrypted, the certificate not
# checked. With RLSGATE_POOL_MODE=transaction (the proxy lends its
# RLSGATE_POOL_SIZE backends, fewer than pgbench's clients, per
# transaction), the same runs, and one of settings.sql: a session's SET
# follows it from backend to backend. Exits 0 only if every check passed.
set -uo pipefail
cd "$(dirname "$0")"

export PSQLRC=/dev/null PGCONNECT_TIMEOUT=10
unset PGSERVICE PGSSLMODE
if [ -n "${RLSGATE_SSLMODE:-}" ]; then
  export PGSSLMODE=$RLSGATE_SSLMODE
fi
PSQL=${PSQL:-psql}

failures=()
check() { # NAME WANT GOT
  if [ "$3" = "$2" ]; then
    echo "ok   $1: $3"
  else
    echo "FAIL $1: want [$2], got [$3]"
    failures+=("$1")
  fi
}

out=$(mktemp)
trap 'rm -f "$out"' EXIT

for mode in prepared extended; do
  # docs:begin pgbench
  PGPASSWORD=$ALICE_TOKEN pgbench -h "$RLSGATE_HOST" -p "$RLSGATE_PORT" -U authenticated \
    -n -c 4 -t 50 -M "$mode" -f todos.sql "$RLSGATE_DB"
  # docs:end
  status=$?
  check "pgbench -M $mode exits 0" 0 "$status"
done >"$out" 2>&1
cat "$out"
for mode in prepared extended; do
  processed=$(grep -A20 "query mode: $mode" "$out" | grep -m1 'number of transactions actually processed' || true)
  check "pgbench -M $mode processed all transactions" "number of transactions actually processed: 200/200" "$processed"
done

if [ "${RLSGATE_POOL_MODE:-}" = transaction ]; then
  PGPASSWORD=$ALICE_TOKEN pgbench -h "$RLSGATE_HOST" -p "$RLSGATE_PORT" -U authenticated \
    -n -c 4 -t 25 -M prepared -D first=1 -f settings.sql "$RLSGATE_DB" >"$out" 2>&1
  status=$?
  cat "$out"
  check "pgbench -M prepared with settings.sql exits 0" 0 "$status"
  processed=$(grep -m1 'number of transactions actually processed' "$out" || true)
  check "each client's SET held in each of its transactions" "number of transactions actually processed: 100/100" "$processed"
fi

count() { # TOKEN
  PGPASSWORD=$1 "$PSQL" -h "$RLSGATE_HOST" -p "$RLSGATE_PORT" -U authenticated -d "$RLSGATE_DB" \
    -At -v ON_ERROR_STOP=1 -c "select count(*) || ' ' || coalesce(string_agg(distinct user_id, ','), '-') from todos where title like 'pgbench %'" 2>&1
}
check "alice sees the 400 rows pgbench inserted, all hers" "400 alice" "$(count "$ALICE_TOKEN")"
check "bob sees none of them" "0 -" "$(count "$BOB_TOKEN")"
if [ "${RLSGATE_SSLMODE:-}" = require ]; then
  conninfo=$(PGPASSWORD=$ALICE_TOKEN "$PSQL" -h "$RLSGATE_HOST" -p "$RLSGATE_PORT" -U authenticated -d "$RLSGATE_DB" -c '\conninfo' 2>&1)
  if [[ "$conninfo" == *"SSL connection"* ]]; then
    echo "ok   sslmode=require encrypts: $conninfo"
  else
    echo "FAIL sslmode=require encrypts: [$conninfo]"
    failures+=("sslmode=require encrypts")
  fi
fi

pgbench --version
if [ "${#failures[@]}" -gt 0 ]; then
  echo "${#failures[@]} check(s) failed: ${failures[*]}"
  exit 1
fi
echo "all pgbench checks passed"
