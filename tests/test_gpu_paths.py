"""The branches that run only on a GPU, run on the CPU as far as it can: CUDA faked as available for
device and dtype choice (torch's own checks kept), float16 with the gradient scaler, compiled
training and decoding, FSDP's bf16 mixed precision on gloo, uneven multiple-choice splits under FSDP.
What the CPU cannot reach (NCCL, CUDA graphs, pinned memory, real GPU memory) tests/gpu_check.py
checks on a GPU; docs/gpu.md lists which is which."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TORCHRUN

import runtime
import train
from checkpoint import load_checkpoint
import generate as generate_module
from generate import check_kv_cache_fits, generate
from model import GPT, GPTConfig, KVCache
from runtime import ConfigError, autocast, pick_device, pick_dtype

REPO = Path(__file__).resolve().parents[1]
TASK = REPO / "tests" / "tiny_task.jsonl"
TINY = (
    "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
    "--gradient_accumulation_steps=2", "--eval_iters=2", "--eval_interval=1000", "--log_interval=1",
    "--warmup_iters=2", "--learning_rate=3e-3", "--eval_full=False", "--seed=7",
)  # fmt: skip
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PATH": "/usr/bin:/bin"}


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
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, qk_norm=True)
    model = GPT(config).eval()
    cache = KVCache(config.n_layer, 16, torch.device("cpu"))
    with torch.no_grad(), autocast(torch.device("cpu"), torch.bfloat16):
        model(torch.zeros((3, 5), dtype=torch.long), cache=cache)
    assert {t.dtype for t in cache.k + cache.v} == {torch.bfloat16}
    # sample.py's memory check counts what the cache holds: exactly enough free memory passes
    held = sum(t.nbytes for t in cache.k + cache.v)
    for free, fits in ((held, True), (held - 1, False)):
        monkeypatch.setattr(generate_module, "free_memory_bytes", lambda device: free)
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
