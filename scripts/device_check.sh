#!/usr/bin/env bash
# The device check (scripts/device_check.py): parity, decode and prefill against their
# floors, NIXL when present; JSON out. `--cpu` is the smoke run CI does.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PYTHON" scripts/device_check.py "$@"
