"""Checkpoint files: atomic saves, safe loads, and the model and tokenizer a checkpoint describes.

A checkpoint is a dict with nanoGPT's keys (model, optimizer, model_args, iter_num, best_val_loss,
config) plus `tokenizer`: the tokenizer entries of the training data's meta.json (tokenizer.py), so
that sampling needs nothing but the checkpoint. It comes in two kinds, read alike by load_checkpoint:
  out_dir/ckpt.pt        one file (torch.save), written by rank 0 of a run that is not sharded
  out_dir/ckpt-<iter>-<tag>/  a sharded run's folder, written by every process at once with
                         torch.distributed.checkpoint, plus meta.pt (everything but the tensors);
                         out_dir/ckpt.latest names the complete one, so a save killed half-way
                         leaves the previous checkpoint in force.
The optimizer state is keyed by parameter name (torch.distributed.checkpoint.state_dict), so either
kind resumes on any number of processes, sharded or not.
"""

import fcntl
import os
import secrets
import shutil
import warnings
from pathlib import Path
from typing import BinaryIO

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    get_state_dict,
    set_optimizer_state_dict,
)

from lora import add_lora, check_lora_base, lora_config, merge_lora
from model import GPT, GPTConfig
from runtime import (
    CheckpointError,
    ConfigError,
    PathLike,
    UserError,
    atomic_write,
    fsync_dir,
    os_error_behind,
    world,
)
from tokenizer import Tokenizer, get_tokenizer, has_hf_tokenizer

CKPT_NAME = "ckpt.pt"
LATEST_SHARDED = "ckpt.latest"  # names the current sharded checkpoint folder
SHARDED_META = "meta.pt"
TOKENIZER_DIR = "tokenizer"  # in out_dir: a copy of a Hugging Face tokenizer's files (import, training)


def save_checkpoint(checkpoint: dict, path: PathLike) -> None:
    """Atomic: a crash at any moment leaves either the old checkpoint or the new one, never a torn file."""
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def save_sharded_checkpoint(state: dict, meta: dict, out_dir: Path, iter_num: int) -> None:
    """Every process writes its shards of state (tensors) into a new folder in parallel; then rank 0
    adds meta.pt and points ckpt.latest at the folder. Called by every process."""
    tag = [f"ckpt-{iter_num:08d}-{secrets.token_hex(3)}"]  # a new folder for every save, never rewritten
    dist.broadcast_object_list(tag, src=0)
    folder = out_dir / tag[0]
    try:
        dcp.save(state, checkpoint_id=folder)  # returns once every process's shards are written and synced
    except CheckpointException as e:  # a BaseException: name the first failure, a full disk most often
        raise dcp_failure(e, f"cannot write sharded checkpoint {folder}") from None
    if dist.get_rank() == 0:
        atomic_write(folder / SHARDED_META, lambda f: torch.save(meta, f))
        atomic_write(out_dir / LATEST_SHARDED, lambda f: f.write(folder.name.encode()))
        prune_checkpoints(out_dir, keep=folder)
    dist.barrier()  # no process moves on while the previous checkpoint is being replaced


def save_training_state(
    model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], meta: dict, out_dir: Path, sharded: bool
) -> None:
    """A training run's checkpoint in out_dir: meta plus the model's and optimizers' state, the latter
    keyed by parameter name. ckpt.pt, written by rank 0 (every process holds the same weights), or with
    sharded=True a sharded checkpoint written by every process at once. Called by every process."""
    if sharded:
        model_state, optimizer_state = get_state_dict(model, optimizers)
        save_sharded_checkpoint(
            {"model": model_state, "optimizer": optimizer_state}, meta, out_dir, meta["iter_num"]
        )
    elif world()[0] == 0:
        optimizer_state = get_optimizer_state_dict(model, optimizers)
        save_checkpoint(
            {**meta, "model": model.state_dict(), "optimizer": optimizer_state}, out_dir / CKPT_NAME
        )
        prune_checkpoints(out_dir, keep=out_dir / CKPT_NAME)


def load_optimizer_state(
    checkpoint: dict, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]
) -> None:
    """Load the optimizers' state of a checkpoint of either kind into optimizers, whatever the number of
    processes and sharding that wrote it. Each param group keeps its lr_scale: this run's, not the saved."""
    if "optimizer" in checkpoint:  # ckpt.pt: whole tensors, which set_optimizer_state_dict shards if needed
        state, options = checkpoint["optimizer"], StateDictOptions(full_state_dict=True)
    else:  # a sharded checkpoint: every process reads the parts its own shards need
        state, options = get_optimizer_state_dict(model, optimizers), None
        load_sharded_state({"optimizer": state}, checkpoint["folder"])
    scales = [[group["lr_scale"] for group in optimizer.param_groups] for optimizer in optimizers]
    set_optimizer_state_dict(model, optimizers, state, options=options)
    for optimizer, group_scales in zip(
        optimizers, scales
    ):  # this run's lr_scale (muon_lr), not the saved one
        for group, scale in zip(optimizer.param_groups, group_scales):
            group["lr_scale"] = scale


def restore_training_state(
    checkpoint: dict,
    model: torch.nn.Module,
    optimizers: list,
    scaler: torch.amp.GradScaler,
    out_dir: str,
    optimizer: str,
) -> float:
    """Load what resuming continues besides the weights (optimizer and gradient-scaler state), whatever
    the number of processes and sharding that wrote it; returns the run's best val loss so far."""
    if "optimizer" not in checkpoint and "folder" not in checkpoint:
        raise UserError(
            f"the checkpoint in {out_dir} has no optimizer state to resume; "
            f"start from its weights: --init_from={out_dir}"
        )
    saved = (checkpoint.get("config") or {}).get("optimizer", "adamw")
    if saved != optimizer:
        raise ConfigError(
            f"the run in {out_dir} was trained with optimizer={saved!r}; resume it with that optimizer, "
            f"or start a new run from its weights with optimizer={optimizer!r}: --init_from={out_dir}"
        )
    load_optimizer_state(checkpoint, model, optimizers)
    if scaler.is_enabled() and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    return checkpoint["best_val_loss"]


def sharded_folder_named(out_dir: Path) -> Path:
    """The folder out_dir/ckpt.latest names, checked: a complete sharded checkpoint folder directly
    inside out_dir. A damaged or dangling pointer is reported, never followed (nor pruned by)."""
    pointer = out_dir / LATEST_SHARDED
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {pointer} ({e}): restore it, or remove it to use ckpt.pt") from e
    folder = out_dir / name
    if not name.startswith("ckpt-") or Path(name).name != name or not (folder / SHARDED_META).is_file():
        raise CheckpointError(
            f"{pointer} names {name!r}, not a complete checkpoint folder in {out_dir}: it is damaged or its "
            f"folder is gone; write the right ckpt-* folder's name into it, or remove it to use {CKPT_NAME}"
        )
    return folder


def find_checkpoint(path: PathLike) -> Path:
    """The checkpoint path means: a checkpoint file or sharded folder itself, or in a run's out_dir the
    newer of ckpt.pt and the sharded folder ckpt.latest names."""
    path = Path(path)
    if path.is_file() or (path / SHARDED_META).is_file():
        return path
    candidates = [path / CKPT_NAME] if (path / CKPT_NAME).is_file() else []
    if (path / LATEST_SHARDED).exists():
        candidates.append(sharded_folder_named(path))
    if not candidates:
        where = path if path.suffix == ".pt" else path / CKPT_NAME
        raise CheckpointError(
            f"no checkpoint at {where}: train one first (python train.py ...) or fix out_dir"
        )
    return max(candidates, key=lambda p: p.stat().st_mtime_ns)  # a kill between save and prune leaves two


def prune_checkpoints(out_dir: Path, keep: Path) -> None:
    """Delete every checkpoint in out_dir but keep, which has been written or loaded: those it replaced,
    and the folders of sharded saves killed half-way. Rank 0, holding the run's lock."""
    for path in [out_dir / CKPT_NAME, out_dir / LATEST_SHARDED, *out_dir.glob("ckpt-*")]:
        is_pointer_to_keep = path.name == LATEST_SHARDED and keep.is_dir()
        if path == keep or is_pointer_to_keep or not path.exists():
            continue
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    fsync_dir(out_dir)


def lock_out_dir(out_dir: Path) -> BinaryIO | None:
    """Make this process the only run writing out_dir (rank 0; the others write nothing). The kernel
    holds the lock for the open file, so a killed run never leaves it stuck; the file names our pid."""
    if world()[0] != 0:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = open(out_dir / ".lock", "a+b")  # kept open for the whole run
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        other = lock.read().decode().strip() or "?"
        raise UserError(
            f"{out_dir} is in use by another run (process {other}): wait for it to finish, stop it, "
            "or choose another out_dir"
        ) from None
    lock.truncate(0)
    lock.write(str(os.getpid()).encode())
    lock.flush()
    for stale in out_dir.glob("*.tmp"):  # a run killed mid-save left it; with the lock, nobody writes it now
        stale.unlink()
    return lock  # nothing else is removed here: only a checkpoint proven to load replaces the others


def dcp_failure(e: BaseException, what: str) -> Exception:
    """One error for a failed DCP save or load, whose CheckpointException wraps each process's failure:
    the OSError behind it (a full disk, a missing shard), else the first failure's reason."""
    causes = [failure[0] for failure in getattr(e, "failures", {}).values()] or [e]
    os_error = next((c for c in map(os_error_behind, causes) if c is not None), None)
    if os_error is not None:
        return OSError(os_error.errno, f"{what}: {os_error.strerror or os_error}", os_error.filename)
    reason = " ".join(f"{type(causes[0]).__name__}: {causes[0]}".split())[:200]
    return CheckpointError(f"{what}: it is truncated or damaged ({reason}); use an earlier checkpoint")


def load_sharded_checkpoint(folder: Path, device: str | torch.device) -> dict:
    """A sharded checkpoint read whole into one process: meta.pt and the model's full tensors."""
    meta = torch.load(folder / SHARDED_META, map_location=device, weights_only=True)
    state = {"model": GPT(GPTConfig(**meta["model_args"])).to(device).state_dict()}
    load_sharded_state(state, folder)
    return {**meta, "model": state["model"], "folder": folder}  # folder: where its optimizer state is


def load_sharded_state(state: dict, folder: Path) -> None:
    """Fill state's tensors in place from a sharded checkpoint, in whatever sharding they have: whole
    in one process, or this process's shards."""
    with warnings.catch_warnings():  # without a process group DCP warns that one process reads it all
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(state, checkpoint_id=folder, no_dist=not dist.is_initialized())


def load_checkpoint(path: PathLike, device: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """The checkpoint path means (see find_checkpoint), loaded with weights_only=True: a checkpoint
    cannot run code when it is opened. mmap: a ckpt.pt's tensors are read only when used (for a look
    at the other entries)."""
    path = find_checkpoint(path)
    if path.is_dir():
        try:
            return load_sharded_checkpoint(path, device)
        except (Exception, CheckpointException) as e:  # DCP's own kind derives from BaseException
            raise dcp_failure(e, f"cannot read sharded checkpoint {path}") from None
    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as e:  # torch's message is advice about weights_only, wrong for a damaged file
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is truncated, corrupt or not a checkpoint "
            f"({type(e).__name__})"
        ) from e


def clean_state_dict(state_dict: dict) -> dict:
    """Drop the prefixes that torch.compile ('_orig_mod.') and DDP ('module.') add to parameter names."""
    cleaned = {}
    for name, tensor in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            name = name.removeprefix(prefix)
        cleaned[name] = tensor
    return cleaned


def model_from_checkpoint(checkpoint: dict, keep_adapters: bool = False) -> GPT:
    """The checkpoint's model. A LoRA run's (train.py --lora_rank) comes with its adapters merged into
    the base, or with keep_adapters kept apart to train on, once its base is proven the one they were
    trained on."""
    lora = checkpoint.get("lora")
    try:
        model = GPT(GPTConfig(**checkpoint["model_args"]))
        if lora:
            add_lora(model, lora_config(lora))
        model.load_state_dict(clean_state_dict(checkpoint["model"]))
    except KeyError as e:
        raise CheckpointError(
            f"checkpoint has no {e} entry; it was not written by train.py or convert.py"
        ) from e
    except (TypeError, ValueError, RuntimeError) as e:  # unknown model_args, bad shapes, mismatched weights
        reason = " ".join(str(e).split())[:300]
        raise CheckpointError(f"checkpoint does not describe a valid model: {reason}") from e
    if broken := next((name for name, t in model.state_dict().items() if not t.isfinite().all()), None):
        raise CheckpointError(f"{broken} holds NaN or inf: the run diverged, or the checkpoint is damaged")
    if lora:
        check_lora_base(model, lora)
        if not keep_adapters:
            merge_lora(model)
    return model


def tokenizer_entry_from_folder(path: PathLike) -> dict:
    """The tokenizer entry of a folder: the one its checkpoint records (path/ckpt.pt), else the Hugging
    Face tokenizer of a model folder (e.g. one to fine-tune, before or after convert.py import)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a folder: give a checkpoint folder or a Hugging Face model folder")
    try:
        found = find_checkpoint(path)
    except CheckpointError:
        return {"tokenizer": "hf", "path": str(path.resolve())}
    if found.is_dir():  # a sharded checkpoint: its meta.pt holds everything but the tensors
        checkpoint = torch.load(found / SHARDED_META, weights_only=True)
    else:
        checkpoint = load_checkpoint(found, mmap=True)
    return tokenizer_entry_from_checkpoint(checkpoint, found)


def tokenizer_entry_from_checkpoint(checkpoint: dict, found: Path) -> dict:
    """The tokenizer entry of the checkpoint at found (find_checkpoint's answer). A Hugging Face
    tokenizer is read from out_dir/tokenizer when its files are there (import and training copy them),
    so that a moved out_dir keeps working; else from the folder it names (older checkpoints)."""
    entry = checkpoint.get("tokenizer")
    if not entry:
        raise CheckpointError(f"checkpoint {found} records no tokenizer (its 'tokenizer' entry is missing)")
    copy = found.parent / TOKENIZER_DIR
    if entry.get("tokenizer") == "hf" and has_hf_tokenizer(copy):
        return {**entry, "path": str(copy.resolve())}
    return entry


def tokenizer_from_entry(entry: dict, found: Path) -> Tokenizer:
    """The tokenizer a checkpoint's entry names (found: the checkpoint, for the message)."""
    try:
        return get_tokenizer(entry)
    except (KeyError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {found} has an unusable tokenizer entry ({type(e).__name__}: {e})"
        ) from e


def load_model_and_tokenizer(
    path: PathLike,
    device: str | torch.device = "cpu",
    *,
    tokenizer: str = "required",
    keep_adapters: bool = False,
    dropout: float | None = None,
) -> tuple[GPT, Tokenizer | None, dict]:
    """The one door to a checkpoint: the model (eval mode, on device), its tokenizer and the raw
    checkpoint path means (see find_checkpoint). tokenizer: "required", "optional" (None where none is
    recorded) or "none" (not built: training reads its data set's). dropout: a run's own, in place of
    the saved one (a choice of the run, not part of the weights). keep_adapters: model_from_checkpoint."""
    found = find_checkpoint(path)
    checkpoint = load_checkpoint(found, device)
    if dropout is not None and "model_args" in checkpoint:
        checkpoint["model_args"] = {**checkpoint["model_args"], "dropout": dropout}
    built = None
    if tokenizer == "required" or (tokenizer == "optional" and checkpoint.get("tokenizer")):
        built = tokenizer_from_entry(tokenizer_entry_from_checkpoint(checkpoint, found), found)
    model = model_from_checkpoint(checkpoint, keep_adapters).to(device).eval()
    return model, built, checkpoint
