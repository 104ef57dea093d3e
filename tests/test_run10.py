"""run10.sh's exact command lines, run on CPU with tiny sizes (the GPU run cannot happen here).

The CORE eval bundle is a small generated one served from 127.0.0.1; pretraining data is the
offline local corpus. Marked slow: it runs every stage of the pipeline.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, bundle_zip, needs_extra

TINY_RUN10_ENV = {
    "DEPTH": "1", "SEQ": "64", "DEVICE_BATCH": "2", "TOTAL_BATCH": "128", "RANK_K": "8", "VOCAB": "512",
    "TOK_CHARS": "300000", "DATA_SOURCE": "local", "BASE_STEPS": "4", "MID_STEPS": "2", "SFT_STEPS": "2",
    "RL_STEPS": "1", "EVAL_PROBLEMS": "2", "CORE_PER_TASK": "2", "CHAT_SEQ": "64", "EVAL_TOKENS": "256",
    "RL_FLAGS": "--examples_per_step=2 --num_samples=2 --max_new_tokens=16 --device_batch_size=4 --eval_examples=2",
    "NANOCHAT_SKIP_SETUP": "1", "OMP_NUM_THREADS": "1", "DEVICE": "cpu", "MEMORY_MODE": "lowest",  # the default (dense) needs no MoleGrad
}


@pytest.mark.multiprocess
@pytest.mark.slow
def test_run10_commands_with_tiny_sizes(tmp_path, http_server):
    needs_extra("matplotlib", "plot")  # the report card's plots
    http_server.files["/eval_bundle.zip"] = bundle_zip()
    env = {**os.environ, **TINY_RUN10_ENV, "NANOCHAT_BASE_DIR": str(tmp_path / "base"),
           "NANOCHAT_EVAL_BUNDLE_URL": f"{http_server.url}/eval_bundle.zip",
           "NANOCHAT_HF_URL": "http://127.0.0.1:9", "WANDB_RUN": "dummy",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # its `python` is this one
    proc = subprocess.run(["bash", str(REPO / "run10.sh")], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "base" / "report" / "report.md").read_text()
    for heading in ("## Tokenizer training", "## Base model training", "## Base model loss", "## Base model evaluation",
                    "## Midtraining", "## Chat SFT", "## Chat RL", "## Chat evaluation mid", "## Chat evaluation sft",
                    "## Chat evaluation rl"):
        assert heading in report, heading
    assert "MoleGrad" in proc.stdout  # base_train ran with the MoleGrad flags
