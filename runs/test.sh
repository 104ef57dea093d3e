#!/usr/bin/env bash
# The test suite: creates the environment if missing, installs, runs pytest: every tier by default
# (what CI runs); arguments go to pytest. docs/testing.md has the details.
#
# Tiers (pytest markers), with the wall time of `python -m pytest -q -m <tier>` on a 2-core CPU VM
# shared with other jobs (load average in parentheses); a test may carry two markers:
#   (none)        units, numerics against slow references, tiny stages in-process   3.3 min (load 1-2)
#   slow          bench runs, bf16/compiled variants, measured peaks, run10.sh       14 min (load 2-5)
#   multiprocess  torchrun, gloo workers, scripts and measurements in a child       12.5 min (load 2-5)
#   browser       the web UI in headless Chromium (playwright)                       0.6 min (load 4)
#   hf            transformers parity, export and import (the hf extra)              1.3 min (load 4)
# The whole suite: about 25 min at load 4-5 (the tiers' sum, overlaps counted once). The fast tier
# alone: -m "not slow and not multiprocess and not browser and not hf".
#
# The fast loop after changing the model (nanochat/gpt.py, nanochat/ops.py), about 1 min:
#   bash runs/test.sh -m "not slow and not multiprocess and not browser" tests/test_gpt.py \
#       tests/test_recipe.py tests/test_molegrad_linear.py tests/test_molegrad.py tests/test_engine.py
# MoleGrad, the planner, serving, the tokenizer: docs/testing.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source runs/setup_env.sh
python -m pytest -q "$@"
