"""Tokenizers: text to token ids and back, as recorded in a data set's meta.json and in checkpoints.

get_tokenizer(meta)    the tokenizer meta describes: "char" (the characters of the training text),
                       "tiktoken" (a named encoding, e.g. gpt2) or "hf" (a Hugging Face tokenizer folder)
"""

from collections.abc import Iterable
from pathlib import Path

import tiktoken

from runtime import UserError

# The meta.json entries that describe a tokenizer; the rest describe the token files.
TOKENIZER_KEYS = ("tokenizer", "chars", "encoding", "eot_token", "path", "vocab_size")


def tokenizer_entry(meta: dict) -> dict:
    """What a checkpoint records of its data set's meta.json: the tokenizer, not the token files."""
    return {key: meta[key] for key in TOKENIZER_KEYS if key in meta}


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
            raise ValueError(
                f"{len(missing)} character(s) not in the vocabulary of the training text: {shown}"
            )
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
        raise UserError(
            f"cannot load the tiktoken encoding {name!r} ({type(e).__name__}: {e}); connect to the network "
            "once, or set TIKTOKEN_CACHE_DIR to a folder holding its cached files"
        ) from e


class HFTokenizer(Tokenizer):
    """The Hugging Face tokenizer of a model directory (checkpoints made by convert.py import).
    transformers is an optional dependency, imported only here."""

    def __init__(self, path: str):
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise UserError(
                f"this checkpoint uses the Hugging Face tokenizer in {path}: pip install transformers"
            ) from e
        if not Path(path).is_dir():
            raise UserError(
                f"the Hugging Face tokenizer folder {path} named in the checkpoint does not exist"
            )
        try:  # local_files_only: nothing here may turn into a download attempt
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(
                f"cannot load a Hugging Face tokenizer from {path} ({type(e).__name__}: {e}); put the "
                "model's tokenizer files (tokenizer.json, tokenizer_config.json, ...) there"
            ) from e
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
        return self.tok.decode(self._anchor + list(ids))[len(anchor) :].encode("utf-8")


def get_tokenizer(meta: dict) -> Tokenizer:
    kind = meta.get("tokenizer")
    if kind == "char":
        return CharTokenizer(meta["chars"])
    if kind == "tiktoken":
        return TiktokenTokenizer(meta["encoding"])
    if kind == "hf":
        return HFTokenizer(meta["path"])
    raise ValueError(f"unknown tokenizer {kind!r} in meta.json: expected 'char', 'tiktoken' or 'hf'")
