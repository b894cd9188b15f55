"""Checkpoint files: atomic saves, safe loads, and the model and tokenizer a checkpoint describes.

A checkpoint is a dict with nanoGPT's keys (model, optimizer, model_args, iter_num, best_val_loss,
config) plus `tokenizer`: the tokenizer entries of the training data's meta.json (tokenizer.py), so
that sampling needs nothing but the checkpoint.
"""

from pathlib import Path

import torch

from model import GPT, GPTConfig
from runtime import PathLike, UserError, atomic_write
from tokenizer import Tokenizer, get_tokenizer

CKPT_NAME = "ckpt.pt"


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable or inconsistent; the message says which and why."""


def save_checkpoint(checkpoint: dict, path: PathLike) -> None:
    """Atomic: a crash at any moment leaves either the old checkpoint or the new one, never a torn file."""
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def load_checkpoint(path: PathLike, device: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """Load with weights_only=True: a checkpoint cannot run code when it is opened. mmap: tensors are
    read from the file only when used (for a look at the other entries)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}: train one first (python train.py ...) or fix out_dir"
        )
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


def model_from_checkpoint(checkpoint: dict) -> GPT:
    try:
        model = GPT(GPTConfig(**checkpoint["model_args"]))
        model.load_state_dict(clean_state_dict(checkpoint["model"]))
    except KeyError as e:
        raise CheckpointError(
            f"checkpoint has no {e} entry; it was not written by train.py or convert.py"
        ) from e
    except (TypeError, ValueError, RuntimeError) as e:  # unknown model_args, bad shapes, mismatched weights
        reason = " ".join(str(e).split())[:300]
        raise CheckpointError(f"checkpoint does not describe a valid model: {reason}") from e
    return model


def tokenizer_entry_of(path: PathLike) -> dict:
    """The tokenizer entry of a folder: the one its checkpoint records (path/ckpt.pt), else the Hugging
    Face tokenizer of a model folder (e.g. one to fine-tune, before or after convert.py import)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a folder: give a checkpoint folder or a Hugging Face model folder")
    if not (path / CKPT_NAME).is_file():
        return {"tokenizer": "hf", "path": str(path.resolve())}
    entry = load_checkpoint(path / CKPT_NAME, mmap=True).get("tokenizer")
    if not entry:
        raise CheckpointError(
            f"checkpoint {path / CKPT_NAME} records no tokenizer (its 'tokenizer' entry is missing)"
        )
    return entry


def load_model_and_tokenizer(
    out_dir: PathLike, device: str | torch.device = "cpu"
) -> tuple[GPT, Tokenizer, dict]:
    """The model (in eval mode, on device), its tokenizer and the raw checkpoint from out_dir/ckpt.pt."""
    path = Path(out_dir) / CKPT_NAME
    checkpoint = load_checkpoint(path, device)
    if not checkpoint.get("tokenizer"):
        raise CheckpointError(f"checkpoint {path} records no tokenizer (its 'tokenizer' entry is missing)")
    try:
        tokenizer = get_tokenizer(checkpoint["tokenizer"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {path} has an unusable tokenizer entry ({type(e).__name__}: {e})"
        ) from e
    model = model_from_checkpoint(checkpoint).to(device).eval()
    return model, tokenizer, checkpoint
