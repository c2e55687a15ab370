#!/usr/bin/env bash
# Checks the layout rules docs/design.md states ("Layers"): who may import
# whom, where object_store and `unsafe` may appear, and that every key of
# the repository format comes from src/format/key.rs. Run by `make lint`.
# Each rule is a grep over src/; test modules (from `#[cfg(test)]` on, which
# this project keeps at the end of a file) are left out where noted.
set -uo pipefail
cd "$(dirname "$0")/.."

failed=0
fail() {
    printf 'lint-layout: %s\n' "$*" >&2
    failed=1
}

# The code of a file before its test module.
non_test() { sed '/^#\[cfg(test)\]/,$d' "$1"; }

# 1. Layers: each top-level module of the library may import only the ones
#    listed (plus itself); its tests may use anything. Read downwards: nothing imports a module above it,
#    so there is no cycle, and nothing outside commands/ imports commands.
declare -A may_import=(
    [error]=""
    [logging]="error"
    [sys]="error"
    [human]="error"
    [pg]="error sys human"
    [format]="error pg sys"
    [store]="error format sys"
    [repository]="error format pg store sys human recovery"
    [recovery]="error format pg"
    [ahead]="error format pg store repository recovery sys human"
    [commands]="error logging sys human pg format store repository recovery ahead"
)
for module in "${!may_import[@]}"; do
    if [[ -d src/$module ]]; then
        files=$(find "src/$module" -name '*.rs')
    elif [[ -f src/$module.rs ]]; then
        files=src/$module.rs
    else
        continue
    fi
    allowed=" $module ${may_import[$module]} say "
    for file in $files; do
        # `crate::x` paths, and the first name of every `use crate::{x, …}` group.
        used=$({ non_test "$file" | grep -oE 'crate::[a-z_]+' | sed 's/crate:://'
                 non_test "$file" | grep -oE 'crate::\{[^}]*' | sed 's/crate::{//' | tr ',' '\n' |
                     sed -E 's/^ *([a-z_]+).*/\1/'; } | sort -u)
        for name in $used; do
            [[ -z $name || $allowed == *" $name "* ]] && continue
            fail "$file: $module/ may not import crate::$name (allowed: ${may_import[$module]:-nothing})"
        done
    done
done

# 2. Only the store drivers name object_store.
while IFS= read -r hit; do
    fail "$hit: only src/store/ may name object_store"
done < <(grep -rn 'object_store' src --include='*.rs' | grep -v '^src/store/')

# 3. `unsafe` only in src/sys/ and the local store driver, and each block
#    with a SAFETY comment in the three lines above it.
while IFS= read -r hit; do
    fail "$hit: unsafe code belongs in src/sys/ (or src/store/local)"
done < <(grep -rnE '\bunsafe\b' src --include='*.rs' | grep -vE '^src/(sys/|store/local)' |
    grep -vE '^[^:]+:[0-9]+:\s*//')
for file in $(grep -rlE '\bunsafe\b' src/sys src/store 2>/dev/null); do
    awk -v f="$file" '
        /^\s*\/\// { if ($0 ~ /SAFETY:/) last = NR; next }
        /\<unsafe\>/ && !/unsafe fn/ && !/^\s*#/ {
            if (NR - last > 3) { printf "%s:%d: unsafe without a SAFETY comment above it\n", f, NR; bad = 1 }
        }
        END { exit bad }' "$file" >&2 || failed=1
done

# 4. Every key of docs/format.md is spelled in src/format/key.rs only
#    (test code may spell keys to plant or check objects).
key_literals='"(wal|backups|packs|locks)/|"(walvault|retention)\.json"'
for file in $(find src -name '*.rs' ! -path 'src/format/key.rs'); do
    non_test "$file" | grep -nE "$key_literals" | while IFS= read -r hit; do
        printf 'lint-layout: %s:%s: a repository key outside src/format/key.rs\n' "$file" "$hit" >&2
        echo x
    done | grep -q x && failed=1
done

exit $failed
