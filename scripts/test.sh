#!/usr/bin/env bash
# Run the test suite: setup first, then pytest. Extra args go to pytest (default: -q -ra).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh

if [ "$#" -eq 0 ]; then
    set -- -q -ra
fi

rc=0
.venv/bin/python -m pytest "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    echo "test.sh: pytest collected no tests (exit 5); treating as failure" >&2
    exit 1
fi
exit "$rc"
