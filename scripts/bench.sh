#!/usr/bin/env bash
# walvault benchmarks, side by side with pgBackRest, on real WAL from a real
# PostgreSQL under pgbench load. Writes docs/benchmarks.md (BENCH_OUT).
#
#   make bench                               # full run: BENCH_SCALE=100 BENCH_RUNS=5
#   BENCH_SCALE=5 BENCH_RUNS=2 scripts/bench.sh   # smoke run, a few minutes
#
# Scenarios (BENCH_SCENARIOS, default "1 2 3 4"):
#   1  push / fetch of one 16 MiB segment: walvault vs pgbackrest archive-push/get vs cp+sync
#   2  drain of ~200 .ready segments through PostgreSQL's archiver under pgbench load:
#      walvault push --push-ahead vs pgBackRest archive-async
#   3  recovery replaying ~200 segments from S3 (s3s-fs) behind 20 ms of round trip:
#      walvault fetch with prefetch vs without
#   4  backup and restore of a pgbench database (scale BENCH_SCALE): walvault vs pgBackRest
#
# Knobs: BENCH_SCALE (100), BENCH_RUNS (5), BENCH_RUNS4 (min(BENCH_RUNS,3): runs
# for scenario 4), BENCH_DRAIN_SEGS (200), BENCH_SEGSIZE_SMALL (1: MiB per WAL
# segment in scenarios 2 and 3), BENCH_PUSH_AHEAD (16), BENCH_PREFETCH (64),
# BENCH_LATENCY_MS (20: round trip added in scenario 3), BENCH_OUT
# (docs/benchmarks.md), BENCH_KEEP=1 (keep the scratch dir),
# BENCH_FORCE_MISSING=1 (run scenarios 2/3 even when walvault lacks
# --push-ahead/--prefetch, to test this script; their rows say so).
#
# Everything runs in a scratch dir under /tmp owned by the postgres OS user
# (initdb and postgres refuse root), servers listen on unix sockets or
# 127.0.0.1 only, and every server and load generator started here is stopped
# on exit. Missing tools (pgbackrest, GNU time) are installed with apt-get.
set -eEuo pipefail
trap 'say "error: line $LINENO: $BASH_COMMAND failed"' ERR
cd "$(dirname "$0")/.."
ROOT=$PWD
export LC_ALL=C

SCALE=${BENCH_SCALE:-100}
RUNS=${BENCH_RUNS:-5}
RUNS4=${BENCH_RUNS4:-$((RUNS < 3 ? RUNS : 3))}
DRAIN_SEGS=${BENCH_DRAIN_SEGS:-200}
SMALL_SEG=${BENCH_SEGSIZE_SMALL:-1}
PUSH_AHEAD=${BENCH_PUSH_AHEAD:-16}  # walvault's default
PREFETCH=${BENCH_PREFETCH:-64}  # walvault's default for 1 MiB segments (256 MiB of spool)
LATENCY_MS=${BENCH_LATENCY_MS:-20}
OUT=${BENCH_OUT:-$ROOT/docs/benchmarks.md}
SCENARIOS=${BENCH_SCENARIOS:-1 2 3 4}
FORCE_MISSING=${BENCH_FORCE_MISSING:-0}
STEP_TIMEOUT=${BENCH_STEP_TIMEOUT:-600}   # seconds any one wait may take
S3S_FS=${S3S_FS:-$ROOT/.tools/bin/s3s-fs}
(( RUNS >= 1 && RUNS4 >= 1 && SCALE >= 1 )) || { echo "bench: BENCH_RUNS, BENCH_RUNS4 and BENCH_SCALE must be >= 1" >&2; exit 2; }

say() { printf '[bench %4ss] %s\n' "$SECONDS" "$*" >&2; }
die() {
    say "error: $*"
    [[ -n ${CUR_SCEN:-} ]] && echo "failed: $*" >"$T/res/s$CUR_SCEN.status"
    exit 1
}
is_root() { [[ $(id -u) -eq 0 ]]; }
as_pg() { if is_root; then runuser -u postgres -- "$@"; else "$@"; fi; }

# ---------------------------------------------------------------- tools
ensure_tools() {
    local missing=()
    command -v pg_config >/dev/null && [[ -x $(pg_config --bindir)/initdb ]] || missing+=(postgresql)
    command -v pgbackrest >/dev/null || missing+=(pgbackrest)
    [[ -x /usr/bin/time ]] || missing+=(time)
    command -v python3 >/dev/null || missing+=(python3)
    if ((${#missing[@]})); then
        is_root && command -v apt-get >/dev/null || die "missing: ${missing[*]} (install them, or run as root with apt-get)"
        say "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    if is_root && ! id postgres >/dev/null 2>&1; then
        useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
    fi
    [[ -x target/release/walvault ]] || die "target/release/walvault missing: run 'cargo build --release' (make bench does)"
}
ensure_tools
BINDIR=$(pg_config --bindir)
PGBENCH=$BINDIR/pgbench
PSQL=$BINDIR/psql

# ---------------------------------------------------------------- scratch dir and cleanup
T=$(mktemp -d /tmp/walvault-bench.XXXXXX)
is_root && chown postgres: "$T"
chmod 755 "$T"
as_pg mkdir -p "$T/bin" "$T/res" "$T/logs" "$T/pgbr/log" "$T/pgbr/lock" "$T/pgbr/spool" "$T/work"
touch "$T/servers" "$T/pids"
cp target/release/walvault "$T/bin/walvault"
# What is measured is this copy: describe it now, as the build may change meanwhile.
WV_BUILT=$(date -u -r target/release/walvault '+%Y-%m-%d %H:%M UTC')
WV_SHA=$(sha256sum "$T/bin/walvault" | cut -c1-12)
WV_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo "?")
git diff --quiet HEAD -- src Cargo.toml 2>/dev/null || WV_COMMIT="$WV_COMMIT + uncommitted changes in src/"
WV_STALE=""
if [[ -n $(find src -newer target/release/walvault -type f 2>/dev/null | head -1) ]]; then
    WV_STALE=" **The binary is older than files in src/: it does not measure the working tree.**"
fi
is_root && chown postgres: "$T/bin/walvault"
WV=$T/bin/walvault
NETNS=""

cleanup() {
    local rc=$? d p
    trap - EXIT INT TERM
    while read -r p; do [[ -n $p ]] && kill "$p" 2>/dev/null || true; done <"$T/pids"
    while read -r d; do
        [[ -n $d && -f $d/postmaster.pid ]] && as_pg "$BINDIR/pg_ctl" -D "$d" -m immediate -w stop >/dev/null 2>&1 || true
    done <"$T/servers"
    while read -r p; do [[ -n $p ]] && kill -9 "$p" 2>/dev/null || true; done <"$T/pids"
    [[ -n $NETNS ]] && ip netns del "$NETNS" 2>/dev/null || true
    if [[ ${BENCH_KEEP:-0} == 1 ]]; then
        say "scratch dir kept: $T"
    else
        # pgBackRest's async archiver may still be finishing its log: retry.
        for _ in 1 2 3 4 5 6 7 8 9 10; do rm -rf "$T" 2>/dev/null && break; sleep 1; done
        [[ -e $T ]] && say "could not remove $T"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# timeit OUTFILE DIR [VAR=VALUE...] CMD...: run CMD in DIR as the postgres
# user, with those variables set before the clock starts; append
# "<wall seconds> <peak RSS KiB> <exit status>" to OUTFILE; output to OUTFILE.log.
# Wall time is taken inside the postgres user's shell, so runuser is not in it.
cat >"$T/bin/timeit" <<'EOF'
#!/usr/bin/env bash
out=$1 dir=$2; shift 2
while [[ $1 == [A-Z]*=* ]]; do export "$1"; shift; done
cd "$dir" || exit 99
rss=$(mktemp)
s=$EPOCHREALTIME
/usr/bin/time -f %M -o "$rss" "$@" >>"$out.log" 2>&1
rc=$?
e=$EPOCHREALTIME
echo "$(awk -v s="$s" -v e="$e" 'BEGIN { printf "%.4f", e - s }') $(tail -n1 "$rss") $rc" >>"$out"
rm -f "$rss"
exit $rc
EOF
# cp+sync: the floor for a durable local copy (file and directory fsynced).
cat >"$T/bin/cpsync" <<'EOF'
#!/bin/sh
cp "$1" "$2" && sync "$2" "$(dirname "$2")"
EOF
chmod 755 "$T/bin/timeit" "$T/bin/cpsync"
timeit() { as_pg "$T/bin/timeit" "$@"; }

# ---------------------------------------------------------------- PostgreSQL clusters
# Each cluster NAME lives in $T/NAME/{data,sock}, on port 5432 of its own socket dir.
pg_init() {   # NAME SEGSIZE_MB [extra conf lines]
    local name=$1 seg=$2 extra=${3:-}
    as_pg mkdir -p "$T/$name/sock"
    as_pg "$BINDIR/initdb" -A trust -U postgres --no-sync -E UTF8 --locale=C \
        --wal-segsize="$seg" -D "$T/$name/data" >"$T/logs/initdb-$name.log"
    as_pg tee -a "$T/$name/data/postgresql.conf" >/dev/null <<CONF
listen_addresses = ''
unix_socket_directories = '$T/$name/sock'
port = 5432
fsync = off
max_wal_size = 2GB
archive_mode = on
archive_command = ''
$extra
CONF
}
pg_start() {  # NAME [env assignments...]
    local name=$1; shift
    echo "$T/$name/data" >>"$T/servers"
    as_pg_ns env "$@" "$BINDIR/pg_ctl" -D "$T/$name/data" -l "$T/logs/server-$name.log" -w -t 300 start >/dev/null
}
pg_stop() { as_pg "$BINDIR/pg_ctl" -D "$T/$1/data" -m fast -w -t 300 stop >/dev/null; }
sql() { local name=$1; shift; "$PSQL" -h "$T/$name/sock" -p 5432 -U postgres -d postgres -AtqX -v ON_ERROR_STOP=1 "$@"; }
set_archive_command() {  # NAME COMMAND: takes effect at once (reload)
    local q=${2//\'/\'\'}
    sql "$1" -c "ALTER SYSTEM SET archive_command = '$q'" -c "SELECT pg_reload_conf()" >/dev/null
}
ready_count() { find "$T/$1/data/pg_wal/archive_status" -name '*.ready' | wc -l; }
# Waits until everything up to the current segment is archived.
switch_and_wait_archived() {
    local name=$1 last i
    last=$(sql "$name" -c "SELECT pg_walfile_name(pg_switch_wal())")
    for ((i = 0; i < STEP_TIMEOUT * 10; i++)); do
        [[ $(sql "$name" -c "SELECT coalesce(last_archived_wal, '') >= '$last' FROM pg_stat_archiver") == t ]] && return 0
        sleep 0.1
    done
    die "$name: $last not archived after ${STEP_TIMEOUT}s"
}
pgbench_() { local name=$1; shift; "$PGBENCH" -h "$T/$name/sock" -p 5432 -U postgres "$@" postgres; }
# Real WAL, quickly: pgbench re-initialisations (COPY, index builds, vacuum) and
# short pgbench runs, until NAME has written COUNT more segments than at LSN0.
gen_wal_segments() {  # NAME LSN0 COUNT SEGBYTES
    local name=$1 lsn0=$2 count=$3 segbytes=$4 done_=0 n
    while :; do
        n=$(sql "$name" -c "SELECT floor(pg_wal_lsn_diff(pg_current_wal_lsn(), '$lsn0') / $segbytes)::int")
        ((n >= count)) && break
        if ((count - n > 40)); then
            pgbench_ "$name" -i -s 2 -q >>"$T/logs/pgbench-$name.log" 2>&1
        else
            pgbench_ "$name" -n -c 2 -j 2 -T 1 >>"$T/logs/pgbench-$name.log" 2>&1
        fi
        ((++done_ < 1000)) || die "$name: WAL generation does not progress"
    done
}

# ---------------------------------------------------------------- pgBackRest
PGBR_CONF=$T/pgbr/pgbackrest.conf
write_pgbr_conf() {
    as_pg tee "$PGBR_CONF" >/dev/null <<CONF
[global]
repo1-path=$T/pgbr/unused-repo
repo1-retention-full=9999
compress-type=zst
compress-level=3
process-max=2
start-fast=y
log-path=$T/pgbr/log
lock-path=$T/pgbr/lock
spool-path=$T/pgbr/spool

[bench]
pg1-path=$T/src/data
pg1-socket-path=$T/src/sock
pg1-port=5432

[drain]
pg1-path=$T/drain/data
pg1-socket-path=$T/drain/sock
pg1-port=5432
archive-async=y
CONF
}
pgbr() { as_pg pgbackrest --config="$PGBR_CONF" "$@"; }

# ---------------------------------------------------------------- results
# Files in $T/res: <key> holds timeit lines or plain numbers; <scenario>.status
# holds "ok", "not run: ..." or "failed: ...".
res() { echo "$2" >>"$T/res/$1"; }
status() { echo "$2" >"$T/res/s$1.status"; }
median() {  # FILE [COLUMN]: median of a column (default 1), empty if no data
    [[ -s $1 ]] || return 0
    awk -v c="${2:-1}" '{ print $c }' "$1" | sort -g | awk '{ v[NR] = $1 } END {
        if (NR == 0) exit; if (NR % 2) printf "%.6g\n", v[(NR + 1) / 2]; else printf "%.6g\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
values() { [[ -s $1 ]] && awk -v c="${2:-1}" '{ printf "%s%s", (NR > 1 ? ", " : ""), $c }' "$1" || true; }
sum_sizes() { find "$@" -type f -printf '%s\n' 2>/dev/null | awk '{ s += $1 } END { print s + 0 }'; }
have_flag() { "$WV" "$1" --help 2>/dev/null | grep -q -- "$2"; }

# ---------------------------------------------------------------- the source cluster (scenarios 1 and 4)
prepare_source() {
    say "source cluster: initdb (16 MiB segments), pgbench -i -s 10, pgbench -T 20, WAL copied out by archive_command"
    as_pg mkdir -p "$T/stage"
    pg_init src 16
    pg_start src
    set_archive_command src "cp %p $T/stage/%f"
    pgbench_ src -i -s 10 -q >"$T/logs/pgbench-src.log" 2>&1
    pgbench_ src -c 2 -j 2 -T 20 >>"$T/logs/pgbench-src.log" 2>&1
    switch_and_wait_archived src
    # Enough completed segments for one per run, the last (switched, mostly empty) left out.
    while (($(find "$T/stage" -name '????????????????????????' | wc -l) < RUNS + 2)); do
        pgbench_ src -c 2 -j 2 -T 10 >>"$T/logs/pgbench-src.log" 2>&1
        switch_and_wait_archived src
    done
    set_archive_command src "/bin/true"
    status src ok
}

# ================================================================ scenario 1
scenario_1() {
    local dir=$T/s1 wvrepo=$T/s1/wv pgbrrepo=$T/s1/pgbr segs i seg tool
    as_pg mkdir -p "$dir/cp" "$dir/fetch"
    pgbr --stanza=bench --repo1-path="$pgbrrepo" stanza-create >"$T/logs/s1-stanza.log" 2>&1
    mapfile -t segs < <(find "$T/stage" -name '????????????????????????' -printf '%f\n' | sort | head -n -1 | tail -n "$((RUNS + 1))")
    # The first, untimed, sets both repositories up (walvault.json, pgBackRest's
    # archive directories), so no timed push pays for that.
    as_pg env WALVAULT_PUSH_AHEAD=0 "$WV" --repo "$wvrepo" push "$T/stage/${segs[0]}" "${segs[0]}" >"$T/logs/s1-setup.log" 2>&1
    pgbr --stanza=bench --repo1-path="$pgbrrepo" archive-push "$T/stage/${segs[0]}" >>"$T/logs/s1-setup.log" 2>&1
    segs=("${segs[@]:1}")
    say "scenario 1: push/fetch of one 16 MiB segment, $RUNS runs (segments ${segs[0]}..${segs[-1]})"
    for ((i = 0; i < RUNS; i++)); do
        seg=${segs[i]}
        cat "$T/stage/$seg" >/dev/null   # the same warm page cache for every tool
        # Each run pushes a segment its repository does not hold yet; the tools
        # take turns going first.
        for tool in $( ((i % 2)) && echo "pgbr cp wv" || echo "wv pgbr cp"); do
            case $tool in
            wv) timeit "$T/res/s1_wv_push" "$T/work" WALVAULT_PUSH_AHEAD=0 "$WV" --repo "$wvrepo" push "$T/stage/$seg" "$seg" ;;
            pgbr) timeit "$T/res/s1_pgbr_push" "$T/work" pgbackrest --config="$PGBR_CONF" --stanza=bench --repo1-path="$pgbrrepo" archive-push "$T/stage/$seg" ;;
            cp) timeit "$T/res/s1_cp_push" "$T/work" "$T/bin/cpsync" "$T/stage/$seg" "$dir/cp/$seg" ;;
            esac
        done
    done
    for ((i = 0; i < RUNS; i++)); do
        seg=${segs[i]}
        for tool in $( ((i % 2)) && echo "pgbr dd wv" || echo "wv pgbr dd"); do
            case $tool in
            wv) timeit "$T/res/s1_wv_fetch" "$T/work" WALVAULT_PREFETCH=0 "$WV" --repo "$wvrepo" fetch "$seg" "$dir/fetch/wv-$seg" ;;
            pgbr) timeit "$T/res/s1_pgbr_fetch" "$T/work" pgbackrest --config="$PGBR_CONF" --stanza=bench --repo1-path="$pgbrrepo" archive-get "$seg" "$dir/fetch/pgbr-$seg" ;;
            # The floor: only writing the segment's bytes into a new file.
            dd) timeit "$T/res/s1_dd_write" "$T/work" dd if="$T/stage/$seg" of="$dir/fetch/dd-$seg" bs=1M status=none ;;
            esac
        done
        cmp "$T/stage/$seg" "$dir/fetch/wv-$seg" || die "walvault fetch of $seg differs from the original"
        cmp "$T/stage/$seg" "$dir/fetch/pgbr-$seg" || die "pgbackrest archive-get of $seg differs from the original"
    done
    local orig=0 wvs=0 pgs=0
    for seg in "${segs[@]}"; do
        orig=$((orig + $(stat -c %s "$T/stage/$seg")))
        wvs=$((wvs + $(sum_sizes "$wvrepo/wal" -name "$seg*")))
        pgs=$((pgs + $(sum_sizes "$pgbrrepo/archive" -name "$seg*")))
    done
    ((wvs > 0 && pgs > 0)) || die "stored segments not found (walvault $wvs bytes, pgBackRest $pgs bytes)"
    res s1_wv_ratio "$(awk -v a=$orig -v b=$wvs 'BEGIN { printf "%.6f", a / b }')"
    res s1_pgbr_ratio "$(awk -v a=$orig -v b=$pgs 'BEGIN { printf "%.6f", a / b }')"
    res s1_segs "${segs[0]}..${segs[-1]}"
    status 1 ok
}

# ================================================================ scenario 4
scenario_4() {
    local dir=$T/s4 i tool repo rdir sock=$T/src/sock
    as_pg mkdir -p "$dir"
    say "scenario 4: pgbench -i -s $SCALE (archive_command = /bin/true meanwhile)"
    pgbench_ src -i -s "$SCALE" -q >>"$T/logs/pgbench-src.log" 2>&1
    sql src -c CHECKPOINT
    res s4_dbsize "$(du -sb --exclude=pg_wal "$T/src/data" | cut -f1)"
    say "scenario 4: backup and restore, $RUNS4 runs per tool ($(($(cat "$T/res/s4_dbsize") / 1048576)) MiB data directory)"
    for ((i = 0; i < RUNS4; i++)); do
        for tool in $( ((i % 2)) && echo "pgbr wv" || echo "wv pgbr"); do
            # A fresh repository per run: a second backup into the same walvault
            # repository would store (and so time) almost nothing.
            repo=$dir/$tool-repo-$i rdir=$dir/$tool-restore-$i
            case $tool in
            wv)
                set_archive_command src "$WV --repo $repo push %p %f"
                timeit "$T/res/s4_wv_backup" "$T/work" PGHOST="$sock" PGPORT=5432 PGUSER=postgres "$WV" --repo "$repo" backup --pgdata "$T/src/data"
                res s4_wv_stored "$(sum_sizes "$repo/packs" "$repo/backups")"
                timeit "$T/res/s4_wv_restore" "$T/work" "$WV" --repo "$repo" restore --pgdata "$rdir"
                ;;
            pgbr)
                pgbr --stanza=bench --repo1-path="$repo" stanza-create >>"$T/logs/s4-stanza.log" 2>&1
                set_archive_command src "pgbackrest --config=$PGBR_CONF --stanza=bench --repo1-path=$repo archive-push %p"
                timeit "$T/res/s4_pgbr_backup" "$T/work" pgbackrest --config="$PGBR_CONF" --stanza=bench --repo1-path="$repo" --type=full backup
                res s4_pgbr_stored "$(sum_sizes "$repo/backup")"
                as_pg mkdir -m 700 "$rdir"
                timeit "$T/res/s4_pgbr_restore" "$T/work" pgbackrest --config="$PGBR_CONF" --stanza=bench --repo1-path="$repo" --pg1-path="$rdir" restore
                ;;
            esac
            set_archive_command src "/bin/true"
            # The restored data directory must hold the database: compare sizes.
            res "s4_${tool}_restored" "$(du -sb --exclude=pg_wal "$rdir" | cut -f1)"
            [[ -f $rdir/global/pg_control && -f $rdir/backup_label ]] || die "$tool restore into $rdir lacks pg_control or backup_label"
            rm -rf "$repo" "$rdir"
        done
    done
    status 4 ok
}

# ================================================================ scenario 2
scenario_2() {
    local note=""
    if ! have_flag push --push-ahead; then
        status 2 "not run: feature missing (walvault push --help has no --push-ahead)"
        [[ $FORCE_MISSING == 1 ]] || return 0
        note="feature missing: walvault measured without --push-ahead (BENCH_FORCE_MISSING=1)"
    fi
    local seg=$SMALL_SEG i tool a0 f0 r t0 t1 n f load cmd wvrepo=$T/s2/wv
    as_pg mkdir -p "$T/s2"
    say "scenario 2: cluster with $seg MiB segments, $DRAIN_SEGS ready segments drained per run, $RUNS runs per tool"
    pg_init drain "$seg"
    pg_start drain
    pgbench_ drain -i -s 2 -q >"$T/logs/pgbench-drain.log" 2>&1
    pgbr --stanza=drain --repo1-path="$T/s2/pgbr" stanza-create >"$T/logs/s2-stanza.log" 2>&1
    for ((i = 0; i < RUNS; i++)); do
        for tool in $( ((i % 2)) && echo "pgbr wv" || echo "wv pgbr"); do
            while (($(ready_count drain) < DRAIN_SEGS)); do
                if (($(ready_count drain) < DRAIN_SEGS - 40)); then
                    pgbench_ drain -i -s 2 -q >>"$T/logs/pgbench-drain.log" 2>&1
                else
                    pgbench_ drain -n -c 2 -j 2 -T 1 >>"$T/logs/pgbench-drain.log" 2>&1
                fi
            done
            r=$(ready_count drain)
            IFS='|' read -r a0 f0 < <(sql drain -c "SELECT archived_count, failed_count FROM pg_stat_archiver")
            case $tool in
            wv) if [[ -z $note ]]; then
                    cmd="$WV --repo $wvrepo push --push-ahead $PUSH_AHEAD %p %f"
                else
                    cmd="$WV --repo $wvrepo push %p %f"
                fi ;;
            pgbr) cmd="pgbackrest --config=$PGBR_CONF --stanza=drain --repo1-path=$T/s2/pgbr archive-push %p" ;;
            esac
            # Load while the archiver drains: pgbench keeps writing WAL.
            "$PGBENCH" -h "$T/drain/sock" -p 5432 -U postgres -n -c 2 -j 2 -T "$STEP_TIMEOUT" postgres >>"$T/logs/pgbench-drain-load.log" 2>&1 &
            load=$!
            echo "$load" >>"$T/pids"
            t0=$EPOCHREALTIME
            set_archive_command drain "$cmd"
            while :; do
                IFS='|' read -r n f < <(sql drain -c "SELECT archived_count, failed_count FROM pg_stat_archiver")
                ((n - a0 >= r)) && break
                awk -v s="$t0" -v e="$EPOCHREALTIME" -v m="$STEP_TIMEOUT" 'BEGIN { exit !(e - s > m) }' && die "scenario 2: $tool drained $((n - a0)) of $r segments in ${STEP_TIMEOUT}s"
                sleep 0.05
            done
            t1=$EPOCHREALTIME
            set_archive_command drain ""
            kill "$load" 2>/dev/null || true
            wait "$load" 2>/dev/null || true
            ((f == f0)) || say "scenario 2: $tool: $((f - f0)) failed archive_command runs (see server-drain.log)"
            res "s2_${tool}" "$(awk -v s="$t0" -v e="$t1" -v r="$r" 'BEGIN { printf "%.4f %d %.4f", e - s, r, r / (e - s) }') $((f - f0))"
        done
    done
    res s2_note "$note"
    pg_stop drain
    status 2 ok
}

# ================================================================ scenario 3
S3_DIRECT="" S3_SLOW=""
start_s3() {
    local port pport
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    as_pg mkdir -p "$T/s3/data/bench"
    # Latency the honest way: netem on the loopback of a network namespace of
    # our own, so the host's loopback is untouched. Else a delaying proxy.
    if is_root && command -v ip >/dev/null && command -v tc >/dev/null &&
        ip netns add "wvbench$$" 2>/dev/null; then
        NETNS=wvbench$$
        if ! { ip netns exec "$NETNS" ip link set lo up &&
            ip netns exec "$NETNS" tc qdisc add dev lo root netem delay 0ms 2>/dev/null; }; then
            ip netns del "$NETNS"
            NETNS=""
        fi
    fi
    # Started directly (not through a shell function), so $! is the server itself.
    local s3args=(--host 127.0.0.1 --port "$port" --access-key benchkey --secret-key benchsecret0123456789 "$T/s3/data")
    if [[ -n $NETNS ]]; then
        ip netns exec "$NETNS" "$S3S_FS" "${s3args[@]}" >"$T/logs/s3s-fs.log" 2>&1 &
    else
        "$S3S_FS" "${s3args[@]}" >"$T/logs/s3s-fs.log" 2>&1 &
    fi
    echo $! >>"$T/pids"
    wait_port "$port"
    S3_DIRECT=http://127.0.0.1:$port
    if [[ -n $NETNS ]]; then
        S3_SLOW=$S3_DIRECT
        res s3_latency "netem: tc qdisc netem delay $((LATENCY_MS / 2))ms on lo in network namespace $NETNS (both directions: ${LATENCY_MS} ms round trip)"
    else
        pport=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
        python3 "$T/bin/delayproxy.py" "$pport" "$port" "$(awk -v l="$LATENCY_MS" 'BEGIN { print l / 2000 }')" >"$T/logs/delayproxy.log" 2>&1 &
        echo $! >>"$T/pids"
        wait_port "$pport"
        S3_SLOW=http://127.0.0.1:$pport
        res s3_latency "proxy: netem unavailable here, so a python3 asyncio TCP proxy on 127.0.0.1 delays every chunk $((LATENCY_MS / 2)) ms each way and every new connection one ${LATENCY_MS} ms round trip"
    fi
}
in_ns() { if [[ -n $NETNS ]]; then ip netns exec "$NETNS" "$@"; else "$@"; fi; }
as_pg_ns() { if [[ -n $NETNS ]]; then ip netns exec "$NETNS" runuser -u postgres -- "$@"; else as_pg "$@"; fi; }
wait_port() {
    local i
    for ((i = 0; i < 200; i++)); do
        in_ns python3 -c "import socket, sys; socket.create_connection(('127.0.0.1', $1), 0.2)" 2>/dev/null && return 0
        sleep 0.1
    done
    die "nothing listens on 127.0.0.1:$1"
}
s3env() { echo AWS_ACCESS_KEY_ID=benchkey AWS_SECRET_ACCESS_KEY=benchsecret0123456789 AWS_REGION=us-east-1 AWS_ALLOW_HTTP=true AWS_ENDPOINT_URL="$1"; }
cat >"$T/bin/delayproxy.py" <<'EOF'
# A TCP proxy on 127.0.0.1 that adds latency like netem does on a link: each
# chunk is delivered DELAY seconds after it arrived (in order, pipelined, so
# bandwidth is not limited), in both directions, and a new connection waits
# one round trip first, as a TCP handshake would.
import asyncio, sys, time

LISTEN, UPSTREAM, DELAY = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])

async def pipe(reader, writer):
    queue = asyncio.Queue()

    async def receive():
        while True:
            data = await reader.read(65536)
            await queue.put((time.monotonic() + DELAY, data))
            if not data:
                return

    async def send():
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    await asyncio.gather(receive(), send())

async def handle(client_reader, client_writer):
    try:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", UPSTREAM)
    except OSError:
        client_writer.close()
        return
    await asyncio.sleep(2 * DELAY)
    try:
        await asyncio.gather(pipe(client_reader, up_writer), pipe(up_reader, client_writer))
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        client_writer.close()
        up_writer.close()

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", LISTEN)
    async with server:
        await server.serve_forever()

asyncio.run(main())
EOF

scenario_3() {
    local note=""
    if ! have_flag fetch --prefetch; then
        status 3 "not run: feature missing (walvault fetch --help has no --prefetch)"
        [[ $FORCE_MISSING == 1 ]] || return 0
        note="feature missing: WALVAULT_PREFETCH set but ignored by this walvault (BENCH_FORCE_MISSING=1)"
    fi
    [[ -x $S3S_FS ]] || { status 3 "not run: $S3S_FS missing (make setup builds it)"; return 0; }
    local seg=$SMALL_SEG segbytes=$((SMALL_SEG * 1048576)) repo=s3://bench/wv lsn0 i variant k t0 t1 fetched rdir=$T/replay/data
    say "scenario 3: S3 (s3s-fs) with ${LATENCY_MS} ms round trip, $DRAIN_SEGS segments of $seg MiB replayed, $RUNS runs per variant"
    start_s3
    pg_init s3src "$seg"
    # shellcheck disable=SC2046
    pg_start s3src $(s3env "$S3_DIRECT")
    set_archive_command s3src "$WV --repo $repo push %p %f"
    pgbench_ s3src -i -s 2 -q >"$T/logs/pgbench-s3src.log" 2>&1
    lsn0=$(sql s3src -c "SELECT pg_current_wal_lsn()")
    # shellcheck disable=SC2046
    as_pg_ns env $(s3env "$S3_DIRECT") PGHOST="$T/s3src/sock" PGPORT=5432 PGUSER=postgres \
        "$WV" --repo "$repo" backup --pgdata "$T/s3src/data" >"$T/logs/s3-backup.log" 2>&1
    gen_wal_segments s3src "$lsn0" "$DRAIN_SEGS" "$segbytes"
    switch_and_wait_archived s3src
    pg_stop s3src
    [[ -n $NETNS ]] && ip netns exec "$NETNS" tc qdisc change dev lo root netem delay "$((LATENCY_MS / 2))ms"
    as_pg mkdir -p "$T/replay/sock"
    for ((i = 0; i < RUNS; i++)); do
        for variant in $( ((i % 2)) && echo "off on" || echo "on off"); do
            k=$([[ $variant == on ]] && echo "$PREFETCH" || echo 0)
            rm -rf "$rdir"
            # shellcheck disable=SC2046
            as_pg_ns env $(s3env "$S3_DIRECT") "$WV" --repo "$repo" restore --pgdata "$rdir" >>"$T/logs/s3-restore.log" 2>&1
            rm -f "$T/logs/server-replay.log"
            echo "$rdir" >>"$T/servers"
            t0=$EPOCHREALTIME
            # shellcheck disable=SC2046
            as_pg_ns env $(s3env "$S3_SLOW") WALVAULT_PREFETCH="$k" "$BINDIR/pg_ctl" -D "$rdir" -l "$T/logs/server-replay.log" \
                -o "-c unix_socket_directories=$T/replay/sock -c archive_mode=off -c port=5432" start >/dev/null
            while [[ $("$PSQL" -h "$T/replay/sock" -p 5432 -U postgres -d postgres -AtqX -c "SELECT pg_is_in_recovery()" 2>/dev/null) != f ]]; do
                if [[ ! -f $rdir/postmaster.pid ]] && awk -v s="$t0" -v e="$EPOCHREALTIME" 'BEGIN { exit !(e - s > 5) }'; then
                    tail -5 "$T/logs/server-replay.log" >&2
                    die "scenario 3: the restored server stopped during recovery"
                fi
                awk -v s="$t0" -v e="$EPOCHREALTIME" -v m="$STEP_TIMEOUT" 'BEGIN { exit !(e - s > m) }' && die "scenario 3: recovery not done after ${STEP_TIMEOUT}s"
                sleep 0.05
            done
            t1=$EPOCHREALTIME
            fetched=$(grep -c 'restored log file "[0-9A-F]\{24\}" from archive' "$T/logs/server-replay.log" || true)
            as_pg "$BINDIR/pg_ctl" -D "$rdir" -m immediate -w stop >/dev/null
            cat "$T/logs/server-replay.log" >>"$T/logs/server-replay-all.log"
            res "s3_$variant" "$(awk -v s="$t0" -v e="$t1" 'BEGIN { printf "%.4f", e - s }') $fetched"
        done
    done
    rm -rf "$rdir"
    res s3_note "$note"
    status 3 ok
}

# ================================================================ the report
fmt() { [[ -n ${1:-} ]] && awk -v v="$1" -v d="${2:-3}" 'BEGIN { printf "%.*f", d, v }' || printf '–'; }
mb() { [[ -n ${1:-} ]] && awk -v v="$1" 'BEGIN { printf "%.1f MB (%.1f MiB)", v * 1024 / 1e6, v / 1024 }' || printf '–'; }
ratio() { [[ -n ${1:-} && -n ${2:-} ]] && awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b }' || true; }
rawratio() { [[ -n ${1:-} && -n ${2:-} ]] && awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.9g", a / b }' || true; }
# An RSS target "N MB" is judged in 10^6 bytes; when only N MiB would meet it, say so.
rss_verdict() {  # KIB OP MB
    local dec bin
    [[ -n ${1:-} ]] || { printf 'n/a'; return; }
    dec=$(verdict "$(awk -v v="$1" 'BEGIN { print v * 1024 / 1e6 }')" "$2" "$3")
    bin=$(verdict "$(awk -v v="$1" 'BEGIN { print v / 1024 }')" "$2" "$3")
    if [[ $dec == MISSED && $bin == MET ]]; then printf 'MISSED (MET if read as %s MiB)' "$3"; else printf '%s' "$dec"; fi
}
verdict() {  # VALUE OP LIMIT
    [[ -n ${1:-} ]] || { printf 'n/a'; return; }
    awk -v v="$1" -v l="$3" -v op="$2" 'BEGIN { ok = (op == "<=") ? v <= l : (op == "<") ? v < l : (op == ">=") ? v >= l : v > l; printf ok ? "MET" : "MISSED" }'
}
st() { cat "$T/res/s$1.status" 2>/dev/null || echo "not run: not selected (BENCH_SCENARIOS)"; }

report() {
    local R=$T/res cpu mem disk dev fs rota wvver
    cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
    mem=$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
    dev=$(df --output=source /tmp | tail -1)
    fs=$(df --output=fstype /tmp | tail -1)
    rota=$(cat "/sys/block/$(basename "$dev")/queue/rotational" 2>/dev/null || echo "?")
    disk="$dev ($fs, $(df -h --output=size /tmp | tail -1 | tr -d ' '), $(case $rota in 0) echo "non-rotational" ;; 1) echo "rotational" ;; *) echo "rotational: unknown" ;; esac) as the kernel reports it); /tmp holds every repository"
    wvver=$("$WV" --version)
    local small="" forced=""
    [[ $FORCE_MISSING == 1 ]] && forced=" BENCH_FORCE_MISSING=1"
    if ((SCALE != 100 || RUNS < 5)) || [[ $FORCE_MISSING == 1 || $SCENARIOS != "1 2 3 4" ]]; then
        small="> **Smoke run, not the benchmark.** Settings: BENCH_SCALE=$SCALE BENCH_RUNS=$RUNS BENCH_SCENARIOS=\"$SCENARIOS\"$forced (a full run is \`make bench\`: scale 100, 5 runs). These numbers only prove the script works end to end; do not quote them."
    fi

    # scenario 1
    local s1 wp pp cp wr pr cr wf pf df wfr pfr wc pc
    s1=$(st 1)
    wp=$(median $R/s1_wv_push) pp=$(median $R/s1_pgbr_push) cp=$(median $R/s1_cp_push)
    wr=$(median $R/s1_wv_push 2) pr=$(median $R/s1_pgbr_push 2) cr=$(median $R/s1_cp_push 2)
    wf=$(median $R/s1_wv_fetch) pf=$(median $R/s1_pgbr_fetch) df=$(median $R/s1_dd_write)
    wfr=$(median $R/s1_wv_fetch 2) pfr=$(median $R/s1_pgbr_fetch 2)
    wc=$(median $R/s1_wv_ratio) pc=$(median $R/s1_pgbr_ratio)
    # scenario 2
    local s2 w2 p2 w2t p2t
    s2=$(st 2)
    w2=$(median $R/s2_wv 3) p2=$(median $R/s2_pgbr 3) w2t=$(median $R/s2_wv 1) p2t=$(median $R/s2_pgbr 1)
    # scenario 3
    local s3 on off on_n off_n
    s3=$(st 3)
    on=$(median $R/s3_on) off=$(median $R/s3_off) on_n=$(median $R/s3_on 2) off_n=$(median $R/s3_off 2)
    # scenario 4
    local s4 wb pb wbr pbr wrs prs wrsr prsr wst pst
    s4=$(st 4)
    wb=$(median $R/s4_wv_backup) pb=$(median $R/s4_pgbr_backup) wbr=$(median $R/s4_wv_backup 2) pbr=$(median $R/s4_pgbr_backup 2)
    wrs=$(median $R/s4_wv_restore) prs=$(median $R/s4_pgbr_restore) wrsr=$(median $R/s4_wv_restore 2) prsr=$(median $R/s4_pgbr_restore 2)
    wst=$(median $R/s4_wv_stored) pst=$(median $R/s4_pgbr_stored)
    local dbsize
    dbsize=$(awk -v b="$(cat $R/s4_dbsize 2>/dev/null || echo 0)" 'BEGIN { printf "%.2f GB", b / 1e9 }')

    # row SCEN STATUS LABEL METRIC WV PGBR BASE RATIO TARGET VERDICT
    row() {
        if [[ $2 == ok ]]; then
            printf '| %s | %s | %s | %s | %s | %s | %s | %s | **%s** |\n' "$1" "$3" "$4" "$5" "$6" "$7" "$8" "$9" "${10}"
        else
            printf '| %s | %s | %s | %s | – | – | – | %s | %s |\n' "$1" "$3" "$4" "$2" "$9" "$(echo "$2" | cut -d: -f1)"
        fi
    }
    {
        echo "# walvault benchmarks"
        echo
        [[ -n $small ]] && { echo "$small"; echo; }
        echo "Written by \`scripts/bench.sh\` ($(date -u '+%Y-%m-%d %H:%M UTC'), ${ELAPSED}s in all). Medians of the runs listed; every ratio compares numbers from this same run. Rerun with \`make bench\`, or \`BENCH_SCALE=$SCALE BENCH_RUNS=$RUNS scripts/bench.sh\` for these settings."
        echo
        echo "## Machine"
        echo
        echo "| | |"
        echo "|---|---|"
        echo "| CPU | $cpu, $(nproc) cores (nproc) |"
        echo "| memory | $mem |"
        echo "| disk | $disk |"
        echo "| kernel | $(uname -sr) |"
        echo "| load at start | $LOAD_START (1, 5, 15 min; other jobs may share this machine) |"
        echo "| PostgreSQL | $("$BINDIR/postgres" --version | sed 's/^postgres (PostgreSQL) //') |"
        echo "| pgBackRest | $(pgbackrest version | sed 's/^pgBackRest //') |"
        echo "| walvault | $wvver, checkout at commit $WV_COMMIT when the run started; binary built $WV_BUILT, sha256 $WV_SHA….$WV_STALE |"
        echo
        echo "## Results"
        echo
        echo "walvault / pgBackRest ratios are walvault's number divided by pgBackRest's; \"× faster\" is the other way round. Peak RSS is the largest single process (getrusage ru_maxrss via \`/usr/bin/time\`); pgBackRest's worker processes are not added up. MB = 10^6 bytes."
        echo
        echo "| # | scenario | metric | walvault | pgBackRest | baseline | ratio | target | verdict |"
        echo "|---|---|---|---|---|---|---|---|---|"
        row 1 "$s1" "push one 16 MiB segment" "wall time" "$(fmt "$wp") s" "$(fmt "$pp") s" "$(fmt "$cp") s (cp+sync)" "$(ratio "$wp" "$pp")× pgBackRest" "≤ 0.5× pgBackRest" "$(verdict "$(rawratio "$wp" "$pp")" "<=" 0.5)"
        row 1 "$s1" "push one 16 MiB segment" "peak RSS" "$(mb "$wr")" "$(mb "$pr")" "$(mb "$cr") (cp+sync)" "" "≤ 20 MB" "$(rss_verdict "$wr" "<=" 20)"
        row 1 "$s1" "push one 16 MiB segment" "compression ratio (original / stored bytes)" "$(fmt "$wc" 4)" "$(fmt "$pc" 4)" "1.0000" "$(awk -v a="$wc" -v b="$pc" 'BEGIN { if (a != "" && b > 0) printf "%.4f", a / b }')× pgBackRest" "≥ pgBackRest's" "$(verdict "$(rawratio "$wc" "$pc")" ">=" 1)"
        row 1 "$s1" "fetch one 16 MiB segment" "wall time" "$(fmt "$wf") s" "$(fmt "$pf") s" "$(fmt "$df") s (dd into a new file)" "$(ratio "$wf" "$pf")× pgBackRest" "≤ 0.7× pgBackRest" "$(verdict "$(rawratio "$wf" "$pf")" "<=" 0.7)"
        row 1 "$s1" "fetch one 16 MiB segment" "peak RSS" "$(mb "$wfr")" "$(mb "$pfr")" "" "" "(none)" "–"
        row 2 "$s2" "drain $DRAIN_SEGS ready segments of $SMALL_SEG MiB under pgbench load" "segments/s" "$(fmt "$w2" 1) (push-ahead $PUSH_AHEAD)" "$(fmt "$p2" 1) (async, process-max 2)" "" "$(ratio "$w2" "$p2")× pgBackRest" "≥ 2× pgBackRest async" "$(verdict "$(rawratio "$w2" "$p2")" ">=" 2)"
        row 2 "$s2" "drain $DRAIN_SEGS ready segments of $SMALL_SEG MiB under pgbench load" "time to drain" "$(fmt "$w2t" 2) s" "$(fmt "$p2t" 2) s" "" "" "" "–"
        row 3 "$s3" "recovery replaying ~$DRAIN_SEGS segments of $SMALL_SEG MiB from S3, ${LATENCY_MS} ms RTT" "recovery time" "$(fmt "$on" 2) s (prefetch $PREFETCH)" "–" "$(fmt "$off" 2) s (prefetch 0)" "$(ratio "$off" "$on")× faster" "≥ 3× faster than without prefetch" "$(verdict "$(rawratio "$off" "$on")" ">=" 3)"
        row 4 "$s4" "backup, pgbench scale $SCALE ($dbsize)" "wall time" "$(fmt "$wb" 2) s" "$(fmt "$pb" 2) s" "" "$(ratio "$pb" "$wb")× faster" "≥ 1.5× faster" "$(verdict "$(rawratio "$pb" "$wb")" ">=" 1.5)"
        row 4 "$s4" "backup, pgbench scale $SCALE ($dbsize)" "peak RSS" "$(mb "$wbr")" "$(mb "$pbr")" "" "" "< 200 MB" "$(rss_verdict "$wbr" "<" 200)"
        row 4 "$s4" "backup, pgbench scale $SCALE ($dbsize)" "stored size" "$(awk -v v="$wst" 'BEGIN { printf "%.1f MB", v / 1e6 }')" "$(awk -v v="$pst" 'BEGIN { printf "%.1f MB", v / 1e6 }')" "" "$(ratio "$wst" "$pst")× pgBackRest" "(none)" "–"
        row 4 "$s4" "restore of that backup" "wall time" "$(fmt "$wrs" 2) s" "$(fmt "$prs" 2) s" "" "$(ratio "$prs" "$wrs")× faster" "≥ 1.5× faster" "$(verdict "$(rawratio "$prs" "$wrs")" ">=" 1.5)"
        row 4 "$s4" "restore of that backup" "peak RSS" "$(mb "$wrsr")" "$(mb "$prsr")" "" "" "< 200 MB" "$(rss_verdict "$wrsr" "<" 200)"
        echo
        echo "## What each scenario does (\$T is the scratch dir, /tmp/walvault-bench.XXXXXX, owned by the postgres OS user; every command runs as postgres)"
        echo
        echo "Setup: \`initdb -A trust -U postgres --no-sync -E UTF8 --locale=C --wal-segsize=16\`, postgresql.conf: \`listen_addresses = ''\` (unix socket only), \`fsync = off\`, \`max_wal_size = 2GB\`, \`archive_mode = on\`. pgBackRest config: \`[global] compress-type=zst compress-level=3 process-max=2 start-fast=y repo1-retention-full=9999\`, log, lock and spool paths in \$T (file log level left at its default, info); the stanza's \`pg1-path\` and \`pg1-socket-path\` are the cluster's. Wall time and peak RSS come from \`\$T/bin/timeit\`: \`EPOCHREALTIME\` around \`/usr/bin/time -f %M CMD\`, inside the postgres user's shell."
        echo
        echo "1. **push/fetch.** Real WAL: archive_command \`cp %p \$T/stage/%f\` while \`pgbench -i -s 10\` and \`pgbench -c 2 -j 2 -T 20\` run; the last $RUNS completed segments but one ($(cat $R/s1_segs 2>/dev/null)) are used, one per run, so every push stores a segment its repository does not hold yet. Per run, page cache warmed with \`cat\`, tools taking turns going first:"
        echo "   - \`WALVAULT_PUSH_AHEAD=0 walvault --repo \$T/s1/wv push \$T/stage/SEG SEG\`"
        echo "   - \`pgbackrest --config=\$T/pgbr/pgbackrest.conf --stanza=bench --repo1-path=\$T/s1/pgbr archive-push \$T/stage/SEG\` (synchronous; stanza made with \`stanza-create\`)"
        echo "   - \`cp \$T/stage/SEG \$T/s1/cp/SEG && sync \$T/s1/cp/SEG \$T/s1/cp\` (the floor: a durable copy, uncompressed)"
        echo "   - fetch: \`WALVAULT_PREFETCH=0 walvault --repo \$T/s1/wv fetch SEG \$T/s1/fetch/wv-SEG\` and \`pgbackrest ... archive-get SEG \$T/s1/fetch/pgbr-SEG\`; both outputs compared with \`cmp\` to the original. The floor, taking turns with them: \`dd if=\$T/stage/SEG of=\$T/s1/fetch/dd-SEG bs=1M\`, only writing the segment into a new file. In a VM whose host takes back freed guest memory, fresh page cache is slow on first touch: this floor then rises from a few ms to tens of ms, for every tool alike, and shows which state the run met."
        echo "   - compression ratio: original bytes over the stored files' bytes, summed over the segments pushed."
        echo "2. **drain.** A cluster with $SMALL_SEG MiB segments (\`initdb --wal-segsize=$SMALL_SEG\`: 200 segments of 16 MiB per run and tool would take too long for the time budget), \`archive_command = ''\` (PostgreSQL keeps marking segments .ready and archives nothing) while \`pgbench -i -s 2\` and \`pgbench -T 1\` write WAL until $DRAIN_SEGS or more .ready files are in pg_wal/archive_status. Then \`pgbench -n -c 2 -j 2\` starts as load, the clock starts, \`ALTER SYSTEM SET archive_command\` + \`pg_reload_conf()\`, and the clock stops when \`pg_stat_archiver.archived_count\` has grown by the number of .ready files. Then \`archive_command = ''\` again and the load stops. Commands: \`walvault --repo \$T/s2/wv push --push-ahead $PUSH_AHEAD %p %f\`; \`pgbackrest --config=... --stanza=drain --repo1-path=\$T/s2/pgbr archive-push %p\` with \`archive-async=y\`, \`process-max=2\`, \`spool-path=\$T/pgbr/spool\`. Runs take turns going first."
        echo "3. **replay from S3.** s3s-fs (\`s3s-fs --host 127.0.0.1 --port P --access-key K --secret-key S \$T/s3/data\`, bucket \`bench\`); a cluster with $SMALL_SEG MiB segments archives with \`walvault --repo s3://bench/wv push %p %f\`, \`walvault backup\` takes a base backup, then pgbench writes $DRAIN_SEGS segments more, all archived. Latency: $(cat $R/s3_latency 2>/dev/null || echo "netem in a network namespace, or a delaying proxy where netem is unavailable"). Per run: \`walvault --repo s3://bench/wv restore --pgdata \$T/replay/data\` (not timed, no added latency), then \`pg_ctl start -o '-c archive_mode=off ...'\` with \`AWS_ENDPOINT_URL\` at the slow endpoint and \`WALVAULT_PREFETCH=$PREFETCH\` or \`WALVAULT_PREFETCH=0\`; the clock runs from \`pg_ctl start\` until \`SELECT pg_is_in_recovery()\` returns false (end of archive reached, promoted). The restore_command is the one \`walvault restore\` writes. Segments restored per run (from the server log, median): $(fmt "$on_n" 0) with prefetch, $(fmt "$off_n" 0) without."
        echo "4. **backup and restore.** \`pgbench -i -s $SCALE\` on the 16 MiB cluster, then $RUNS4 runs per tool$( ((RUNS4 < RUNS)) && echo " (min(BENCH_RUNS, 3) to keep the run within about 20 minutes on 2 cores; BENCH_RUNS4 overrides)"), each into a fresh repository (a second walvault backup into the same repository would deduplicate everything), tools taking turns going first; archive_command points at that run's repository during the run:"
        echo "   - \`PGHOST=\$T/src/sock PGPORT=5432 PGUSER=postgres walvault --repo \$T/s4/wv-repo-N backup --pgdata \$T/src/data\` (default --jobs: the number of cores) then \`walvault --repo \$T/s4/wv-repo-N restore --pgdata \$T/s4/wv-restore-N\`"
        echo "   - \`pgbackrest --config=... --stanza=bench --repo1-path=\$T/s4/pgbr-repo-N --type=full backup\` (stanza-create first, process-max=2, start-fast=y) then \`pgbackrest ... --pg1-path=\$T/s4/pgbr-restore-N restore\`"
        echo "   - stored size: walvault's packs/ and backups/, pgBackRest's backup/ (WAL not counted). Restore times are the restore command alone (files written, recovery configured), not WAL replay. Each restored directory is checked for pg_control and backup_label and its size is recorded."
        echo
        echo "## Every run"
        echo
        echo "| measurement | values (wall s, or as noted) |"
        echo "|---|---|"
        local f
        for f in s1_wv_push s1_pgbr_push s1_cp_push s1_wv_fetch s1_pgbr_fetch s1_dd_write s4_wv_backup s4_pgbr_backup s4_wv_restore s4_pgbr_restore; do
            [[ -s $R/$f ]] && echo "| $f | $(values $R/$f 1) (peak RSS KiB: $(values $R/$f 2)) |"
        done
        [[ -s $R/s1_wv_ratio ]] && echo "| s1 compression ratio | walvault: $(values $R/s1_wv_ratio), pgBackRest: $(values $R/s1_pgbr_ratio) |"
        [[ -s $R/s4_wv_stored ]] && echo "| s4 stored bytes | walvault: $(values $R/s4_wv_stored), pgBackRest: $(values $R/s4_pgbr_stored) |"
        [[ -s $R/s4_wv_restored ]] && echo "| s4 restored data dir bytes (source $(cat $R/s4_dbsize)) | walvault: $(values $R/s4_wv_restored), pgBackRest: $(values $R/s4_pgbr_restored) |"
        for f in s2_wv s2_pgbr; do
            [[ -s $R/$f ]] && echo "| $f | seconds: $(values $R/$f 1); segments: $(values $R/$f 2); segments/s: $(values $R/$f 3); failed archive_command runs: $(values $R/$f 4) |"
        done
        for f in s3_on s3_off; do
            [[ -s $R/$f ]] && echo "| $f | seconds: $(values $R/$f 1); segments restored: $(values $R/$f 2) |"
        done
        local n
        for n in src 1 2 3 4; do
            [[ -s $R/time_$n ]] && echo "| time spent: $( [[ $n == src ]] && echo "source cluster setup" || echo "scenario $n") | $(cat $R/time_$n) s |"
        done
        for n in 2 3; do
            [[ -s $R/s${n}_note && -n $(cat $R/s${n}_note) ]] && echo "| scenario $n note | $(cat $R/s${n}_note) |"
        done
        echo
    } >"$OUT"
}

# ================================================================ main
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
say "scratch dir $T; scenarios: $SCENARIOS; scale $SCALE, $RUNS runs (scenario 4: $RUNS4)"
run_scenario() {
    local n=$1 start=$SECONDS
    status "$n" "failed (see the log above)"
    set +e
    (
        set -eE
        CUR_SCEN=$n
        trap 'echo "failed: \`${BASH_COMMAND//|/\\|}\` (line $LINENO)" >"$T/res/s'"$n"'.status"' ERR
        if [[ $n == src ]]; then prepare_source; else "scenario_$n"; fi
    )
    local rc=$?
    set -e
    res "time_$n" "$((SECONDS - start))"
    if ((rc != 0)); then
        say "scenario $n failed: $(cat "$T/res/s$n.status")"
        for f in "$T"/logs/*; do
            [[ -s $f ]] && { echo "--- $f (tail)" >&2; tail -n 5 "$f" >&2; }
        done
        for f in "$T"/res/*.log; do
            [[ -s $f ]] && { echo "--- $f (tail)" >&2; tail -n 5 "$f" >&2; }
        done
    fi
    return 0
}
write_pgbr_conf
if [[ " $SCENARIOS " == *" 1 "* || " $SCENARIOS " == *" 4 "* ]]; then
    run_scenario src
fi
for n in 1 4 2 3; do
    [[ " $SCENARIOS " == *" $n "* ]] || continue
    if [[ $n == [14] && $(cat "$T/res/ssrc.status") != ok ]]; then
        status "$n" "$(cat "$T/res/ssrc.status") (preparing the source cluster)"
        continue
    fi
    run_scenario "$n"
    # Scenarios 1 and 4 share the source cluster; stop it once both are done.
    if [[ $n == 4 && -f $T/src/data/postmaster.pid ]]; then pg_stop src; fi
done
ELAPSED=$SECONDS
report
say "done in ${ELAPSED}s; wrote $OUT"
cat "$OUT"
