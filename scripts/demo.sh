#!/usr/bin/env bash
# Set up (if needed) and run the demo: learn the packaged public-domain face and draw the example
# prompts with Stable Diffusion 1.5 (a tiny random model if it cannot be loaded; --tiny forces that).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/celebbasis demo "$@"
