#!/usr/bin/env bash
# Train the toy world from scratch on the CPU (about 3.5 hours on 2 quiet cores) and write it into the package
# (src/celebbasis/data/toy). Resumable: run it again after a stop and it carries on from the last
# checkpoint in toy-world-work/ (log: toy-world-work/train.log). Flags go to `python -m celebbasis.toy.train_world`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m celebbasis.toy.train_world "$@"
