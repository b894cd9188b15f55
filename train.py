"""Train a GPT (model.py) on a prepared data set.

    python train.py configs/shakespeare_char.py                  # one process
    python train.py configs/shakespeare_char.py --max_iters=500   # later arguments win
    torchrun --standalone --nproc_per_node=8 train.py configs/openwebtext.py

Writes out_dir/ckpt.pt, config.json and metrics.jsonl. A micro-step's random draws (its batch, its
dropout) derive from (seed, iteration, global micro-step index): a resumed run repeats the uninterrupted
one exactly, and N processes train on the same global batches as one.

Reading order: train(), its loop and step; evaluation; setup, a few calls into the modules that hold
each part: train_config.py (every key), batches.py (what a loss is computed on), lora.py (adapters on
a loaded model), distributed.py (processes, stop signals, DDP / FSDP / compile).
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
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from batches import SPLITS, TRAIN_STREAM, Batches, open_batches
from checkpoint import (
    CKPT_NAME,
    TOKENIZER_DIR,
    CheckpointError,
    find_checkpoint,
    load_model_and_tokenizer,
    lock_out_dir,
    prune_checkpoints,
    restore_training_state,
    save_training_state,
)
from dataset import check_data_fits, load_meta, resolve_data_dir
from distributed import agreed_stop_signal, parallelize, processes, stop_signals_caught
from lora import Adapted, add_adapters
from loss_eval import all_reduce_sum
from memory import check_model_fits, max_memory_allocated_bytes, memory_per_process
from metrics import MetricsLog, start_wandb
from model import GPT, GPTConfig
from optim import make_optimizers
from runtime import (
    ConfigError,
    UserError,
    atomic_write,
    autocast,
    datasheet_peak_flops,
    exit_on_error,
    pick_dtype,
    print0,
    world,
)
from tasks import score_tasks
from tokenizer import copy_hf_tokenizer, tokenizer_entry_from_meta
from train_config import RUN_CONFIG_NAME, SHAPE_KEYS, TrainConfig, check_config, fit_to_processes, read_config


@dataclass
class Run:
    """Everything a run needs after setup; iter_num and best_val_loss advance as it trains."""

    cfg: TrainConfig
    device: torch.device
    autocast: AbstractContextManager  # bf16/fp16 autocast, or a no-op for float32
    meta: dict  # the data set's meta.json: tokenizer, token dtype, token counts
    batches: Batches  # what every loss is computed on: the data set's kind of batches
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
    adapted: Adapted  # what the model was given after loading, and what the checkpoint records of it
    iter_num: int = 0
    best_val_loss: float = float("inf")


def train(cfg: TrainConfig) -> int:
    """Train (or, with eval_only, evaluate) as cfg says; returns the process exit code."""
    group_of_one = cfg.parallelism == "fsdp"  # FSDP shards over a group, even of one process
    with stop_signals_caught(), processes(cfg.device, cfg.collective_timeout_s, group_of_one) as device:
        check_config(cfg)
        timeout = timedelta(seconds=cfg.collective_timeout_s)  # gloo: agreeing never waits for the GPU
        stop_group = dist.new_group(backend="gloo", timeout=timeout) if dist.is_initialized() else None
        run = setup(fit_to_processes(cfg, world()[1]), device, stop_group)
        code = evaluate_only(run) if cfg.eval_only else train_loop(run)
        if dist.is_initialized():
            dist.barrier()  # all done with collectives: destroying the group while one is busy can abort
        return code


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


def train_step(run: Run, lr: float) -> torch.Tensor:
    """One iteration: this process's micro-steps of forward and backward, then one optimizer step.
    Returns the sum of its micro-step losses, left on the device (reading it waits for the device)."""
    cfg, rank = run.cfg, world()[0]
    for group in (group for optimizer in run.optimizers for group in optimizer.param_groups):
        group["lr"] = lr * group["lr_scale"]
    loss_sum = torch.zeros((), device=run.device)
    for micro_step in range(run.local_steps):
        step = rank * run.local_steps + micro_step  # the micro-step's index in the global batch
        rng = np.random.default_rng([cfg.seed, TRAIN_STREAM, run.iter_num, step])
        torch.manual_seed(int(rng.integers(2**62)))  # this micro-step's dropout masks
        # Gradients are averaged across processes only in the last micro-step's backward.
        sync_now = micro_step == run.local_steps - 1 or not isinstance(run.train_model, DDP)
        with nullcontext() if sync_now else run.train_model.no_sync():
            with run.autocast:
                loss = run.batches.micro_step_loss(run.train_model, run.iter_num, step, rng)
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
    tokens_per_s = run.batches.tokens_per_iter / dt
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
        "tokenizer": tokenizer_entry_from_meta(run.meta),
        "scaler": run.scaler.state_dict(),
        **run.adapted.checkpoint_entries,
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
        f"{run.cfg.out_dir}; continue with: python train.py --out_dir={run.cfg.out_dir} --init_from=resume"
    )
    return 128 + stop_signal  # the run did not finish


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


# --- evaluation -----------------------------------------------------------------------------------


@torch.no_grad()
def estimate_loss(run: Run) -> dict[str, float]:
    """Mean loss over eval_iters batches of each split (batches.py says what a batch's loss and the
    mean are), shared out among the processes. The batches are the same at every evaluation, so
    successive evaluations differ only by the model."""
    cfg, (rank, world_size) = run.cfg, world()
    run.model.eval()
    losses = {}
    for split in SPLITS:
        total = torch.zeros((), device=run.device)
        # Every process runs as many batches (a sharded model's forward is collective); a stop signal
        # ends them all at the same batch, and the caller discards the evaluation.
        for k in range(rank, math.ceil(cfg.eval_iters / world_size) * world_size, world_size):
            if agreed_stop_signal(run.stop_group):
                break
            with run.autocast:
                loss = run.batches.eval_batch_loss(run.model, split, k)
            if k < cfg.eval_iters:  # the others only keep the processes in step
                total += loss.float()
        losses[split] = all_reduce_sum(total).item() / run.batches.eval_count(split)
    run.model.train()
    return losses


def evaluate(run: Run) -> float | None:
    """Estimate, print and log the train and val losses; returns the val loss, which must be finite,
    or None if a stop signal on any process cut the evaluation short."""
    cfg, losses, scores = run.cfg, estimate_loss(run), {}
    if cfg.eval_tasks:  # the raw model: every batch of choices has its own length, too many to compile
        args = (cfg.eval_task_examples, cfg.batch_size, run.device, run.autocast)
        scores = score_tasks(run.raw_model, run.meta, cfg.eval_tasks, *args)
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
    """The loss over the whole val split, every target once: the number to compare runs by."""
    t0 = time.time()
    should_stop = lambda: bool(agreed_stop_signal(run.stop_group))  # noqa: E731
    loss = run.batches.full_val_loss(run.model, run.autocast, should_stop)
    if agreed_stop_signal(run.stop_group):  # cut short: not a result
        return None
    what = run.batches.full_val_what
    print0(f"iter {run.iter_num}: full val loss {loss:.4f} ({what}, {time.time() - t0:.1f}s)")
    run.metrics.write({"iter": run.iter_num, "val_loss_full": loss})
    return loss


def evaluate_only(run: Run) -> int:
    """eval_only: evaluate the model init_from gives, without training or saving."""
    evaluate(run)
    if run.cfg.eval_full:
        evaluate_full(run)
    stop_signal = agreed_stop_signal(run.stop_group)
    return 128 + stop_signal if stop_signal else 0


# --- setup: data, model, optimizer, resume --------------------------------------------------------


def setup(cfg: TrainConfig, device: torch.device, stop_group: dist.ProcessGroup | None) -> Run:
    """Data, model, optimizer and the state a resumed run continues from; prints what was set up."""
    lock = lock_out_dir(Path(cfg.out_dir))
    data_dir = resolve_data_dir(cfg.dataset, cfg.data_dir)
    meta, dtype = load_meta(data_dir), pick_dtype(cfg.dtype, device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for whatever runs in float32
    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    check_data_fits(data_dir, meta, cfg.block_size)  # before building a model of that length
    raw_model, checkpoint, cfg = init_model(cfg, meta, device)
    check_data_fits(data_dir, meta, cfg.block_size)  # a loaded model brings its own
    adapted = add_adapters(cfg, raw_model, checkpoint, dtype)  # before DDP and the optimizers: what trains
    batches = open_batches(cfg, data_dir, meta, device)
    model, train_model = parallelize(
        raw_model, device, dtype, cfg.parallelism, use_compile(cfg, device), cfg.activation_checkpointing
    )
    optimizers = new_optimizers(raw_model, cfg, device)  # after sharding: they update its shards
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    resumed = cfg.init_from == "resume" and not cfg.eval_only
    iter_num = checkpoint["iter_num"] if checkpoint is not None and (resumed or cfg.eval_only) else 0
    state = (checkpoint, raw_model, optimizers, scaler, cfg.out_dir, cfg.optimizer)
    best_val_loss = restore_training_state(*state) if resumed else math.inf
    if resumed and lock is not None:  # what it replaced goes only now that it has loaded
        prune_checkpoints(Path(cfg.out_dir), keep=find_checkpoint(cfg.out_dir))
    del checkpoint, state  # the weights now live in the model and optimizer
    run = Run(
        cfg=cfg,
        device=device,
        # A sharded model computes in its mixed-precision policy's dtype; autocast is for the others.
        autocast=autocast(device, dtype) if cfg.parallelism != "fsdp" else nullcontext(),
        meta=meta,
        batches=batches,
        raw_model=raw_model,
        model=model,
        train_model=train_model,
        optimizers=optimizers,
        scaler=scaler,
        metrics=open_metrics(cfg, records_to_keep(cfg, resumed, iter_num)),
        stop_group=stop_group,
        lock=lock,
        local_steps=cfg.gradient_accumulation_steps // world()[1],
        resumed=resumed,
        adapted=adapted,
        iter_num=iter_num,
        best_val_loss=best_val_loss,
    )
    if not cfg.eval_only:
        write_run_files(cfg, meta)
    print_setup(run, dtype)
    return run


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


def open_metrics(cfg: TrainConfig, keep: Callable[[dict], bool] | None) -> MetricsLog:
    """metrics.jsonl (and wandb, if asked) on rank 0; the other processes log nothing."""
    if world()[0] != 0:
        return MetricsLog(None, keep)
    wandb = dict(project=cfg.wandb_project, name=cfg.wandb_run_name, config=asdict(cfg), dir=cfg.out_dir)
    return MetricsLog(cfg.out_dir, keep, start_wandb(**wandb) if cfg.wandb_log else None)


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


def use_compile(cfg: TrainConfig, device: torch.device) -> bool:
    return device.type == "cuda" if cfg.compile is None else cfg.compile


def padded_vocab_size(vocab_size: int) -> int:
    """BPE-sized vocabularies are padded up to a multiple of 64 for faster matmuls (GPT-2: 50257 ->
    50304); a small character vocabulary stays exact, where padding would add mostly unused rows."""
    return 64 * math.ceil(vocab_size / 64) if vocab_size >= 1024 else vocab_size


def model_config(cfg: TrainConfig, vocab_size: int) -> GPTConfig:
    shape = {k: getattr(cfg, k) for k in SHAPE_KEYS}
    try:
        return GPTConfig(vocab_size=vocab_size, dropout=cfg.dropout, **shape)
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
        check_model_fits(wanted, cfg.optimizer, world()[1] if cfg.parallelism == "fsdp" else 1, device)
        warn_of_replaced_checkpoint(cfg)
        return GPT(wanted, cfg.zero_init_out_proj), None, cfg
    path = Path(cfg.out_dir) if cfg.init_from == "resume" else Path(cfg.init_from)
    if cfg.init_from != "resume" and not path.exists():
        raise UserError(
            f"init_from={cfg.init_from!r} is not 'scratch', 'resume' or an existing checkpoint or folder"
        )
    resuming = cfg.init_from == "resume"  # a resumed run trains its adapters on, if it has any
    model, _, checkpoint = load_model_and_tokenizer(
        path, tokenizer="none", keep_adapters=resuming, dropout=cfg.dropout
    )
    model.train()
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


def warn_of_replaced_checkpoint(cfg: TrainConfig) -> None:
    """A new run into an out_dir holding another run's checkpoint replaces it at its first save."""
    out_dir = Path(cfg.out_dir)
    found = [p.name for p in [out_dir / CKPT_NAME, *sorted(out_dir.glob("ckpt-*"))] if p.exists()]
    if found and not cfg.eval_only:
        print0(
            f"warning: {out_dir} holds the checkpoint of an earlier run ({', '.join(found)}); this run's "
            "first save replaces it. Stop now and choose another out_dir to keep it"
        )


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
        f"{run.raw_model.get_num_params() / 1e6:.2f}M parameters; {run.batches.tokens_per_iter:,} tokens per "
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
    if run.adapted.summary:
        print0(run.adapted.summary)
    print0(memory_per_process(run.raw_model, run.optimizers, layout))
    if run.resumed:
        print0(f"resumed from iter {run.iter_num} of the checkpoint in {cfg.out_dir}")


def main(argv: list[str] | None = None) -> None:
    exit_on_error(lambda: train(read_config(argv)))


if __name__ == "__main__":
    main()
