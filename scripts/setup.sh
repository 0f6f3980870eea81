#!/usr/bin/env bash
# Create .venv and install celebbasis with its test tools. Safe to run again: it only reinstalls
# when pyproject.toml changed. torch goes first, pinned, so pip takes the local CPU wheel where
# there is one instead of a multi-GB CUDA build it does not need.
#   CELEBBASIS_TORCH=VERSION      another torch pin (default 2.13.0);
#   CELEBBASIS_TORCH=installed    keep the torch that .venv already sees (e.g. a CUDA build), pin only if none;
#   CELEBBASIS_SYSTEM_SITE_PACKAGES=1  make .venv on top of the interpreter's packages (a machine's own torch);
#   PYTHON=python3.12             the interpreter .venv is made from (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if [ -n "${CELEBBASIS_SYSTEM_SITE_PACKAGES:-}" ]; then
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
stamp=.venv/.celebbasis-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  torch=${CELEBBASIS_TORCH:-2.13.0}
  if [ "$torch" = installed ] && .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "setup: keeping torch $(.venv/bin/python -c 'import torch; print(torch.__version__)')"
  else
    [ "$torch" = installed ] && torch=2.13.0
    .venv/bin/python -m pip install -q "torch==$torch"
  fi
  .venv/bin/python -m pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi
