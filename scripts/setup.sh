#!/usr/bin/env bash
# Installs what walvault's tests and demo need when it is missing:
# PostgreSQL's server binaries and the S3-compatible test server (s3s-fs).
# Safe to run again: it only acts on what is absent.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'setup: %s\n' "$*" >&2; }

have_pg_server() {
    local bindir
    bindir=$(pg_config --bindir 2>/dev/null) || return 1
    [[ -x "$bindir/initdb" && -x "$bindir/postgres" && -x "$bindir/pg_basebackup" ]]
}

if ! have_pg_server; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        say "installing PostgreSQL server packages"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq postgresql postgresql-contrib >/dev/null
    else
        say "PostgreSQL server binaries not found (pg_config --bindir has no initdb);"
        say "install PostgreSQL (e.g. 'apt-get install postgresql') and run again"
        exit 1
    fi
fi
have_pg_server || { say "PostgreSQL install did not provide initdb/postgres"; exit 1; }

# The durability test watches push's system calls.
if ! command -v strace >/dev/null && [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    say "installing strace"
    apt-get install -y -qq strace >/dev/null || { apt-get update -qq && apt-get install -y -qq strace >/dev/null; }
fi

# Tests run the server as the 'postgres' OS user when we are root.
if [[ $(id -u) -eq 0 ]] && ! id postgres >/dev/null 2>&1; then
    say "creating the postgres OS user"
    useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
fi

S3S_FS=.tools/bin/s3s-fs
if [[ ! -x $S3S_FS ]]; then
    say "building s3s-fs 0.14.1 into .tools/ (about two minutes, once)"
    # Newer s3s-fs versions need a newer rustc than 1.95.
    CARGO_TARGET_DIR=.tools/build cargo install s3s-fs --version 0.14.1 \
        --features binary --locked --root .tools --quiet
    rm -rf .tools/build
fi
