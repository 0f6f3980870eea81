#!/usr/bin/env bash
# Create .venv and install celebbasis with its test tools. Safe to run again: it only reinstalls
# when pyproject.toml changed. torch goes first, pinned, so pip takes the local CPU wheel where
# there is one instead of a multi-GB CUDA build it does not need.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.celebbasis-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==${CELEBBASIS_TORCH:-2.13.0}"
  .venv/bin/python -m pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi
