#!/usr/bin/env bash
# Create .venv and install celebbasis. Safe to run again: it only installs when pyproject.toml changed
# or more is asked for than is there. torch goes in the same pip call, pinned, so pip takes the local
# CPU wheel where there is one instead of a multi-GB CUDA build it does not need.
#   bash scripts/setup.sh [dev|core]
#     dev (default): celebbasis with every extra and the test tools (scripts/test.sh, the benchmarks);
#     core: only what the command line needs (scripts/demo.sh): no Gradio, Playwright, test tools, plots.
#   CELEBBASIS_TORCH=VERSION      another torch pin (default 2.13.0);
#   CELEBBASIS_TORCH=installed    keep the torch that .venv already sees (e.g. a CUDA build), pin only if none;
#   CELEBBASIS_SYSTEM_SITE_PACKAGES=1  make .venv on top of the interpreter's packages (a machine's own torch);
#   PYTHON=python3.12             the interpreter .venv is made from (default python3).
# pip does not byte-compile what it installs (--no-compile): Python compiles each module the first time
# it is imported, only the ones used, which makes a first install about a minute shorter.
set -euo pipefail
cd "$(dirname "$0")/.."
LEVEL=${1:-dev}
case "$LEVEL" in
  dev) SPEC=".[dev]" ;;
  core) SPEC="." ;;
  *) echo "usage: bash scripts/setup.sh [dev|core]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if [ -n "${CELEBBASIS_SYSTEM_SITE_PACKAGES:-}" ]; then
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
stamp=.venv/.celebbasis-installed  # "<sha256 of pyproject.toml> <level>"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
read -r have_hash have_level < "$stamp" 2>/dev/null || true
if [ "${have_hash:-}" = "$want" ] && { [ "${have_level:-dev}" = dev ] || [ "$LEVEL" = core ]; }; then
  exit 0  # installed, with at least what is asked for
fi
PIP=(.venv/bin/python -m pip install -q --no-compile --disable-pip-version-check)
# pip 21.3 is the first to install a pyproject.toml project in editable mode; newer ones need no upgrade.
.venv/bin/python -c 'import sys, pip; sys.exit(int(pip.__version__.split(".")[0]) < 22)' || "${PIP[@]}" --upgrade pip
torch=${CELEBBASIS_TORCH:-2.13.0}
TORCH=("torch==$torch")
if [ "$torch" = installed ]; then
  if .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "setup: keeping torch $(.venv/bin/python -c 'import torch; print(torch.__version__)')"
    TORCH=()
  else
    TORCH=("torch==2.13.0")
  fi
fi
"${PIP[@]}" ${TORCH[@]+"${TORCH[@]}"} -e "$SPEC"
echo "$want $LEVEL" > "$stamp"
