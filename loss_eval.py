"""Loss over a whole token split, every token predicted once, and bits per byte from it: the numbers
to compare runs by, shared by train.py (the whole-val loss after training) and eval.py (bpb)."""

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
import torch.distributed as dist

from dataset import to_device
from runtime import world
from tokenizer import Tokenizer


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


@torch.no_grad()
def full_val_loss(
    model: torch.nn.Module,
    tokens: np.ndarray,
    block_size: int,
    batch_size: int,
    device: torch.device,
    autocast: AbstractContextManager | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> float:
    """Mean loss over every token of tokens but the first, each predicted once: consecutive,
    non-overlapping windows of block_size, batched and shared out among the processes. The last
    window is padded, its padding ignored, so every batch has one shape (no recompiling). Every
    process runs as many batches (a sharded model's forward is collective); should_stop, agreed by
    all processes, ends them all at the same batch, and the caller discards the result."""
    rank, world_size = world()
    n_targets = len(tokens) - 1
    n_windows = math.ceil(n_targets / block_size)
    step = world_size * batch_size
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for first in range(rank * batch_size, math.ceil(n_windows / step) * step, step):
        if should_stop():
            break
        x = np.zeros((batch_size, block_size), dtype=np.int64)
        y = np.full((batch_size, block_size), -1, dtype=np.int64)  # -1: ignored by the loss
        for row, window in enumerate(range(first, min(first + batch_size, n_windows))):
            chunk = np.asarray(tokens[window * block_size : (window + 1) * block_size + 1], dtype=np.int64)
            x[row, : len(chunk) - 1], y[row, : len(chunk) - 1] = chunk[:-1], chunk[1:]
        with autocast or nullcontext():
            _, loss = model(to_device(x, device), to_device(y, device))
        n_real = int((y >= 0).sum())  # 0 in a batch that only keeps the processes in step
        if n_real:
            total += loss.double() * n_real  # the loss is a mean over the batch's real targets
    model.train(was_training)
    return all_reduce_sum(total).item() / n_targets


def bits_per_byte(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    tokens: np.ndarray,
    batch_size: int,
    device: torch.device,
    autocast: AbstractContextManager | None = None,
) -> tuple[float, int]:
    """(bits per byte, bytes): the loss of every token of tokens but the first, in bits, summed, over
    the UTF-8 bytes those tokens decode to."""
    mean_loss = full_val_loss(model, tokens, model.config.block_size, batch_size, device, autocast)  # nats
    n_bytes = len(tokenizer.decode_bytes(np.asarray(tokens[1:], dtype=np.int64).tolist()))
    return mean_loss * (len(tokens) - 1) / math.log(2) / n_bytes, n_bytes
