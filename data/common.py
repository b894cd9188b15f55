"""Data preparation shared by the prepare scripts: writing a prepared set (its format and names are
dataset.py's, which reads it), downloads, text inputs."""

import argparse
import json
import os
import urllib.error
import urllib.request
from itertools import product
from pathlib import Path

import numpy as np

from dataset import CHAT_KINDS, KIND_DTYPES, META_NAME, SPLITS, token_file
from runtime import PathLike, UserError, atomic_write

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


class DataError(UserError):
    """Bad input for a prepare script, or an environment fault while reading or writing it."""


def dtype_for_vocab(vocab_size: int) -> str:
    """The smallest unsigned dtype that holds every id below vocab_size."""
    if vocab_size <= 2**16:
        return "uint16"
    if vocab_size <= 2**32:
        return "uint32"
    raise DataError(f"vocabulary of {vocab_size:,} tokens does not fit in uint32 token files")


class TokenSetWriter:
    """Appends token ids to train.bin and val.bin under temporary names; commit() publishes them.
    With chat=True also each split's loss mask and conversation starts (see dataset.py).

    Until commit() the folder keeps the set it had before, untouched; commit() removes meta.json,
    renames the token files into place and writes meta.json last. So a failed or killed run never
    leaves a half-written train.bin that looks complete. Files are appended to, not memory-mapped:
    the written pages of a memmap count in the process's RSS, which would then grow with the corpus.
    """

    def __init__(self, out_dir: PathLike, dtype: str, chat: bool = False):
        self.out_dir = Path(out_dir)
        self.dtypes = {**KIND_DTYPES, "tokens": np.dtype(dtype).name}
        self.kinds = CHAT_KINDS if chat else ("tokens",)
        self.token_counts = dict.fromkeys(SPLITS, 0)
        self._files = {}
        self._committed = False

    def _paths(self) -> dict[tuple[str, str], tuple[Path, Path]]:
        """(temporary, final) path of every file the set consists of, by (split, kind)."""
        finals = {key: token_file(self.out_dir, *key) for key in product(SPLITS, self.kinds)}
        return {key: (final.with_suffix(".bin.tmp"), final) for key, final in finals.items()}

    def __enter__(self) -> "TokenSetWriter":
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._files = {key: open(tmp, "wb") for key, (tmp, _) in self._paths().items()}
        if "starts" in self.kinds:  # the first conversation starts at 0
            for split in SPLITS:
                self._files[split, "starts"].write(np.zeros(1, dtype=np.int64).tobytes())
        return self

    def write(
        self, split: str, ids: np.ndarray | list[int], mask: np.ndarray | list[int] | None = None
    ) -> None:
        """Append ids; in a chat set, one whole conversation and its loss mask (1: learned)."""
        array = np.asarray(ids, dtype=self.dtypes["tokens"])  # OverflowError rather than wrap an id around
        self._files[split, "tokens"].write(array.tobytes())
        self.token_counts[split] += array.size
        if "mask" in self.kinds:
            if mask is None or len(mask) != array.size:
                raise ValueError("a chat set's write needs a loss mask of one value per token")
            self._files[split, "mask"].write(np.asarray(mask, dtype=np.uint8).tobytes())
            self._files[split, "starts"].write(np.array([self.token_counts[split]], dtype=np.int64).tobytes())

    def commit(self, meta: dict) -> dict:
        """Publish the token files and meta.json (meta, dtype and token counts); returns the meta written."""
        for split, count in self.token_counts.items():
            if count == 0:
                raise DataError(f"the {split} split came out empty: the input is too small to split")
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        counts = {f"{split}_tokens": count for split, count in self.token_counts.items()}
        meta = {**meta, "dtype": self.dtypes["tokens"], **counts}
        (self.out_dir / META_NAME).unlink(missing_ok=True)  # from here on the old set reads as incomplete
        for tmp, final in self._paths().values():
            os.replace(tmp, final)
        text = json.dumps(meta, indent=1, ensure_ascii=False) + "\n"
        atomic_write(self.out_dir / META_NAME, lambda f: f.write(text.encode("utf-8")))
        self._committed = True
        return meta

    def __exit__(self, *exc_info) -> None:
        for f in self._files.values():
            f.close()
        if not self._committed:
            for tmp, _ in self._paths().values():
                tmp.unlink(missing_ok=True)


def text_parser(doc: str, default_out_dir: Path) -> argparse.ArgumentParser:
    """A text prepare script's parser: its docstring as the help, and --input, --out_dir and --url."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, help="local text file to use instead of downloading one")
    parser.add_argument(
        "--out_dir",
        type=Path,
        default=default_out_dir,
        help="where train.bin, val.bin and meta.json go (default: %(default)s)",
    )
    parser.add_argument(
        "--url", default=SHAKESPEARE_URL, help="where to download the text if there is no local copy"
    )
    return parser


def download(
    url: str, dest: Path, offline_hint: str = "or pass --input PATH to a local copy of the text"
) -> None:
    """Fetch url into dest; dest appears only once complete."""
    print(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            data = response.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise DataError(
            f"could not download {url} ({reason}): connect to the network and re-run, {offline_hint}"
        ) from e
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dest, lambda f: f.write(data))


def read_input_text(args: argparse.Namespace) -> str:
    """The text named by --input, else out_dir/input.txt, downloaded from --url the first time."""
    path = args.input
    if path is None:
        path = args.out_dir / "input.txt"
        if not path.is_file():
            download(args.url, path)
    if not path.is_file():
        raise DataError(f"--input {path} does not exist or is not a file")
    try:
        with open(path, encoding="utf-8", newline="") as f:  # newline="": keep "\r\n" as written
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e})") from e
    if not text:
        raise DataError(f"{path} is empty: point --input at a file with text in it")
    return text


def split_text(text: str, train_fraction: float = 0.9) -> tuple[str, str]:
    """Split by characters: the first train_fraction for training, the rest for validation."""
    n = int(len(text) * train_fraction)
    return text[:n], text[n:]
