#!/usr/bin/env bash
# The test suite: creates the environment if missing, installs, runs pytest (fast + slow tests).
set -euo pipefail
cd "$(dirname "$0")/.."
source runs/setup_env.sh
python -m pytest -q "$@"
