"""What every data set shares: the token-file format, meta.json, tokenizers, downloads, CLI errors.

A prepared data set is a folder holding
  train.bin, val.bin  flat arrays of token ids (dtype from meta.json), read with np.memmap
  meta.json           the tokenizer, vocab_size, dtype and token counts; written last, so its
                      presence means the set is complete
"""
import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterable, Union

import numpy as np
import tiktoken

REPO_ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "val")
META_NAME = "meta.json"
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"

PathLike = Union[str, Path]


class DataError(Exception):
    """Bad input or environment, explained in one line for the person at the terminal."""


def run_cli(main: Callable[[], None]) -> None:
    """Run a prepare script's main(); expected failures end as one line on stderr and exit code 1."""
    try:
        main()
    except (DataError, OSError) as e:  # OSError messages already name the path and the reason
        sys.exit(f"error: {e}")


def dtype_for_vocab(vocab_size: int) -> str:
    """The smallest unsigned dtype that holds every id below vocab_size."""
    if vocab_size <= 2**16:
        return "uint16"
    if vocab_size <= 2**32:
        return "uint32"
    raise DataError(f"vocabulary of {vocab_size:,} tokens does not fit in uint32 token files")


# --- tokenizers -------------------------------------------------------------------------------


class Tokenizer:
    """Maps text to token ids and back; get_tokenizer(meta) builds the one a data set was made with."""

    vocab_size: int
    eot_token: int | None  # end-of-text id between documents; None where the vocabulary has none

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """UTF-8 bytes of ids; a BPE token can end mid-character, so streams decode these incrementally."""
        raise NotImplementedError


class CharTokenizer(Tokenizer):
    def __init__(self, chars: list[str]):
        self.itos = list(chars)
        self.stoi = {ch: i for i, ch in enumerate(self.itos)}
        self.vocab_size = len(self.itos)
        self.eot_token = None

    def encode(self, text: str) -> list[int]:
        missing = set(text) - self.stoi.keys()
        if missing:
            shown = " ".join(repr(ch) for ch in sorted(missing)[:20])
            raise ValueError(f"{len(missing)} character(s) not in the vocabulary of the training text: {shown}")
        return [self.stoi[ch] for ch in text]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.itos[i] for i in ids)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.decode(ids).encode("utf-8")


class TiktokenTokenizer(Tokenizer):
    def __init__(self, encoding: str):
        self.enc = load_tiktoken(encoding)
        self.vocab_size = self.enc.n_vocab
        self.eot_token = self.enc.eot_token

    def encode(self, text: str) -> list[int]:
        # a user may type "<|endoftext|>" in a prompt to mean a document boundary
        return self.enc.encode(text, allowed_special="all")

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.enc.decode_bytes(list(ids))


def load_tiktoken(name: str) -> tiktoken.Encoding:
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # on first use tiktoken downloads its files; any failure there lands here
        raise DataError(
            f"cannot load the tiktoken encoding {name!r} ({type(e).__name__}: {e}); connect to the network "
            "once, or set TIKTOKEN_CACHE_DIR to a folder holding its cached files") from e


class HFTokenizer(Tokenizer):
    """The Hugging Face tokenizer of a model directory (checkpoints made by convert.py import).
    transformers is an optional dependency, imported only here."""

    def __init__(self, path: str):
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise DataError(f"this checkpoint uses the Hugging Face tokenizer in {path}: "
                            "pip install transformers") from e
        if not Path(path).is_dir():
            raise DataError(f"the Hugging Face tokenizer folder {path} named in the checkpoint does not exist")
        try:  # local_files_only: nothing here may turn into a download attempt
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot load a Hugging Face tokenizer from {path} ({type(e).__name__}: {e}); put the "
                            "model's tokenizer files (tokenizer.json, tokenizer_config.json, ...) there") from e
        self.vocab_size = len(self.tok)
        self.eot_token = self.tok.eos_token_id
        self._anchor = self.tok.encode("a", add_special_tokens=False)[-1:]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)  # with the model's own special tokens (Llama: a leading BOS)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        # Decoded after an anchor token, which is then cut off: decoded alone, a SentencePiece token loses
        # its leading space. A character split across tokens still streams as U+FFFD: decode has no state.
        anchor = self.tok.decode(self._anchor)
        return self.tok.decode(self._anchor + list(ids))[len(anchor):].encode("utf-8")


def get_tokenizer(meta: dict) -> Tokenizer:
    kind = meta.get("tokenizer")
    if kind == "char":
        return CharTokenizer(meta["chars"])
    if kind == "tiktoken":
        return TiktokenTokenizer(meta["encoding"])
    if kind == "hf":
        return HFTokenizer(meta["path"])
    raise ValueError(f"unknown tokenizer {kind!r} in meta.json: expected 'char', 'tiktoken' or 'hf'")


# --- meta.json and token files ----------------------------------------------------------------


def load_meta(data_dir: PathLike) -> dict:
    data_dir = Path(data_dir)
    path = data_dir / META_NAME
    if not path.is_file():
        script = REPO_ROOT / "data" / data_dir.name / "prepare.py"
        command = (f"python data/{data_dir.name}/prepare.py" if script.is_file()
                   else f"python data/<name>/prepare.py --out_dir {data_dir}")
        raise FileNotFoundError(f"{path} not found: the data set is not prepared (or its preparation did "
                                f"not finish); run {command}")
    return json.loads(path.read_text(encoding="utf-8"))


def _fsync_dir(path: Path) -> None:
    """Make renames inside path durable (POSIX only; Windows cannot open a folder)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_meta(data_dir: PathLike, meta: dict) -> None:
    _write_atomic(Path(data_dir) / META_NAME, (json.dumps(meta, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


class TokenSetWriter:
    """Appends token ids to train.bin and val.bin under temporary names; commit() publishes them.

    Until commit() the folder keeps the set it had before, untouched; commit() removes meta.json,
    renames the token files into place and writes meta.json last. So a failed or killed run never
    leaves a half-written train.bin that looks complete. Files are appended to, not memory-mapped:
    the written pages of a memmap count in the process's RSS, which would then grow with the corpus.
    """

    def __init__(self, out_dir: PathLike, dtype: str):
        self.out_dir = Path(out_dir)
        self.dtype = np.dtype(dtype)
        self.token_counts = dict.fromkeys(SPLITS, 0)
        self._files = {}
        self._committed = False

    def _tmp_path(self, split: str) -> Path:
        return self.out_dir / f"{split}.bin.tmp"

    def __enter__(self) -> "TokenSetWriter":
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._files = {split: open(self._tmp_path(split), "wb") for split in SPLITS}
        return self

    def write(self, split: str, ids: Union[np.ndarray, list[int]]) -> None:
        array = np.asarray(ids, dtype=self.dtype)  # raises OverflowError rather than wrap an id around
        self._files[split].write(array.tobytes())
        self.token_counts[split] += array.size

    def commit(self, meta: dict) -> dict:
        """Publish the token files and meta.json (meta plus dtype and token counts); returns the meta written."""
        for split, count in self.token_counts.items():
            if count == 0:
                raise DataError(f"the {split} split came out empty: the input is too small to split")
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        meta = {**meta, "dtype": self.dtype.name,
                **{f"{split}_tokens": count for split, count in self.token_counts.items()}}
        (self.out_dir / META_NAME).unlink(missing_ok=True)  # from here on the old set reads as incomplete
        for split in SPLITS:
            os.replace(self._tmp_path(split), self.out_dir / f"{split}.bin")
        write_meta(self.out_dir, meta)
        self._committed = True
        return meta

    def __exit__(self, *exc_info) -> None:
        for f in self._files.values():
            f.close()
        if not self._committed:
            for split in SPLITS:
                self._tmp_path(split).unlink(missing_ok=True)


# --- text inputs (the Shakespeare scripts) ----------------------------------------------------


def add_text_input_args(parser: argparse.ArgumentParser, default_out_dir: Path) -> None:
    parser.add_argument("--input", type=Path, help="local text file to use instead of downloading one")
    parser.add_argument("--out_dir", type=Path, default=default_out_dir,
                        help="where train.bin, val.bin and meta.json go (default: %(default)s)")
    parser.add_argument("--url", default=SHAKESPEARE_URL, help="where to download the text if there is no local copy")


def download(url: str, dest: Path) -> None:
    """Fetch url into dest; dest appears only once complete."""
    print(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            data = response.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise DataError(f"could not download {url} ({reason}): connect to the network and re-run, "
                        "or pass --input PATH to a local copy of the text") from e
    dest.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(dest, data)


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
