# Sourced by .ci/run: make TEST_DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/test) usable
# for the tests, whose user must connect to it and create databases. On a machine where PostgreSQL
# is missing, stopped, has no `test` database, or asks for a password on 127.0.0.1, this installs or
# starts the cluster on the URL's port, creates the database, and, when the URL carries no password
# and its user cannot log in, uses a role of the tests' own (password login, CREATEDB) instead of
# touching the server's authentication rules or anybody's password. Needs root (su postgres).

pg_up() {
  .venv/bin/python - <<'PY'
import asyncio, os, sys
import asyncpg
async def main() -> None:
    conn = await asyncpg.connect(os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"), timeout=3)
    await conn.close()
try:
    asyncio.run(main())
except Exception as exc:
    print(f"PostgreSQL not usable at TEST_DATABASE_URL: {type(exc).__name__}: {exc}")
    sys.exit(1)
PY
}

# The URL's parts, for the cluster on its port and the statements below.
pg_url_part() {
  .venv/bin/python -c 'import os, sys; from urllib.parse import urlsplit
u = urlsplit(os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"))
print({"port": u.port or 5432, "database": u.path.lstrip("/") or "postgres", "password": u.password or ""}[sys.argv[1]])' "$1"
}

pg_as_superuser() {  # psql as the postgres OS user over the cluster's local socket (peer authentication)
  su postgres -c "psql -X -q -v ON_ERROR_STOP=1 -p $(pg_url_part port) -d postgres -Atc \"$1\""
}

prepare_postgres() {
  pg_up >/dev/null 2>&1 && return 0
  local port database cluster
  port=$(pg_url_part port)
  database=$(pg_url_part database)
  log "preparing PostgreSQL on port $port"
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  # The cluster on the URL's port (Debian's pg_lsclusters: version, name, port, status, ...).
  cluster=$(pg_lsclusters -h | awk -v port="$port" '$3 == port {print $1 " " $2; exit}')
  [ -n "$cluster" ] || { echo "no PostgreSQL cluster listens on port $port (pg_lsclusters)"; return 1; }
  # shellcheck disable=SC2086  # version and name are two words on purpose
  pg_ctlcluster --skip-systemctl-redirect $cluster start 2>/dev/null || true
  for _ in $(seq 1 30); do pg_as_superuser "SELECT 1" >/dev/null 2>&1 && break; sleep 1; done
  pg_as_superuser "SELECT 1" >/dev/null
  if [ -z "$(pg_as_superuser "SELECT 1 FROM pg_database WHERE datname = '$database'")" ]; then
    su postgres -c "createdb -p $port '$database'"
  fi
  if ! pg_up >/dev/null 2>&1 && [ -z "$(pg_url_part password)" ]; then
    # Password authentication on 127.0.0.1 (Debian's default for a new cluster): our own role.
    pg_as_superuser "DO \\\$\\\$ BEGIN
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tusingest_test') THEN
          CREATE ROLE tusingest_test LOGIN CREATEDB PASSWORD 'tusingest_test';
        END IF; END \\\$\\\$"
    export TEST_DATABASE_URL="postgresql://tusingest_test:tusingest_test@127.0.0.1:$port/$database"
    log "using TEST_DATABASE_URL=$TEST_DATABASE_URL (the server asks for a password on 127.0.0.1)"
  fi
  pg_up
}
