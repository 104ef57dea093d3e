"""Entry points: `python -m scripts.<name>`. Started that way, re-exec with tcmalloc first."""
from nanochat.common import fast_malloc_reexec

fast_malloc_reexec("scripts")
