"""Train a GPT (model.py) on a prepared data set.

    python train.py configs/shakespeare_char.py                  # one process
    python train.py configs/shakespeare_char.py --max_iters=500   # later arguments win
    torchrun --standalone --nproc_per_node=8 train.py configs/openwebtext.py

Writes out_dir/ckpt.pt, out_dir/config.json and out_dir/metrics.jsonl. Every random draw of a
training micro-step (its batch windows and its dropout masks) is derived from (seed, iteration,
global micro-step index): a resumed run repeats the uninterrupted one exactly, and N processes
train on the same global batches as one process.
"""
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, ContextManager, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import CKPT_NAME, CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from configurator import cli_config
from data.common import load_meta
from model import GPT, GPTConfig

REPO_DIR = Path(__file__).resolve().parent


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"  # ckpt.pt, config.json and metrics.jsonl go here
    init_from: str = "scratch"  # 'scratch', 'resume' (out_dir/ckpt.pt), or a checkpoint file/folder to start anew from
    eval_interval: int = 250  # iterations between evaluations; a checkpoint is saved when val loss improves
    eval_iters: int = 100  # batches per split in each evaluation (the same batches every time)
    eval_only: bool = False  # evaluate the model init_from gives, then exit
    eval_full: bool = True  # after training (and with eval_only) also the loss over every val token once
    log_interval: int = 10  # iterations between log lines: the only points where the host waits for the device
    always_save_checkpoint: bool = False  # save at every evaluation, not only when val loss improves
    wandb_log: bool = False
    wandb_project: str = "llm-train"
    wandb_run_name: str = "run"
    # data
    dataset: str = "openwebtext"  # a prepared folder under the repo's data/
    data_dir: Optional[str] = None  # any prepared folder instead of data/<dataset>
    batch_size: int = 12  # sequences per micro-step in each process
    block_size: int = 1024  # tokens per sequence, and the model's context length
    gradient_accumulation_steps: int = 40  # micro-steps per iteration, all processes together
    # model: from scratch only; a loaded checkpoint brings its own shape
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: Optional[int] = None  # key/value heads; None = n_head
    n_embd: int = 768
    dropout: float = 0.0
    # AdamW, with linear warmup then cosine decay to min_lr
    learning_rate: float = 6e-4
    max_iters: int = 600000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = off
    warmup_iters: int = 2000
    lr_decay_iters: Optional[int] = None  # where the decay reaches min_lr; None = max_iters
    min_lr: float = 6e-5
    # system
    device: str = "auto"  # 'auto' (cuda, then mps, then cpu), or a torch device such as 'cpu', 'cuda:1'
    dtype: str = "auto"  # 'auto': bfloat16 on CUDA (float16 if unsupported), else float32; or one of those
    compile: Optional[bool] = None  # torch.compile the model; None = only on CUDA
    seed: int = 1337


class TrainError(Exception):
    """Bad input for a run, explained for the person at the terminal."""


# TrainConfig keys that are also GPTConfig fields: the model's shape.
SHAPE_KEYS = ("block_size", "n_layer", "n_head", "n_kv_head", "n_embd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TRAIN_STREAM, EVAL_STREAM = 0, 1  # random streams for training micro-steps and for evaluation batches


def world() -> tuple[int, int]:
    """(rank, world_size) of this process: (0, 1) when not started by torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def say(message: str) -> None:
    """Print on rank 0 only, above the progress bar, flushed so that a piped log shows it at once."""
    if world()[0] == 0:
        tqdm.write(message)
        sys.stdout.flush()


def pick_device(requested: str, local_rank: Optional[int]) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise TrainError(f"device={requested!r} is not a torch device; use 'auto', 'cpu', 'cuda' or 'mps'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"device={requested!r} but CUDA is not available here; use --device=cpu")
    if device.type == "cuda" and local_rank is not None:  # one GPU per torchrun process
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        if device.type != "cuda":
            return torch.float32  # bf16 matmuls are far slower than fp32 on most CPUs
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if requested not in DTYPES:
        raise TrainError(f"dtype={requested!r}: use 'auto' or one of {', '.join(DTYPES)}")
    if requested == "float16" and device.type != "cuda":
        raise TrainError(f"dtype='float16' needs CUDA (for its gradient scaler); on {device.type} use bfloat16")
    return DTYPES[requested]


def padded_vocab_size(vocab_size: int) -> int:
    """BPE-sized vocabularies are padded up to a multiple of 64 for faster matmuls (GPT-2: 50257 ->
    50304); a small character vocabulary stays exact, where padding would add mostly unused rows."""
    return 64 * math.ceil(vocab_size / 64) if vocab_size >= 1024 else vocab_size


def model_config(cfg: TrainConfig, vocab_size: int) -> GPTConfig:
    try:
        return GPTConfig(vocab_size=vocab_size, dropout=cfg.dropout, **{k: getattr(cfg, k) for k in SHAPE_KEYS})
    except ValueError as e:
        raise TrainError(f"bad model shape: {e}") from None


def init_model(cfg: TrainConfig, meta: dict) -> tuple[GPT, Optional[dict], TrainConfig]:
    """The model init_from asks for, the checkpoint it came from (None from scratch), and cfg with its
    shape keys set to the model's. Resuming needs the run's own shape; any other load takes the
    checkpoint's shape (printing what it overrides), as a pretrained model's shape is not a choice."""
    wanted = model_config(cfg, padded_vocab_size(meta["vocab_size"]))
    if cfg.init_from == "scratch":
        return GPT(wanted), None, cfg
    path = Path(cfg.out_dir) / CKPT_NAME if cfg.init_from == "resume" else Path(cfg.init_from)
    if cfg.init_from != "resume" and not path.exists():
        raise TrainError(f"init_from={cfg.init_from!r} is not 'scratch', 'resume' or an existing checkpoint or folder")
    if path.is_dir():
        path = path / CKPT_NAME
    checkpoint = load_checkpoint(path)
    if "model_args" in checkpoint:  # dropout is a choice of this run, not part of the weights
        checkpoint["model_args"] = {**checkpoint["model_args"], "dropout": cfg.dropout}
    model = model_from_checkpoint(checkpoint)
    loaded = model.config
    if cfg.init_from == "resume" and not cfg.eval_only:
        wanted_args = asdict(wanted)
        diffs = [f"{k}={v} (config: {wanted_args[k]})" for k, v in asdict(loaded).items() if v != wanted_args[k]]
        if diffs:
            raise TrainError(
                f"cannot resume {path}: its model has {', '.join(diffs)}. Resume with the run's own config "
                "(e.g. the same config file), or start a new run in another out_dir"
            )
    else:
        changed = {k: getattr(loaded, k) for k in SHAPE_KEYS if getattr(loaded, k) != getattr(wanted, k)}
        if changed:
            shape = ", ".join(f"{k}={v}" for k, v in changed.items())
            say(f"note: the model's shape comes from {path}: {shape} (the config's values are ignored)")
        cfg = replace(cfg, **changed)
        if meta["vocab_size"] > loaded.vocab_size:
            raise TrainError(
                f"the data set's vocabulary ({meta['vocab_size']:,} tokens) is larger than the model's "
                f"({loaded.vocab_size:,}) in {path}: the data was prepared with another tokenizer"
            )
    return model, checkpoint, cfg


def check_data_fits(data_dir: Path, meta: dict, block_size: int) -> None:
    for split in ("train", "val"):
        n_tokens = meta[f"{split}_tokens"]
        if n_tokens <= block_size:
            raise TrainError(
                f"block_size={block_size} does not fit the {split} split of {data_dir} ({n_tokens:,} tokens): "
                "lower block_size or use a larger data set"
            )


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    if device.type == "cuda":  # pinned memory lets the copy run asynchronously
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def get_batch(path: Path, dtype: str, rng: np.random.Generator, batch_size: int, block_size: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """batch_size random windows of the token file: inputs and their next tokens, each (B, block_size)."""
    # Opened anew for every batch: a long-lived np.memmap keeps every page it has read referenced,
    # so on a corpus of many GB the process's memory would keep growing.
    data = np.memmap(path, dtype=dtype, mode="r")
    starts = rng.integers(0, len(data) - block_size, size=batch_size)
    x = np.stack([data[s : s + block_size] for s in starts]).astype(np.int64)
    y = np.stack([data[s + 1 : s + 1 + block_size] for s in starts]).astype(np.int64)
    return to_device(x, device), to_device(y, device)


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, cfg: TrainConfig, data_dir: Path, dtype: str, device: torch.device,
                  autocast: ContextManager) -> dict[str, float]:
    """Mean loss over eval_iters batches of each split, shared out among the processes. The batches
    are the same at every evaluation, so successive evaluations differ only by the model."""
    rank, world_size = world()
    was_training = model.training
    model.eval()
    losses = {}
    for split_index, split in enumerate(("train", "val")):
        total = torch.zeros((), device=device)
        for k in range(rank, cfg.eval_iters, world_size):
            rng = np.random.default_rng([cfg.seed, EVAL_STREAM, split_index, k])
            x, y = get_batch(data_dir / f"{split}.bin", dtype, rng, cfg.batch_size, cfg.block_size, device)
            with autocast:
                _, loss = model(x, y)
            total += loss.float()
        losses[split] = all_reduce_sum(total).item() / cfg.eval_iters
    model.train(was_training)
    return losses


@torch.no_grad()
def full_val_loss(model: torch.nn.Module, tokens: np.ndarray, block_size: int, batch_size: int,
                  device: torch.device, autocast: Optional[ContextManager] = None) -> float:
    """Mean loss over every token of tokens but the first, each predicted once: consecutive,
    non-overlapping windows of block_size, batched and shared out among the processes. The last
    window is padded, its padding ignored, so every batch has one shape (no recompiling)."""
    rank, world_size = world()
    n_targets = len(tokens) - 1
    n_windows = math.ceil(n_targets / block_size)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for first in range(rank * batch_size, n_windows, world_size * batch_size):
        x = np.zeros((batch_size, block_size), dtype=np.int64)
        y = np.full((batch_size, block_size), -1, dtype=np.int64)  # -1: ignored by the loss
        for row, window in enumerate(range(first, min(first + batch_size, n_windows))):
            chunk = np.asarray(tokens[window * block_size : (window + 1) * block_size + 1], dtype=np.int64)
            x[row, : len(chunk) - 1], y[row, : len(chunk) - 1] = chunk[:-1], chunk[1:]
        with autocast or nullcontext():
            _, loss = model(to_device(x, device), to_device(y, device))
        total += loss.double() * int((y >= 0).sum())  # the loss is a mean over the batch's real targets
    model.train(was_training)
    return all_reduce_sum(total).item() / n_targets


def get_lr(it: int, cfg: TrainConfig) -> float:
    decay_iters = cfg.max_iters if cfg.lr_decay_iters is None else cfg.lr_decay_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / (decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def metrics_logger(cfg: TrainConfig, append: bool) -> Callable[[dict], None]:
    """A function appending a record to out_dir/metrics.jsonl (and wandb) on rank 0; a no-op elsewhere."""
    if world()[0] != 0:
        return lambda record: None
    path = Path(cfg.out_dir) / "metrics.jsonl"
    if not append:
        path.write_text("")
    run = None
    if cfg.wandb_log:
        import wandb  # only when asked for: it is slow to import

        run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=asdict(cfg), dir=cfg.out_dir)

    def log(record: dict) -> None:
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if run is not None:
            run.log({k: v for k, v in record.items() if k != "iter" and v is not None}, step=record["iter"])

    return log


_stop_signal = 0  # set by the SIGTERM / SIGINT handler; the loop stops after the current iteration


def request_stop(signum: int, frame) -> None:
    global _stop_signal
    if _stop_signal:  # a second signal: stop at once, unsaved (saves are atomic, the last one is intact)
        raise KeyboardInterrupt
    _stop_signal = signum
    if world()[0] == 0:
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this iteration (again to abort now)",
              file=sys.stderr, flush=True)


def agreed_stop_signal(group: Optional[dist.ProcessGroup]) -> int:
    """The stop signal if any process has received one, else 0. Processes get a signal at slightly
    different moments; agreeing after every iteration makes them all stop after the same one. The
    group is gloo, on the CPU, so this never waits for the GPU."""
    flag = torch.tensor(_stop_signal)
    if group is not None:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return int(flag)


def check_finite(loss: float, what: str, iter_num: int) -> None:
    if not math.isfinite(loss):
        raise TrainError(
            f"{what} is {loss} at iter {iter_num}: training diverged, so it stops here and the last good "
            "checkpoint is left as it was. Try a lower learning_rate, a longer warmup_iters or grad_clip"
        )


def train(cfg: TrainConfig) -> int:
    """Train (or, with eval_only, evaluate) as cfg says; returns the process exit code."""
    global _stop_signal
    _stop_signal = 0
    previous_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    ddp = "RANK" in os.environ  # started by torchrun
    try:
        device = pick_device(cfg.device, int(os.environ["LOCAL_RANK"]) if ddp else None)
        stop_group = None
        if ddp:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            stop_group = dist.new_group(backend="gloo")
        return run(cfg, device, stop_group)
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        if ddp and dist.is_initialized():
            dist.destroy_process_group()


def run(cfg: TrainConfig, device: torch.device, stop_group: Optional[dist.ProcessGroup]) -> int:
    rank, world_size = world()
    master = rank == 0
    for key in ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval"):
        if getattr(cfg, key) < 1:
            raise TrainError(f"{key} must be at least 1, got {getattr(cfg, key)}")
    if cfg.gradient_accumulation_steps % world_size:
        raise TrainError(
            f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} counts micro-steps over all "
            f"{world_size} processes and must be a multiple of {world_size}"
        )
    local_steps = cfg.gradient_accumulation_steps // world_size
    out_dir = Path(cfg.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainError(f"out_dir={cfg.out_dir!r} exists and is not a directory: choose another out_dir")
    data_dir = Path(cfg.data_dir) if cfg.data_dir else REPO_DIR / "data" / cfg.dataset
    try:
        meta = load_meta(data_dir)
    except FileNotFoundError as e:
        raise TrainError(str(e)) from None
    dtype = pick_dtype(cfg.dtype, device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for whatever runs in float32

    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    raw_model, checkpoint, cfg = init_model(cfg, meta)
    check_data_fits(data_dir, meta, cfg.block_size)
    raw_model.to(device)
    optimizer = raw_model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    resumed = cfg.init_from == "resume" and not cfg.eval_only
    iter_num, best_val_loss = 0, float("inf")
    if checkpoint is not None and (resumed or cfg.eval_only):
        iter_num = checkpoint["iter_num"]
    if resumed:
        if "optimizer" not in checkpoint:
            raise TrainError(
                f"{out_dir / CKPT_NAME} has no optimizer state to resume; start from its weights: --init_from={out_dir}"
            )
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scaler.is_enabled() and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        best_val_loss = checkpoint["best_val_loss"]
    del checkpoint  # the weights now live in the model and optimizer
    use_compile = device.type == "cuda" if cfg.compile is None else cfg.compile
    model = torch.compile(raw_model) if use_compile else raw_model
    train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world_size > 1 else model

    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not cfg.eval_only:
            (out_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    log = metrics_logger(cfg, append=resumed or cfg.eval_only)
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    say("config:\n" + "\n".join(f"  {k} = {v!r}" for k, v in asdict(cfg).items()))
    say(f"{raw_model.get_num_params() / 1e6:.2f}M parameters; {tokens_per_iter:,} tokens per iteration "
        f"({world_size} process(es) x {local_steps} micro-steps x {cfg.batch_size} x {cfg.block_size}); "
        f"device {device}, {str(dtype).removeprefix('torch.')}, compile {use_compile}")

    def save(iter_num: int, best_val_loss: float) -> None:
        if master:
            save_checkpoint({
                "model": raw_model.state_dict(),  # unwrapped: loads without compile or DDP
                "optimizer": optimizer.state_dict(),
                "model_args": asdict(raw_model.config),
                "iter_num": iter_num,
                "best_val_loss": best_val_loss,
                "config": asdict(cfg),
                "tokenizer": meta,
                "scaler": scaler.state_dict(),
            }, out_dir / CKPT_NAME)

    def global_loss(loss_sum: torch.Tensor) -> float:
        """This iteration's mean micro-step loss over all processes (waits for the device)."""
        return all_reduce_sum(loss_sum / local_steps).item() / world_size

    train_bin = data_dir / "train.bin"
    start_iter, stop_signal, loss_sum = iter_num, 0, None
    bar = tqdm(total=cfg.max_iters, initial=iter_num, disable=not (master and sys.stderr.isatty()), dynamic_ncols=True)
    t_log, iter_log = time.time(), iter_num
    while True:
        evaluate = iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters or cfg.eval_only
        if evaluate and not (resumed and iter_num == start_iter):  # a resumed run's first point was evaluated already
            losses = estimate_loss(model, cfg, data_dir, meta["dtype"], device, autocast)
            say(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            log({"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"]})
            check_finite(losses["val"], "the val loss", iter_num)
            if losses["val"] < best_val_loss or cfg.always_save_checkpoint:
                best_val_loss = min(best_val_loss, losses["val"])
                if iter_num > 0 and not cfg.eval_only:
                    save(iter_num, best_val_loss)
            t_log, iter_log = time.time(), iter_num  # evaluation time is not training time
        if iter_num >= cfg.max_iters or stop_signal or cfg.eval_only:
            break

        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro_step in range(local_steps):
            rng = np.random.default_rng([cfg.seed, TRAIN_STREAM, iter_num, rank * local_steps + micro_step])
            torch.manual_seed(int(rng.integers(2**62)))  # this micro-step's dropout masks
            x, y = get_batch(train_bin, meta["dtype"], rng, cfg.batch_size, cfg.block_size, device)
            # Gradients are averaged across processes only in the last micro-step's backward.
            with train_model.no_sync() if world_size > 1 and micro_step < local_steps - 1 else nullcontext():
                with autocast:
                    loss = train_model(x, y)[1]  # not holding the logits frees them before backward
                scaler.scale(loss / local_steps).backward()
            loss_sum += loss.detach()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        bar.update()

        if iter_num % cfg.log_interval == 0:
            loss_value = global_loss(loss_sum)
            check_finite(loss_value, "the training loss", iter_num)
            dt = (time.time() - t_log) / (iter_num - iter_log)
            t_log, iter_log = time.time(), iter_num
            mfu = raw_model.estimate_mfu(cfg.batch_size * local_steps, dt)
            tokens_per_s = tokens_per_iter / dt
            say(f"iter {iter_num}: loss {loss_value:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/iter, "
                f"{tokens_per_s:,.0f} tokens/s, mfu {'n/a' if mfu is None else f'{mfu:.1%}'}")
            log({"iter": iter_num, "loss": loss_value, "lr": lr, "ms_per_iter": dt * 1000,
                 "tokens_per_s": tokens_per_s, "mfu": mfu})
            bar.set_postfix_str(f"loss {loss_value:.4f}, {tokens_per_s:,.0f} tokens/s", refresh=False)
        stop_signal = agreed_stop_signal(stop_group)
    bar.close()

    if stop_signal:
        if loss_sum is not None:  # never replace a good checkpoint with diverged weights
            check_finite(global_loss(loss_sum), "the training loss", iter_num)
        save(iter_num, best_val_loss)
        say(f"stopped by {signal.Signals(stop_signal).name} at iter {iter_num}: saved {out_dir / CKPT_NAME}; "
            "continue with --init_from=resume")
        return 128 + stop_signal  # the shell's code for death by that signal: the run did not finish
    if cfg.eval_full:
        t0 = time.time()
        val_tokens = np.memmap(data_dir / "val.bin", dtype=meta["dtype"], mode="r")
        loss_full = full_val_loss(model, val_tokens, cfg.block_size, cfg.batch_size, device, autocast)
        say(f"iter {iter_num}: full val loss {loss_full:.4f} (every val token once, {time.time() - t0:.1f}s)")
        log({"iter": iter_num, "val_loss_full": loss_full})
    return 0


def main(argv: Optional[list[str]] = None) -> None:
    cfg = cli_config(TrainConfig(), argv, prog="train.py", description=__doc__.splitlines()[0])
    try:
        code = train(cfg)
    except (TrainError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
