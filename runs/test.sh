#!/usr/bin/env bash
# The test suite: creates the environment if missing, installs, runs pytest: every tier by default
# (what CI runs); arguments go to pytest. docs/testing.md has the details.
#
# Tiers (pytest markers); minutes: the sum of the tier's test times in one full run of this script on
# a fresh clone (CI=true, 2-vCPU AMD EPYC without AVX-512, so bf16 is emulated; load 1-2, nothing else
# running; 1036 tests, 14.2 min in all, 16.4 min with the install). A test may carry two markers:
#   (none)        units, numerics against slow references, tiny stages in-process   897 tests  2.7 min
#   slow          bench runs, bf16/compiled variants, measured peaks, run10.sh        32 tests  8.5 min
#   multiprocess  torchrun, gloo workers, scripts and measurements in a child         26 tests  6.0 min
#   browser       the web UI in headless Chromium (playwright)                         1 test   0.1 min
#   hf            transformers parity, export and import (the hf extra)               89 tests  0.5 min
# The fast tier alone: -m "not slow and not multiprocess and not browser and not hf".
#
# The fast loop after changing the model (nanochat/gpt.py, nanochat/ops.py), about 1 min:
#   bash runs/test.sh -m "not slow and not multiprocess and not browser" tests/test_gpt.py \
#       tests/test_recipe.py tests/test_molegrad_linear.py tests/test_molegrad.py tests/test_engine.py
# MoleGrad, the planner, serving, the tokenizer: docs/testing.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source runs/setup_env.sh
python -m pytest -q "$@"
