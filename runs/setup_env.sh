#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project. Sourced by runs/runcpu.sh and runs/test.sh.
# Every machine gets the tested torch, 2.13.0: the CPU build where there is no NVIDIA driver, a CUDA
# build where there is one (see below), checked before anything else runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
STAMP=.venv/.nanochat-installed
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        # PyPI's torch 2.13.0 for Linux is built with CUDA 13 (it depends on nvidia-*-cu13), which
        # needs an NVIDIA driver >= 580 and covers sm_120 (RTX 5090). Older drivers get the CUDA 12.8
        # build; TORCH_INDEX_URL overrides the choice (e.g. .../whl/cu126 for a V100). Right after
        # the install, check_cuda_build stops with one line unless this GPU has kernels in the build.
        DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)
        INDEX=${TORCH_INDEX_URL:-}
        if [ -z "$INDEX" ] && [ "${DRIVER%%.*}" -lt 580 ]; then
            INDEX=https://download.pytorch.org/whl/cu128
        fi
        .venv/bin/pip install -q torch==2.13.0 ${INDEX:+--index-url "$INDEX"}
        .venv/bin/python -c "from nanochat.common import check_cuda_build; check_cuda_build('$DRIVER')"
    else
        .venv/bin/pip install -q torch==2.13.0
    fi
    .venv/bin/pip install -q -e ".[dev,hf,plot,bench,lowmem]"
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
