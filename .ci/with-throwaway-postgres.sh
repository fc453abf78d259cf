#!/usr/bin/env bash
# Runs a command with DATABASE_URL pointing at a fresh database on a throwaway Postgres
# started from the local binaries, removed afterwards. initdb/postgres refuse to run as
# root, so as root they run as the `postgres` (or `nobody`) user.
set -euo pipefail

bindir=""
for candidate in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$candidate/initdb" ] && [ -x "$candidate/pg_ctl" ]; then bindir=$candidate; break; fi
done
if [ -z "$bindir" ]; then
    if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
        bindir=$(dirname "$(command -v initdb)")
    else
        echo "no PostgreSQL server binaries found (install postgresql)" >&2
        exit 1
    fi
fi

tmp=$(mktemp -d)
run_as=()
if [ "$(id -u)" = 0 ]; then
    user=postgres
    id "$user" >/dev/null 2>&1 || user=nobody
    chown -R "$user" "$tmp"
    run_as=(runuser -u "$user" --)
fi
port=$((20000 + RANDOM % 20000))
cleanup() {
    "${run_as[@]}" "$bindir/pg_ctl" -D "$tmp/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$tmp"
}
trap cleanup EXIT

"${run_as[@]}" "$bindir/initdb" -D "$tmp/data" -U postgres --auth=trust -E UTF8 --locale=C --no-sync >/dev/null
"${run_as[@]}" "$bindir/pg_ctl" -D "$tmp/data" -l "$tmp/postgres.log" -w \
    -o "-p $port -k $tmp -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null

export DATABASE_URL="postgres://postgres@127.0.0.1:$port/plane_ci"
"$@"
