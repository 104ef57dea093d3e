"""A pytest plugin (`-p tests.tcmalloc_plugin`, set in pyproject.toml's addopts): re-exec the test
run with tcmalloc preloaded (nanochat/tcmalloc.py) before torch is imported and before pytest
starts capturing output (conftest.py loads too late for that: its output would be lost)."""

from nanochat.tcmalloc import reexec_with_tcmalloc

reexec_with_tcmalloc("pytest")
