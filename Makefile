# walvault: `make demo` and `make test` do all set-up on a fresh machine.
CARGO ?= cargo

.PHONY: all build release setup lint test test-versions unit demo bench chaos clean

all: build

build:
	$(CARGO) build

release:
	$(CARGO) build --release

# PostgreSQL server binaries and the S3-compatible test server, when missing.
setup:
	scripts/setup.sh

# Formatting, clippy, and the layout rules of docs/design.md ("Layers").
lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	scripts/lint-layout.sh

unit:
	$(CARGO) test --lib

test: setup lint
	$(CARGO) test --all-targets

# The version matrix: archive, backup, PITR, latest, verify and drill on
# every supported PostgreSQL major version (13 to 18).
test-versions: setup
	$(CARGO) test --test versions -- --ignored

demo: setup release
	scripts/demo.sh

bench: setup release
	scripts/bench.sh

# The fault suite: kill storms, hostile repositories; writes docs/reliability.md.
chaos: setup
	scripts/chaos.sh

clean:
	$(CARGO) clean
	rm -rf .demo
