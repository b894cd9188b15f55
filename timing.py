"""What bench.py and bench_features.py share: presets, timers that alternate what they compare, the
measured matmul peak, a step's peak memory, the common flags, the results' header, a table's row."""

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch

from model import GPT, GPTConfig
from optim import make_optimizers
from runtime import DTYPE_NAMES, UserError, atomic_write, autocast, pick_device, pick_dtype


@dataclass
class Preset:
    model: dict  # GPTConfig fields
    batch_size: int  # training batch, sequences of seq_len tokens
    seq_len: int
    train_steps: int  # timed steps per model, after one warm-up step
    prompt_len: int  # generation: a random prompt of prompt_len tokens, then new_tokens greedy ones
    new_tokens: int
    generate_repeats: int  # timed generations per model and batch size (a long call needs no warm-up)
    no_cache_tokens: int  # new tokens for the KV cache vs no cache comparison
    no_cache_repeats: int  # its gap is several-fold: fewer repeats do
    matmul_size: int  # n of the n x n x n matmul that measures the peak FLOP/s (on CUDA at least 8192)
    choice_examples: int  # multiple-choice scoring: random examples of 4 choices, scored twice
    speculative_tokens: int = 500  # --speculative: tokens per sample
    draft_tokens: int = 4  # --speculative: tokens proposed per verification


PRESETS = {
    "tiny": Preset(  # seconds; for the smoke test, not for numbers
        dict(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64),
        batch_size=2,
        seq_len=32,
        train_steps=1,
        prompt_len=8,
        new_tokens=8,
        generate_repeats=1,
        no_cache_tokens=8,
        no_cache_repeats=1,
        matmul_size=256,
        choice_examples=2,
    ),
    "small": Preset(  # about a minute on a 2-core CPU
        dict(vocab_size=8192, block_size=512, n_layer=6, n_head=6, n_kv_head=2, n_embd=384),
        batch_size=8,
        seq_len=256,
        train_steps=3,
        prompt_len=64,
        new_tokens=256,
        generate_repeats=3,
        no_cache_tokens=500,
        no_cache_repeats=1,
        matmul_size=2048,
        choice_examples=32,
    ),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median_times(
    fns: list[Callable], repeats: int, device: torch.device, warm_up: bool = False
) -> list[float]:
    """Median seconds of each of fns. Calls alternate, and who goes first rotates, so that load from
    other processes and cache warmth fall on all alike."""
    if warm_up:
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for i in range(repeats):
        for j in range(len(fns)):
            k = (i + j) % len(fns)
            times[k].append(timed(fns[k], device))
    return [statistics.median(t) for t in times]


def measure_peak_flops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """The best FLOP/s of an n x n x n matmul in dtype: the device's practical peak, measured, not
    looked up, so MFU means the same on a laptop CPU as on a datacenter GPU."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up: library initialisation, kernel selection
    best = min(timed(lambda: a @ b, device) for _ in range(5))
    return 2 * n**3 / best


CUDA_MATMUL_SIZE = 8192  # a datacenter GPU reaches its peak only on large matmuls: at 2048 an H100 does not


def peak_matmul_size(preset: Preset, device: torch.device) -> int:
    return max(preset.matmul_size, CUDA_MATMUL_SIZE) if device.type == "cuda" else preset.matmul_size


def step_peak_memory(step: Callable[[], None], device: torch.device) -> int | None:
    """Bytes a training step needs at its peak beyond what was allocated before it: activations,
    gradients, temporaries. CPU: peak RSS over RSS before (Linux with glibc only, else None)."""
    gc.collect()
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap to the OS: a step cannot hide in it
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM, the peak RSS, to the current RSS
    except OSError:
        return None
    before = psutil.Process().memory_info().rss
    step()
    status = Path("/proc/self/status").read_text().splitlines()  # no library reads VmHWM after a reset
    peak_kib = next(line for line in status if line.startswith("VmHWM:")).split()[1]
    return int(peak_kib) * 1024 - before


def our_train_step(model: GPT, x: torch.Tensor, dtype: torch.dtype) -> tuple[Callable, torch.optim.AdamW]:
    """One forward + backward + AdamW step of our model on the batch x, and its optimizer."""
    (optimizer,) = make_optimizers(model, 0.1, 1e-4, (0.9, 0.95), x.device.type)

    def step() -> None:
        with autocast(x.device, dtype):
            loss = model(x, x)[1]  # not holding the logits: they would stay alive through backward
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer


def random_batch(preset: Preset, device: torch.device) -> torch.Tensor:
    return torch.randint(0, preset.model["vocab_size"], (preset.batch_size, preset.seq_len), device=device)


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def row(name: str, *values: float | None, fmt: str = "{:,.0f}") -> None:
    """A table's row: the values in columns, then the first over the second."""
    cells = "".join(f" {fmt.format(v) if v is not None else 'n/a':>12}" for v in values)
    ratio = f"{values[0] / values[1]:.2f}x" if values[0] and values[1] else ""
    print(f"{name:<44}{cells} {ratio:>9}")


def bench_arguments(doc: str) -> argparse.ArgumentParser:
    """The flags every benchmark takes: the preset, the device and dtype, and a JSON file."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="small")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu) or a torch device")
    parser.add_argument(
        "--dtype",
        choices=["auto", *DTYPE_NAMES],
        default="auto",
        help="float32, or autocast to a 16-bit type (auto: as train.py chooses)",
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    return parser


def check_json_path(path: str | None) -> None:
    """What would fail only at the end of minutes of measuring fails now."""
    if path and not Path(path).resolve().parent.is_dir():
        raise UserError(f"--json {path}: its folder does not exist; create it or choose another path")


def start(
    args: argparse.Namespace, versions: dict[str, str]
) -> tuple[torch.device, torch.dtype, Preset, GPT, dict]:
    """The device, dtype and preset args ask for, the preset's model (seeded) and the results' header
    (the machine, the versions), printed."""
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    dtype_name = str(dtype).removeprefix("torch.")
    preset = PRESETS[args.preset]
    torch.manual_seed(0)
    model = GPT(GPTConfig(**preset.model)).to(device)
    results: dict = {
        "preset": args.preset,
        "machine": machine_name(device),
        "device": device.type,
        "dtype": dtype_name,
        "torch": torch.__version__,
        **versions,
        "threads": torch.get_num_threads(),
        "model": asdict(model.config),
        "params": model.get_num_params(),
    }
    shown = "".join(f" | {name} {version}" for name, version in versions.items())
    threads = f"{results['threads']} threads | {device.type} {dtype_name}"
    print(f"machine: {results['machine']} | torch {torch.__version__}{shown} | {threads}")
    print(f"preset {args.preset}: {model.get_num_params() / 1e6:.1f}M params, {preset.model}")
    return device, dtype, preset, model, results


def write_json(path: str | None, results: dict) -> None:
    if path:
        text = json.dumps(results, indent=2) + "\n"
        atomic_write(path, lambda f: f.write(text.encode()))
