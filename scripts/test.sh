#!/usr/bin/env bash
# Runs every test: Rust unit, property and integration tests, then the Autobahn|Python interop
# suite against the freshly built `macula` binary. Creates the Python venv itself.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> cargo test (workspace)"
cargo test --workspace --all-targets

echo "==> interop: Autobahn|Python against target/debug/macula"
cargo build -p macula --quiet
MACULA_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/macula" tests/interop/run.sh
