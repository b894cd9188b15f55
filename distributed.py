"""Processes: start-up under torchrun (device, process group, a stuck collective ended in one line),
stop signals all processes agree on, the SIGTERM watchdog, the model laid out (DDP, FSDP, compile)."""

import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from model import GPT
from runtime import ConfigError, UserError, pick_device, report_error, world

SIGTERM_GRACE_S = 25  # torchrun kills its workers 30 s after passing them its own SIGTERM


@contextmanager
def processes(
    requested_device: str, collective_timeout_s: float = 600, group_of_one: bool = False
) -> Iterator[torch.device]:
    """This process's device. Under torchrun (RANK is set) each process takes its local rank's GPU and
    joins the default process group (NCCL on CUDA, else gloo), destroyed on the way out. group_of_one:
    a process not started by torchrun joins a group of its own (FSDP shards over a group). A collective
    that waits over collective_timeout_s for another process ends the run: one line on gloo; on NCCL
    its watchdog aborts the process (exit -6, NCCL's own lines: PyTorch gives no hook for a message)."""
    if not 0 < collective_timeout_s <= 1e7:  # beyond it, timedelta overflows
        raise ConfigError(
            f"collective_timeout_s must be positive, in seconds, at most 1e7; got {collective_timeout_s}"
        )
    distributed = "RANK" in os.environ  # started by torchrun
    device = pick_device(requested_device, int(os.environ["LOCAL_RANK"]) if distributed else None)
    backend = "nccl" if device.type == "cuda" else "gloo"  # NCCL: GPU only, checked by tests/gpu_check.py
    timeout = timedelta(seconds=collective_timeout_s)
    if distributed:
        dist.init_process_group(backend, timeout=timeout)
    elif group_of_one:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    try:
        with exit_when_stuck_after_sigterm() if distributed else nullcontext():
            yield device
    except RuntimeError as e:
        if not distributed or "Timed out" not in str(e) and "Connection closed by peer" not in str(e):
            raise
        rank, world_size = world()
        others = (
            "rank 1" if world_size == 2 and rank == 0 else "rank 0" if world_size == 2 else "another rank"
        )
        raise UserError(
            f"rank {rank}: a collective waited over collective_timeout_s={collective_timeout_s:g} s for "
            f"{others}, or lost it: that process is stopped (kill -STOP: send it SIGCONT), stuck or died; "
            "see its output, then resume"
        ) from e
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@contextmanager
def exit_when_stuck_after_sigterm() -> Iterator[None]:
    """A process blocked in a collective never returns to Python, so its SIGTERM handler cannot run.
    Python's C-level handler still writes the signal's number to the wakeup fd; a thread reading it
    exits the process with 143 if it is still alive SIGTERM_GRACE_S later (a healthy one has saved
    and stopped by then). Main thread only, as signal.set_wakeup_fd."""
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)

    def watch() -> None:
        while (received := reader.recv(1)) and received[0] != signal.SIGTERM:
            pass
        if received:
            time.sleep(SIGTERM_GRACE_S)
            report_error(
                f"error: rank {world()[0]} did not stop within {SIGTERM_GRACE_S} s of SIGTERM (blocked in a "
                "collective by another process): exiting unsaved; the last checkpoint is intact"
            )
            os._exit(143)

    threading.Thread(target=watch, daemon=True).start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous)
        writer.close()  # the reader sees the end and the thread ends
        reader.shutdown(socket.SHUT_RDWR)


# --- stop signals ---------------------------------------------------------------------------------

_stop_signal = 0  # set by the SIGTERM / SIGINT handler: the run saves and stops at the next agreement


@contextmanager
def stop_signals_caught() -> Iterator[None]:
    """SIGTERM and SIGINT only set the stop flag while inside (a second one exits at once, unsaved);
    the previous handlers come back on the way out."""
    global _stop_signal
    _stop_signal = 0
    previous_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)


def request_stop(signum: int, frame) -> None:
    global _stop_signal
    if _stop_signal:  # a second signal: stop at once, unsaved (saves are atomic, the last one is intact)
        raise SystemExit(128 + signum)
    _stop_signal = signum
    if world()[0] == 0:
        print(
            f"\n{signal.Signals(signum).name}: saving a checkpoint after this iteration (again to abort now)",
            file=sys.stderr,
            flush=True,
        )


def agreed_stop_signal(group: dist.ProcessGroup | None) -> int:
    """The stop signal if any process has received one, else 0. Processes get a signal at slightly
    different moments; agreeing after every iteration makes them all stop after the same one. The
    group is gloo, on the CPU, so this never waits for the GPU."""
    flag = torch.tensor(_stop_signal)
    if group is not None:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return int(flag)


def parallelize(
    raw_model: GPT,
    device: torch.device,
    dtype: torch.dtype,
    parallelism: str,
    compiled: bool,
    checkpointed: bool,
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the model to evaluate, the model to train): raw_model on device, with activation checkpointing
    if asked, sharded (fsdp) or replicated (ddp, several processes), compiled if asked."""
    raw_model.activation_checkpointing = checkpointed
    raw_model.to(device)
    if parallelism == "fsdp":
        if dtype == torch.float16:
            raise ConfigError("parallelism='fsdp' computes in bfloat16 or float32; set dtype to one of those")
        # Each block is a unit, gathered whole just before it runs and freed after; the root unit holds
        # the rest, so a tied embedding and LM head stay one tensor. Parameters are gathered in dtype,
        # gradients reduce-scattered in float32 after every micro-step's backward, so they stay sharded.
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in raw_model.layers:
            fully_shard(block, mp_policy=policy)
        fully_shard(raw_model, mp_policy=policy)
    model = torch.compile(raw_model) if compiled else raw_model
    if parallelism == "ddp" and world()[1] > 1:
        # device_ids: NCCL on 2+ GPUs only, checked by tests/gpu_check.py where that many are present
        return model, DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, model
