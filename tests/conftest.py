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

import torch  # noqa: E402

from model import GPT, GPTConfig  # noqa: E402

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


# A training run of a few seconds: a tiny model, two iterations, a checkpoint at each.
TINY = ("--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=2", "--eval_iters=1")
TINY += ("--max_iters=2", "--eval_interval=1", "--log_interval=1", "--eval_full=False", "--dtype=float32")


@pytest.fixture(scope="session")
def finished_run(char_data, tmp_path_factory) -> Path:
    """The out_dir of a finished tiny run (TINY): a good ckpt.pt at iteration 2. Read-only: copy to damage."""
    import train

    out = tmp_path_factory.mktemp("run")
    with pytest.raises(SystemExit, match="0"):
        train.main([f"--out_dir={out}", f"--data_dir={char_data}", *TINY, "--always_save_checkpoint=True"])
    return out


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models on a 2-core machine: a second OpenMP thread only adds synchronisation (up to 4x slower
    when the machine is busy). Modules take it with pytestmark = pytest.mark.usefixtures("single_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Two processes under torchrun on this machine (gloo on CPU): prefix a script and its arguments.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def random_model(config: GPTConfig, seed: int = 0) -> GPT:
    """A random model in eval mode whose norm gains and biases are random too."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():  # norm gains of one and zero biases would hide a mix-up
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
    return model


def context_sensitive_model(config: GPTConfig, seed: int) -> GPT:
    """A random model whose greedy tokens depend on the context: at GPT-2's initial scale, one repeats
    two or three tokens whatever came before, and a test of which context it saw would prove nothing."""
    model = random_model(config, seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10)
    return model
