"""Train a GPT (model.py) on a prepared data set.

    python train.py configs/shakespeare_char.py                  # one process
    python train.py configs/shakespeare_char.py --max_iters=500   # later arguments win
    torchrun --standalone --nproc_per_node=8 train.py configs/openwebtext.py

Writes out_dir/ckpt.pt, out_dir/config.json and out_dir/metrics.jsonl. Every random draw of a
training micro-step (its batch windows and its dropout masks) is derived from (seed, iteration,
global micro-step index): a resumed run repeats the uninterrupted one exactly, and N processes
train on the same global batches as one process.

Reading order: the config; train() and its loop, step and saves; evaluation; setup (data, model,
optimizer, resume) and the config's checks; signals and main().
"""

import json
import math
import signal
import sys
import textwrap
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import (
    CKPT_NAME,
    TOKENIZER_DIR,
    CheckpointError,
    check_lora_base,
    find_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    lock_out_dir,
    lora_config,
    model_from_checkpoint,
    prune_checkpoints,
    save_training_state,
)
from configurator import (
    AT_LEAST_1,
    AT_LEAST_1_OR_NONE,
    BELOW_ONE,
    NOT_NEGATIVE,
    POSITIVE,
    check_values,
    one_of,
    parse_config,
)
from dataset import (
    SPLITS,
    ChatRows,
    Row,
    check_data_fits,
    get_batch,
    load_meta,
    read_checked_tokens,
    resolve_data_dir,
)
from lora import LoRAConfig, add_lora, base_fingerprint, cast_base, is_adapter
from loss_eval import all_reduce_sum, full_val_loss
from metrics import MetricsLog
from model import GPT, GPTConfig
from optim import make_optimizers
from runtime import (
    ConfigError,
    UserError,
    atomic_write,
    autocast,
    datasheet_peak_flops,
    exit_on_error,
    free_memory_bytes,
    max_memory_allocated_bytes,
    pick_dtype,
    print0,
    processes,
    world,
)
from tasks import ChatTaskOptions, score_task, task_names
from tokenizer import copy_hf_tokenizer, get_tokenizer, tokenizer_entry

RUN_CONFIG_NAME = "config.json"  # the run's resolved config, what --init_from=resume restores
# How a run is launched, not what it is: --init_from=resume takes them from the command line (or their
# defaults), not from config.json, so a run resumes on whatever machine and process count is at hand.
LAUNCH_KEYS = ("device", "parallelism", "compile")


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"  # ckpt.pt, config.json and metrics.jsonl go here
    init_from: str = "scratch"  # 'scratch', 'resume' (out_dir/ckpt.pt), or a checkpoint to start anew from
    eval_interval: int = 250  # iterations between evaluations; a checkpoint is saved when val loss improves
    eval_iters: int = 100  # batches per split in each evaluation (the same batches every time)
    eval_only: bool = False  # evaluate the model init_from gives, then exit
    eval_full: bool = True  # after training (and with eval_only) also the loss over every val token once
    eval_tasks: str = ""  # eval.py's multiple-choice tasks to score at each evaluation, e.g. 'hellaswag'
    eval_task_examples: int = 100  # the first N examples of each of eval_tasks (the same ones every time)
    log_interval: int = 10  # iterations between log lines: the only points the host waits for the device
    always_save_checkpoint: bool = False  # save at every evaluation, not only when val loss improves
    wandb_log: bool = False
    wandb_project: str = "llm-train"
    wandb_run_name: str = "run"
    # data
    dataset: str = "openwebtext"  # a prepared folder under the repo's data/
    data_dir: str | None = None  # any prepared folder instead of data/<dataset>
    batch_size: int = 12  # sequences per micro-step in each process
    block_size: int = 1024  # tokens per sequence, and the model's context length
    gradient_accumulation_steps: int = 40  # micro-steps per iteration, all processes together
    chat_packing: bool = True  # a chat set's rows: conversations packed one after another, or one per row
    # model: from scratch only; a loaded checkpoint brings its own shape
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # key/value heads; None = n_head
    n_embd: int = 768
    head_dim: int | None = None  # size of each attention head; None = n_embd // n_head
    qk_norm: bool = False  # RMSNorm on each head's q and k (Qwen3)
    attn_bias: bool = False  # biases on the q, k and v projections (Qwen2)
    rope_scaling: dict | None = None  # Llama 3.1's {"rope_type": "llama3", ...}; see model.py
    sliding_window: int | None = None  # attend to the W most recent positions only (Mistral)
    tie_embeddings: bool = True  # the LM head shares the token embedding's weights (GPT-2, small Llamas)
    dropout: float = 0.0
    zero_init_out_proj: bool = False  # start attention's and the MLP's output projections at zero
    # optimizer: AdamW, or Muon for the blocks' matrices and AdamW for the rest
    optimizer: str = "adamw"  # 'adamw' or 'muon'
    muon_lr: float = 0.02  # Muon's learning rate (AdamW's is learning_rate); the schedule scales both alike
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5  # Newton-Schulz iterations that orthogonalise each Muon update
    learning_rate: float = 6e-4
    max_iters: int = 600000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = off
    warmup_iters: int = 2000
    lr_decay_iters: int | None = None  # where the decay reaches min_lr; None = max_iters
    min_lr: float = 6e-5
    lr_schedule: str = "cosine"  # after warmup: 'cosine' decay, or 'wsd' (constant, then a linear decay)
    decay_frac: float = 0.2  # wsd: the last fraction of lr_decay_iters that decays linearly to min_lr
    # LoRA (docs/lora.md): train low-rank adapters on a loaded model's matrices, the base frozen
    lora_rank: int | None = None  # the adapters' rank; None = no LoRA, train every weight
    lora_alpha: float = 32.0  # the adapters' output is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_targets: str = "q,k,v,o,gate,up,down"  # the matrices to adapt: attention's and the MLP's
    # parallelism (under torchrun) and memory
    parallelism: str = "ddp"  # 'ddp': each process holds the whole model; 'fsdp': shard it over them
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory
    # system
    device: str = "auto"  # 'auto' (cuda, then mps, then cpu), or a torch device such as 'cpu', 'cuda:1'
    dtype: str = "auto"  # 'auto': bfloat16 on CUDA (float16 if unsupported), else float32; or one of those
    compile: bool | None = None  # torch.compile the model; None = only on CUDA
    seed: int = 1337
    # A process that waits this long in a collective for another one ends the run (one stopped, stuck
    # or dead). Healthy waits stay far below it: rank 0 saving ckpt.pt while the others wait in their
    # next all-reduce (measured: 0.32 GiB/s fsynced on this CI machine's disk, so 600 s is a ~190 GiB
    # checkpoint), or one rank compiling longer than another (seconds to a minute or two cold).
    collective_timeout_s: float = 600


# TrainConfig keys that are also GPTConfig fields: the model's shape and options.
SHAPE_KEYS = (
    *("block_size", "n_layer", "n_head", "n_kv_head", "n_embd"),
    *("head_dim", "qk_norm", "attn_bias", "rope_scaling", "sliding_window", "tie_embeddings"),
)
TRAIN_STREAM, EVAL_STREAM = 0, 1  # random streams for training micro-steps and for evaluation batches
# A chat set's training rows, each drawn by its index in the global batch, so that any split of the batch
# into micro-steps and processes sees the same rows. Not TRAIN_STREAM: row r's stream would be micro-step
# r's, which seeds its dropout.
CHAT_ROW_STREAM = 2
_stop_signal = 0  # set by the SIGTERM / SIGINT handler: the run saves and stops after this iteration


@dataclass
class Run:
    """Everything a run needs after setup; iter_num and best_val_loss advance as it trains."""

    cfg: TrainConfig
    device: torch.device
    autocast: AbstractContextManager  # bf16/fp16 autocast, or a no-op for float32
    data_dir: Path
    meta: dict  # the data set's meta.json: tokenizer, token dtype, token counts
    chat: dict[str, ChatRows] | None  # a chat set's rows of each split; None for a text set
    raw_model: GPT  # the plain module: its state_dict loads without compile or DDP
    model: torch.nn.Module  # raw_model, compiled if asked: evaluation calls this
    train_model: torch.nn.Module  # model, in DDP when there are several processes: training calls this
    optimizers: list[torch.optim.Optimizer]  # AdamW, or Muon and AdamW
    scaler: torch.amp.GradScaler  # active for float16 only
    metrics: MetricsLog
    stop_group: dist.ProcessGroup | None  # gloo group that agrees on stop signals
    lock: BinaryIO | None  # held open: the lock on out_dir lasts as long as the run
    local_steps: int  # micro-steps per iteration in this process
    resumed: bool  # continuing the run in out_dir
    lora: dict | None  # LoRA's settings and the base's fingerprint (the checkpoint's entry), or None
    iter_num: int = 0
    best_val_loss: float = float("inf")


def train(cfg: TrainConfig) -> int:
    """Train (or, with eval_only, evaluate) as cfg says; returns the process exit code."""
    global _stop_signal
    _stop_signal = 0
    previous_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with processes(cfg.device, cfg.collective_timeout_s, cfg.parallelism == "fsdp") as device:
            check_config(cfg)
            timeout = timedelta(seconds=cfg.collective_timeout_s)
            stop_group = dist.new_group(backend="gloo", timeout=timeout) if dist.is_initialized() else None
            run = setup(fit_to_processes(cfg, world()[1]), device, stop_group)
            code = evaluate_only(run) if cfg.eval_only else train_loop(run)
            if dist.is_initialized():
                dist.barrier()  # all done with collectives: destroying the group while one is busy can abort
            return code
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)


def train_loop(run: Run) -> int:
    """Evaluate every eval_interval (saving when val loss improves), train an iteration, log every
    log_interval; stop at max_iters or, saving first, on SIGINT / SIGTERM. Returns the exit code."""
    cfg, started = run.cfg, time.time()
    first_iter, stop_signal, loss_sum = run.iter_num, 0, None
    show_bar = world()[0] == 0 and sys.stderr.isatty()
    bar = tqdm(total=cfg.max_iters, initial=run.iter_num, disable=not show_bar, dynamic_ncols=True)
    clock = (time.time(), run.iter_num)  # when the last log line or evaluation ended, at which iteration
    while True:
        due = run.iter_num % cfg.eval_interval == 0 or run.iter_num == cfg.max_iters
        evaluated_before = run.resumed and run.iter_num == first_iter  # by the run that saved the checkpoint
        if due and not evaluated_before:
            val_loss = evaluate(run)  # None when a stop signal cut it short
            if val_loss is not None and (val_loss < run.best_val_loss or cfg.always_save_checkpoint):
                run.best_val_loss = min(run.best_val_loss, val_loss)
                if run.iter_num > 0:
                    save(run)
            clock = (time.time(), run.iter_num)  # evaluation time is not training time
        stop_signal = agreed_stop_signal(run.stop_group)
        if run.iter_num >= cfg.max_iters or stop_signal:
            break

        lr = get_lr(run.iter_num, cfg)
        loss_sum = train_step(run, lr)
        run.iter_num += 1
        bar.update()
        if run.iter_num % cfg.log_interval == 0:
            clock = log_progress(run, loss_sum, lr, clock, bar)
    bar.close()

    full_loss = evaluate_full(run) if cfg.eval_full and not stop_signal else None
    stop_signal = stop_signal or agreed_stop_signal(run.stop_group)
    if stop_signal:
        return save_and_stop(run, stop_signal, loss_sum)
    print_summary(run, time.time() - started, full_loss)
    return 0


def print_summary(run: Run, seconds: float, full_loss: float | None) -> None:
    """The run's last line: how far it went, its losses, and where its checkpoint is."""
    full = "" if full_loss is None else f", full val loss {full_loss:.4f}"
    try:
        saved = find_checkpoint(run.cfg.out_dir)
        where = f"checkpoint in {saved}; sample with: python sample.py --out_dir={run.cfg.out_dir}"
    except CheckpointError:
        where = "no checkpoint saved (the val loss never improved after iter 0)"
    print0(
        f"done: iter {run.iter_num} in {seconds:.1f}s, best val loss {run.best_val_loss:.4f}{full}; {where}"
    )


def train_step(run: Run, lr: float) -> torch.Tensor:
    """One iteration: this process's micro-steps of forward and backward, then one optimizer step.
    Returns the sum of its micro-step losses, left on the device (reading it waits for the device)."""
    cfg, rank = run.cfg, world()[0]
    for group in (group for optimizer in run.optimizers for group in optimizer.param_groups):
        group["lr"] = lr * group["lr_scale"]
    chat = None
    if run.chat:  # every process draws every global row: the learned-token count needs no collective
        rows = draw_chat_rows(run, "train", CHAT_ROW_STREAM, run.iter_num, cfg.gradient_accumulation_steps)
        chat = (rows, run.chat["train"].learned(rows))
    loss_sum = torch.zeros((), device=run.device)
    for micro_step in range(run.local_steps):
        step = rank * run.local_steps + micro_step  # the micro-step's index in the global batch
        rng = np.random.default_rng([cfg.seed, TRAIN_STREAM, run.iter_num, step])
        torch.manual_seed(int(rng.integers(2**62)))  # this micro-step's dropout masks
        # Gradients are averaged across processes only in the last micro-step's backward.
        sync_now = micro_step == run.local_steps - 1 or not isinstance(run.train_model, DDP)
        with nullcontext() if sync_now else run.train_model.no_sync():
            with run.autocast:
                loss = micro_step_loss(run, rng, step, chat)
            run.scaler.scale(loss / run.local_steps).backward()
        loss_sum += loss.detach()
    if cfg.grad_clip > 0:
        for optimizer in run.optimizers:
            run.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), cfg.grad_clip)
    for optimizer in run.optimizers:
        run.scaler.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
    run.scaler.update()
    return loss_sum


def micro_step_loss(
    run: Run, rng: np.random.Generator, step: int, chat: tuple[list[Row], int] | None
) -> torch.Tensor:
    """The loss of global micro-step `step` of G: a text batch's mean (its windows drawn from rng). A
    chat batch's is the sum over its learned tokens times G / N, chat being (every global row, N their
    learned tokens): so the mean over the G micro-steps, which the backward and DDP's gradient averaging
    take, is the global batch's sum over N, and every learned token weighs the same however the batch
    is split into micro-steps and processes (a mean per micro-step would weigh a short reply's more)."""
    cfg = run.cfg
    if chat is None:
        x, y = get_batch(run.data_dir, run.meta, "train", rng, cfg.batch_size, cfg.block_size, run.device)
        return run.train_model(x, y)[1]  # not holding the logits frees them before backward
    rows, n_learned = chat
    mine = rows[step * cfg.batch_size : (step + 1) * cfg.batch_size]
    loss_sum = chat_loss_sum(run.train_model, run.chat["train"], mine, run.device)
    return loss_sum * (cfg.gradient_accumulation_steps / max(n_learned, 1))  # no learned token: 0, not NaN


def draw_chat_rows(run: Run, split: str, stream: int, key: int, n_batches: int) -> list[Row]:
    """The conversations of n_batches batches' rows, row r from the random stream (seed, stream, key, r)."""
    n_rows = n_batches * run.cfg.batch_size
    return [
        run.chat[split].draw(np.random.default_rng([run.cfg.seed, stream, key, r])) for r in range(n_rows)
    ]


def chat_loss_sum(
    model: torch.nn.Module, chat: ChatRows, rows: list[Row], device: torch.device
) -> torch.Tensor:
    """The loss summed over the learned tokens of rows, each attending only to its own conversation."""
    x, y, segments = chat.batch(rows, device)
    return model(x, y, segments=segments, reduction="sum")[1]


def get_lr(it: int, cfg: TrainConfig) -> float:
    """AdamW's learning rate at iteration it (Muon's is muon_lr / learning_rate times it): a linear
    warmup to learning_rate, then to min_lr at lr_decay_iters by a cosine decay, or by 'wsd': constant
    until the last decay_frac of lr_decay_iters, then a linear decay; then min_lr."""
    decay_iters = cfg.max_iters if cfg.lr_decay_iters is None else cfg.lr_decay_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    if cfg.lr_schedule == "wsd":
        decay_start = max(cfg.warmup_iters, decay_iters * (1 - cfg.decay_frac))
        if it < decay_start:
            return cfg.learning_rate
        return cfg.learning_rate + (cfg.min_lr - cfg.learning_rate) * (it - decay_start) / (
            decay_iters - decay_start
        )
    progress = (it - cfg.warmup_iters) / (decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def global_loss(run: Run, loss_sum: torch.Tensor) -> float:
    """An iteration's mean micro-step loss over all processes (waits for the device)."""
    return all_reduce_sum(loss_sum / run.local_steps).item() / world()[1]


def log_progress(
    run: Run, loss_sum: torch.Tensor, lr: float, since: tuple[float, int], bar: tqdm
) -> tuple[float, int]:
    """Log the last iteration's loss and the speed since `since` (time, iteration); returns the new clock."""
    loss = global_loss(run, loss_sum)  # waits for the device, so the time below is real
    check_finite(loss, "the training loss", run.iter_num)
    now = time.time()
    dt = (now - since[0]) / (run.iter_num - since[1])
    tokens_per_s = tokens_per_iter(run.cfg) / dt
    peak = datasheet_peak_flops(run.device)
    # Per device: this process's tokens against one device's peak.
    mfu = run.raw_model.flops_per_token() * tokens_per_s / world()[1] / peak[1] if peak else None
    print0(
        f"iter {run.iter_num}: loss {loss:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/iter, "
        f"{tokens_per_s:,.0f} tokens/s" + ("" if mfu is None else f", mfu {mfu:.1%}")
    )
    record = dict(loss=loss, lr=lr, ms_per_iter=dt * 1000, tokens_per_s=tokens_per_s, mfu=mfu)
    if (allocated := max_memory_allocated_bytes(run.device)) is not None:
        record["max_memory_mib"] = allocated / 2**20
    run.metrics.write({"iter": run.iter_num, **record})
    bar.set_postfix_str(f"loss {loss:.4f}, {tokens_per_s:,.0f} tokens/s", refresh=False)
    return now, run.iter_num


def check_finite(loss: float, what: str, iter_num: int) -> None:
    if not math.isfinite(loss):
        raise UserError(
            f"{what} is {loss} at iter {iter_num}: training diverged, so it stops here and the last good "
            "checkpoint is left as it was. Try a lower learning_rate, a longer warmup_iters or grad_clip"
        )


def save(run: Run) -> None:
    """The run's checkpoint in out_dir: ckpt.pt written by rank 0 (every process holds the same
    weights), or a sharded checkpoint written by every process at once (fsdp)."""
    out_dir = Path(run.cfg.out_dir)
    meta = {
        "model_args": asdict(run.raw_model.config),
        "iter_num": run.iter_num,
        "best_val_loss": run.best_val_loss,
        "config": asdict(run.cfg),
        "tokenizer": tokenizer_entry(run.meta),
        "scaler": run.scaler.state_dict(),
        "lora": run.lora,
    }
    print0(f"saving checkpoint to {out_dir} (iter {run.iter_num})")
    save_training_state(run.raw_model, run.optimizers, meta, out_dir, sharded=run.cfg.parallelism == "fsdp")


def save_and_stop(run: Run, stop_signal: int, loss_sum: torch.Tensor | None) -> int:
    """Save where the run stands after a stop signal; returns the shell's exit code for that signal."""
    if loss_sum is not None:  # never replace a good checkpoint with diverged weights
        check_finite(global_loss(run, loss_sum), "the training loss", run.iter_num)
    save(run)
    print0(
        f"stopped by {signal.Signals(stop_signal).name} at iter {run.iter_num}: saved a checkpoint in "
        f"{run.cfg.out_dir}; continue with: "
        f"python train.py --out_dir={run.cfg.out_dir} --init_from=resume"
    )
    return 128 + stop_signal  # the run did not finish


# --- evaluation -----------------------------------------------------------------------------------


@torch.no_grad()
def estimate_loss(run: Run) -> dict[str, float]:
    """Mean loss over eval_iters batches of each split, shared out among the processes: of a text set
    the mean of the batches' means, of a chat set the mean over all their learned tokens. The batches
    are the same at every evaluation, so successive evaluations differ only by the model."""
    cfg, (rank, world_size) = run.cfg, world()
    run.model.eval()
    losses = {}
    for split_index, split in enumerate(SPLITS):
        total = torch.zeros((), device=run.device)
        rows = draw_chat_rows(run, split, EVAL_STREAM, split_index, cfg.eval_iters) if run.chat else None
        # Every process runs as many batches (a sharded model's forward is collective); a stop signal
        # ends them all at the same batch, and the caller discards the evaluation.
        for k in range(rank, math.ceil(cfg.eval_iters / world_size) * world_size, world_size):
            if agreed_stop_signal(run.stop_group):
                break
            with run.autocast:
                loss = eval_batch_loss(run, split, split_index, k, rows)
            if k < cfg.eval_iters:  # the others only keep the processes in step
                total += loss.float()
        count = cfg.eval_iters if rows is None else max(run.chat[split].learned(rows), 1)
        losses[split] = all_reduce_sum(total).item() / count
    run.model.train()
    return losses


def eval_batch_loss(run: Run, split: str, split_index: int, k: int, rows: list[Row] | None) -> torch.Tensor:
    """Evaluation batch k of split: a text batch's mean loss, or the loss sum over the learned tokens of
    a chat batch, its rows from rows (past eval_iters, a repeat that only keeps the processes in step)."""
    cfg = run.cfg
    if rows is None:
        rng = np.random.default_rng([cfg.seed, EVAL_STREAM, split_index, k])
        x, y = get_batch(run.data_dir, run.meta, split, rng, cfg.batch_size, cfg.block_size, run.device)
        return run.model(x, y)[1]
    first = (k % cfg.eval_iters) * cfg.batch_size
    return chat_loss_sum(run.model, run.chat[split], rows[first : first + cfg.batch_size], run.device)


def evaluate(run: Run) -> float | None:
    """Estimate, print and log the train and val losses; returns the val loss, which must be finite,
    or None if a stop signal on any process cut the evaluation short."""
    cfg, losses, scores = run.cfg, estimate_loss(run), {}
    if cfg.eval_tasks:  # the raw model: every batch of choices has its own length, too many to compile
        tokenizer, args = get_tokenizer(run.meta), (cfg.eval_task_examples, cfg.batch_size, run.device)
        for name in task_names(cfg.eval_tasks):  # draws no random numbers
            chat = ChatTaskOptions(template=run.meta.get("chat_template"))  # the set's, if prepare had one
            scores |= score_task(run.raw_model, tokenizer, name, *args, run.autocast, chat)[0]
    if agreed_stop_signal(run.stop_group):
        return None
    shown = "".join(f", {name} {value:.4f}" for name, value in scores.items())
    print0(f"iter {run.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}{shown}")
    run.metrics.write(
        {"iter": run.iter_num, "train_loss": losses["train"], "val_loss": losses["val"], **scores}
    )
    check_finite(losses["val"], "the val loss", run.iter_num)
    return losses["val"]


def evaluate_full(run: Run) -> float | None:
    """The loss over the whole val split, every token once (of a chat set: every learned token of the
    conversations that fit): the number to compare runs by."""
    t0, cfg = time.time(), run.cfg
    should_stop = lambda: bool(agreed_stop_signal(run.stop_group))  # noqa: E731
    if run.chat:
        loss, what = chat_full_val_loss(run, should_stop), "every learned val token once"
    else:
        tokens = read_checked_tokens(run.data_dir, run.meta, "val")
        loss = full_val_loss(
            run.model, tokens, cfg.block_size, cfg.batch_size, run.device, run.autocast, should_stop
        )
        what = "every val token once"
    if agreed_stop_signal(run.stop_group):  # cut short: not a result
        return None
    print0(f"iter {run.iter_num}: full val loss {loss:.4f} ({what}, {time.time() - t0:.1f}s)")
    run.metrics.write({"iter": run.iter_num, "val_loss_full": loss})
    return loss


@torch.no_grad()
def chat_full_val_loss(run: Run, should_stop: Callable[[], bool]) -> float:
    """The mean loss over the learned tokens of every val conversation that fits, each once, in rows
    packed in order and shared out among the processes as full_val_loss shares windows (every process
    runs as many batches; the last ones are filled with empty rows, all padding, so one shape serves)."""
    chat, batch_size, (rank, world_size) = run.chat["val"], run.cfg.batch_size, world()
    rows = chat.in_order()
    step = world_size * batch_size
    run.model.eval()
    total = torch.zeros((), dtype=torch.float64, device=run.device)
    for first in range(rank * batch_size, math.ceil(len(rows) / step) * step, step):
        if should_stop():
            break
        batch = (rows[first : first + batch_size] + [[]] * batch_size)[:batch_size]
        with run.autocast:
            total += chat_loss_sum(run.model, chat, batch, run.device).double()
    run.model.train()
    return all_reduce_sum(total).item() / max(chat.learned(rows), 1)


def evaluate_only(run: Run) -> int:
    """eval_only: evaluate the model init_from gives, without training or saving."""
    evaluate(run)
    if run.cfg.eval_full:
        evaluate_full(run)
    stop_signal = agreed_stop_signal(run.stop_group)
    return 128 + stop_signal if stop_signal else 0


# --- setup: model, optimizer, resume --------------------------------------------------------------


def setup(cfg: TrainConfig, device: torch.device, stop_group: dist.ProcessGroup | None) -> Run:
    """Data, model, optimizer and the state a resumed run continues from; prints what was set up."""
    lock = lock_out_dir(Path(cfg.out_dir))
    data_dir = resolve_data_dir(cfg.dataset, cfg.data_dir)
    meta = load_meta(data_dir)
    dtype = pick_dtype(cfg.dtype, device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for whatever runs in float32
    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    check_data_fits(data_dir, meta, cfg.block_size)  # before building a model of that length
    raw_model, checkpoint, cfg = init_model(cfg, meta, device)
    check_data_fits(data_dir, meta, cfg.block_size)  # a loaded model brings its own
    lora = setup_lora(cfg, raw_model, checkpoint, dtype)  # before DDP and the optimizers: what trains
    chat = chat_rows(data_dir, meta, cfg) if meta.get("chat") else None
    model, train_model = parallelize(raw_model, cfg, device, dtype)
    optimizers = new_optimizers(raw_model, cfg, device)  # after sharding: they update its shards
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    resumed = cfg.init_from == "resume" and not cfg.eval_only
    iter_num = checkpoint["iter_num"] if checkpoint is not None and (resumed or cfg.eval_only) else 0
    best_val_loss = (
        restore_training_state(cfg, checkpoint, raw_model, optimizers, scaler) if resumed else math.inf
    )
    del checkpoint  # the weights now live in the model and optimizer
    if resumed and lock is not None:  # what it replaced goes only now that it has loaded
        prune_checkpoints(Path(cfg.out_dir), keep=find_checkpoint(cfg.out_dir))
    # A sharded model computes in its mixed-precision policy's dtype; autocast is for the others.
    run = Run(
        cfg=cfg,
        device=device,
        autocast=autocast(device, dtype) if cfg.parallelism != "fsdp" else nullcontext(),
        data_dir=data_dir,
        meta=meta,
        chat=chat,
        raw_model=raw_model,
        model=model,
        train_model=train_model,
        optimizers=optimizers,
        scaler=scaler,
        metrics=open_metrics(cfg, records_to_keep(cfg, resumed, iter_num)),
        lock=lock,
        stop_group=stop_group,
        local_steps=cfg.gradient_accumulation_steps // world()[1],
        resumed=resumed,
        lora=lora,
        iter_num=iter_num,
        best_val_loss=best_val_loss,
    )
    if not cfg.eval_only:
        write_run_files(cfg, meta)
    print_setup(run, dtype)
    return run


def chat_rows(data_dir: Path, meta: dict, cfg: TrainConfig) -> dict[str, ChatRows]:
    """Each split's rows of a chat set. Says how many conversations fit a row and how many, longer than
    block_size + 1 tokens, are left out; refuses a split where none fits."""
    chat = {split: ChatRows(data_dir, meta, split, cfg.block_size, cfg.chat_packing) for split in SPLITS}
    for split, rows in chat.items():
        if not len(rows.fitting):
            raise UserError(
                f"no {split} conversation of {data_dir} fits a row of block_size {cfg.block_size} (a row "
                f"holds {cfg.block_size + 1} tokens): raise block_size, or prepare shorter conversations"
            )
    counts = ", ".join(
        f"{split} {len(rows.fitting):,} ({rows.left_out:,} left out)" for split, rows in chat.items()
    )
    layout = "packed" if cfg.chat_packing else "one per row"
    print0(
        f"chat set: conversations {counts}, left out as longer than block_size + 1 = {cfg.block_size + 1} "
        f"tokens; rows of whole conversations, {layout}, the loss on learned tokens only"
    )
    return chat


def records_to_keep(cfg: TrainConfig, resumed: bool, iter_num: int) -> Callable[[dict], bool] | None:
    """Which records of metrics.jsonl stay (None: a new log). A resumed run drops what the interrupted
    one logged past its checkpoint; eval_only drops the evaluations of the checkpoint's iteration that
    it writes anew, so that no iteration has an evaluation twice."""
    if resumed:
        return lambda record: record["iter"] <= iter_num
    if cfg.eval_only:
        rewritten = {"val_loss", *(("val_loss_full",) if cfg.eval_full else ())}
        return lambda record: record["iter"] != iter_num or not rewritten & record.keys()
    return None


def new_optimizers(raw_model: GPT, cfg: TrainConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    return make_optimizers(
        raw_model,
        cfg.weight_decay,
        cfg.learning_rate,
        (cfg.beta1, cfg.beta2),
        device.type,
        muon_lr=cfg.muon_lr if cfg.optimizer == "muon" else None,
        muon_momentum=cfg.muon_momentum,
        muon_ns_steps=cfg.muon_ns_steps,
    )


def padded_vocab_size(vocab_size: int) -> int:
    """BPE-sized vocabularies are padded up to a multiple of 64 for faster matmuls (GPT-2: 50257 ->
    50304); a small character vocabulary stays exact, where padding would add mostly unused rows."""
    return 64 * math.ceil(vocab_size / 64) if vocab_size >= 1024 else vocab_size


def model_config(cfg: TrainConfig, vocab_size: int) -> GPTConfig:
    try:
        return GPTConfig(
            vocab_size=vocab_size, dropout=cfg.dropout, **{k: getattr(cfg, k) for k in SHAPE_KEYS}
        )
    except ValueError as e:
        raise ConfigError(f"bad model shape: {e}") from None


def init_model(cfg: TrainConfig, meta: dict, device: torch.device) -> tuple[GPT, dict | None, TrainConfig]:
    """The model init_from asks for, the checkpoint it came from (None from scratch), and cfg with its
    shape keys set to the model's. Resuming needs the run's own shape keys; any other load takes the
    checkpoint's shape (printing what it overrides), as a pretrained model's shape is not a choice.
    What TrainConfig does not set (MLP width, norm epsilon, RoPE theta) always comes from the
    checkpoint."""
    wanted = model_config(cfg, padded_vocab_size(meta["vocab_size"]))
    if cfg.init_from == "scratch":
        check_model_fits(wanted, cfg, device)
        warn_of_replaced_checkpoint(cfg)
        return GPT(wanted, cfg.zero_init_out_proj), None, cfg
    path = Path(cfg.out_dir) if cfg.init_from == "resume" else Path(cfg.init_from)
    if cfg.init_from != "resume" and not path.exists():
        raise UserError(
            f"init_from={cfg.init_from!r} is not 'scratch', 'resume' or an existing checkpoint or folder"
        )
    checkpoint = load_checkpoint(path)
    if "model_args" in checkpoint:  # dropout is a choice of this run, not part of the weights
        checkpoint["model_args"] = {**checkpoint["model_args"], "dropout": cfg.dropout}
    model = model_from_checkpoint(checkpoint, keep_lora=cfg.init_from == "resume")
    loaded = model.config
    changed = {k: getattr(loaded, k) for k in SHAPE_KEYS if getattr(loaded, k) != getattr(wanted, k)}
    if changed and cfg.init_from == "resume" and not cfg.eval_only:
        diffs = ", ".join(f"{k}={v} (config: {getattr(wanted, k)})" for k, v in changed.items())
        raise ConfigError(
            f"cannot resume {path}: its model has {diffs}. Resume with the run's own config "
            "(e.g. the same config file), or start a new run in another out_dir"
        )
    if changed:
        shape = ", ".join(f"{k}={v}" for k, v in changed.items())
        print0(f"note: the model's shape comes from {path}: {shape} (the config's values are ignored)")
    if meta["vocab_size"] > loaded.vocab_size:
        raise UserError(
            f"the data set's vocabulary ({meta['vocab_size']:,} tokens) is larger than the model's "
            f"({loaded.vocab_size:,}) in {path}: the data was prepared with another tokenizer"
        )
    return model, checkpoint, replace(cfg, **changed)


def lora_settings(cfg: TrainConfig) -> LoRAConfig | None:
    if cfg.lora_rank is None:
        return None
    targets = tuple(target.strip() for target in cfg.lora_targets.split(","))
    try:
        return LoRAConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, targets)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def setup_lora(cfg: TrainConfig, model: GPT, checkpoint: dict | None, dtype: torch.dtype) -> dict | None:
    """With lora_rank: freeze model and give it adapters (a resumed run's own came with it), its base held
    in the run's dtype. Returns the checkpoint's lora entry: the settings and the base's fingerprint."""
    wanted = lora_settings(cfg)
    saved = checkpoint.get("lora") if cfg.init_from == "resume" else None
    if cfg.init_from == "resume" and wanted != (saved and lora_config(saved)):
        had = f"LoRA {lora_config(saved)}" if saved else "no LoRA"
        raise ConfigError(
            f"the run in {cfg.out_dir} was trained with {had}: resume it with its own lora_* settings "
            f"(config.json holds them), or start a new run from its weights: --init_from={cfg.out_dir}"
        )
    if wanted is None:
        return None
    if saved is None:
        try:
            add_lora(model, wanted)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    cast_base(model, dtype)
    entry = {**asdict(wanted), "base_fingerprint": base_fingerprint(model)}
    if saved:  # a base saved in float32 would be rounded by a 16-bit dtype: another base
        stored = str(checkpoint["model"]["tok_embeddings.weight"].dtype).removeprefix("torch.")
        check_lora_base(model, saved, f"its base was saved in {stored}; resume with --dtype={stored}")
    return entry


def check_model_fits(config: GPTConfig, cfg: TrainConfig, device: torch.device) -> None:
    """Refuse, with the figures, a model whose parameters, gradients, optimizer state and RoPE tables
    alone exceed the device's free memory (activations come on top), before allocating any of it."""
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
    moments = 2 if cfg.optimizer == "adamw" else 1  # Muon keeps one for its matrices: a lower bound
    shards = world()[1] if cfg.parallelism == "fsdp" else 1
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


def warn_of_replaced_checkpoint(cfg: TrainConfig) -> None:
    """A new run into an out_dir holding another run's checkpoint replaces it at its first save."""
    out_dir = Path(cfg.out_dir)
    found = [p.name for p in [out_dir / CKPT_NAME, *sorted(out_dir.glob("ckpt-*"))] if p.exists()]
    if found and not cfg.eval_only:
        print0(
            f"warning: {out_dir} holds the checkpoint of an earlier run ({', '.join(found)}); this run's "
            "first save replaces it. Stop now and choose another out_dir to keep it"
        )


def parallelize(
    raw_model: GPT, cfg: TrainConfig, device: torch.device, dtype: torch.dtype
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the model to evaluate, the model to train): raw_model on device, with activation checkpointing
    if asked, sharded (fsdp) or replicated (ddp, several processes), compiled if asked."""
    raw_model.activation_checkpointing = cfg.activation_checkpointing
    raw_model.to(device)
    if cfg.parallelism == "fsdp":
        if dtype == torch.float16:
            raise ConfigError("parallelism='fsdp' computes in bfloat16 or float32; set dtype to one of those")
        # Each block is a unit, gathered whole just before it runs and freed after; the root unit holds
        # the rest, so a tied embedding and LM head stay one tensor. Parameters are gathered in dtype,
        # gradients reduce-scattered in float32 after every micro-step's backward, so they stay sharded.
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in raw_model.layers:
            fully_shard(block, mp_policy=policy)
        fully_shard(raw_model, mp_policy=policy)
    model = torch.compile(raw_model) if use_compile(cfg, device) else raw_model
    if cfg.parallelism == "ddp" and world()[1] > 1:
        # device_ids: NCCL on 2+ GPUs only, checked by tests/gpu_check.py where that many are present
        return model, DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, model


def use_compile(cfg: TrainConfig, device: torch.device) -> bool:
    return device.type == "cuda" if cfg.compile is None else cfg.compile


def restore_training_state(
    cfg: TrainConfig,
    checkpoint: dict,
    raw_model: GPT,
    optimizers: list[torch.optim.Optimizer],
    scaler: torch.amp.GradScaler,
) -> float:
    """Load what resuming continues besides the weights (optimizer and gradient-scaler state), whatever
    the number of processes and sharding that wrote it; returns the run's best val loss so far."""
    if "optimizer" not in checkpoint and "folder" not in checkpoint:
        raise UserError(
            f"the checkpoint in {cfg.out_dir} has no optimizer state to resume; "
            f"start from its weights: --init_from={cfg.out_dir}"
        )
    saved = (checkpoint.get("config") or {}).get("optimizer", "adamw")
    if saved != cfg.optimizer:
        raise ConfigError(
            f"the run in {cfg.out_dir} was trained with optimizer={saved!r}; resume it with that optimizer, "
            f"or start a new run from its weights with optimizer={cfg.optimizer!r}: --init_from={cfg.out_dir}"
        )
    load_optimizer_state(checkpoint, raw_model, optimizers)
    if scaler.is_enabled() and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    return checkpoint["best_val_loss"]


def open_metrics(cfg: TrainConfig, keep: Callable[[dict], bool] | None) -> MetricsLog:
    """metrics.jsonl (and wandb, if asked) on rank 0; the other processes log nothing."""
    if world()[0] != 0:
        return MetricsLog(None, keep)
    return MetricsLog(cfg.out_dir, keep, start_wandb(cfg) if cfg.wandb_log else None)


def start_wandb(cfg: TrainConfig):
    """A wandb run, or one line that says how to get one: log in, or log locally with WANDB_MODE=offline."""
    try:
        import wandb  # only when asked for: it is slow to import
    except ImportError:
        raise UserError("wandb_log=True needs wandb: pip install wandb, or leave wandb_log off") from None
    try:
        return wandb.init(
            project=cfg.wandb_project, name=cfg.wandb_run_name, config=asdict(cfg), dir=cfg.out_dir
        )
    except Exception as e:  # wandb's own kinds: not logged in, no network, a bad project name
        reason = " ".join(str(e).split())[:200]
        raise UserError(
            f"wandb did not start ({type(e).__name__}: {reason}); log in with `wandb login`, or log "
            "locally with WANDB_MODE=offline (wandb sync uploads it later), or leave wandb_log off"
        ) from None


def write_run_files(cfg: TrainConfig, meta: dict) -> None:
    """out_dir/config.json, what --init_from=resume restores, and a copy of a Hugging Face tokenizer's
    files, so that the run's checkpoints do not depend on the folder the data set names (rank 0)."""
    if world()[0] == 0:
        text = json.dumps(asdict(cfg), indent=2) + "\n"
        atomic_write(Path(cfg.out_dir) / RUN_CONFIG_NAME, lambda f: f.write(text.encode()))
        if meta.get("tokenizer") == "hf" and Path(meta["path"]).is_dir():
            copy_hf_tokenizer(Path(meta["path"]), Path(cfg.out_dir) / TOKENIZER_DIR)


def print_setup(run: Run, dtype: torch.dtype) -> None:
    """A few lines: the config's differences from the defaults (the whole of it is in config.json), the
    model's size, the batch, the device and the memory per process."""
    cfg, world_size = run.cfg, world()[1]
    changed = [
        f"{key}={value!r}"
        for key, value in asdict(cfg).items()
        if value != getattr(TrainConfig, key) and not (key == "dataset" and cfg.data_dir)
    ]
    print0("\n".join(textwrap.wrap("config: " + ", ".join(changed), 110, subsequent_indent="  ")))
    per_process = f" ({run.local_steps} in each of {world_size} processes)" if world_size > 1 else ""
    print0(
        f"{run.raw_model.get_num_params() / 1e6:.2f}M parameters; {tokens_per_iter(cfg):,} tokens per "
        f"iteration: batch_size {cfg.batch_size} x block_size {cfg.block_size} x "
        f"gradient_accumulation_steps {cfg.gradient_accumulation_steps}{per_process}"
    )
    peak = datasheet_peak_flops(run.device)
    mfu = f"; mfu against {peak[0]}'s bf16 datasheet peak, {peak[1] / 1e12:,.0f} TFLOP/s" if peak else ""
    compiled = "compiled" if use_compile(cfg, run.device) else "not compiled"
    print0(f"device {run.device}, {str(dtype).removeprefix('torch.')}, {compiled}{mfu}")
    layout = cfg.parallelism if world_size > 1 else "one process"
    if cfg.parallelism == "fsdp" and world_size == 1:
        layout = "fsdp in one process, the sharded code path: it saves no memory"
    if run.lora:
        print0(lora_summary(run))
    print0(memory_per_process(run, layout))
    if run.resumed:
        print0(f"resumed from iter {run.iter_num} of the checkpoint in {cfg.out_dir}")


def memory_per_process(run: Run, layout: str) -> str:
    """What this process holds of the parameters, their gradients and the optimizers' state (AdamW: two
    moments, Muon: one momentum; as many values each as their parameters): under fsdp its shards."""

    def mib(params) -> float:
        local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
        return sum(p.numel() * p.element_size() for p in local) / 2**20

    weights = mib(run.raw_model.parameters())
    gradients = mib(p for p in run.raw_model.parameters() if p.requires_grad)  # LoRA: the adapters' only
    state = sum(
        (2 if isinstance(optimizer, torch.optim.AdamW) else 1)
        * mib(p for g in optimizer.param_groups for p in g["params"])
        for optimizer in run.optimizers
    )
    return (
        f"memory per process ({layout}): parameters {weights:.4g} MiB, gradients {gradients:.4g} MiB, "
        f"optimizer state {state:.4g} MiB, {weights + gradients + state:.4g} MiB in all"
    )


def lora_summary(run: Run) -> str:
    """LoRA's line: its settings, and the parameters trained (the adapters) and frozen, with dtypes."""
    trained, frozen = {}, {}
    for name, p in run.raw_model.named_parameters():
        side = trained if is_adapter(name) else frozen
        side[p.dtype] = side.get(p.dtype, 0) + p.numel()

    def count(side: dict) -> str:
        return ", ".join(
            f"{n / 1e6:.3g}M in {str(dtype).removeprefix('torch.')}" for dtype, n in side.items()
        )

    lora = run.lora
    return (
        f"LoRA rank {lora['rank']}, alpha {lora['alpha']:g}, dropout {lora['dropout']:g} on "
        f"{','.join(lora['targets'])}: trains {count(trained)} (AdamW), {count(frozen)} frozen; "
        f"base fingerprint {lora['base_fingerprint']}"
    )


def tokens_per_iter(cfg: TrainConfig) -> int:
    return cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size


# --- checks ---------------------------------------------------------------------------------------


def check_config(cfg: TrainConfig) -> None:
    """Values no run can use, refused before any work (exit code 2)."""
    at_least_1 = ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters")
    at_least_1 += ("eval_task_examples", "muon_ns_steps", "log_interval")
    not_negative = ("max_iters", "warmup_iters", "lr_decay_iters", "min_lr", "weight_decay", "grad_clip")
    rules = dict.fromkeys(at_least_1, AT_LEAST_1) | dict.fromkeys(not_negative, NOT_NEGATIVE)
    rules |= dict.fromkeys(("beta1", "beta2", "dropout", "muon_momentum"), BELOW_ONE)
    rules |= dict.fromkeys(("learning_rate", "muon_lr"), POSITIVE)
    rules |= {"seed": (lambda v: 0 <= v < 2**63, "must be in [0, 2**63)")}
    rules |= {"optimizer": one_of("adamw", "muon"), "lr_schedule": one_of("cosine", "wsd")}
    rules |= {"decay_frac": (lambda v: 0 < v <= 1, "must be in (0, 1]")}
    rules |= {"lora_rank": AT_LEAST_1_OR_NONE, "lora_alpha": POSITIVE, "lora_dropout": BELOW_ONE}
    check_values(cfg, rules)
    check_lora(cfg)
    task_names(cfg.eval_tasks)  # an unknown task stops the run before it starts
    if cfg.parallelism not in ("ddp", "fsdp"):
        raise ConfigError(f"parallelism must be 'ddp' or 'fsdp', got {cfg.parallelism!r}")
    # nanoGPT's init_from=gpt2, gpt2-medium, ...: a clear no, with what to use instead
    if cfg.init_from.startswith("gpt2") and not Path(cfg.init_from).exists():
        raise ConfigError(
            f"init_from={cfg.init_from!r}: GPT-2's architecture (learned positions, LayerNorm, GELU) is not "
            "this model's (RoPE, RMSNorm, SwiGLU). Import a Llama-family model instead, e.g. SmolLM2-135M "
            "(GPT-2 small's size, far stronger): python convert.py import path/to/SmolLM2-135M "
            "out-smollm2, then --init_from=out-smollm2"
        )
    out_dir = Path(cfg.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out_dir={cfg.out_dir!r} exists and is not a directory: choose another out_dir")


def check_lora(cfg: TrainConfig) -> None:
    """What LoRA cannot be combined with (lora_settings checks the settings themselves)."""
    if lora_settings(cfg) is None:
        return
    if cfg.init_from == "scratch":
        raise ConfigError(
            "lora_rank: LoRA adapts a trained model, and a from-scratch one has nothing worth freezing; "
            "start from a checkpoint (--init_from=DIR, e.g. one convert.py imported), or drop lora_rank"
        )
    if cfg.parallelism == "fsdp":
        raise ConfigError(
            "lora_rank: LoRA runs with parallelism='ddp' (every process holds the 16-bit base), not 'fsdp'"
        )
    if cfg.optimizer != "adamw":
        raise ConfigError("lora_rank: the adapters train with AdamW; set optimizer='adamw'")


def fit_to_processes(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """cfg with gradient_accumulation_steps, the micro-steps of all processes together, rounded up to a
    multiple of the number of processes, so that each runs as many (said once; config.json keeps it)."""
    steps = math.ceil(cfg.gradient_accumulation_steps / world_size) * world_size
    if steps != cfg.gradient_accumulation_steps:
        print0(
            f"note: gradient_accumulation_steps {cfg.gradient_accumulation_steps} -> {steps}, rounded up to "
            f"a multiple of the {world_size} processes: {steps // world_size} per process"
        )
    return replace(cfg, gradient_accumulation_steps=steps)


# --- signals and the command line -----------------------------------------------------------------


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


def read_config(argv: list[str] | None) -> TrainConfig:
    """The config the command line gives. With --init_from=resume it starts from the run's own
    out_dir/config.json, so `train.py --out_dir=X --init_from=resume` alone continues the run; the
    command line's files and flags still apply on top."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(TrainConfig(), argv, prog="train.py", description=__doc__.splitlines()[0])
    saved = Path(cfg.out_dir) / RUN_CONFIG_NAME
    if cfg.init_from != "resume":
        return cfg
    if not saved.is_file():
        try:
            find_checkpoint(cfg.out_dir)
        except CheckpointError:  # before anything else: the defaults' data set is not what is missing
            raise UserError(
                f"no checkpoint in {cfg.out_dir} to resume (no {RUN_CONFIG_NAME}, {CKPT_NAME} or sharded "
                "checkpoint): check --out_dir, or start a run without --init_from=resume"
            ) from None
        return cfg
    resumed = parse_config(TrainConfig(), [str(saved), *argv])
    resumed = replace(resumed, **{key: getattr(cfg, key) for key in LAUNCH_KEYS})
    saved_cfg = parse_config(TrainConfig(), [str(saved)])
    changes = [
        f"{k}={v!r}"
        for k, v in asdict(resumed).items()
        if v != getattr(saved_cfg, k) and k not in ("init_from", *LAUNCH_KEYS)
    ]
    print0(
        f"resuming with {saved}"
        + (f", changed: {', '.join(changes)}" if changes else "")
        + f"; {', '.join(LAUNCH_KEYS)} follow this machine and command line, not the saved run"
    )
    return resumed


def main(argv: list[str] | None = None) -> None:
    exit_on_error(lambda: train(read_config(argv)))


if __name__ == "__main__":
    main()
