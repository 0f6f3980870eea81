#!/usr/bin/env bash
# Set up (if needed) and run the test suite, offline, on the CPU, in two processes; lists the 15 slowest tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Two workers, one file each at a time (module fixtures are built once), one thread per worker (tiny
# models only lose to thread hand-offs). The end-to-end runs of the scripts and of several processes
# (marker e2e, a few minutes) are CI's own job: `bash .ci/run e2e`, or pass `-m e2e` here.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q -n "${CELEBBASIS_TEST_WORKERS:-2}" --dist loadfile -m "not e2e" --durations=15 "$@"
