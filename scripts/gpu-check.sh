#!/usr/bin/env bash
# The GPU check, one command (under 8 minutes on one H100/H200 once set up):
#   1. the tests marked `gpu` (half-precision training, --compile, --low-memory, offload, generation);
#   2. personalization on SD 1.5's shapes (random weights) at 512 px, 400 steps, against the
#      textual-inversion recipe in the same run (benchmarks/bench_personalize.py), beside the targets:
#      >= 3x the recipe, <= 30 s per identity, <= 8 GB peak GPU memory.
# Results go to RESULTS_DIR (default: $OUT if set, else gpu-check/): personalize.json,
# personalize.md, gpu-tests.log, environment.txt; the tables are printed too.
#
#   bash scripts/gpu-check.sh [RESULTS_DIR]
#
# Setup is scripts/setup.sh (.venv). On Linux a fresh setup installs torch's default build from the
# package index, which has CUDA (the first run downloads about 3 GB). Where the machine's python3
# already has a CUDA build of torch and there is no .venv yet, .venv is made on top of it instead.
# CELEBBASIS_PYTHON=/path/to/python uses that interpreter as it is (its torch must be a CUDA build).
# Exit status: 0 all tests passed and all targets met; 1 a test failed or a target was missed;
# 3 no usable CUDA GPU (said plainly, before anything slow runs).
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-${OUT:-gpu-check}}
export PYTHONUNBUFFERED=1
START=$SECONDS
say() { printf '\n== gpu-check: %s\n' "$*"; }
fail() { echo "gpu-check: $*" >&2; exit 3; }

# 0. Is there an NVIDIA GPU at all? Answer in a second, before any setup.
if ! command -v nvidia-smi >/dev/null 2>&1 && [ ! -e /dev/nvidia0 ] && [ ! -e /proc/driver/nvidia/version ]; then
  fail "no NVIDIA GPU on this machine (no nvidia-smi, no /dev/nvidia0, no NVIDIA driver). Run this on a machine with a CUDA GPU; the CPU tests are 'bash scripts/test.sh'."
fi

# 1. Environment.
if [ -n "${CELEBBASIS_PYTHON:-}" ]; then
  PY=$CELEBBASIS_PYTHON
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
  if [ ! -x .venv/bin/python ] && "${PYTHON:-python3}" -c 'import sys, torch; sys.exit(torch.version.cuda is None)' 2>/dev/null; then
    echo "gpu-check: making .venv on top of this machine's CUDA build of torch"
    export CELEBBASIS_SYSTEM_SITE_PACKAGES=1 CELEBBASIS_TORCH=installed
  fi
  say "setup (scripts/setup.sh)"
  bash scripts/setup.sh
  PY=$PWD/.venv/bin/python
fi
mkdir -p "$RESULTS"
"$PY" - "$RESULTS/environment.txt" <<'EOF' || exit 3
import platform
import sys

import torch

if torch.version.cuda is None:
    sys.exit(f"gpu-check: the installed torch {torch.__version__} is a CPU-only build ({sys.prefix}), so the GPU cannot be "
             "used. Install a CUDA build of torch there (or delete .venv and run this again: a fresh setup on Linux "
             "installs the package index's default build, which has CUDA), or point CELEBBASIS_PYTHON at a Python "
             "that has one.")
if not torch.cuda.is_available():
    sys.exit(f"gpu-check: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU. Check the driver with "
             "nvidia-smi, and CUDA_VISIBLE_DEVICES; a torch built for a newer CUDA than the driver supports reads the "
             "same (pin another with CELEBBASIS_TORCH=VERSION and delete .venv).")
import diffusers
import transformers

props = torch.cuda.get_device_properties(0)
text = (f"{torch.cuda.get_device_name(0)}, {props.total_memory / 2**30:.0f} GiB, compute capability "
        f"{props.major}.{props.minor}; torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
        f"{torch.backends.cudnn.version()}), diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}")
open(sys.argv[1], "w").write(text + "\n")
print("gpu-check:", text)
EOF
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >> "$RESULTS/environment.txt" 2>&1 || true

# 2. The tests marked gpu.
say "tests marked gpu"
mapfile -t GPU_TESTS < <(grep -l 'mark\.gpu' tests/test_*.py || true)
tests_rc=0
if [ ${#GPU_TESTS[@]} = 0 ]; then
  echo "gpu-check: no test file marks tests with pytest.mark.gpu" | tee "$RESULTS/gpu-tests.log"
  tests_rc=1
else
  set +e
  "$PY" -m pytest -q -m gpu -p no:cacheprovider --durations=10 "${GPU_TESTS[@]}" 2>&1 | tee "$RESULTS/gpu-tests.log"
  tests_rc=${PIPESTATUS[0]}
  set -e
  [ "$tests_rc" = 5 ] && echo "gpu-check: no test is marked gpu"
fi
TESTS_DONE=$SECONDS

# 3. Personalization against the textual-inversion recipe, SD 1.5 shapes, 512 px, 400 steps.
say "personalization benchmark (SD 1.5 shapes, 512 px, 400 steps, vs the textual-inversion recipe)"
bench_rc=0
"$PY" benchmarks/bench_personalize.py --arch sd15 --device cuda --steps 400 --resolution 512 \
  --json "$RESULTS/personalize.json" --markdown "$RESULTS/personalize.md" \
  --target-speedup 3 --target-seconds 30 --target-peak-gb 8 || bench_rc=$?

say "summary"
if [ "$tests_rc" = 0 ]; then echo "gpu tests: passed ($((TESTS_DONE - START)) s so far)"; else echo "gpu tests: FAILED (exit $tests_rc; see $RESULTS/gpu-tests.log)"; fi
targets_ok=0
if [ "$bench_rc" = 0 ] && [ -f "$RESULTS/personalize.json" ]; then
  "$PY" -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))["targets_met"] else 1)' "$RESULTS/personalize.json" || targets_ok=1
  if [ "$targets_ok" = 0 ]; then echo "benchmark: all targets met"; else echo "benchmark: a target was MISSED (table above)"; fi
else
  echo "benchmark: FAILED (exit $bench_rc)"
  targets_ok=1
fi
echo "results in $RESULTS/; whole check $((SECONDS - START)) s"
[ "$tests_rc" = 0 ] && [ "$targets_ok" = 0 ]
