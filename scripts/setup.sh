#!/usr/bin/env bash
# Idempotent developer/CI setup: redis-server (from apt, if missing), .venv, editable install.
# Does not start or stop any service: tests start their own redis-server processes.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
fi

# (a) redis-server
if command -v redis-server >/dev/null 2>&1; then
    echo "setup: redis-server present: $(command -v redis-server)"
else
    echo "setup: installing redis-server with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends redis-server >/dev/null
    command -v redis-server >/dev/null 2>&1 || {
        echo "setup: redis-server still not on PATH after apt-get install" >&2
        exit 1
    }
    echo "setup: installed $(redis-server --version | head -n 1)"
fi

# (b) virtualenv
if [ -x .venv/bin/python ]; then
    echo "setup: .venv present"
else
    echo "setup: creating .venv"
    python3 -m venv .venv
fi

# (c) editable install with test extras; skipped when the packaging files are unchanged
# since the last successful install (the stamp holds their checksum).
STAMP=.venv/.redlockdlm-install-stamp
WANT="$(cat pyproject.toml setup.py | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] \
        && .venv/bin/python -c 'import redlockdlm_cli, redlockdlm; redlockdlm.DLM' 2>/dev/null; then
    echo "setup: .venv already has redlockdlm installed (editable, with [test] extras)"
else
    echo "setup: pip install -e '.[test]' into .venv"
    .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
    echo "$WANT" > "$STAMP"
    rm -rf redlockdlm.egg-info  # left by the editable build; the venv has its own metadata
fi
echo "setup: done"
