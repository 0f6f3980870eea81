#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, offline, on the CPU; lists the 15 slowest tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q --durations=15 "$@"
