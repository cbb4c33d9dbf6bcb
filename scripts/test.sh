#!/usr/bin/env bash
# The test command: installs what is missing, then runs the whole suite (core, plugin, real engine, server).
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider --durations=15 "$@"
