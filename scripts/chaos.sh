#!/usr/bin/env bash
# The fault suite: walvault under faults against real PostgreSQL (and the
# S3-compatible server on 127.0.0.1), with figures. Writes
# docs/reliability.md (CHAOS_OUT) and exits non-zero when anything was lost.
#
#   make chaos                        # the full suite
#   CHAOS_KILLS=40 CHAOS_FUZZ_CASES=2000 scripts/chaos.sh   # a short run
#
# The scenarios are the ignored tests of tests/chaos.rs and tests/pitr_random.rs
# (each appends its section to the report), those of tests/store_faults.rs (a
# stalled store, a 20 s outage; pass or fail only) and the hostile-repository
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
for suite in chaos pitr_random store_faults; do
    if ! WALVAULT_CHAOS_REPORT=$sections WALVAULT_CHAOS_KILLS=$KILLS \
        cargo test --release --test "$suite" -- --ignored --test-threads 1 >"$work/$suite.log" 2>&1; then
        status=1
        tail -40 "$work/$suite.log" >&2
    fi
done

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
