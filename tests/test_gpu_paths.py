"""The branches that run only on a GPU, run on the CPU as far as it can: CUDA faked as available for
device and dtype choice (torch's own checks kept), float16 with the gradient scaler, compiled
training and decoding, FSDP's bf16 mixed precision on gloo, uneven multiple-choice splits under FSDP.
What the CPU cannot reach (NCCL, CUDA graphs, pinned memory, real GPU memory) tests/gpu_check.py
checks on a GPU; docs/gpu.md lists which is which."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import TORCHRUN

import memory
import train
from checkpoint import load_checkpoint
from generate import generate
from memory import check_kv_cache_fits
from model import GPT, GPTConfig, KVCache
from runtime import ConfigError, autocast, pick_device, pick_dtype

REPO = Path(__file__).resolve().parents[1]
TASK = REPO / "tests" / "tiny_task.jsonl"
TINY = (
    "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
    "--gradient_accumulation_steps=2", "--eval_iters=2", "--eval_interval=1000", "--log_interval=1",
    "--warmup_iters=2", "--learning_rate=3e-3", "--lr_decay_iters=10", "--eval_full=False", "--seed=7",
)  # fmt: skip
QK_NORM_SHAPE = dict(vocab_size=64, n_head=4, n_kv_head=2, n_embd=32, qk_norm=True)
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PATH": "/usr/bin:/bin"}


@pytest.fixture(autouse=True)
def fresh_compile_state():
    """Forget what this file's tests compiled: dynamo would otherwise reuse (or make dynamic) graphs
    in later tests of this process, which count the graphs they compile."""
    yield
    torch._dynamo.reset()


@pytest.fixture
def fake_gpus(monkeypatch) -> list[int]:
    """Two CUDA devices as torch reports them; the indices torch.cuda.set_device was given. Only the
    CPU build's missing C call is stubbed: torch's check that a device has an index still runs."""
    set_to: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch._C, "_cuda_setDevice", set_to.append, raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    return set_to


def test_a_gpu_without_an_index_becomes_gpu_0_and_the_current_one(fake_gpus):
    assert pick_device("auto") == torch.device("cuda", 0)
    assert pick_device("cuda") == torch.device("cuda", 0)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    assert fake_gpus == [0, 0, 1]


def test_under_torchrun_each_process_takes_its_local_ranks_gpu(fake_gpus, monkeypatch):
    assert pick_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert pick_device("cuda", local_rank=0) == torch.device("cuda", 0)
    assert fake_gpus == [1, 0]
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ConfigError, match="this machine has 2; .*--nproc_per_node=2"):
        pick_device("auto", local_rank=2)


def test_a_gpu_index_the_machine_lacks_is_a_config_error(fake_gpus):
    with pytest.raises(ConfigError, match=r"GPU 5 asked for, this machine has 2; use cuda:0 to cuda:1"):
        pick_device("cuda:5")
    assert fake_gpus == []


def test_auto_dtype_is_float16_where_bf16_is_only_emulated(monkeypatch):
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    # A T4: bf16 "supported" only by emulation
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert pick_dtype("auto", gpu) == torch.float16
    assert pick_dtype("bfloat16", gpu) == torch.bfloat16  # asked for: slow, but it runs
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100
    assert pick_dtype("auto", gpu) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    with pytest.raises(ConfigError, match="Tesla T4 cannot compute in bfloat16"):
        pick_dtype("bfloat16", gpu)


def test_kv_cache_holds_keys_and_values_in_the_autocast_dtype_with_qk_norm(monkeypatch):
    config = GPTConfig(block_size=16, n_layer=2, **QK_NORM_SHAPE)
    model = GPT(config).eval()
    cache = KVCache(config.n_layer, 16, torch.device("cpu"))
    with torch.no_grad(), autocast(torch.device("cpu"), torch.bfloat16):
        model(torch.zeros((3, 5), dtype=torch.long), cache=cache)
    assert {t.dtype for t in cache.k + cache.v} == {torch.bfloat16}
    # sample.py's memory check counts what the cache holds: exactly enough free memory passes
    held = sum(t.nbytes for t in cache.k + cache.v)
    for free, fits in ((held, True), (held - 1, False)):
        monkeypatch.setattr(memory, "free_memory_bytes", lambda device: free)
        try:
            check_kv_cache_fits(config, 3, 5, 11, torch.device("cpu"), torch.bfloat16)
            assert fits
        except ConfigError:
            assert not fits


def run_train(out_dir: Path, data_dir: Path, *flags: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        train.main([f"--out_dir={out_dir}", f"--data_dir={data_dir}", *TINY, *flags])
    return exit_info.value.code


def losses(out_dir: Path) -> dict[int, float]:
    records = map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())
    return {r["iter"]: r["loss"] for r in records if "loss" in r}


def test_float16_with_the_gradient_scaler_resumes_exactly(char_data, tmp_path):
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    assert run_train(whole, char_data, "--dtype=float16", "--max_iters=4") == 0
    assert run_train(halves, char_data, "--dtype=float16", "--max_iters=2", "--eval_interval=2") == 0
    scaler = load_checkpoint(halves)["scaler"]
    assert scaler["scale"] > 0 and "_growth_tracker" in scaler  # the scaler's state is saved
    assert run_train(halves, char_data, "--dtype=float16", "--max_iters=4", "--init_from=resume") == 0
    assert losses(halves) == losses(whole)
    # the resumed scaler carried on from the saved one: its count of steps since the last overflow too
    assert load_checkpoint(halves)["scaler"] == load_checkpoint(whole)["scaler"]


COMPILED = ("--max_iters=3", "--n_layer=1")  # one block: compile time grows with the blocks


@pytest.fixture(scope="module")
def eager_losses(char_data, tmp_path_factory) -> dict[int, float]:
    """What the compiled runs must match: the same iterations, eager, in one process."""
    out = tmp_path_factory.mktemp("eager") / "out"
    assert run_train(out, char_data, *COMPILED, "--compile=False") == 0
    return losses(out)


def test_compiled_training_with_activation_checkpointing_matches_eager(char_data, eager_losses, tmp_path):
    flags = ("--compile=True", "--activation_checkpointing=True")
    assert run_train(tmp_path / "out", char_data, *COMPILED, *flags) == 0
    assert losses(tmp_path / "out") == pytest.approx(eager_losses, rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_compiled_training_on_two_processes_matches_eager(char_data, eager_losses, tmp_path, parallelism):
    """2 iterations: compiling is what it costs, and the first iterations already show a compiled
    graph that computes something else."""
    out = tmp_path / "out"
    command = [str(REPO / "train.py"), f"--out_dir={out}", f"--data_dir={char_data}", *TINY, *COMPILED]
    result = subprocess.run(
        [*TORCHRUN, *command, "--max_iters=2", "--compile=True", f"--parallelism={parallelism}"],
        capture_output=True, text=True, timeout=300, env={**os.environ, **ENV},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(out) == pytest.approx({i: eager_losses[i] for i in (1, 2)}, rel=1e-4)


def test_compiled_decoding_under_bf16_autocast_gives_the_eager_tokens():
    config = GPTConfig(block_size=32, n_layer=1, **QK_NORM_SHAPE)
    torch.manual_seed(0)
    model = GPT(config).eval()
    prompt = torch.randint(0, 64, (2, 5))
    with autocast(torch.device("cpu"), torch.bfloat16):
        eager = generate(model, prompt, 12, temperature=0)
        compiled = generate(model, prompt, 12, temperature=0, compile=True)
    assert torch.equal(compiled, eager)


def test_auto_device_is_mps_where_cuda_is_absent_and_mps_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("mps")
    assert pick_dtype("auto", torch.device("mps")) == torch.float32
