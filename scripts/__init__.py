"""Entry points: `python -m scripts.<name>`. Started that way, re-exec with tcmalloc first."""
from nanochat.tcmalloc import reexec_with_tcmalloc

reexec_with_tcmalloc("scripts")
