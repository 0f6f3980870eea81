#!/usr/bin/env bash
# Set up (if needed) and run the demo: learn the packaged public-domain face and draw the example
# prompts with Stable Diffusion 1.5; if it cannot be loaded, the packaged toy world of cartoon people
# (--toy asks for it; --tiny for the tiny random model, whose images are noise).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh core   # only what the command line needs; scripts/test.sh adds the test tools
exec .venv/bin/celebbasis demo "$@"
