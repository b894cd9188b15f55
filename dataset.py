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
            found = "is missing" if size is None else f"holds {size / itemsize:,.15g} tokens"
            raise UserError(f"{bin_path} {found} but {META_NAME} says {n_tokens:,}: {redo}")
    if meta.get("chat"):
        check_chat_files(data_dir, meta, path, redo)
    return meta


def check_chat_files(data_dir: Path, meta: dict, path: Path, redo: str) -> None:
    """A chat set's mask (a byte per token) and conversation starts (n + 1 offsets, from 0 to the token
    count, rising): the sizes meta.json gives, and starts that cut the token file into conversations."""
    for split in SPLITS:
        if not isinstance(meta.get(f"{split}_conversations"), int):
            raise UserError(f"{path} has no {split}_conversations count of a chat set: {redo}")
        n_tokens, n_conversations = meta[f"{split}_tokens"], meta[f"{split}_conversations"]
        for kind, count, what in (
            ("mask", n_tokens, "mask values"),
            ("starts", n_conversations + 1, "offsets"),
        ):
            bin_path = token_file(data_dir, split, kind)
            size = bin_path.stat().st_size if bin_path.is_file() else None
            itemsize = np.dtype(KIND_DTYPES[kind]).itemsize
            if size != count * itemsize:
                found = "is missing" if size is None else f"holds {size / itemsize:,.15g} {what}"
                raise UserError(f"{bin_path} {found} but {META_NAME} says {count:,}: {redo}")
        mask_path = token_file(data_dir, split, "mask")
        largest = int(np.memmap(mask_path, dtype=np.uint8, mode="r").max()) if n_tokens else 0
        if largest > 1:  # a weight of the loss, were it used
            raise UserError(f"{mask_path} holds a byte {largest}; a loss mask's bytes are 0 or 1: {redo}")
        starts = read_starts(data_dir, split)
        if starts[0] != 0 or starts[-1] != n_tokens or np.any(np.diff(starts) < 1):
            raise UserError(
                f"{token_file(data_dir, split, 'starts')} does not cut {split}.bin's {n_tokens:,} tokens "
                f"into conversations (offsets from 0 to the token count, rising): {redo}"
            )


def check_data_fits(data_dir: Path, meta: dict, block_size: int) -> None:
    """A text split must be longer than a window; a chat set's rows hold whole conversations instead,
    and ChatRows says how many fit."""
    if meta.get("chat"):
        return
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


# --- chat sets ------------------------------------------------------------------------------------

Row = list[int]  # the conversations of one batch row, by their index in the split


def read_starts(data_dir: Path, split: str) -> np.ndarray:
    """A chat split's conversation starts, then its token count: (n + 1,) int64, read into memory."""
    return np.fromfile(token_file(data_dir, split, "starts"), dtype=np.int64)


class ChatRows:
    """Batch rows of whole conversations from one split of a chat set. Packed: conversations drawn one
    after another into a row until the next drawn does not fit, padding in the rest; or one per row.
    Packed is the default: it fills far more of each row with learned tokens (measured by
    bench_features.py --chat_packing; figures in docs/training.md).

    A conversation of L tokens takes L - 1 positions of a row: its tokens but the last as inputs, its
    tokens but the first as targets, so no target crosses into the next conversation. One longer than
    block_size + 1 tokens fits no row: it is left out of the draw and counted (left_out)."""

    def __init__(self, data_dir: Path, meta: dict, split: str, block_size: int, packed: bool = True):
        self.data_dir, self.meta, self.split = data_dir, meta, split
        self.block_size, self.packed = block_size, packed
        self.starts = read_starts(data_dir, split)
        lengths = np.diff(self.starts)
        # A one-token conversation has no target: nothing to learn, and it would take no room in a row.
        self.fitting = np.flatnonzero((lengths >= 2) & (lengths <= block_size + 1))
        self.left_out = int(np.sum(lengths > block_size + 1))
        if not len(self.fitting):
            raise UserError(
                f"no {split} conversation of {data_dir} fits a row of block_size {block_size} (a row holds "
                f"{block_size + 1} tokens): raise block_size, or prepare shorter conversations"
            )

    def positions(self, conversation: int) -> int:
        return int(self.starts[conversation + 1] - self.starts[conversation]) - 1

    def draw(self, rng: np.random.Generator) -> Row:
        """One row's conversations, each drawn uniformly (with replacement) from those that fit."""
        row, free = [], self.block_size
        while True:
            conversation = int(self.fitting[rng.integers(len(self.fitting))])
            if self.positions(conversation) > free:
                return row
            row.append(conversation)
            free -= self.positions(conversation)
            if not self.packed:
                return row

    def in_order(self) -> list[Row]:
        """Every conversation that fits, once and in order, in rows as draw() fills them: the rows of an
        evaluation over the whole split."""
        rows, row, free = [], [], self.block_size
        for conversation in map(int, self.fitting):
            if row and (self.positions(conversation) > free or not self.packed):
                rows, row, free = rows + [row], [], self.block_size
            row.append(conversation)
            free -= self.positions(conversation)
        return rows + [row]

    def _mask(self) -> np.memmap:
        return np.memmap(token_file(self.data_dir, self.split, "mask"), dtype=np.uint8, mode="r")

    def learned(self, rows: list[Row]) -> int:
        """How many learned targets rows hold: a conversation's mask but its first token's."""
        mask = self._mask()
        return sum(int(mask[self.starts[c] + 1 : self.starts[c + 1]].sum()) for row in rows for c in row)

    def batch(self, rows: list[Row], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs, targets (-1 where not learned) and segments, each (len(rows), block_size): segment s
        is a row's s-th conversation, and the padding after the last one is a segment of its own."""
        tokens, mask = read_tokens(self.data_dir, self.meta, self.split), self._mask()  # anew: see get_batch
        shape = (len(rows), self.block_size)
        x, y, segments = np.zeros(shape, np.int64), np.full(shape, -1, np.int64), np.zeros(shape, np.int64)
        for r, row in enumerate(rows):
            at = 0
            for s, c in enumerate(row):
                start, end, n = self.starts[c], self.starts[c + 1], self.positions(c)
                ids = tokens[start:end].astype(np.int64)
                x[r, at : at + n] = ids[:-1]
                y[r, at : at + n] = np.where(mask[start + 1 : end] == 1, ids[1:], -1)
                segments[r, at : at + n] = s
                at += n
            segments[r, at:] = len(row)
        check_token_ids(np.concatenate([x, y]), self.meta, self.data_dir, self.split)
        return to_device(x, device), to_device(y, device), to_device(segments, device)
