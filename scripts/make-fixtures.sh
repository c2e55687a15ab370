#!/usr/bin/env bash
# Makes fixtures/wal/: one real WAL segment from each supported PostgreSQL
# major version, so unit tests of the segment header and of walscan cover
# every version without starting a server. Each cluster is fresh (1 MiB
# segments, autovacuum off); after a switch to a new segment it runs exactly
# four committed transactions and one rolled back, then switches again: that
# finished segment is the fixture, zstd-compressed, and a JSON file beside it
# says what it holds. Run as root after `make setup`; the output is committed.
set -euo pipefail
cd "$(dirname "$0")/.."
out=fixtures/wal
mkdir -p "$out"

bindir_for() {
    local major=$1 default
    default=$(pg_config --bindir)
    if "$default/postgres" --version | grep -q "PostgreSQL) $major\."; then
        echo "$default"
    else
        echo "$PWD/.tools/pg/$major/bin"
    fi
}

psql_bin=$(pg_config --bindir)/psql
for major in ${MAJORS:-13 14 15 16 17 18}; do
    bin=$(bindir_for "$major")
    work=$(mktemp -d)
    chown postgres "$work"
    as_pg() { runuser -u postgres -- "$@"; }
    as_pg "$bin/initdb" -A trust -U postgres --no-sync -E UTF8 --locale=C \
        --wal-segsize=1 -D "$work/data" >/dev/null
    cat >> "$work/data/postgresql.conf" <<CONF
listen_addresses = ''
unix_socket_directories = '$work'
autovacuum = off
fsync = off
CONF
    as_pg "$bin/pg_ctl" -w -D "$work/data" -l "$work/log" start >/dev/null
    sql() { "$psql_bin" -h "$work" -U postgres -d postgres -AtX -v ON_ERROR_STOP=1 -c "$1"; }
    sql "SELECT pg_switch_wal()" >/dev/null
    before=$(sql "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
    sql "CREATE TABLE t (id int)" >/dev/null
    for batch in 1 2 3; do
        sql "INSERT INTO t SELECT g FROM generate_series(1, 100) g" >/dev/null
    done
    sql "BEGIN; INSERT INTO t VALUES (0); ROLLBACK" >/dev/null
    after=$(sql "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
    segment=$(sql "SELECT pg_walfile_name(pg_switch_wal())")
    sysid=$(sql "SELECT system_identifier FROM pg_control_system()")
    version=$(sql "SHOW server_version_num")
    rm -f "$out/pg$major".*
    zstd -q -19 "$work/data/pg_wal/$segment" -o "$out/pg$major.$segment.zst"
    chown "$(id -u):$(id -g)" "$out/pg$major.$segment.zst"
    chmod 0644 "$out/pg$major.$segment.zst"
    cat > "$out/pg$major.json" <<JSON
{
  "major": $major,
  "server_version_num": $version,
  "segment": "$segment",
  "segment_size": 1048576,
  "system_identifier": "$sysid",
  "transactions": 5,
  "committed": 4,
  "aborted": 1,
  "not_before": "$before",
  "not_after": "$after"
}
JSON
    as_pg "$bin/pg_ctl" -w -D "$work/data" stop -m fast >/dev/null
    [[ -n ${KEEP:-} ]] || rm -rf "$work"
    echo "PostgreSQL $major: $segment"
done
