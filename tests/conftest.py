"""Shared test setup: offline data from ../shared when it exists, a download otherwise."""

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"

sys.path.insert(0, str(REPO_ROOT))  # tests import model.py, train.py, ... from the repo root

if (SHARED / "tiktoken_cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end test (tiny sizes, still runs in CI)")


@pytest.fixture(scope="session")
def shakespeare_input(tmp_path_factory) -> Path:
    """Path to tiny-shakespeare input.txt: the shared offline copy, else downloaded once."""
    local = SHARED / "data" / "tinyshakespeare" / "input.txt"
    if local.is_file():
        return local
    if os.environ.get("CI"):
        pytest.fail(f"CI must run offline with {local} present; it is missing")
    path = tmp_path_factory.mktemp("shakespeare") / "input.txt"
    urllib.request.urlretrieve(SHAKESPEARE_URL, path)
    return path


@pytest.fixture(scope="session")
def char_data(shakespeare_input, tmp_path_factory) -> Path:
    """Tiny Shakespeare prepared at character level by data/shakespeare_char/prepare.py."""
    out = tmp_path_factory.mktemp("data") / "shakespeare_char"
    script = REPO_ROOT / "data/shakespeare_char/prepare.py"
    subprocess.run(
        [sys.executable, script, "--input", shakespeare_input, "--out_dir", out],
        check=True,
        capture_output=True,
    )
    return out
