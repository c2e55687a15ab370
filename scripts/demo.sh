#!/usr/bin/env bash
# walvault demo: a throwaway PostgreSQL archiving its WAL through walvault into
# a local repository, shown step by step. Everything lives under .demo/ (or a
# temp dir when the postgres OS user cannot reach the checkout) and the server
# is stopped on exit.
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
DATA=$DEMO/pg/data
SOCK=$DEMO/pg/sock
as_pg mkdir -p "$SOCK"

psql_() { "$BINDIR/psql" -h "$SOCK" -p 5432 -U postgres -d postgres -AtX -v ON_ERROR_STOP=1 "$@"; }
stop_server() { as_pg "$BINDIR/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null 2>&1 || true; }
trap stop_server EXIT

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
as_pg "$BINDIR/pg_ctl" -D "$DATA" -l "$DEMO/pg/server.log" -w start >/dev/null

step "2. Write some data and switch WAL segments three times"
psql_ -c "CREATE TABLE orders (id int PRIMARY KEY, item text, placed_at timestamptz DEFAULT now())" >/dev/null
last=""
for batch in 1 2 3; do
    psql_ -c "INSERT INTO orders (id, item) SELECT g, 'item ' || g FROM generate_series(($batch - 1) * 20000 + 1, $batch * 20000) g" >/dev/null
    last=$(psql_ -c "SELECT pg_walfile_name(pg_switch_wal() - 1)")
    echo "batch $batch: 20000 orders, segment $last completed"
done

step "3. Wait for PostgreSQL's archiver to hand every segment to walvault"
for _ in $(seq 1 300); do
    done_=$(psql_ -c "SELECT coalesce(last_archived_wal, '') >= '$last' FROM pg_stat_archiver")
    [[ $done_ == t ]] && break
    sleep 0.1
done
psql_ -c "SELECT 'archived: ' || archived_count || ', failed: ' || failed_count || ', last: ' || last_archived_wal FROM pg_stat_archiver"

step "4. What is in the repository ($REPO)"
cat "$REPO/walvault.json"; echo
total_in=0; total_out=0
while IFS= read -r f; do
    size=$(stat -c %s "$f")
    total_out=$((total_out + size))
    printf '  %-70s %9d bytes\n' "${f#"$REPO"/}" "$size"
done < <(find "$REPO/wal" -type f | sort)
segments=$(find "$REPO/wal" -name '????????????????????????.zst' | wc -l)
echo "  $segments segments of 16 MiB stored in $((total_out / 1024)) KiB"

step "5. Fetch a segment back, as restore_command would, and compare"
mkdir -p "$DEMO/fetched"
"$WALVAULT" --repo "$REPO" fetch "$last" "$DEMO/fetched/$last"
if [[ -f $DATA/pg_wal/$last ]]; then
    cmp "$DEMO/fetched/$last" "$DATA/pg_wal/$last" && echo "  $last: identical to pg_wal/$last"
fi
sha256sum "$DEMO/fetched/$last" | sed 's/^/  sha256 /'
echo "  a name that is not archived yet exits 1, quietly, as PostgreSQL expects:"
set +e
"$WALVAULT" --repo "$REPO" fetch 00000002.history "$DEMO/fetched/x"; echo "  exit status $?"
set -e

step "Done; the server is stopped. Files are in $DEMO"
