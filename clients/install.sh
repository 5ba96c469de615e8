#!/usr/bin/env bash
# Installs what the client checks (tests/integration/clients.rs) run: psql and pgbench,
# pgjdbc and a JDK, psycopg 3 with psycopg_pool and asyncpg in
# clients/python/.venv, the Node.js drivers pg and postgres from
# clients/node/package-lock.json, and (for tests/integration/serverless.rs)
# @neondatabase/serverless, drizzle-orm and ws from
# clients/serverless/package-lock.json.
# Running it again installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")"

JDBC_JAR=/usr/share/java/postgresql.jar

# pgbench is in the server package (postgresql-15), beside psql's binaries.
have_pgbench() {
  command -v pgbench >/dev/null 2>&1 && return 0
  command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/pgbench" ] && return 0
  compgen -G '/usr/lib/postgresql/*/bin/pgbench' >/dev/null
}

# Debian packages, only those missing.
apt_packages=()
command -v psql >/dev/null 2>&1 || apt_packages+=(postgresql-client)
have_pgbench || apt_packages+=(postgresql postgresql-contrib)
[ -f "$JDBC_JAR" ] || apt_packages+=(libpostgresql-jdbc-java)
{ command -v java >/dev/null 2>&1 && command -v javac >/dev/null 2>&1; } || apt_packages+=(default-jdk-headless)
{ command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; } || apt_packages+=(nodejs npm)
command -v python3 >/dev/null 2>&1 || apt_packages+=(python3)
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  apt_packages+=(python3-venv)
fi
if [ "${#apt_packages[@]}" -gt 0 ]; then
  echo "installing from Debian: ${apt_packages[*]}"
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${apt_packages[@]}"
fi
[ -f "$JDBC_JAR" ] || { echo "$JDBC_JAR is missing after installing libpostgresql-jdbc-java" >&2; exit 1; }

# Python: psycopg 3, psycopg_pool and asyncpg, pinned in requirements.txt.
venv=python/.venv
if [ ! -x "$venv/bin/python" ]; then
  echo "creating $venv"
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check -r python/requirements.txt; then
  echo "pip could not install python/requirements.txt into $venv" >&2
  exit 1
fi
"$venv/bin/python" -c 'import psycopg, psycopg_pool; print("psycopg", psycopg.__version__, "psycopg_pool", psycopg_pool.__version__, "libpq", psycopg.pq.version())'
"$venv/bin/python" -c 'import asyncpg; print("asyncpg", asyncpg.__version__)'

# Node.js: exactly the lock file's versions, unless they are already there.
if ! cmp -s node/package-lock.json node/node_modules/.package-lock.json.installed 2>/dev/null; then
  echo "installing node modules (npm ci)"
  (cd node && npm ci --no-audit --no-fund --loglevel=error)
  cp node/package-lock.json node/node_modules/.package-lock.json.installed
fi
node -e 'for (const m of ["pg", "postgres"]) console.log(m, require("./node/node_modules/" + m + "/package.json").version)'

# The serverless driver and Drizzle, likewise from their own lock file.
if ! cmp -s serverless/package-lock.json serverless/node_modules/.package-lock.json.installed 2>/dev/null; then
  echo "installing serverless node modules (npm ci)"
  (cd serverless && npm ci --no-audit --no-fund --loglevel=error)
  cp serverless/package-lock.json serverless/node_modules/.package-lock.json.installed
fi
node -e 'for (const m of ["@neondatabase/serverless", "drizzle-orm", "ws"]) console.log(m, require("./serverless/node_modules/" + m + "/package.json").version)'

echo "java: $(javac -version 2>&1), pgjdbc: $JDBC_JAR"
echo "client checks ready: cargo test --test integration clients::"
