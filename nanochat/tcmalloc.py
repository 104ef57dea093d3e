"""tcmalloc, loaded in one place: entry points re-exec themselves with it preloaded.

glibc malloc makes small tensor ops 5-10x slower than tcmalloc on the 2-core CPU machines
(docs/cpu_notes.md), so `python -m scripts.X`, `python -m bench.X` and the test suite (the pytest
plugin tests/tcmalloc_plugin.py, loaded by pyproject.toml's addopts) call `reexec_with_tcmalloc`
before torch is imported. runs/setup_env.sh only installs the library.
Opt out with NANOCHAT_TCMALLOC=0. This module imports nothing of nanochat and not torch.
"""

from __future__ import annotations

import glob
import os
import sys

TCMALLOC_GLOBS = (
    "/usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
)


def find_tcmalloc() -> str | None:
    for pattern in TCMALLOC_GLOBS:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def reexec_with_tcmalloc(package: str) -> None:
    """Re-exec this process with tcmalloc preloaded, if available and not already loaded.

    Only for processes started as `python -m <package>` or `python -m <package>.<module>`
    (sys.orig_argv keeps the command line): so `scripts`/`bench` never re-exec inside a test run
    (`python -m pytest`, which re-execs once itself), a REPL or an embedding program.
    """
    if os.environ.get("NANOCHAT_TCMALLOC", "1") == "0" or "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        return
    argv = getattr(sys, "orig_argv", [])
    if len(argv) < 3 or argv[1] != "-m" or not (argv[2] == package or argv[2].startswith(package + ".")) or sys.platform != "linux":
        return
    lib = find_tcmalloc()
    if lib is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = (lib + " " + env.get("LD_PRELOAD", "")).strip()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)
