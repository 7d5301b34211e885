#!/usr/bin/env bash
# Runs the WAMP interop suite: Autobahn|Python clients against a real Macula node.
#
#   tests/interop/run.sh [pytest args...]
#
# Uses the already-built binary at $MACULA_BIN (default: target/debug/macula); it does
# not build anything. The Python environment lives in .venv-interop at the repo root.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo"

export MACULA_BIN="${MACULA_BIN:-$repo/target/debug/macula}"
if [[ ! -x "$MACULA_BIN" ]]; then
    echo "run.sh: macula binary not found at $MACULA_BIN (build it first or set MACULA_BIN)" >&2
    exit 1
fi

venv="$repo/.venv-interop"
if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$here/requirements.txt"

exec "$venv/bin/python" -m pytest tests/interop -q "$@"
