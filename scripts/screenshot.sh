#!/usr/bin/env bash
# Regenerate the README's web UI screenshot (docs/webui-learn.png): the browser test that uploads two
# photos of one person takes it after detection. Needs Debian's chromium (see .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
CELEBBASIS_UPDATE_SCREENSHOTS=1 exec .venv/bin/python -m pytest -q tests/test_webui.py -k several_photos "$@"
