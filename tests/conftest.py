import os

import pytest

# Tests never touch ~/.cache: each test gets its own artifact directory unless it sets one itself.
@pytest.fixture(autouse=True)
def _isolated_base_dir(tmp_path, monkeypatch):
    if "NANOCHAT_BASE_DIR" not in os.environ or os.environ["NANOCHAT_BASE_DIR"].startswith(str(tmp_path.parent.parent)):
        monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "nanochat_base"))
    monkeypatch.setenv("WANDB_RUN", "dummy")
    yield
