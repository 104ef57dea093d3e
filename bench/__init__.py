"""Benchmarks: `python -m bench.<name>`. Started that way, re-exec with tcmalloc first."""
from nanochat.common import fast_malloc_reexec

fast_malloc_reexec("bench")
