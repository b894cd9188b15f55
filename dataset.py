"""Reading a prepared data set: its folder, meta.json (the tokenizer, vocab_size, dtype and token counts;
written last, so its presence means the set is complete) and batches of train.bin and val.bin (flat
token ids). A chat set (meta "chat": true, data/chat/prepare.py) has two more files per split:
<split>.mask.bin, uint8, 1 where a token is learned (the assistant's reply and the token ending its
turn), and <split>.starts.bin, int64, where each conversation starts in the token file, then the total.
data/common.py writes them with the names below. No torch at import: the prepare scripts import this
module through data/common.py and start in a fifth of a second (see runtime.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from runtime import UserError

if TYPE_CHECKING:
    import torch

REPO_DIR = Path(__file__).resolve().parent
SPLITS = ("train", "val")
META_NAME = "meta.json"
# The files of a split: its token ids, and in a chat set the loss mask and the conversation starts.
KIND_DTYPES = {"tokens": None, "mask": "uint8", "starts": "int64"}  # tokens: meta's dtype
CHAT_KINDS = ("tokens", "mask", "starts")


def token_file(data_dir: Path, split: str, kind: str = "tokens") -> Path:
    return data_dir / (f"{split}.bin" if kind == "tokens" else f"{split}.{kind}.bin")


def resolve_data_dir(dataset: str | None, data_dir: str | None) -> Path:
    """data_dir if given, else the repo's data/<dataset>."""
    return Path(data_dir) if data_dir else REPO_DIR / "data" / str(dataset)


def load_meta(data_dir: Path) -> dict:
    """The meta.json of a prepared data set, checked against its token files."""
    path = data_dir / META_NAME
    script = REPO_DIR / "data" / data_dir.name / "prepare.py"
    if script.is_file():
        command = f"python data/{data_dir.name}/prepare.py"
    else:
        command = f"python data/<name>/prepare.py --out_dir {data_dir}"
    if not path.is_file():
        raise UserError(
            f"{path} not found: the data set is not prepared (or its preparation did not finish); "
            f"run {command}"
        )
    redo = f"prepare the data set again: {command}"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        itemsize = np.dtype(meta["dtype"]).itemsize
        counts = {split: int(meta[f"{split}_tokens"]) for split in SPLITS}
        if not 1 <= int(meta["vocab_size"]) <= np.iinfo(meta["dtype"]).max + 1:
            raise ValueError(f"vocab_size must be between 1 and what {meta['dtype']} token ids hold")
    except (ValueError, TypeError, KeyError) as e:  # JSONDecodeError is a ValueError
        what = f"has no {e}" if isinstance(e, KeyError) else f"is malformed ({e})"
        raise UserError(f"{path} {what}: {redo}") from None
    for split, n_tokens in counts.items():
        bin_path = token_file(data_dir, split)
        size = bin_path.stat().st_size if bin_path.is_file() else None
        if size != n_tokens * itemsize:
            found = "is missing" if size is None else f"holds {size // itemsize:,} tokens"
            raise UserError(f"{bin_path} {found} but {META_NAME} says {n_tokens:,}: {redo}")
    return meta


def check_data_fits(data_dir: Path, meta: dict, block_size: int) -> None:
    for split in SPLITS:
        n_tokens = meta[f"{split}_tokens"]
        if n_tokens <= block_size:
            raise UserError(
                f"block_size={block_size} does not fit the {split} split of {data_dir} "
                f"({n_tokens:,} tokens): lower block_size or use a larger data set"
            )


def read_tokens(data_dir: Path, meta: dict, split: str) -> np.memmap:
    return np.memmap(token_file(data_dir, split), dtype=meta["dtype"], mode="r")


def check_token_ids(tokens: np.ndarray, meta: dict, data_dir: Path, split: str) -> None:
    """Every id below meta.json's vocab_size: a larger one would index past the embedding table."""
    largest = int(tokens.max()) if len(tokens) else 0
    if largest >= int(meta["vocab_size"]):
        raise UserError(
            f"{token_file(data_dir, split)} holds token id {largest}, but {META_NAME} says vocab_size "
            f"{meta['vocab_size']}: the file is damaged or was prepared with another tokenizer; prepare "
            "the data set again"
        )


def read_checked_tokens(data_dir: Path, meta: dict, split: str) -> np.memmap:
    """A whole split, its ids checked (one pass over it: for the val split, not the train split)."""
    tokens = read_tokens(data_dir, meta, split)
    check_token_ids(tokens, meta, data_dir, split)
    return tokens


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    import torch

    tensor = torch.from_numpy(array)
    if device.type == "cuda":  # pinned memory lets the copy run asynchronously; needs CUDA: GPU only
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def get_batch(
    data_dir: Path, meta: dict, split: str, rng: np.random.Generator, batch_size: int, block_size: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """batch_size random windows of a split: inputs and their next tokens, each (B, block_size)."""
    # Opened anew for every batch: a long-lived np.memmap keeps every page it has read referenced,
    # so on a corpus of many GB the process's memory would keep growing.
    data = read_tokens(data_dir, meta, split)
    starts = rng.integers(0, len(data) - block_size, size=batch_size)
    windows = np.stack([data[s : s + block_size + 1] for s in starts]).astype(np.int64)
    check_token_ids(windows, meta, data_dir, split)  # every batch's: train.bin may be too large to scan
    x, y = np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])
    return to_device(x, device), to_device(y, device)
