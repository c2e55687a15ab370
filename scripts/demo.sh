#!/usr/bin/env bash
# walvault demo: a throwaway PostgreSQL archives its WAL through walvault into
# a local repository; a base backup is taken, more data written, and a
# point-in-time restore to a moment between two batches is started beside the
# original, rows shown side by side. Everything lives under .demo/ (or a temp
# dir when the postgres OS user cannot reach the checkout); servers are
# stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

BINDIR=$(pg_config --bindir)
if [[ -t 1 ]]; then B=$'\033[1m' N=$'\033[0m'; else B='' N=''; fi
step() { printf '\n%s== %s%s\n' "$B" "$*" "$N"; }
as_pg() { if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }

DEMO=$PWD/.demo
rm -rf "$DEMO"
mkdir -p "$DEMO"
if [[ $(id -u) -eq 0 ]]; then
    chown postgres: "$DEMO"
    if ! runuser -u postgres -- test -w "$DEMO"; then
        rm -rf "$DEMO"
        DEMO=$(mktemp -d /tmp/walvault-demo.XXXXXX)
        chown postgres: "$DEMO"
        echo "(the postgres user cannot reach this checkout; using $DEMO)"
    fi
fi
cp target/release/walvault "$DEMO/walvault"
WALVAULT=$DEMO/walvault
REPO=$DEMO/repo
DATA=$DEMO/primary/data
SOCK=$DEMO/primary/sock
RDATA=$DEMO/restored/data
RSOCK=$DEMO/restored/sock
as_pg mkdir -p "$SOCK" "$RSOCK"

psql_at() { local sock=$1; shift; "$BINDIR/psql" -h "$sock" -p 5432 -U postgres -d postgres -AtX -v ON_ERROR_STOP=1 "$@"; }
psql_() { psql_at "$SOCK" "$@"; }
stop_servers() {
    for d in "$RDATA" "$DATA"; do
        [[ -f $d/postmaster.pid ]] && as_pg "$BINDIR/pg_ctl" -D "$d" -m fast -w stop >/dev/null 2>&1 || true
    done
}
trap stop_servers EXIT

step "1. A fresh PostgreSQL cluster that archives through walvault"
as_pg "$BINDIR/initdb" -A trust -U postgres --no-sync -D "$DATA" >/dev/null
cat >>"$DATA/postgresql.conf" <<CONF
listen_addresses = ''
unix_socket_directories = '$SOCK'
port = 5432
archive_mode = on
archive_command = '$WALVAULT --repo $REPO push %p %f'
CONF
grep -E '^(archive_mode|archive_command)' "$DATA/postgresql.conf"
as_pg "$BINDIR/pg_ctl" -D "$DATA" -l "$DEMO/primary/server.log" -w start >/dev/null

step "2. Batch 1 of orders, then an online base backup"
psql_ -c "CREATE TABLE orders (id int PRIMARY KEY, batch int, placed_at timestamptz DEFAULT clock_timestamp())" >/dev/null
add_batch() { psql_ -c "INSERT INTO orders (id, batch) SELECT g, $1 FROM generate_series(($1 - 1) * 10000 + 1, $1 * 10000) g" >/dev/null; }
add_batch 1
echo "+ walvault --repo $REPO backup"
as_pg env PGHOST="$SOCK" PGPORT=5432 PGUSER=postgres "$WALVAULT" --repo "$REPO" backup --pgdata "$DATA"
echo "+ walvault --repo $REPO list"
"$WALVAULT" --repo "$REPO" list

step "3. More writes after the backup: batch 2, a moment to return to, batch 3"
add_batch 2
sleep 1
TARGET=$(psql_ -c "SELECT clock_timestamp()")
sleep 1
add_batch 3
echo "batch 2 committed before, batch 3 after: $TARGET"
last=$(psql_ -c "SELECT pg_walfile_name(pg_switch_wal() - 1)")
for _ in $(seq 1 300); do
    [[ $(psql_ -c "SELECT coalesce(last_archived_wal, '') >= '$last' FROM pg_stat_archiver") == t ]] && break
    sleep 0.1
done
psql_ -c "SELECT 'archiver: ' || archived_count || ' files archived, ' || failed_count || ' failed' FROM pg_stat_archiver"

step "4. What the repository holds and can recover"
echo "+ walvault --repo $REPO status --graph"
"$WALVAULT" --repo "$REPO" status --graph
echo "  (primary data directory: $(du -sh --exclude=pg_wal "$DATA" | cut -f1) without pg_wal)"

step "5. Point-in-time restore to $TARGET"
echo "+ walvault --repo $REPO restore --pgdata $RDATA --time '$TARGET'"
as_pg "$WALVAULT" --repo "$REPO" restore --pgdata "$RDATA" --time "$TARGET"
echo "+ tail -5 $RDATA/postgresql.auto.conf"
tail -5 "$RDATA/postgresql.auto.conf" | sed 's/^/  /'
as_pg "$BINDIR/pg_ctl" -D "$RDATA" -l "$DEMO/restored/server.log" -w \
    -o "-c unix_socket_directories=$RSOCK -c archive_mode=off" start >/dev/null
for _ in $(seq 1 600); do
    [[ $(psql_at "$RSOCK" -c "SELECT pg_is_in_recovery()" 2>/dev/null) == f ]] && break
    sleep 0.1
done
grep -E "recovery stopping|archive recovery complete|selected new timeline" "$DEMO/restored/server.log" | sed 's/^/  server log: /'

step "6. Side by side: the primary now, and the restore at $TARGET"
query="SELECT batch, count(*), max(placed_at)::timestamptz(0) FROM orders GROUP BY batch ORDER BY batch"
paste <(echo "primary (now)"; psql_ -F ' | ' -c "$query") \
      <(echo "restored (at target)"; psql_at "$RSOCK" -F ' | ' -c "$query") | column -t -s $'\t'

step "Done; both servers are stopped on exit. Everything is in $DEMO"
