#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project. Sourced by runs/runcpu.sh and runs/test.sh.
# CPU machines get the pinned CPU build of torch; machines with an NVIDIA driver get PyPI's CUDA build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
STAMP=.venv/.nanochat-installed
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        .venv/bin/pip install -q "torch>=2.5"
    else
        .venv/bin/pip install -q torch==2.13.0
    fi
    .venv/bin/pip install -q -e ".[dev,hf,plot,bench]"
    touch "$STAMP"
fi
# Debian packages, installed as root when missing (one apt-get run for all of them):
# - libtcmalloc-minimal4: 5-10x faster small tensor ops on CPU than glibc malloc; loaded by
#   nanochat/tcmalloc.py (entry points and the test suite re-exec themselves with it preloaded);
# - bubblewrap: the OS isolation of the code sandbox (nanochat/execution.py, docs/sandbox.md);
# - chromium: the headless browser of the web UI test (playwright cannot download its own here).
MISSING=()
ls /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4 >/dev/null 2>&1 || MISSING+=(libtcmalloc-minimal4)
command -v bwrap >/dev/null 2>&1 || MISSING+=(bubblewrap)
[ -x /usr/bin/chromium ] || MISSING+=(chromium)
if [ ${#MISSING[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq "${MISSING[@]}") >/dev/null 2>&1 \
        || echo "note: could not install ${MISSING[*]}: CPU runs are slower without tcmalloc, the sandbox refuses to run without bubblewrap, the browser test is skipped without chromium"
fi
source .venv/bin/activate
