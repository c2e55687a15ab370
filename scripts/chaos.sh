#!/usr/bin/env bash
# The fault suite: walvault under faults against real PostgreSQL (and the
# S3-compatible server on 127.0.0.1), with figures. Writes
# docs/reliability.md (CHAOS_OUT) and exits non-zero when anything was lost.
#
#   make chaos                        # the full suite
#   CHAOS_KILLS=40 CHAOS_FUZZ_CASES=2000 scripts/chaos.sh   # a short run
#
# The scenarios are the ignored tests of tests/chaos.rs and tests/pitr_random.rs
# (each appends its section to the report), every test of tests/store_faults.rs
# (a fault-injecting proxy before the S3 server: its FIGURE lines make the
# store section) and the hostile-repository
# property tests of tests/hostile_repository.rs at CHAOS_FUZZ_CASES cases per parser.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${CHAOS_OUT:-docs/reliability.md}
KILLS=${CHAOS_KILLS:-200}
FUZZ=${CHAOS_FUZZ_CASES:-100000}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git status --porcelain -- src tests 2>/dev/null | head -1)
started=$(date -u '+%Y-%m-%d %H:%M UTC')
status=0

sections=$work/sections.md
: > "$sections"
echo "chaos: scenarios of tests/chaos.rs (kills: $KILLS)" >&2
for suite in chaos pitr_random; do
    if ! WALVAULT_CHAOS_REPORT=$sections WALVAULT_CHAOS_KILLS=$KILLS \
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
    echo "# walvault under faults"
    echo
    echo "Written by \`make chaos\` (scripts/chaos.sh) on $started at commit $commit${dirty:+ (with uncommitted changes)},"
    echo "on $(nproc) cores and $(free -g | awk '/^Mem:/ {print $2}') GiB, $(uname -sr),"
    echo "PostgreSQL $(pg_config --version | awk '{print $2}') and the S3-compatible server s3s-fs on 127.0.0.1."
    echo "Rerun it with \`make chaos\`; it exits non-zero when anything was lost."
    echo
    cat "$sections"
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
} > "$OUT"
echo "chaos: wrote $OUT" >&2
exit $status
