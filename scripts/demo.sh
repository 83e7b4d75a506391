#!/usr/bin/env bash
# Run the main job: setup first, then `dlm demo`. Extra args go to `dlm demo`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh
exec .venv/bin/dlm demo "$@"
