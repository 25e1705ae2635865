#!/bin/sh
# Starts PostgreSQL the way the official postgres image does: POSTGRES_USER, POSTGRES_PASSWORD,
# POSTGRES_DB and /docker-entrypoint-initdb.d/*.sql on first start. A compose file written for
# `image: postgres` therefore works unchanged with this image, which builds with no registry.
# Started as root it drops to the `postgres` user; started as that user (a Kubernetes pod with
# runAsUser, PodSecurity `restricted`) it runs as it is.
set -eu
bin=$(ls -d /usr/lib/postgresql/*/bin | tail -n 1)
data=${PGDATA:-/var/lib/postgresql/data}
user=${POSTGRES_USER:-postgres}
db=${POSTGRES_DB:-$user}
if [ "$(id -u)" = 0 ]; then
  as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }
else
  as_postgres() { "$@"; }
fi

if [ ! -s "$data/PG_VERSION" ]; then
  mkdir -p "$data" /var/run/postgresql
  if [ "$(id -u)" = 0 ]; then
    chown postgres:postgres "$data" /var/run/postgresql
  fi
  chmod 700 "$data"
  pwfile=$(mktemp)
  printf '%s\n' "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}" >"$pwfile"
  [ "$(id -u)" = 0 ] && chown postgres "$pwfile"
  as_postgres "$bin/initdb" -D "$data" -U "$user" --pwfile="$pwfile" \
    --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  rm -f "$pwfile"
  echo "listen_addresses = '*'" >>"$data/postgresql.conf"
  echo "host all all all scram-sha-256" >>"$data/pg_hba.conf"
  as_postgres "$bin/pg_ctl" -D "$data" -o "-c listen_addresses=''" -w start >/dev/null
  if [ "$db" != postgres ]; then
    as_postgres psql -q -U "$user" -d postgres -c "CREATE DATABASE \"$db\""
  fi
  for f in /docker-entrypoint-initdb.d/*.sql; do
    [ -e "$f" ] && as_postgres psql -q -v ON_ERROR_STOP=1 -U "$user" -d "$db" -f "$f"
  done
  as_postgres "$bin/pg_ctl" -D "$data" -m fast -w stop >/dev/null
fi
if [ "$(id -u)" = 0 ]; then
  exec setpriv --reuid=postgres --regid=postgres --init-groups "$bin/postgres" -D "$data"
fi
exec "$bin/postgres" -D "$data"
