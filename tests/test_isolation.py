"""The suite never reads or writes the user's directories: with $NANOCHAT_BASE_DIR, the Hugging Face
and cache variables and $HOME pointing at sentinel directories, a slice of the tests that write
artifacts (corpus shards, tokenizer, eval bundle, hub datasets, checkpoints, report) or read them
(the bench's corpus) runs green in a subprocess and every sentinel stays empty (tests/conftest.py
points them all into temporary directories)."""

from __future__ import annotations

import os
import site
import subprocess
import sys

import pytest

from tests.helpers import REPO

# what a user may have exported (the README asks for NANOCHAT_BASE_DIR), and HOME for ~/.cache
USER_DIRS = ("NANOCHAT_BASE_DIR", "HF_HOME", "HF_DATASETS_CACHE", "HF_HUB_CACHE", "XDG_CACHE_HOME", "TORCH_HOME",
             "MPLCONFIGDIR", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "HOME")

# each failed, or wrote into the user's directory, while the suite honoured an exported NANOCHAT_BASE_DIR
WRITERS_AND_READERS = [
    "tests/test_core_eval.py::test_truncated_zip_is_retried_then_unpacked",  # eval_bundle/
    "tests/test_core_eval.py::test_base_eval_script_end_to_end",  # base_checkpoints/, report/
    "tests/test_download.py::test_dataset_download_then_skip",  # base_data/
    "tests/test_tasks.py::test_hub_sha256_mismatch_is_fetched_again",  # hf_datasets/
    "tests/test_tokenizer.py::test_tok_train_convert_legacy_runs_no_code",  # tokenizer/
    "tests/test_memory.py::test_bench_smoke_two_arms",  # reads the corpus and tokenizer if there are any
]


@pytest.mark.multiprocess
def test_the_suite_leaves_the_users_directories_alone(tmp_path):
    sentinels = {name: tmp_path / name.lower() for name in USER_DIRS}
    for path in sentinels.values():
        path.mkdir()
    # a user-site install stays importable with HOME moved
    env = {**os.environ, **{name: str(path) for name, path in sentinels.items()}, "PYTHONUSERBASE": site.getuserbase(),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *WRITERS_AND_READERS],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout.splitlines()[-1], proc.stdout[-1000:]
    written = {name: sorted(p.relative_to(path).as_posix() for p in path.rglob("*")) for name, path in sentinels.items()}
    assert written == {name: [] for name in sentinels}
