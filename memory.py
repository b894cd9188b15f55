"""Every memory query and check: free and peak memory, whether a model's training state or a KV cache
fits before it is allocated, and what each process holds."""

from dataclasses import replace
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from generate import kv_cache_length
from model import GPT, GPTConfig
from runtime import ConfigError


def free_memory_bytes(device: torch.device) -> int | None:
    """Bytes that can still be allocated on device: CUDA's free memory, or the memory Linux reports
    available (MemAvailable); None where unknown (MPS, other systems)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    available = next(
        (line.split()[1] for line in meminfo.splitlines() if line.startswith("MemAvailable:")), None
    )
    return int(available) * 1024 if available else None


def max_memory_allocated_bytes(device: torch.device) -> int | None:
    """The most torch has held allocated on a CUDA device since the process started; None elsewhere."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None  # GPU only


def check_model_fits(config: GPTConfig, optimizer: str, shards: int, device: torch.device) -> None:
    """Refuse, with the figures, a model whose parameters, gradients, optimizer state and RoPE tables
    alone exceed the device's free memory (activations come on top), before allocating any of it.
    shards: the processes FSDP shards the parameters, gradients and optimizer state over (else 1)."""
    free = free_memory_bytes(device)

    def sizes(n_layer: int) -> tuple[int, int]:  # (parameters, bytes of buffers) of n_layer blocks
        with torch.device("meta"):  # shapes only: no memory
            model = GPT(replace(config, n_layer=n_layer))
        return sum(p.numel() for p in model.parameters()), sum(b.nbytes for b in model.buffers())

    # Two small models' sizes, extrapolated by layer: building all n_layer blocks, even on the meta
    # device, takes minutes for 100,000 layers.
    (params_1, tables_1), (params_2, tables_2) = sizes(1), sizes(2)
    weights = (params_1 + (config.n_layer - 1) * (params_2 - params_1)) * 4  # float32 master weights
    tables = tables_1 + (config.n_layer - 1) * (tables_2 - tables_1)
    moments = 2 if optimizer == "adamw" else 1  # Muon keeps one for its matrices: a lower bound
    need = (2 + moments) * weights / shards + tables
    if free is not None and need > free:
        gib = {
            "parameters and gradients": 2 * weights / shards,
            "optimizer state": moments * weights / shards,
        }
        parts = ", ".join(f"{k} {v / 2**30:,.1f} GiB" for k, v in {**gib, "RoPE tables": tables}.items())
        raise ConfigError(
            f"the model needs at least {need / 2**30:,.1f} GiB on {device} ({parts}) but "
            f"{free / 2**30:,.1f} GiB is free: lower n_layer, n_embd or block_size"
        )


def memory_per_process(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], layout: str) -> str:
    """What this process holds of the parameters, their gradients and the optimizers' state (AdamW: two
    moments, Muon: one momentum; as many values each as their parameters): under fsdp its shards."""

    def mib(params) -> float:
        local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
        return sum(p.numel() * p.element_size() for p in local) / 2**20

    weights = mib(model.parameters())
    gradients = mib(p for p in model.parameters() if p.requires_grad)  # of a frozen base: none
    state = sum(
        (2 if isinstance(optimizer, torch.optim.AdamW) else 1)
        * mib(p for g in optimizer.param_groups for p in g["params"])
        for optimizer in optimizers
    )
    return (
        f"memory per process ({layout}): parameters {weights:.4g} MiB, gradients {gradients:.4g} MiB, "
        f"optimizer state {state:.4g} MiB, {weights + gradients + state:.4g} MiB in all"
    )


def check_kv_cache_fits(
    config: GPTConfig, num_samples: int, prompt_len: int, max_new_tokens: int, device: torch.device, dtype
) -> None:
    """Refuse a KV cache larger than the memory free on the device, before allocating anything."""
    positions = kv_cache_length(config, prompt_len, max_new_tokens)
    per_position = 2 * config.n_layer * config.n_kv_head * config.head_dim * dtype.itemsize  # keys and values
    needed = num_samples * positions * per_position
    free = free_memory_bytes(device)
    if free is not None and needed > free:
        raise ConfigError(
            f"num_samples={num_samples} x {positions} positions need a KV cache of "
            f"{needed / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB free on {device}; "
            "lower num_samples or max_new_tokens"
        )
