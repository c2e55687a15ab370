#!/usr/bin/env bash
# The fault suite: walvault under faults against real PostgreSQL (and the
# S3-compatible server on 127.0.0.1), with figures. Writes
# docs/reliability.md (CHAOS_OUT) and exits non-zero when anything was lost.
#
#   make chaos                        # the full suite
#   CHAOS_KILLS=40 CHAOS_COLLIDE_SECONDS=20 CHAOS_FUZZ_CASES=2000 scripts/chaos.sh   # a short run
#
# The scenarios are the ignored tests of tests/chaos.rs, tests/collisions.rs and
# tests/pitr_random.rs (each appends its section to the report), every test of
# tests/disk_full.rs (tmpfs filling up), every test of tests/store_faults.rs
# (a fault-injecting proxy before the S3 server: its FIGURE lines make the
# store section) and the hostile-repository
# property tests of tests/hostile_repository.rs at CHAOS_FUZZ_CASES cases per parser.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${CHAOS_OUT:-docs/reliability.md}
KILLS=${CHAOS_KILLS:-200}
COLLIDE=${CHAOS_COLLIDE_SECONDS:-120}
FUZZ=${CHAOS_FUZZ_CASES:-100000}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git status --porcelain -- src tests 2>/dev/null | head -1)
started=$(date -u '+%Y-%m-%d %H:%M UTC')
status=0

sections=$work/sections.md
: > "$sections"
echo "chaos: scenarios of tests/chaos.rs, tests/collisions.rs and tests/pitr_random.rs (kills: $KILLS, collisions: ${COLLIDE}s)" >&2
for suite in chaos collisions pitr_random; do
    if ! WALVAULT_CHAOS_REPORT=$sections WALVAULT_CHAOS_KILLS=$KILLS WALVAULT_CHAOS_COLLIDE_SECONDS=$COLLIDE \
        cargo test --release --test "$suite" -- --ignored --test-threads 1 >"$work/$suite.log" 2>&1; then
        status=1
        tail -40 "$work/$suite.log" >&2
    fi
done

echo "chaos: store outage and misbehaviour (tests/store_faults.rs)" >&2
if cargo test --release --test store_faults -- --include-ignored --test-threads 1 --nocapture \
    >"$work/store_faults.log" 2>&1; then
    store_verdict="every push failed within 1..125 while the store was down, no segment lost, no damaged body handed over"
else
    store_verdict="FAILED (see the test output)"
    status=1
    tail -40 "$work/store_faults.log" >&2
fi
# --nocapture interleaves the tests' lines: count from the summary, and take
# each FIGURE wherever it starts.
store_tests=$(sed -n 's/^test result: ok\. \([0-9]*\) passed.*/\1/p' "$work/store_faults.log" | head -1)
{
    echo "## 2. Store outage and misbehaviour, S3"
    echo
    echo "A fault-injecting proxy on 127.0.0.1 (tests/common/fault_proxy.rs) before s3s-fs: refused"
    echo "connections, connections reset at accept or mid-body, truncated bodies, 503 SlowDown answers,"
    echo "a store that accepts and never answers, and outages of 5 s and 20 s while segments are pushed"
    echo "the way PostgreSQL's archiver does (the same segment again every second until it is stored)."
    echo "Each test checks the bytes fetched back against the original; ${store_tests:-0} tests passed."
    echo
    echo "| figure (one run) |"
    echo "|---|"
    grep -o 'FIGURE .*' "$work/store_faults.log" | sed 's/^FIGURE /| /; s/$/ |/'
    echo
    echo "Verdict: **$store_verdict**"
    echo
} >> "$sections"

echo "chaos: disk full (tests/disk_full.rs)" >&2
if cargo test --release --test disk_full -- --test-threads 1 >"$work/disk_full.log" 2>&1; then
    disk_verdict="clean failures, nothing half-written visible, everything resumed after space was freed"
else
    disk_verdict="FAILED (see the test output)"
    status=1
    tail -40 "$work/disk_full.log" >&2
fi
disk_tests=$(sed -n 's/^test result: ok\. \([0-9]*\) passed.*/\1/p' "$work/disk_full.log" | head -1)
{
    echo "## 3. Disk full, filesystem"
    echo
    echo "Each place walvault writes, on a small tmpfs that fills up (tests/disk_full.rs):"
    echo
    echo "| place | what is checked |"
    echo "|---|---|"
    echo "| the repository | a push that does not fit fails with status 5 (PostgreSQL retries) and one line on stderr, leaving nothing a fetch would take; once space is freed PostgreSQL's retry succeeds and every pushed segment fetches byte-identical |"
    echo "| the prefetch spool | a full spool never fails a fetch: the segment comes from the repository, byte-identical |"
    echo "| a restore target | restore fails with one line naming the full disk and the directory (\"incomplete, do not start it\"), PostgreSQL refuses to start on it, a second restore into it is refused rather than written over, and a restore to a bigger disk at the same place holds the expected rows |"
    echo "| pg_wal, fetched into | fetch fails naming the full disk, with 205 in archive recovery (PostgreSQL stops rather than ending recovery there) and 5 on a standby (it retries); no partial file at %p and no temporary beside it; once space is freed it delivers |"
    echo
    echo "${disk_tests:-0} of 4 tests passed."
    echo
    echo "Verdict: **$disk_verdict**"
    echo
} >> "$sections"

echo "chaos: hostile repository, $FUZZ cases per parser" >&2
fuzz_started=$(date +%s)
if WALVAULT_FUZZ_CASES=$FUZZ cargo test --release --test hostile_repository >"$work/fuzz.log" 2>&1; then
    fuzz_verdict="no panic, no hang, every damaged object refused"
else
    fuzz_verdict="FAILED (see the test output)"
    status=1
    tail -40 "$work/fuzz.log" >&2
fi
fuzz_secs=$(( $(date +%s) - fuzz_started ))
parsers=$(grep -c '^test .* ok$' "$work/fuzz.log" || true)

{
    echo "## 5. Hostile repository"
    echo
    echo "Property tests (tests/hostile_repository.rs) over every parser of repository content:"
    echo "encoded objects damaged, cut and extended; real WAL of PostgreSQL 13 to 18 with damaged"
    echo "records (header parser and walscan); manifests from random JSON and with damaged bytes;"
    echo "WAL names, LSNs, durations, times, URLs and manifest paths from random text."
    echo
    echo "| figure | value |"
    echo "|---|---|"
    echo "| cases per parser | $FUZZ |"
    echo "| property tests passed | $parsers |"
    echo "| time | $fuzz_secs s |"
    echo
    echo "Verdict: **$fuzz_verdict**"
    echo
} >> "$sections"

{
    echo "# walvault under faults"
    echo
    echo "Written by \`make chaos\` (scripts/chaos.sh) on $started at commit $commit${dirty:+ (with uncommitted changes)},"
    echo "on $(nproc) cores and $(free -g | awk '/^Mem:/ {print $2}') GiB, $(uname -sr),"
    echo "PostgreSQL $(pg_config --version | awk '{print $2}') and the S3-compatible server s3s-fs on 127.0.0.1."
    echo "Rerun it with \`make chaos\`; it exits non-zero when anything was lost."
    echo
    # Sections in the issue's order, whichever ran first.
    awk '/^## [0-9]/ { n = $2 + 0 } { printf "%d\t%08d\t%s\n", n, NR, $0 }' "$sections" \
        | sort -s -t "$(printf '\t')" -k1,1n -k2,2n | cut -f3-
} > "$OUT"
echo "chaos: wrote $OUT" >&2
exit $status
